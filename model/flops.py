"""Analytic parameter and FLOP counts from a ModelConfig alone: the numerator of MFU.

A matmul [m, k] @ [k, n] costs 2·m·k·n FLOPs (a multiply and an add per term). With
H = hidden_size, nh = num_heads, nkv = num_kv_heads, d = head_dim, I = intermediate_size,
V = vocab_size, E = num_experts, k = num_experts_per_tok, S = num_shared_experts,
N = num_layers, each token costs, per layer:

    q projection          2·H·(nh·d)
    k, v projections      2·H·(nkv·d) each
    o projection          2·(nh·d)·H
    SwiGLU FFN            3 · 2·H·I               (gate, up, down)
    or MoE FFN            2·H·E + (k + S) · 3 · 2·H·I   (router, then only the active experts)

plus once per token at the top: LM head 2·H·V (a stage that reads log-probabilities at some
positions only computes logits there: `lm_head_tokens`). Embedding lookups, norms, RoPE, softmax
and residual adds are not matmuls and are not counted.

Attention scores depend on how tokens group into documents, not on the token count alone.
A document of length L costs, per layer,

    Q·Kᵀ 2·L²·(nh·d)  +  P·V 2·L²·(nh·d)  =  4·L²·nh·d

when every query sees every key; causal masking halves it, counting only the useful half of the
score matrix. Packed documents therefore cost Σ Lᵢ², not (Σ Lᵢ)². Padding is not useful work:
pass the lengths of real documents only.

Training costs 3 × forward: backward runs two matmuls (input and weight gradients) for each
forward one. Activation recomputation is not counted, as MFU measures useful work only; what the
hardware runs besides (HFU's numerator) adds `recomputed_flops`: the blocks' forward once more
under activation checkpointing, the LM head's once more under the chunked loss.
"""

from collections.abc import Sequence

import torch

from model.config import ModelConfig


def matmul_flops_per_token(config: ModelConfig) -> int:
    """Forward FLOPs of the weight matmuls for one token (everything but attention scores)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    q_and_o = 2 * (2 * hidden * config.num_heads * head_dim)
    k_and_v = 2 * (2 * hidden * config.num_kv_heads * head_dim)
    swiglu = 3 * 2 * hidden * config.intermediate_size
    if config.use_moe:
        router = 2 * hidden * config.num_experts
        ffn = router + (config.num_experts_per_tok + config.num_shared_experts) * swiglu
    else:
        ffn = swiglu
    return config.num_layers * (q_and_o + k_and_v + ffn) + lm_head_flops_per_token(config)


def lm_head_flops_per_token(config: ModelConfig) -> int:
    return 2 * config.hidden_size * config.vocab_size


def attention_flops(config: ModelConfig, doc_lengths, causal: bool = True) -> int:
    """Forward FLOPs of Q·Kᵀ and P·V over all layers: N · Σ 4·L²·nh·d, halved when causal."""
    full = sum(4 * length * length * config.num_heads * config.head_dim for length in _lengths(doc_lengths))
    full *= config.num_layers
    return full // 2 if causal else full


def forward_flops(config: ModelConfig, doc_lengths, causal: bool = True, lm_head_tokens: int | None = None) -> int:
    """Forward FLOPs for a batch whose documents have these lengths (list, tuple or 1-D tensor).

    lm_head_tokens: how many positions the LM head projects (None: every token).
    """
    lengths = _lengths(doc_lengths)
    tokens = sum(lengths)
    head_tokens = tokens if lm_head_tokens is None else lm_head_tokens
    head = lm_head_flops_per_token(config)
    body = (matmul_flops_per_token(config) - head) * tokens
    return body + head * head_tokens + attention_flops(config, lengths, causal)


def recomputed_flops(config: ModelConfig, doc_lengths, blocks: bool, lm_head_tokens: int = 0,
                     causal: bool = True) -> int:
    """Forward FLOPs a backward runs a second time: the transformer blocks' (weight matmuls and attention scores,
    when `blocks`: activation checkpointing) and the LM head's at lm_head_tokens positions (the chunked loss)."""
    lengths = _lengths(doc_lengths)
    body = 0
    if blocks:
        body = forward_flops(config, lengths, causal, lm_head_tokens=0)
        if not config.use_moe and config.dropout == 0:
            # torch.utils.checkpoint stops recomputing once the last tensor the backward saved is back: a dense
            # block's down projection, read only by the residual add, is not run again (a dropout mask saved after
            # it, or an MoE's mixing and balance loss, keep everything before them recomputed).
            body -= config.num_layers * 2 * config.intermediate_size * config.hidden_size * sum(lengths)
    return body + lm_head_flops_per_token(config) * lm_head_tokens


