"""On-policy RL from prompts, shared by PPO (train/ppo.py) and GRPO (train/grpo.py).

A global step has two timed phases: rollouts (train/rollout.py: generate answers to the step's prompts, score them,
read the policy's and the reference's log-probs; no gradients), then --ppo_epochs clipped policy-gradient updates
over them, each one optimizer step through the Updater (and the critic's, for PPO). The stages differ in how an
answer's advantage is estimated: PPO learns a critic and uses token-level GAE; GRPO samples a group of answers per
prompt and normalises their rewards within the group. The maths is in train/rl_losses.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from data.prompts import PromptLoader, prompt_without_answer
from model import forward_flops, generation_bytes_read, generation_flops
from model.flops import recomputed_flops
from model.value_head import value_forward_flops
from train import distributed
from train.backend import unwrap
from train.config import ConfigError, TrainConfig
from train.metrics import BatchStats, Phase, device_clock
from train.rl_losses import clipped_policy_loss, response_logps
from train.rollout import Rollout, RolloutMaker
from train.stage import MicroBatchReport, Stage, StageContext, StepReport
from train.updater import LossOutput, Updater

REWARDS = ("rule", "model")


@dataclass
class RLConfig(TrainConfig):
    max_new_tokens: int = field(default=32, metadata={"help": "longest answer a rollout generates"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of rollouts"})
    top_k: int = field(default=0, metadata={"help": "sample rollouts from the k most likely tokens (0: all)"})
    ppo_epochs: int = field(default=2, metadata={"help": "optimizer steps over each step's rollouts"})
    clip_range: float = field(default=0.2, metadata={"help": "policy ratio clip ε: ratios outside 1 ± ε get no gradient"})
    kl_coef: float = field(default=0.05, metadata={"help": "weight of the k3 KL estimate against the reference"})
    target_kl: float = field(default=0.0, metadata={"help": "stop a step's PPO epochs once the approximate KL to "
                                                            "the rollout policy exceeds this (0: never)"})
    reward: str = field(default="rule", metadata={"help": "rule: 1 for the reference answer, 0.5 if the answer "
                                                          "contains it, else 0 | model: --reward_model's score"})
    reward_model: str = field(default="reward", metadata={"help": "with --reward model: the reward stage's name "
                                                                  "(its export under out_root) or a directory"})

    def validate(self) -> None:
        super().validate()
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature: rollouts sample, so it must be > 0, got {self.temperature}")
        for name in ("top_k", "kl_coef", "target_kl"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name}: must be >= 0, got {getattr(self, name)}")
        if self.ppo_epochs < 1:
            raise ConfigError(f"--ppo_epochs: must be >= 1, got {self.ppo_epochs}")
        if not 0 < self.clip_range < 1:
            raise ConfigError(f"--clip_range: must be in (0, 1), got {self.clip_range}")
        if self.reward not in REWARDS:
            raise ConfigError(f"--reward: {self.reward!r} is not one of {', '.join(REWARDS)}")


class RLStage(Stage):
    """What PPO and GRPO share: prompt data, rollouts, the clipped update, the step's accounting and evaluation."""
    data_kind = "rl"
    default_packing = "padded"
    config_class = RLConfig
    group_size = 1  # answers sampled per prompt
    generates = True

    def make_loader(self, store, cfg, seq_len, rank, world_size, mode, weights=None, drop_last=True):
        if cfg.reward == "rule" and (missing := prompt_without_answer(store)):  # at start-up, not at the first rollout
            raise ConfigError(f"--reward rule: {missing}; give every prompt an answer, or use --reward model")
        return PromptLoader(store, cfg.batch_size, rank, world_size, cfg.seed, weights=weights, drop_last=drop_last)

    def optimizer_steps_per_step(self, cfg: RLConfig) -> int:
        return cfg.ppo_epochs

    def setup(self, ctx: StageContext) -> None:
        super().setup(ctx)
        self.rollouts = RolloutMaker(ctx)

    def generate_flops(self, rollout: Rollout) -> float:
        return float(generation_flops(self.ctx.model_config, rollout.prompt_lengths, rollout.response_lengths,
                                      samples_per_prompt=rollout.samples_per_prompt))

    def score_flops(self, rollout: Rollout) -> float:
        """The reward model's forward (none for a rule)."""
        if self.rollouts.reward_model is None:
            return 0.0
        scored = [p + r for p, r in zip(rollout.prompt_lengths, rollout.response_lengths)]
        return float(value_forward_flops(self.rollouts.reward_config, scored))

    def reference_flops(self, rollout: Rollout) -> float:
        """The no-grad forwards that read the answers: the reference's, and the policy's (old log-probs) unless the
        update reads them."""
        scored = rollout.read_lengths
        forwards = 1.0 if self.update_reads_old_logps() else 2.0
        return forwards * forward_flops(self.ctx.model_config, scored, lm_head_tokens=sum(rollout.response_lengths))

    # One epoch updates the policy that generated, so the update's own forward gives the old log-probs (its values,
    # detached; TRL's GRPO does the same) and a no-grad forward is saved. PPO needs them before the update (its
    # KL reward enters the advantages).
    old_logps_before_update = True

    def update_reads_old_logps(self) -> bool:
        return self.ctx.cfg.ppo_epochs == 1 and not self.old_logps_before_update

    def update_flops(self, rollout: Rollout) -> float:
        """One PPO epoch's actor forward + backward over the rollout."""
        scored = rollout.read_lengths
        return 3.0 * forward_flops(self.ctx.model_config, scored, lm_head_tokens=sum(rollout.response_lengths))

    def update_recomputed_flops(self, rollout: Rollout) -> float:
        """Forward FLOPs one PPO epoch's backward runs again (HFU less MFU): --activation_checkpointing's blocks, and
        --loss_chunk_tokens' LM head over the answer tokens."""
        cfg = self.ctx.cfg
        scored = rollout.read_lengths
        head_tokens = rollout.response.numel() if cfg.loss_chunk_tokens else 0  # the head reads every answer column
        return float(recomputed_flops(self.ctx.model_config, scored, cfg.activation_checkpointing, head_tokens))

    # ----- what PPO and GRPO supply -----
    def advantages(self, rollouts: list[Rollout]) -> None:
        """Fill rollout.advantages [B, N] of every rollout of the step (and what the estimator needs)."""
        raise NotImplementedError

    def policy_loss(self, rollout: Rollout, logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token loss to minimise and whether its ratio was clipped."""
        return clipped_policy_loss(logps, rollout.old_logps, rollout.advantages, self.ctx.cfg.clip_range)

    def update_critic(self, updater: Updater, rollouts: list[Rollout], normaliser: torch.Tensor) -> list[dict]:
        """A critic's update of a PPO epoch (none by default): per rollout, its sums to add to the rollout's."""
        return [{} for _ in rollouts]

    def extra_metrics(self, rollout: Rollout, sums: dict, tokens: float, epochs_done: int) -> dict:
        """The stage's own metrics of one rollout: name -> (device sum, host count)."""
        return {}

    def last_values(self) -> dict:
        """The stage's own metrics logged as their value at the window's last step (name -> tensor or None)."""
        return {}

    # ----- the step -----
    def _policy_objective(self, model, rollout: Rollout) -> LossOutput:
        first_read = rollout.old_logps is None  # update_reads_old_logps: this forward is the policy that generated
        logps, entropy, aux_loss = response_logps(model, rollout, first_read, self.ctx.cfg.loss_chunk_tokens)
        if first_read:
            rollout.set_policy_logps(logps.detach(), entropy.detach())
        losses, clipped = self.policy_loss(rollout, logps)
        mask = rollout.mask
        return LossOutput(loss_sum=(losses * mask).sum(), aux_loss=aux_loss,
                          extras={"clipped": (clipped * mask).sum(),
                                  "approxkl": (0.5 * (logps.detach() - rollout.old_logps) ** 2 * mask).sum()})

    def train_step(self, micro_batches: list[dict], updater: Updater) -> StepReport:
        cfg, policy = self.ctx.cfg, self.ctx.model
        # Phases are marked without waiting for the device (CUDA events), and not at all with metrics off.
        marks = {"start": device_clock() if cfg.metrics else None}
        mark = (lambda name: marks.__setitem__(name, device_clock())) if cfg.metrics else (lambda name: None)
        self.rollouts.sync(policy)
        mark("synced")
        rollouts = [self.rollouts.sample(batch, self.group_size) for batch in micro_batches]
        mark("generated")
        for rollout in rollouts:
            rollout.scores = self.rollouts.score(rollout)
        mark("scored")
        reads_old = not self.update_reads_old_logps()
        for rollout in rollouts:
            self.rollouts.read_logprobs(policy if reads_old else None, rollout)
        self.advantages(rollouts)
        mark("read")

        tokens = [float(sum(rollout.response_lengths)) for rollout in rollouts]  # = mask.sum(), known on the host
        normaliser = updater.normaliser(sum(tokens))
        sums = [{"loss": 0.0, "clipped": 0.0, "approxkl": 0.0, "aux_loss": None} for _ in rollouts]
        epochs_done = 0
        for _ in range(cfg.ppo_epochs):
            outputs, update = updater.update(policy, rollouts, self._policy_objective, normaliser)
            critic_sums = self.update_critic(updater, rollouts, normaliser)
            for total, output, critic in zip(sums, outputs, critic_sums):
                total["loss"] += output.loss_sum.detach()
                total["clipped"] += output.extras["clipped"]
                total["approxkl"] += output.extras["approxkl"]
                if output.aux_loss is not None:  # MoE: logged as train/aux_loss, the mean over forwards
                    aux = output.aux_loss.detach()
                    total["aux_loss"] = aux if total["aux_loss"] is None else total["aux_loss"] + aux
                for name, value in critic.items():
                    total[name] = total.get(name, 0.0) + value
            epochs_done += 1
            if cfg.target_kl:
                # Every rank reads the same global value, so all stop after the same epoch.
                approxkl_sum = sum(float(total["approxkl"]) for total in sums)
                kl_sum, count = distributed.reduce_values([approxkl_sum, sum(tokens) * epochs_done])
                if kl_sum / max(count, 1) > cfg.target_kl:
                    break
        if not cfg.metrics:
            return StepReport([], update)
        mark("updated")
        return StepReport(self._reports(rollouts, sums, tokens, epochs_done), update,
                          self._phases(marks, rollouts, epochs_done), self.last_values())

    def _phases(self, marks: dict, rollouts: list[Rollout], epochs_done: int) -> list[Phase]:
        """The step's timed phases with their work (docs/metrics.md, "RL phases")."""
        phases = []
        if self.rollouts.generator_model is not unwrap(self.ctx.model):  # sharded: the generating copy refreshed
            phases.append(Phase("sync_weights", marks["start"], marks["synced"]))
        phases += [
            Phase("generate", marks["synced"], marks["generated"],
                  flops=sum(self.generate_flops(r) for r in rollouts),
                  tokens=sum(sum(r.response_lengths) for r in rollouts),
                  bytes_read=sum(self.generate_bytes_read(r) for r in rollouts)),
            Phase("score", marks["generated"], marks["scored"],  # a rule does no model FLOPs: no MFU to log
                  flops=sum(self.score_flops(r) for r in rollouts) if self.rollouts.reward_model else None),
            Phase("reference", marks["scored"], marks["read"], flops=sum(self.reference_flops(r) for r in rollouts)),
            Phase("update", marks["read"], marks["updated"],
                  flops=epochs_done * sum(self.update_flops(r) for r in rollouts)),
        ]
        return phases

    def generate_bytes_read(self, rollout: Rollout) -> float:
        """Bytes the batched generation read (model/flops.py); NaN for a mixture-of-experts model, whose routing
        decides which experts a decode step reads (its perf/generate_mbu_percent is logged as null)."""
        config = self.ctx.model_config
        if config.use_moe:
            return float("nan")
        element = next(self.rollouts.generator_model.parameters()).element_size()
        return float(generation_bytes_read(config, len(rollout.response_lengths), rollout.prompt_width,
                                           rollout.response.shape[1], element, rollout.samples_per_prompt))

    def _reports(self, rollouts, sums, tokens, epochs_done) -> list[MicroBatchReport]:
        reports = []
        for index, (rollout, total, count) in enumerate(zip(rollouts, sums, tokens)):
            rows = len(rollout.response_lengths)
            mask = rollout.mask
            trained = count * epochs_done
            extras = {
                "objective/reward": (rollout.scores.sum(), rows),
                "objective/kl": (rollout.kl.sum(), rows),
                "objective/entropy": ((rollout.entropy * mask).sum(), count),
                "policy/approxkl": (torch.as_tensor(total["approxkl"]), trained),
                "policy/clipfrac": (torch.as_tensor(total["clipped"]), trained),
                "loss/policy": (torch.as_tensor(total["loss"]), trained),
                "rollout/response_length": (torch.tensor(float(sum(rollout.response_lengths))), rows),
                **self.extra_metrics(rollout, total, count, epochs_done),
            }
            if index == 0:  # once per step and rank: the window's mean over steps and ranks
                extras["policy/ppo_epochs"] = (torch.tensor(float(epochs_done)), 1)
            stats = BatchStats(
                computed_tokens=rollout.full_input_ids.numel(),  # the layout every scoring forward runs on
                input_tokens=sum(rollout.prompt_lengths) + sum(rollout.response_lengths),
                supervised_tokens=int(count), samples=rows,
                model_flops=(self.generate_flops(rollout) + self.score_flops(rollout) + self.reference_flops(rollout)
                             + epochs_done * self.update_flops(rollout)),
                recomputed_flops=epochs_done * self.update_recomputed_flops(rollout))
            aux_loss = total["aux_loss"] / epochs_done if total["aux_loss"] is not None else None
            reports.append(MicroBatchReport(torch.as_tensor(total["loss"]), int(trained), stats, aux_loss, extras))
        return reports

    # ----- evaluation -----
    def begin_evaluation(self, global_step: int) -> None:
        """Greedy answers (eval/reward, eval/response_length) and one sampled like the rollouts
        (eval/reward_sampled), from a generator seeded per rank and step, so evaluating leaves the training's random
        stream untouched and a resumed run evaluates the same."""
        self.rollouts.sync(self.ctx.model)
        self.eval_generator = torch.Generator(self.ctx.device).manual_seed(
            (self.ctx.cfg.seed * 1_000_003 + global_step) * 1024 + distributed.rank())

    def evaluate_batch(self, batch: dict) -> dict:
        prompts = batch["prompt_ids"]
        if not prompts:
            if self.rollouts.reward_model is not None and self.ctx.backend.frozen_forward_is_collective:
                # This rank's share of the last batch is empty, but a partitioned reward model's forward gathers
                # with the other ranks': take part in both scorings on one padding token.
                for _ in range(2):
                    self.rollouts.reward_model(torch.full((1, 1), self.rollouts.pad_id, device=self.ctx.device))
            return {"reward": (0.0, 0), "reward_sampled": (0.0, 0), "response_length": (0.0, 0)}
        greedy = self.rollouts.sample(batch, 1, greedy=True)
        sampled = self.rollouts.sample(batch, 1, generator=self.eval_generator)
        return {"reward": (float(self.rollouts.score(greedy).sum()), len(prompts)),
                "reward_sampled": (float(self.rollouts.score(sampled).sum()), len(prompts)),
                "response_length": (float(sum(greedy.response_lengths)), len(prompts))}
