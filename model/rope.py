"""Rotary position embedding (RoFormer, Su et al. 2021).

Angles are computed from explicit position ids rather than a precomputed table, so packed rows can
restart positions at every document and left-padded generation can give each row its own offset.
"""

import torch


def rotary_angles(position_ids: torch.Tensor, head_dim: int,
                  theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [B, T, 1, head_dim] for channel pairs (i, i + head_dim/2)."""
    # fp32 throughout: positions in the thousands times bf16 frequencies would lose the phase.
    channel = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32)
    inv_freq = theta ** -(channel / head_dim)
    angles = position_ids.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, heads, head_dim] by the angles; the half-split layout matches MiniMind/Llama."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
