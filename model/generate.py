"""Batched autoregressive decoding with a KV cache, for evaluation and PPO rollouts.

Prompts are left-padded so every row's next token is predicted at the same column. Padding gets
document id -1, which hides it from real tokens, and rotary positions count real tokens only,
so a padded row generates exactly what the same prompt would generate alone.

Without the cache (use_cache=False) every new token re-runs the forward over the whole sequence
with the same ids, positions and document ids: the baseline bench/rollout.py measures the cache against.
"""

from dataclasses import dataclass

import torch

from model.kv_cache import KVCache
from model.model import Transformer


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, N] new tokens only, pad_token_id after a row's EOS; N <= max_new_tokens
    lengths: torch.Tensor  # [B] response length of each row, its EOS included
    mask: torch.Tensor  # [B, N] bool, True on response tokens


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]] | torch.Tensor, max_new_tokens: int, *,
             attention_mask: torch.Tensor | None = None, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             pad_token_id: int = 0, greedy: bool = False,
             generator: torch.Generator | None = None, use_cache: bool = True,
             samples_per_prompt: int = 1) -> Generation:
    """Continue each prompt by up to max_new_tokens tokens, samples_per_prompt times in consecutive rows.

    prompts: lists of token ids (padded here), or a left-padded [B, P] tensor with
        attention_mask [B, P] (nonzero on real tokens; None means no padding).
    greedy or temperature == 0 takes the argmax; otherwise samples from softmax(logits / temperature)
    restricted to the top_k tokens and/or the smallest set whose probability reaches top_p.
    A row stops at eos_token_id and emits pad_token_id afterwards; decoding ends when all rows stop.
    use_cache=False re-runs the whole sequence for every new token (same tokens, only slower).
    samples_per_prompt > 1 runs each prompt once and copies its keys and values to its rows (a GRPO group's
    prompt is read once, not once per answer); the rows draw as if each had run its prompt itself (up to the
    kernels' rounding, which a prefill over fewer rows may change on a GPU).
    The model runs in eval mode and gets its previous mode back.
    """
    if max_new_tokens < 1 or samples_per_prompt < 1:
        raise ValueError(f"max_new_tokens and samples_per_prompt must be at least 1, got {max_new_tokens} "
                         f"and {samples_per_prompt}")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError("need temperature >= 0, top_k >= 1, 0 < top_p <= 1; "
                         f"got {temperature}, {top_k}, {top_p}")
    device = next(model.parameters()).device
    input_ids, prompt_mask = _left_pad(prompts, attention_mask, pad_token_id, device)
    was_training = model.training
    model.eval()
    try:
        tokens = _decode(model, input_ids, prompt_mask, max_new_tokens, eos_token_id, pad_token_id,
                         lambda logits: _sample(logits, temperature, top_k, top_p, greedy, generator), use_cache,
                         samples_per_prompt)
    finally:
        model.train(was_training)

    steps = tokens.shape[1]
    lengths = torch.full((tokens.shape[0],), steps, device=device)
    if eos_token_id is not None:
        is_eos = tokens == eos_token_id
        lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, lengths)
    mask = torch.arange(steps, device=device) < lengths[:, None]
    return Generation(tokens=tokens, lengths=lengths, mask=mask)


def _decode(model, input_ids, prompt_mask, max_new_tokens, eos_token_id, pad_token_id, sample,
            use_cache, samples_per_prompt) -> torch.Tensor:
    cache = KVCache(model.config.num_layers, capacity=input_ids.shape[1] + max_new_tokens) if use_cache else None
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    doc_ids = torch.where(prompt_mask, 0, -1)
    logits = _last_logits(model, input_ids, doc_ids, positions, cache)
    if samples_per_prompt > 1:  # from here on each prompt's row is samples_per_prompt rows
        logits, input_ids, doc_ids, positions = (t.repeat_interleave(samples_per_prompt, dim=0)
                                                 for t in (logits, input_ids, doc_ids, positions))
        if cache is not None:
            cache.repeat_rows(samples_per_prompt)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for step in range(max_new_tokens):
        token = sample(logits).masked_fill(finished, pad_token_id)
        new_tokens.append(token)
        if eos_token_id is not None:
            finished |= token == eos_token_id
        if step + 1 == max_new_tokens or finished.all():
            break
        token, position = token[:, None], positions[:, -1:] + 1
        if use_cache:  # the cache holds everything before: only the new token runs
            input_ids, doc_ids, positions = token, torch.zeros_like(token), position
        else:
            input_ids = torch.cat([input_ids, token], dim=1)
            doc_ids = torch.cat([doc_ids, torch.zeros_like(token)], dim=1)
            positions = torch.cat([positions, position], dim=1)
        logits = _last_logits(model, input_ids, doc_ids, positions, cache)
    return torch.stack(new_tokens, dim=1)


def _last_logits(model, input_ids, doc_ids, positions, cache) -> torch.Tensor:
    """Logits of the last position only: the LM head runs there alone."""
    hidden = model(input_ids, doc_ids=doc_ids, position_ids=positions, kv_cache=cache, return_hidden=True).hidden
    return model.logits_from_hidden(hidden[:, -1])


def _sample(logits, temperature, top_k, top_p, greedy, generator) -> torch.Tensor:
    """One token per row. Sampled by inverse CDF, one uniform draw per row: torch.multinomial on the CPU draws an
    exponential for every vocabulary entry, 11 ms a step of 64 rows × 6,400 tokens (10% of a rollout)."""
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_best = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the more likely ones already reach top_p; the most likely always stays.
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)  # float64: a float32 sum near 1 would drop tokens under 6e-8
    non_finite = ~torch.isfinite(cdf[:, -1])
    if non_finite.any():  # a NaN would draw the id one past the vocabulary
        raise ValueError(f"sampling: the logits of rows {torch.nonzero(non_finite).flatten().tolist()} are not finite "
                         f"(NaN or inf; temperature {temperature})")
    # The draw lies in (0, total]: the total, which rounding keeps a little off 1, is always reached, and the first
    # entry at or above the draw is never a zero-probability token (its CDF step is empty).
    draw = (1 - torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)) * cdf[:, -1:]
    return torch.searchsorted(cdf, draw).squeeze(1)


def _left_pad(prompts, attention_mask, pad_token_id, device) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(prompts, torch.Tensor):
        input_ids = prompts.to(device)
        if attention_mask is None:
            mask = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            mask = attention_mask.to(device).bool()
    else:
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.tensor(
            [[pad_token_id] * (width - len(prompt)) + list(prompt) for prompt in prompts], device=device)
        mask = torch.tensor([[False] * (width - len(prompt)) + [True] * len(prompt) for prompt in prompts],
                            device=device)
    if mask.shape[1] == 0 or not mask[:, -1].all():
        raise ValueError("prompts must be non-empty and left-padded: "
                         "every row's last position must be a real token")
    return input_ids, mask
