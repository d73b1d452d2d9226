"""Scaled dot-product attention over packed documents: one function, three kernels.

Every kernel applies the same rule: a query sees the keys at or before it that carry the same
document id. Padding carries document id -1, so real tokens never see it; padding outputs are
ignored and only kept finite (zeros, or the padding query seeing itself under an explicit mask).

- flash: flash-attn's varlen kernel on the non-padding tokens, documents cut by cu_seqlens.
- sdpa:  torch's fused scaled_dot_product_attention with is_causal on each document, a view of the
         flattened batch; an explicit mask only when decoding against a cache.
- math:  explicit matmuls and softmax with the dense mask, so FLOP counters see the attention matmuls.

The fused kernels cost Σ Lᵢ² over the documents, not T² per row, and build no [T, T] mask. They
read where documents lie from `Documents`, computed on the host from the CPU batch, so no kernel
waits for the device to say how many tokens or documents there are.
"""

import contextlib
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # optional CUDA-only dependency; "auto" falls back to sdpa
    flash_attn_func = flash_attn_varlen_func = None


class Documents:
    """Where the documents of a [B, T] batch lie, worked out once per batch on the host from the CPU
    document ids (a document is a run of one id >= 0 within a row), so that no kernel has to read
    them back from the device."""

    def __init__(self, doc_ids: torch.Tensor):
        self.doc_ids = doc_ids
        ids = doc_ids.numpy()
        self.rows, self.width = ids.shape
        real = ids >= 0
        first, last = real.copy(), real.copy()
        first[:, 1:] &= ids[:, 1:] != ids[:, :-1]
        last[:, :-1] &= ids[:, :-1] != ids[:, 1:]
        # Each document's start in the flattened [B*T] batch, and its length, in order.
        self.starts = np.flatnonzero(first)
        self.lengths = np.flatnonzero(last) - self.starts + 1
        # The flattened batch cut into consecutive pieces: a document's length, or minus a padding run's.
        ends = self.starts + self.lengths
        gaps = self.starts - np.concatenate([[0], ends[:-1]])
        pieces = np.stack([-gaps, self.lengths], axis=1).ravel().tolist() + [int(ends[-1:].sum()) - ids.size]
        self.pieces = [piece for piece in pieces if piece]

    @property
    def one_per_row(self) -> bool:
        """Each row is one document without padding: plain causal attention, no mask at all."""
        return len(self.lengths) == self.rows and bool((self.lengths == self.width).all())

    def varlen(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(indices of the non-padding tokens in the flattened [B*T] batch, int32 cu_seqlens of the
        documents among them, longest document) as flash_attn_varlen_func wants them."""
        indices = np.concatenate([np.arange(s, s + n) for s, n in zip(self.starts, self.lengths)] or [[]])
        cu_seqlens = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int32)
        max_seqlen = int(self.lengths.max()) if len(self.lengths) else 0
        return _to_device(indices.astype(np.int64), device), _to_device(cu_seqlens, device), max_seqlen


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cuda":  # from pinned memory the copy is queued; from pageable memory it would wait
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor


class DocumentMask:
    """Which keys each query may attend to in one forward pass, shared by all layers.

    Queries are the last Tq of the Tk keys (Tq < Tk when decoding against a KV cache). Document
    ids are [B, Tq] and [B, Tk] longs; within a row a document is a contiguous run of one id.
    No document ids, or documents that each fill a row, mean plain causal attention.
    `documents` is the host's account of the q_doc_ids; without it, it is read back once per forward.
    """

    def __init__(self, q_doc_ids: torch.Tensor | None = None, k_doc_ids: torch.Tensor | None = None,
                 documents: Documents | None = None):
        if documents is not None and (q_doc_ids is None or documents.doc_ids.shape != q_doc_ids.shape):
            raise ValueError(f"documents describe a [{documents.rows}, {documents.width}] batch, doc_ids are "
                             f"{None if q_doc_ids is None else list(q_doc_ids.shape)}")
        self.q_doc_ids = None if documents is not None and documents.one_per_row else q_doc_ids
        self.k_doc_ids = self.q_doc_ids if k_doc_ids is None else k_doc_ids
        self._documents = documents
        self._dense = None

    @property
    def causal_only(self) -> bool:
        return self.q_doc_ids is None

    @cached_property
    def documents(self) -> Documents:
        # A caller without host-side documents (RL rollouts, generation's prompt) pays one read-back here.
        return self._documents or Documents(self.q_doc_ids.cpu())

    @property
    def dense(self) -> torch.Tensor:
        """[B, 1, Tq, Tk] bool, True where the query may attend to the key; built once, shared by the layers."""
        # Cached by hand: functools.cached_property takes a lock on Python 3.11, which torch.compile cannot trace.
        if self._dense is None:
            q_len, k_len = self.q_doc_ids.shape[1], self.k_doc_ids.shape[1]
            device = self.q_doc_ids.device
            q_slot = torch.arange(k_len - q_len, k_len, device=device)
            causal = torch.arange(k_len, device=device) <= q_slot[:, None]
            same_doc = self.q_doc_ids[:, :, None] == self.k_doc_ids[:, None, :]
            self._dense = (same_doc & causal)[:, None]
        return self._dense

    @cached_property
    def varlen(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.documents.varlen(self.q_doc_ids.device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask,
           impl: str = "auto", dropout_p: float = 0.0) -> torch.Tensor:
    """q [B, Tq, heads, head_dim], k and v [B, Tk, kv_heads, head_dim] -> [B, Tq, heads, head_dim].

    kv_heads divides heads; query head h reads KV head h // (heads / kv_heads) (grouped-query attention).
    """
    impl = resolve_impl(impl, q, k)
    if impl == "math":
        return _math(q, k, v, mask, dropout_p)
    if mask.causal_only:
        if impl == "flash":
            return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
        return _transposed(F.scaled_dot_product_attention, q, k, v, dropout_p=dropout_p, is_causal=True,
                           enable_gqa=True)
    if q.shape[1] < k.shape[1]:  # decoding against a cache: a few queries, a mask of Tq × Tk
        return _grouped_sdpa(q, k, v, mask, dropout_p)
    if impl == "flash":
        return _flash_varlen(q, k, v, mask, dropout_p)
    # No flash-attn (a CPU, or CUDA without the package): causal SDPA per document, the fastest exact kernel measured
    # (bench/attention.py: ~10x the dense mask at T=4096); FlexAttention has no CPU backward in torch 2.13 and runs
    # only compiled; documents padded and batched by length measured slower (index gathers).
    return _by_document(q, k, v, mask, dropout_p)


def resolve_impl(requested: str, q: torch.Tensor, k: torch.Tensor) -> str:
    flash_usable = (flash_attn_func is not None and q.is_cuda
                    and q.dtype in (torch.float16, torch.bfloat16)
                    and torch.cuda.get_device_capability(q.device)[0] >= 8)  # flash-attn refuses V100, T4: SDPA
    if requested == "flash" and not flash_usable:
        raise RuntimeError("attn_impl='flash' needs the flash-attn package and CUDA fp16/bf16 "
                           f"activations; got device {q.device}, dtype {q.dtype}, "
                           f"flash-attn {'missing' if flash_attn_func is None else 'installed'}")
    if requested in ("auto", "flash"):
        # Decoding against a cache (fewer queries than keys) goes through SDPA's explicit mask.
        return "flash" if flash_usable and q.shape[1] == k.shape[1] else "sdpa"
    return requested


def _flash_varlen(q, k, v, mask, dropout_p):
    indices, cu_seqlens, max_seqlen = mask.varlen
    batch, seq_len, heads, head_dim = q.shape
    padded = q.new_zeros(batch * seq_len, heads, head_dim)  # padding positions get zeros
    if max_seqlen == 0:  # all padding (evaluation's last batch on a rank): nothing to attend
        return padded.view(batch, seq_len, heads, head_dim)
    q, k, v = (t.flatten(0, 1)[indices] for t in (q, k, v))
    out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                 dropout_p=dropout_p, causal=True)
    return padded.index_copy(0, indices, out).view(batch, seq_len, heads, head_dim)


def _by_document(q, k, v, mask, dropout_p):
    if torch.compiler.is_compiling():
        # The documents' layout changes every batch: traced, it would retrace the block each time; as an
        # opaque op it is an input. Its backward runs the forward again (the op keeps no autograd graph).
        seed = torch.randint(2**62, (), dtype=torch.long) if dropout_p else torch.zeros((), dtype=torch.long)
        return by_document(q, k, v, mask.documents.doc_ids, dropout_p, seed)
    return _attend_pieces(q, k, v, mask.documents.pieces, dropout_p)


def _attend_pieces(q, k, v, pieces: list[int], dropout_p):
    """Causal SDPA on each document of the flattened batch; zeros on padding."""
    outs = []
    for piece, *qkv in zip(pieces, *(t.flatten(0, 1).split([abs(p) for p in pieces]) for t in (q, k, v))):
        if piece > 0:
            doc_q, doc_k, doc_v = (t[None] for t in qkv)
            outs.append(_transposed(F.scaled_dot_product_attention, doc_q, doc_k, doc_v, dropout_p=dropout_p,
                                    is_causal=True, enable_gqa=True)[0])
        else:
            outs.append(torch.zeros_like(qkv[0]))
    return torch.cat(outs).view_as(q)


@torch.library.custom_op("zerostage::attend_by_document", mutates_args=())
def by_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor, dropout_p: float,
                seed: torch.Tensor) -> torch.Tensor:
    """_attend_pieces as one op for torch.compile; doc_ids: the batch's [B, T] document ids on the CPU."""
    with _seeded(seed, q.device, dropout_p):
        return _attend_pieces(q, k, v, Documents(doc_ids).pieces, dropout_p)


@torch.library.custom_op("zerostage::attend_by_document_backward", mutates_args=())
def _by_document_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          doc_ids: torch.Tensor, dropout_p: float,
                          seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    # Recomputing under autograd reuses SDPA's own backward per document (a hand-written one would hold each
    # document's L² probabilities); an op's kernel runs with autograd's dispatch key excluded, hence the guard.
    autograd = torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False)
    with autograd, torch.enable_grad(), _seeded(seed, q.device, dropout_p):
        out = _attend_pieces(*inputs, Documents(doc_ids).pieces, dropout_p)
    return torch.autograd.grad(out, inputs, grad)


