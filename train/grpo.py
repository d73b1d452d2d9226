"""GRPO (Shao et al. 2024, DeepSeekMath): no critic. Each prompt is answered --group_size times; an answer's
advantage is its reward standardised within its group, the same for all its tokens, and the k3 KL to the frozen
reference is a term of the loss rather than of the reward.

    python train/grpo.py --from_weight sft --group_size 4
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from train.config import ConfigError
from train.rl import RLConfig, RLStage
from train.rl_losses import k3_kl
from train.rollout import Rollout
from train.stage import StageContext


@dataclass
class GRPOConfig(RLConfig):
    group_size: int = field(default=4, metadata={"help": "answers sampled per prompt (at least 2)"})

    def validate(self) -> None:
        super().validate()
        if self.group_size < 2:
            raise ConfigError(f"--group_size: a group needs at least 2 answers, got {self.group_size}")


def group_advantages(scores: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B·G] (r − mean of its group) / (std of its group + 1e-4), [B] the groups' standard deviations)."""
    groups = scores.view(-1, group_size)
    std = groups.std(dim=1)
    return ((groups - groups.mean(dim=1, keepdim=True)) / (std[:, None] + 1e-4)).flatten(), std


class GRPOStage(RLStage):
    name = "grpo"
    config_class = GRPOConfig
    old_logps_before_update = False  # its KL is a term of the loss, not of the reward

    def setup(self, ctx: StageContext) -> None:
        self.group_size = ctx.cfg.group_size
        super().setup(ctx)

    @torch.no_grad()
    def advantages(self, rollouts: list[Rollout]) -> None:
        for rollout in rollouts:
            advantages, rollout.group_std = group_advantages(rollout.scores, self.group_size)
            rollout.advantages = advantages[:, None] * rollout.mask

    def policy_loss(self, rollout: Rollout, logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses, clipped = super().policy_loss(rollout, logps)
        return losses + self.ctx.cfg.kl_coef * k3_kl(logps, rollout.ref_logps), clipped

    def extra_metrics(self, rollout: Rollout, sums: dict, tokens: float, epochs_done: int) -> dict:
        return {"objective/reward_std": (rollout.group_std.sum(), len(rollout.group_std)),
                "policy/clip_ratio": (torch.as_tensor(sums["clipped"]), tokens * epochs_done)}


if __name__ == "__main__":
    from train.cli import main  # the script's entry point: the trainer runs this stage

    main(GRPOStage(), dict(data_config="config/data/posttrain/rl/demo.yaml", from_weight="sft", learning_rate=1e-5,
                           batch_size=4, epochs=1, max_steps=20, log_interval=1, eval_interval=10, eval_batches=4))
