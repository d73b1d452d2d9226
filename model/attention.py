"""Scaled dot-product attention over packed documents: one function, three kernels.

Every kernel applies the same rule: a query sees the keys at or before it that carry the same
document id. Padding carries document id -1, so real tokens never see it, while a padding query
still sees itself and so never produces a NaN.

- flash: flash-attn's varlen kernel on the non-padding tokens, documents cut by cu_seqlens.
- sdpa:  torch's fused scaled_dot_product_attention with a boolean mask.
- math:  explicit matmuls and softmax, so FLOP counters see the attention matmuls.
"""

from functools import cached_property

import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # optional CUDA-only dependency; "auto" falls back to sdpa
    flash_attn_func = flash_attn_varlen_func = None


class DocumentMask:
    """Which keys each query may attend to in one forward pass, shared by all layers.

    Queries are the last Tq of the Tk keys (Tq < Tk when decoding against a KV cache). Document
    ids are [B, Tq] and [B, Tk] longs; within a row a document is a contiguous run of one id.
    No document ids means one document per row and no padding: plain causal attention.
    """

    def __init__(self, q_doc_ids: torch.Tensor | None = None, k_doc_ids: torch.Tensor | None = None):
        self.q_doc_ids = q_doc_ids
        self.k_doc_ids = q_doc_ids if k_doc_ids is None else k_doc_ids

    @property
    def causal_only(self) -> bool:
        return self.q_doc_ids is None

    @cached_property
    def dense(self) -> torch.Tensor:
        """[B, 1, Tq, Tk] bool, True where the query may attend to the key."""
        q_len, k_len = self.q_doc_ids.shape[1], self.k_doc_ids.shape[1]
        device = self.q_doc_ids.device
        q_slot = torch.arange(k_len - q_len, k_len, device=device)
        causal = torch.arange(k_len, device=device) <= q_slot[:, None]
        same_doc = self.q_doc_ids[:, :, None] == self.k_doc_ids[:, None, :]
        return (same_doc & causal)[:, None]

    @cached_property
    def varlen(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(indices of non-padding tokens in the flattened [B*T] batch, int32 cu_seqlens of the
        documents among them, longest document) as flash_attn_varlen_func wants them."""
        doc_ids = self.q_doc_ids
        flat = doc_ids.flatten()
        indices = (flat >= 0).nonzero().squeeze(1)
        doc, row = flat[indices], indices // doc_ids.shape[1]
        starts = torch.ones_like(indices, dtype=torch.bool)
        starts[1:] = (doc[1:] != doc[:-1]) | (row[1:] != row[:-1])
        cu_seqlens = F.pad(starts.nonzero().squeeze(1), (0, 1), value=indices.numel()).to(torch.int32)
        return indices, cu_seqlens, int(cu_seqlens.diff().max())


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask,
           impl: str = "auto", dropout_p: float = 0.0) -> torch.Tensor:
    """q [B, Tq, heads, head_dim], k and v [B, Tk, kv_heads, head_dim] -> [B, Tq, heads, head_dim].

    kv_heads divides heads; query head h reads KV head h // (heads / kv_heads) (grouped-query attention).
    """
    impl = resolve_impl(impl, q, k)
    if impl == "flash":
        return _flash(q, k, v, mask, dropout_p)
    if impl == "sdpa":
        return _sdpa(q, k, v, mask, dropout_p)
    return _math(q, k, v, mask, dropout_p)


def resolve_impl(requested: str, q: torch.Tensor, k: torch.Tensor) -> str:
    flash_usable = (flash_attn_func is not None and q.is_cuda
                    and q.dtype in (torch.float16, torch.bfloat16))
    if requested == "flash" and not flash_usable:
        raise RuntimeError("attn_impl='flash' needs the flash-attn package and CUDA fp16/bf16 "
                           f"activations; got device {q.device}, dtype {q.dtype}, "
                           f"flash-attn {'missing' if flash_attn_func is None else 'installed'}")
    if requested in ("auto", "flash"):
        # Decoding against a cache (fewer queries than keys) goes through SDPA's explicit mask.
        return "flash" if flash_usable and q.shape[1] == k.shape[1] else "sdpa"
    return requested


def _flash(q, k, v, mask, dropout_p):
    if mask.causal_only:
        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
    indices, cu_seqlens, max_seqlen = mask.varlen
    batch, seq_len, heads, head_dim = q.shape
    q, k, v = (t.flatten(0, 1)[indices] for t in (q, k, v))
    out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                 dropout_p=dropout_p, causal=True)
    # Padding positions get zeros: their outputs are ignored but must stay finite.
    padded = out.new_zeros(batch * seq_len, heads, head_dim).index_copy(0, indices, out)
    return padded.view(batch, seq_len, heads, head_dim)


def _sdpa(q, k, v, mask, dropout_p):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if mask.causal_only:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=True)
    else:
        # With an explicit mask, enable_gqa forces the slow math backend; copying KV heads keeps
        # the memory-efficient kernel.
        k, v = _repeat_kv(k, q), _repeat_kv(v, q)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, dropout_p=dropout_p)
    return out.transpose(1, 2)


def _math(q, k, v, mask, dropout_p):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = _repeat_kv(k, q), _repeat_kv(v, q)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask.causal_only:
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    else:
        allowed = mask.dense
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = F.dropout(scores.float().softmax(dim=-1), p=dropout_p).to(q.dtype)
    return (probs @ v).transpose(1, 2)


def _repeat_kv(kv: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[B, kv_heads, T, D] -> [B, heads, T, D], each KV head serving a contiguous group of queries."""
    return kv.repeat_interleave(q.shape[1] // kv.shape[1], dim=1)