@contextlib.contextmanager
def _seeded(seed: torch.Tensor, device: torch.device, dropout_p: float):
    """The same dropout in the forward and in the backward's recomputation: the RNG reseeded, then restored."""
    if not dropout_p:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(seed))
        yield


@by_document.register_fake
def _(q, k, v, doc_ids, dropout_p, seed):
    return torch.empty_like(q)


@_by_document_backward.register_fake
def _(grad, q, k, v, doc_ids, dropout_p, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _backward(ctx, grad):
    q, k, v, doc_ids, seed = ctx.saved_tensors
    return *_by_document_backward(grad, q, k, v, doc_ids, ctx.dropout_p, seed), None, None, None


def _save(ctx, inputs, output):
    q, k, v, doc_ids, ctx.dropout_p, seed = inputs
    ctx.save_for_backward(q, k, v, doc_ids, seed)


by_document.register_autograd(_backward, setup_context=_save)


def _grouped_sdpa(q, k, v, mask, dropout_p):
    """SDPA with the dense mask, each KV head attended by its group of query heads stacked as more queries:
    no copy of the cache's keys and values (copying KV heads cost 13% of a decode; enable_gqa with a mask
    falls back to the math kernel). The mask is repeated per group instead, Tq × Tk, small when decoding."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads, k_len = k.shape[2], k.shape[1]
    group = heads // kv_heads
    grouped_q = q.view(batch, q_len, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4).flatten(2, 3)
    grouped_mask = mask.dense[:, :, None].expand(batch, 1, group, q_len, k_len).flatten(2, 3)
    out = F.scaled_dot_product_attention(grouped_q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=grouped_mask,
                                         dropout_p=dropout_p)
    return out.view(batch, kv_heads, group, q_len, head_dim).permute(0, 3, 1, 2, 4).flatten(2, 3)


def _dense_sdpa(q, k, v, mask, dropout_p):
    """The dense [B, 1, T, T] mask path that per-document attention replaced: bench/attention.py's baseline."""
    # With an explicit mask, enable_gqa forces the slow math backend; copying KV heads keeps
    # the memory-efficient kernel.
    k, v = _repeat_kv(k, q.shape[2]), _repeat_kv(v, q.shape[2])
    return _transposed(F.scaled_dot_product_attention, q, k, v, attn_mask=mask.dense, dropout_p=dropout_p)


def _transposed(kernel, q, k, v, **options):
    """kernel on [B, heads, T, D] views of [B, T, heads, D] tensors, its output back in that layout."""
    return kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **options).transpose(1, 2)


def _math(q, k, v, mask, dropout_p):
    k, v = _repeat_kv(k, q.shape[2]), _repeat_kv(v, q.shape[2])
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask.causal_only:
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    else:
        allowed = mask.dense
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = F.dropout(scores.float().softmax(dim=-1), p=dropout_p).to(q.dtype)
    return (probs @ v).transpose(1, 2)


def _repeat_kv(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, kv_heads, D] -> [B, T, heads, D], each KV head serving a contiguous group of queries."""
    return kv.repeat_interleave(heads // kv.shape[2], dim=2)
