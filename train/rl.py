"""On-policy RL from prompts, shared by PPO (train/ppo.py) and GRPO (train/grpo.py).

A global step: generate answers to the step's prompts with the KV-cache generator (rollouts), score them, then
run --ppo_epochs clipped policy-gradient updates over them, each one optimizer step. The stages differ in how an
answer's advantage is estimated: PPO learns a critic and uses token-level GAE; GRPO samples a group of answers per
prompt and normalises their rewards within the group.

Every answer is laid out as [left padding | prompt | response | right padding] with the prompts left-padded to a
common width P, so response token j sits at column P + j of every row and is predicted from column P + j − 1: the
policy, reference and critic read the columns P − 1 … P + N − 2 of one forward of the sequence without its last
column. Padding gets document id −1 and is never attended to.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from data.prompts import PromptLoader
from model import forward_flops, generate, generation_flops
from model.value_head import is_reward_model, load_reward_model, value_forward_flops
from train import distributed
from train.config import ConfigError, TrainConfig
from train.engine import copy_weights, frozen, frozen_copy, unwrap
from train.metrics import BatchStats
from train.stage import Stage
from train.trainer import resolve_weights

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


def rule_reward(response: str, answer: Optional[str]) -> float:
    """1 for exactly the reference answer (surrounding space aside), 0.5 for an answer containing it as a whole word
    (not inside a longer one: a one-letter answer is inside almost any long text, which RL learns to exploit),
    else 0."""
    if answer is None:
        raise ValueError("a prompt without a reference answer cannot get a rule-based reward (use --reward model)")
    response, answer = response.strip(), answer.strip()
    if response == answer:
        return 1.0
    return 0.5 if answer and re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", response) else 0.0


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
    if distributed.world_size() > 1:
        dist.all_reduce(stats)
    total, squares, count = stats.tolist()
    mean = total / max(count, 1)
    std = max(squares / max(count, 1) - mean * mean, 0.0) ** 0.5
    return [((v - mean) / (std + 1e-8)) * m for v, m in zip(values, masks)]


def global_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed.world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def response_logps(model, rollout: dict, with_entropy: bool = False):
    """([B, N] log π(response token), [B, N] entropy of π at its position or None, MoE aux loss) in fp32."""
    output = model(rollout["input_ids"], doc_ids=rollout["doc_ids"], position_ids=rollout["position_ids"],
                   return_hidden=True)
    logits = unwrap(model).logits_from_hidden(output.hidden[:, rollout["prompt_width"] - 1:]).float()
    log_norm = logits.logsumexp(dim=-1)
    logps = logits.gather(-1, rollout["response"][..., None]).squeeze(-1) - log_norm
    entropy = log_norm - (logits.softmax(dim=-1) * logits).sum(dim=-1) if with_entropy else None
    return logps, entropy, output.aux_loss


def response_values(critic, rollout: dict) -> torch.Tensor:
    """[B, N] the critic's value of the state before each response token."""
    output = critic(rollout["input_ids"], doc_ids=rollout["doc_ids"], position_ids=rollout["position_ids"])
    return output.values[:, rollout["prompt_width"] - 1:].float()


