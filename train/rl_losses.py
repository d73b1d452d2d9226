"""The algorithm maths of PPO and GRPO, on tensors alone: per-token log-probs of a response, the k3 KL estimate,
GAE, whitening over every rank, and the clipped policy surrogate."""
from __future__ import annotations

import torch

from train import distributed
from train.backend import unwrap


def response_logps(model, rollout, with_entropy: bool = False, chunk_tokens: int = 0):
    """([B, N] log π(response token), [B, N] entropy of π at its position or None, MoE aux loss) in fp32; the logits
    chunk_tokens positions at a time (Transformer.label_logps; 0: all at once)."""
    output = model(rollout.input_ids, doc_ids=rollout.doc_ids, position_ids=rollout.position_ids, return_hidden=True)
    response = rollout.response
    logps, entropy = unwrap(model).label_logps(output.hidden[:, rollout.prompt_width - 1:].flatten(0, 1),
                                               response.flatten(), chunk_tokens, with_entropy)
    return (logps.view(response.shape), entropy.view(response.shape) if with_entropy else None,
            output.aux_loss)


def response_values(critic, rollout) -> torch.Tensor:
    """[B, N] the critic's value of the state before each response token."""
    output = critic(rollout.input_ids, doc_ids=rollout.doc_ids, position_ids=rollout.position_ids)
    return output.values[:, rollout.prompt_width - 1:].float()


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π ‖ π_ref) from samples of π: (r − 1) − log r with r = π_ref / π; ≥ 0, unbiased."""
    log_ratio = ref_logps - logps
    return log_ratio.exp() - 1 - log_ratio


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level generalised advantage estimation over [B, N] responses (mask: a prefix of each row).

    δ_t = r_t + γ·V_{t+1} − V_t (V past the last token is 0), A_t = δ_t + γ·λ·A_{t+1}; returns = A + V.
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def clipped_policy_loss(logps, old_logps, advantages, clip_range) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO surrogate max(−A·ρ, −A·clip(ρ, 1 ± ε)) and whether the clipped term was taken."""
    ratio = (logps - old_logps).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), (clipped > unclipped)


def masked_whiten(values: list[torch.Tensor], masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """(x − mean) / std over the masked entries of all tensors on all ranks (one all-reduce)."""
    stats = torch.stack([sum((v * m).sum() for v, m in zip(values, masks)),
                         sum((v * v * m).sum() for v, m in zip(values, masks)),
                         sum(m.sum() for m in masks)]).double()
    total, squares, count = distributed.sum_over_ranks(stats).tolist()
    mean = total / max(count, 1)
    std = max(squares / max(count, 1) - mean * mean, 0.0) ** 0.5
    return [((v - mean) / (std + 1e-8)) * m for v, m in zip(values, masks)]