def generation_flops(config: ModelConfig, prompt_lengths, response_lengths, causal: bool = True,
                     samples_per_prompt: int = 1) -> int:
    """Forward FLOPs of KV-cache decoding (model/generate.py), row by row: the prefill of the prompt (LM head at
    its last position only; once for each samples_per_prompt consecutive rows, which share it), then one
    single-token forward per generated token but the last, which attends to every cached key: at context c,
    N · 4·c·nh·d. Padding and finished rows still in the batch are not counted.
    """
    per_token = matmul_flops_per_token(config)
    per_key = 4 * config.num_layers * config.num_heads * config.head_dim
    total = 0
    for row, (prompt, response) in enumerate(zip(_lengths(prompt_lengths), _lengths(response_lengths))):
        if row % samples_per_prompt == 0:
            total += forward_flops(config, [prompt], causal, lm_head_tokens=1)
        steps = max(response - 1, 0)  # the forward at context prompt + j feeds generated token j (1-based)
        total += steps * per_token + per_key * (steps * prompt + steps * (steps + 1) // 2)
    return total


def generation_bytes_read(config: ModelConfig, rows: int, prompt_width: int, new_columns: int,
                          bytes_per_element: int, samples_per_prompt: int = 1) -> int:
    """Memory traffic of one batched KV-cache generation (model/generate.py) as MBU counts it: every forward
    reads the weights once (the embedding table only through the LM head, which reads it whole) and the keys and
    values it attends to. The batch runs as laid out: `rows` left-padded to `prompt_width`, a prefill, then one
    forward per generated column but the last over every row, finished or padded ones included (the prefill over
    one row for each samples_per_prompt consecutive rows, which share it). Activations, the cache writes (one position
    per forward) and the copy of a prompt's cache to its rows are left out: a lower bound. Dense models only: which
    experts a decode step reads depends on its routing."""
    if config.use_moe:
        raise ValueError("generation_bytes_read: a mixture-of-experts decode step reads the experts its tokens "
                         "route to, which the config alone does not tell")
    weights = num_params(config) - (0 if config.tie_embeddings else config.vocab_size * config.hidden_size)
    kv_per_position = 2 * config.num_layers * config.num_kv_heads * config.head_dim
    decode_contexts = [prompt_width + step for step in range(1, max(new_columns, 1))]  # P + 1, P + 2, …
    prefill_keys = rows // samples_per_prompt * prompt_width
    return bytes_per_element * ((1 + len(decode_contexts)) * weights
                                + kv_per_position * (prefill_keys + rows * sum(decode_contexts)))


def training_flops(config: ModelConfig, doc_lengths, causal: bool = True) -> int:
    """Forward + backward FLOPs: 3 × forward."""
    return 3 * forward_flops(config, doc_lengths, causal)


def num_params(config: ModelConfig, include_embedding: bool = True) -> int:
    """Parameter count of Transformer(config), tied weights counted once.

    include_embedding=False leaves out the input embedding table (and with it a tied LM head),
    the convention for scaling-law "non-embedding" parameters.
    """
    hidden, head_dim = config.hidden_size, config.head_dim
    attention = 2 * hidden * config.num_heads * head_dim + 2 * hidden * config.num_kv_heads * head_dim
    swiglu = 3 * hidden * config.intermediate_size
    if config.use_moe:
        ffn = hidden * config.num_experts + (config.num_experts + config.num_shared_experts) * swiglu
    else:
        ffn = swiglu
    norms = 2 * hidden + (2 * head_dim if config.qk_norm else 0)
    biases = (config.num_heads + 2 * config.num_kv_heads) * head_dim if config.qkv_bias else 0
    body = config.num_layers * (attention + ffn + norms + biases) + hidden  # + final norm
    embedding = config.vocab_size * hidden
    lm_head = 0 if config.tie_embeddings else config.vocab_size * hidden
    return body + lm_head + (embedding if include_embedding else 0)


def _lengths(doc_lengths: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(doc_lengths, torch.Tensor):
        if doc_lengths.dim() != 1:
            raise ValueError(f"doc_lengths must be 1-D, got shape {tuple(doc_lengths.shape)}")
        doc_lengths = doc_lengths.tolist()
    lengths = [int(length) for length in doc_lengths]
    if any(length < 0 for length in lengths):
        raise ValueError(f"doc_lengths must be non-negative, got {lengths}")
    return lengths
