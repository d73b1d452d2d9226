"""PPO (Ouyang et al. 2022; the recipe of OpenRLHF and TRL): the policy from SFT, a critic with a value head, a
frozen reference, and a reward that is either rule-based (the demo prompts carry reference answers) or a trained
reward model's score.

    python train/ppo.py --from_weight sft
    bash launch/run_ppo.sh --reward model --reward_model reward

Per token the reward is −kl_coef · k3(π, π_ref), plus the answer's score at its last token; advantages are GAE
over the critic's values, whitened over the step's tokens on all ranks. The critic starts from the reward model
when it scores (--reward model), else from the policy's weights with a zero value head.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from model import RewardModel
from model.flops import recomputed_flops
from model.value_head import load_reward_model, value_forward_flops
from train import distributed
from train.config import ConfigError
from train.exports import resolve_from_weight, resolve_weights
from train.rl import RLConfig, RLStage
from train.rl_losses import gae, masked_whiten, response_values
from train.rollout import Rollout
from train.stage import StageContext, build_language_model
from train.updater import LossOutput, Updater


@dataclass
class PPOConfig(RLConfig):
    critic_learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate of the critic"})
    value_clip: float = field(default=0.2, metadata={"help": "the critic's new values stay within this of the "
                                                             "rollout's in the clipped value loss"})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount γ"})
    lam: float = field(default=0.95, metadata={"help": "GAE λ"})

    def validate(self) -> None:
        super().validate()
        for name in ("critic_learning_rate", "value_clip"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name}: must be > 0, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"--{name}: must be in [0, 1], got {getattr(self, name)}")


class PPOStage(RLStage):
    name = "ppo"
    config_class = PPOConfig

    def setup(self, ctx: StageContext) -> None:
        super().setup(ctx)
        cfg = ctx.cfg
        if cfg.reward == "model":
            critic = load_reward_model(resolve_weights(cfg, "reward_model", cfg.reward_model))
        else:
            critic = RewardModel(ctx.model_config, backbone=build_language_model(cfg, resolve_from_weight(cfg)))
        self.critic_config = critic.config
        self.critic = ctx.backend.wrap(critic, dataclasses.replace(cfg, learning_rate=cfg.critic_learning_rate),
                                       ctx.total_steps * cfg.ppo_epochs)
        self.critic.train()
        if distributed.is_main():
            print(f"[ppo] critic from {'the reward model' if cfg.reward == 'model' else 'the policy'}, reward "
                  f"{cfg.reward}, {cfg.ppo_epochs} PPO epochs, clip {cfg.clip_range}, k3 KL coefficient "
                  f"{cfg.kl_coef}", flush=True)

    def trained_models(self) -> dict:
        return {"critic": self.critic}

    @torch.no_grad()
    def advantages(self, rollouts: list[Rollout]) -> None:
        cfg = self.ctx.cfg
        for rollout in rollouts:
            mask = rollout.mask
            rollout.values = response_values(self.critic, rollout) * mask
            rewards = -cfg.kl_coef * rollout.kl
            last = torch.tensor(rollout.response_lengths, device=mask.device) - 1
            rewards[torch.arange(len(last), device=mask.device), last] += rollout.scores
            rollout.advantages, rollout.returns = gae(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
        whitened = masked_whiten([r.advantages for r in rollouts], [r.mask for r in rollouts])
        for rollout, advantages in zip(rollouts, whitened):
            rollout.advantages = advantages

    def _value_loss(self, critic, rollout: Rollout) -> LossOutput:
        values, old, returns = response_values(critic, rollout), rollout.values, rollout.returns
        clipped = old + (values - old).clamp(-self.ctx.cfg.value_clip, self.ctx.cfg.value_clip)
        losses = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
        return LossOutput(loss_sum=(losses * rollout.mask).sum())

    def update_critic(self, updater: Updater, rollouts: list[Rollout], normaliser: torch.Tensor) -> list[dict]:
        outputs, self.critic_update = updater.update(self.critic, rollouts, self._value_loss, normaliser)
        return [{"value_loss": output.loss_sum.detach()} for output in outputs]

    def extra_metrics(self, rollout: Rollout, sums: dict, tokens: float, epochs_done: int) -> dict:
        return {"loss/value": (torch.as_tensor(sums["value_loss"]), tokens * epochs_done),
                "val/mean": ((rollout.values * rollout.mask).sum(), tokens)}

    def last_values(self) -> dict:
        """The pre-clip norm of the critic's last update, as train/grad_norm is the policy's; null when that update
        was skipped (DeepSpeed keeps a stale norm then)."""
        update = self.critic_update
        return {"critic/grad_norm": update.grad_norm if update.applied else None}

    def _critic_flops(self, rollout: Rollout) -> float:
        scored = rollout.read_lengths
        return float(value_forward_flops(self.critic_config, scored))

    def reference_flops(self, rollout: Rollout) -> float:
        return super().reference_flops(rollout) + self._critic_flops(rollout)  # the rollout's values

    def update_flops(self, rollout: Rollout) -> float:
        return super().update_flops(rollout) + 3.0 * self._critic_flops(rollout)

    def update_recomputed_flops(self, rollout: Rollout) -> float:
        """The actor's, and the critic's blocks (checkpointed like every trained model; its value head is not)."""
        scored = rollout.read_lengths
        critic = recomputed_flops(self.critic_config, scored, self.ctx.cfg.activation_checkpointing)
        return super().update_recomputed_flops(rollout) + float(critic)


if __name__ == "__main__":
    from train.cli import main  # the script's entry point: the trainer runs this stage

    main(PPOStage(), dict(data_config="config/data/posttrain/rl/demo.yaml", from_weight="sft", learning_rate=1e-5,
                          batch_size=8, epochs=1, max_steps=20, log_interval=1, eval_interval=10, eval_batches=4))
