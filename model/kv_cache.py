"""Preallocated per-layer key/value cache for incremental decoding."""

import torch


class KVCache:
    """Keys and values of every token seen so far, with their document ids.

    Storage is allocated on first use with the dtype and device of the first keys, so the cache
    follows the model's precision (including autocast) without being told. Each forward call first
    reserves slots with `append_doc_ids`, then every layer writes its keys and values into them.
    """

    def __init__(self, num_layers: int, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.doc_ids: torch.Tensor | None = None
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def append_doc_ids(self, doc_ids: torch.Tensor) -> torch.Tensor:
        """Reserve slots for doc_ids [B, T]; returns the document ids of all cached keys [B, length]."""
        batch, new = doc_ids.shape
        if self.length + new > self.capacity:
            raise ValueError(f"KV cache overflow: {self.length} cached + {new} new tokens > "
                             f"capacity {self.capacity}")
        if self.doc_ids is None:
            self.doc_ids = doc_ids.new_full((batch, self.capacity), -1)
        self.doc_ids[:, self.length:self.length + new] = doc_ids
        self.length += new
        return self.doc_ids[:, :self.length]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, T, kv_heads, head_dim] in the slots just reserved; return all cached ones."""
        if self.keys[layer] is None:
            batch, _, heads, head_dim = k.shape
            self.keys[layer] = k.new_zeros(batch, self.capacity, heads, head_dim)
            self.values[layer] = v.new_zeros(batch, self.capacity, heads, head_dim)
        start = self.length - k.shape[1]
        self.keys[layer][:, start:self.length] = k
        self.values[layer][:, start:self.length] = v
        return self.keys[layer][:, :self.length], self.values[layer][:, :self.length]

    def repeat_rows(self, repeats: int) -> None:
        """Each row becomes `repeats` consecutive rows with the same cached tokens (a prompt's answers share it).
        Layer by layer, the filled slots only: the old and the new storage of one layer at a time are alive."""
        if self.doc_ids is None:
            raise ValueError("KVCache.repeat_rows: nothing is cached yet")
        self.doc_ids = self.doc_ids.repeat_interleave(repeats, dim=0)
        for stored in (self.keys, self.values):
            for layer, old in enumerate(stored):
                rows, capacity, *head = old.shape
                new = old.new_zeros(rows * repeats, capacity, *head)
                new.view(rows, repeats, capacity, *head)[:, :, :self.length] = old[:, None, :self.length]
                stored[layer] = new