class RLStage(Stage):
    """What PPO and GRPO share: prompt data, rollouts, rewards, the clipped update and the step's accounting."""
    data_kind = "rl"
    default_packing = "padded"
    config_class = RLConfig
    group_size = 1  # answers sampled per prompt

    def make_loader(self, store, cfg, seq_len, rank, world_size, mode, weights=None, drop_last=True):
        return PromptLoader(store, cfg.batch_size, rank, world_size, cfg.seed, weights=weights, drop_last=drop_last)

    def optimizer_steps_per_step(self, cfg: RLConfig) -> int:
        return cfg.ppo_epochs

    def setup(self, trainer) -> None:
        cfg = trainer.cfg
        self.cfg, self.device, self.model_config = cfg, trainer.device, trainer.model_config
        self.zero3 = trainer.zero_stage == 3
        self.tokenizer = trainer.data.tokenizer
        self.eos_id, self.pad_id = self.tokenizer.eos_id, self.tokenizer.pad_id
        self.reference = frozen_copy(trainer.engine, trainer.ds_config, trainer.device)
        # ZeRO-3 hooks expect every rank to run the same forwards, but ranks' answers end at different lengths:
        # generation runs on a plain copy of the policy, gathered once per step (not once per token).
        module = unwrap(trainer.engine)
        self.rollout_model = module
        if self.zero3:
            self.rollout_model = type(module)(module.config).to(trainer.device).requires_grad_(False)
        self.reward_model = None
        if cfg.reward == "model":
            source = resolve_weights(cfg, "reward_model", cfg.reward_model)
            if not is_reward_model(source):
                raise ConfigError(f"--reward_model {cfg.reward_model}: {source} holds a language model, not a reward "
                                  f"model; train one with bash launch/run_reward.sh")
            self.reward_model = frozen(load_reward_model(source), trainer.ds_config, trainer.device)
            self.reward_config = unwrap(self.reward_model).config

    # ----- rollouts -----
    def sync_rollout_model(self, engine) -> None:
        """Under ZeRO-3, refresh the full, plain copy of the policy that generates (see setup)."""
        if self.rollout_model is not unwrap(engine):
            copy_weights(unwrap(engine), self.rollout_model, partitioned=True)

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], greedy: bool = False, generator: torch.Generator | None = None):
        return generate(self.rollout_model, prompts, self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                        top_k=self.cfg.top_k or None, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                        greedy=greedy, generator=generator)  # None: the global RNG, which checkpoints save

    def _layout(self, prompts: list[list[int]], generation) -> dict:
        width = max(len(prompt) for prompt in prompts)
        prompt_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        prompt_real = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=self.device)
        sequence = torch.cat([prompt_ids, generation.tokens], dim=1)
        real = torch.cat([prompt_real, generation.mask], dim=1)
        positions = (real.cumsum(dim=1) - 1).clamp_min(0)
        doc_ids = torch.where(real, 0, -1)
        return {"input_ids": sequence[:, :-1], "doc_ids": doc_ids[:, :-1], "position_ids": positions[:, :-1],
                "full_input_ids": sequence, "full_doc_ids": doc_ids, "full_position_ids": positions,
                "prompt_width": width, "response": generation.tokens, "mask": generation.mask.float(),
                "prompt_lengths": [len(p) for p in prompts], "response_lengths": generation.lengths.tolist()}

    def _scores(self, rollout: dict, answers: list) -> torch.Tensor:
        if self.reward_model is None:
            texts = [self.tokenizer.decode(row[:length].tolist())
                     for row, length in zip(rollout["response"], rollout["response_lengths"])]
            return torch.tensor([rule_reward(text, answer) for text, answer in zip(texts, answers)],
                                device=self.device)
        values = self.reward_model(rollout["full_input_ids"], doc_ids=rollout["full_doc_ids"],
                                   position_ids=rollout["full_position_ids"]).values.float()
        last = torch.tensor([rollout["prompt_width"] + length - 1 for length in rollout["response_lengths"]],
                            device=self.device)
        return values.gather(1, last[:, None]).squeeze(1)

    @torch.no_grad()
    def rollout(self, engine, batch: dict) -> dict:
        """Answers to the batch's prompts (group_size each) with everything the update needs, no gradients."""
        prompts = [prompt for prompt in batch["prompt_ids"] for _ in range(self.group_size)]
        answers = [answer for answer in batch["answers"] for _ in range(self.group_size)]
        rollout = self._layout(prompts, self._generate(prompts))
        rollout["old_logps"], rollout["entropy"], _ = response_logps(engine, rollout, with_entropy=True)
        rollout["ref_logps"], _, _ = response_logps(self.reference, rollout)
        rollout["kl"] = k3_kl(rollout["old_logps"], rollout["ref_logps"]) * rollout["mask"]
        rollout["scores"] = self._scores(rollout, answers)
        return rollout

    def rollout_flops(self, rollout: dict) -> float:
        """Generation, then the forwards that score it: policy (old log-probs) and reference, and the reward model."""
        config = self.model_config
        prompts, responses = rollout["prompt_lengths"], rollout["response_lengths"]
        scored = [p + r - 1 for p, r in zip(prompts, responses)]  # the last response token is read, not run
        flops = generation_flops(config, prompts, responses)
        flops += 2 * forward_flops(config, scored, lm_head_tokens=sum(responses))
        if self.reward_model is not None:
            flops += value_forward_flops(self.reward_config, [p + r for p, r in zip(prompts, responses)])
        return float(flops)

    def update_flops(self, rollout: dict) -> float:
        """One PPO epoch's actor forward + backward over the rollout."""
        scored = [p + r - 1 for p, r in zip(rollout["prompt_lengths"], rollout["response_lengths"])]
        return 3.0 * forward_flops(self.model_config, scored, lm_head_tokens=sum(rollout["response_lengths"]))

    # ----- the step -----
    def advantages(self, trainer, rollouts: list[dict]) -> None:
        """Fill rollout["advantages"] [B, N] of every rollout of the step (and what the estimator needs)."""
        raise NotImplementedError

    def policy_loss(self, rollout: dict, logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token loss to minimise and whether its ratio was clipped."""
        return clipped_policy_loss(logps, rollout["old_logps"], rollout["advantages"], self.cfg.clip_range)

    def update_critic(self, trainer, rollout: dict, scale: torch.Tensor) -> dict:
        """A critic's share of a PPO epoch (none by default): its sums to add to the rollout's."""
        return {}

    def train_step(self, trainer, micro_batches: list[dict]) -> None:
        cfg, engine = self.cfg, trainer.engine
        started = time.perf_counter()
        self.sync_rollout_model(engine)
        rollouts = [self.rollout(engine, batch) for batch in micro_batches]
        self.advantages(trainer, rollouts)
        distributed.synchronize()
        rollout_seconds = time.perf_counter() - started

        tokens = [float(rollout["mask"].sum()) for rollout in rollouts]
        scale = trainer.loss_scale(sum(tokens))
        sums = [{"loss": 0.0, "clipped": 0.0, "approxkl": 0.0} for _ in rollouts]
        grad_norm, epochs_done = None, 0
        for _ in range(cfg.ppo_epochs):
            for rollout, total in zip(rollouts, sums):
                logps, _, aux_loss = response_logps(engine, rollout)
                losses, clipped = self.policy_loss(rollout, logps)
                mask = rollout["mask"]
                loss_sum = (losses * mask).sum()
                objective = loss_sum * scale + (aux_loss if aux_loss is not None else 0)
                grad_norm = trainer.backward_step(engine, objective)
                for name, value in self.update_critic(trainer, rollout, scale).items():
                    total[name] = total.get(name, 0.0) + value
                total["loss"] += loss_sum.detach()
                total["clipped"] += (clipped * mask).sum()
                total["approxkl"] += (0.5 * (logps.detach() - rollout["old_logps"]) ** 2 * mask).sum()
            epochs_done += 1
            if cfg.target_kl:
                # Every rank reads the same global value, so all stop after the same epoch.
                approxkl_sum = sum(float(total["approxkl"]) for total in sums)
                kl_sum, count = global_sum([approxkl_sum, sum(tokens) * epochs_done], trainer.device)
                if kl_sum / max(count, 1) > cfg.target_kl:
                    break
        distributed.synchronize()
        train_seconds = time.perf_counter() - started - rollout_seconds
        if cfg.metrics:
            self._record(trainer, rollouts, sums, tokens, epochs_done, rollout_seconds, train_seconds)
        trainer.metrics.add_optimizer_step(grad_norm, engine.was_step_applied())

    def extra_metrics(self, rollout: dict, sums: dict, tokens: float, epochs_done: int) -> dict:
        """The stage's own metrics of one rollout: name -> (device sum, host count)."""
        return {}

    def step_metrics(self) -> dict:
        """The stage's own once-per-step metrics (name -> (value, 1)), averaged over steps and ranks."""
        return {}

    def _record(self, trainer, rollouts, sums, tokens, epochs_done, rollout_seconds, train_seconds) -> None:
        for index, (rollout, total, count) in enumerate(zip(rollouts, sums, tokens)):
            rows = len(rollout["response_lengths"])
            mask = rollout["mask"]
            trained = count * epochs_done
            extras = {
                "objective/reward": (rollout["scores"].sum(), rows),
                "objective/kl": (rollout["kl"].sum(), rows),
                "objective/entropy": ((rollout["entropy"] * mask).sum(), count),
                "policy/approxkl": (torch.as_tensor(total["approxkl"]), trained),
                "policy/clipfrac": (torch.as_tensor(total["clipped"]), trained),
                "loss/policy": (torch.as_tensor(total["loss"]), trained),
                "rollout/response_length": (torch.tensor(float(sum(rollout["response_lengths"]))), rows),
                **self.extra_metrics(rollout, total, count, epochs_done),
            }
            if index == 0:  # once per step and rank: the window's mean over steps and ranks
                extras.update({"system/rollout_time_s": (torch.tensor(rollout_seconds), 1),
                               "system/train_time_s": (torch.tensor(train_seconds), 1),
                               "policy/ppo_epochs": (torch.tensor(float(epochs_done)), 1),
                               **self.step_metrics()})
            stats = BatchStats(
                input_tokens=sum(rollout["prompt_lengths"]) + sum(rollout["response_lengths"]),
                supervised_tokens=int(count), samples=rows,
                model_flops=self.rollout_flops(rollout) + epochs_done * self.update_flops(rollout))
            trainer.metrics.add_micro_batch(torch.as_tensor(total["loss"]), int(trained), stats, extras=extras)

    # ----- evaluation -----
    @torch.no_grad()
    def evaluate(self, trainer) -> dict:
        """Answers to the validation prompts: greedy (eval/reward, eval/response_length) and one sampled like the
        rollouts (eval/reward_sampled), from a generator seeded per rank and step, so evaluating leaves the
        training's random stream untouched and a resumed run evaluates the same."""
        if trainer.data.val is None:
            trainer.metrics.warn_once("no_val", f"{self.cfg.data_config} has no validation split: no eval/* metrics")
            return {}
        greedy_sum = sampled_sum = length_sum = rows = 0.0
        self.sync_rollout_model(trainer.engine)
        generator = torch.Generator(self.device).manual_seed(
            (self.cfg.seed * 1_000_003 + trainer.global_step) * 1024 + distributed.rank())
        for index, batch in enumerate(trainer.data.val.iterate(0)):
            if self.cfg.eval_batches and index >= self.cfg.eval_batches:
                break
            if not batch["prompt_ids"]:
                if self.reward_model is not None and self.zero3:
                    # This rank's share of the last batch is empty, but a partitioned reward model's forward
                    # gathers with the other ranks': take part in both scorings on one padding token.
                    for _ in range(2):
                        self.reward_model(torch.full((1, 1), self.pad_id, device=self.device))
                continue
            rollout = self._layout(batch["prompt_ids"], self._generate(batch["prompt_ids"], greedy=True))
            greedy_sum += float(self._scores(rollout, batch["answers"]).sum())
            length_sum += sum(rollout["response_lengths"])
            sampled = self._layout(batch["prompt_ids"], self._generate(batch["prompt_ids"], generator=generator))
            sampled_sum += float(self._scores(sampled, batch["answers"]).sum())
            rows += len(batch["prompt_ids"])
        greedy_sum, sampled_sum, length_sum, rows = global_sum([greedy_sum, sampled_sum, length_sum, rows],
                                                               trainer.device)
        return {"eval/reward": greedy_sum / rows if rows else None,
                "eval/reward_sampled": sampled_sum / rows if rows else None,
                "eval/response_length": length_sum / rows if rows else None}
