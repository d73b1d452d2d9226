"""Rollouts: answers generated to a step's prompts with the KV-cache generator and scored, with everything the
update needs; no gradients (the make-experience phase of PPO and GRPO).

Every answer is laid out as [left padding | prompt | response | right padding] with the prompts left-padded to a
common width P, so response token j sits at column P + j of every row and is predicted from column P + j − 1: the
policy, reference and critic read the columns P − 1 … P + N − 2 of one forward of the sequence without its last
column. Padding gets document id −1 and is never attended to.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from model import generate
from model.value_head import is_reward_model, load_reward_model
from train.backend import TrainedModel, unwrap
from train.config import ConfigError
from train.exports import check_tokenizer, resolve_weights
from train.rl_losses import k3_kl, response_logps


@dataclass
class Rollout:
    """B answers (prompts × group size) with P the prompt width and N the longest response."""
    input_ids: torch.Tensor  # [B, P + N − 1] the sequence without its last column: what the forwards read
    doc_ids: torch.Tensor  # [B, P + N − 1] 0 on real tokens, −1 on padding
    position_ids: torch.Tensor  # [B, P + N − 1]
    full_input_ids: torch.Tensor  # [B, P + N] the whole sequence (the reward model scores its last token)
    full_doc_ids: torch.Tensor  # [B, P + N]
    full_position_ids: torch.Tensor  # [B, P + N]
    prompt_width: int  # P
    response: torch.Tensor  # [B, N] generated ids
    mask: torch.Tensor  # [B, N] float: 1 on each response's tokens
    prompt_lengths: list[int]  # B
    response_lengths: list[int]  # B
    scores: Optional[torch.Tensor] = None  # [B] the reward of each answer
    old_logps: Optional[torch.Tensor] = None  # [B, N] log π of the policy that generated
    entropy: Optional[torch.Tensor] = None  # [B, N] of that policy
    ref_logps: Optional[torch.Tensor] = None  # [B, N] log π_ref of the frozen reference
    kl: Optional[torch.Tensor] = None  # [B, N] k3 estimate of KL(π ‖ π_ref), 0 on padding
    advantages: Optional[torch.Tensor] = None  # [B, N] filled by the algorithm (rl.py's RLStage.advantages)
    values: Optional[torch.Tensor] = None  # [B, N] PPO: the critic's values at rollout time
    returns: Optional[torch.Tensor] = None  # [B, N] PPO: GAE returns, the critic's targets
    group_std: Optional[torch.Tensor] = None  # [B / G] GRPO: the standard deviation of each group's scores
    answers: Optional[list] = None  # [B] each prompt's reference answer (None where it has none)
    samples_per_prompt: int = 1  # G: consecutive rows answer one prompt, whose prefill generation ran once

    @property
    def read_lengths(self) -> list[int]:
        """Each row's real tokens in input_ids, what the forwards over the answers read (its last token is only
        predicted)."""
        return [p + r - 1 for p, r in zip(self.prompt_lengths, self.response_lengths)]

    def set_policy_logps(self, logps: torch.Tensor, entropy: torch.Tensor) -> None:
        """The log-probs (detached) of the policy that generated, its entropy, and the KL to the reference."""
        self.old_logps, self.entropy = logps, entropy
        self.kl = k3_kl(logps, self.ref_logps) * self.mask


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


class RolloutMaker:
    """Generates with (a plain copy of) the policy, scores with the rule or a frozen reward model, and reads the
    log-probs of the policy and of a frozen reference."""

    def __init__(self, ctx):
        cfg, backend = ctx.cfg, ctx.backend
        self.cfg, self.device, self.tokenizer = cfg, ctx.device, ctx.tokenizer
        self.eos_id, self.pad_id = self.tokenizer.eos_id, self.tokenizer.pad_id
        self.reference = backend.frozen_copy(ctx.model)
        # Sharded weights expect every rank to run the same forwards, but ranks' answers end at different lengths:
        # generation runs on a plain copy of the policy, gathered once per step (not once per token).
        module = unwrap(ctx.model)
        self.generator_model = module
        if backend.shards_parameters:
            self.generator_model = type(module)(module.config).to(ctx.device, backend.torch_dtype).requires_grad_(False)
        self.reward_model = self.reward_config = None
        if cfg.reward == "model":
            source = resolve_weights(cfg, "reward_model", cfg.reward_model)
            check_tokenizer(cfg, "reward_model", source, ctx.tokenizer)
            if not is_reward_model(source):
                raise ConfigError(f"--reward_model {cfg.reward_model}: {source} holds a language model, not a reward "
                                  f"model; train one with bash launch/run_reward.sh")
            self.reward_model = backend.frozen(load_reward_model(source))
            self.reward_config = unwrap(self.reward_model).config

    def sync(self, policy: TrainedModel) -> None:
        """Refresh the plain copy that generates (where the policy's weights are sharded)."""
        if self.generator_model is not unwrap(policy):
            policy.copy_weights_to(self.generator_model)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], samples_per_prompt: int, greedy: bool = False,
                 generator: Optional[torch.Generator] = None):
        return generate(self.generator_model, prompts, self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                        top_k=self.cfg.top_k or None, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                        greedy=greedy, generator=generator,  # None: the global RNG, which checkpoints save
                        samples_per_prompt=samples_per_prompt)

    def layout(self, prompts: list[list[int]], generation) -> Rollout:
        width = max(len(prompt) for prompt in prompts)
        prompt_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        prompt_real = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=self.device)
        sequence = torch.cat([prompt_ids, generation.tokens], dim=1)
        real = torch.cat([prompt_real, generation.mask], dim=1)
        positions = (real.cumsum(dim=1) - 1).clamp_min(0)
        doc_ids = torch.where(real, 0, -1)
        return Rollout(input_ids=sequence[:, :-1], doc_ids=doc_ids[:, :-1], position_ids=positions[:, :-1],
                       full_input_ids=sequence, full_doc_ids=doc_ids, full_position_ids=positions,
                       prompt_width=width, response=generation.tokens, mask=generation.mask.float(),
                       prompt_lengths=[len(p) for p in prompts], response_lengths=generation.lengths.tolist())

    @torch.no_grad()
    def score(self, rollout: Rollout) -> torch.Tensor:
        """[B] each answer's reward: the rule against its reference answer, or the reward model at its last token."""
        if self.reward_model is None:
            texts = [self.tokenizer.decode(row[:length].tolist())
                     for row, length in zip(rollout.response, rollout.response_lengths)]
            return torch.tensor([rule_reward(text, answer) for text, answer in zip(texts, rollout.answers)],
                                device=self.device)
        values = self.reward_model(rollout.full_input_ids, doc_ids=rollout.full_doc_ids,
                                   position_ids=rollout.full_position_ids).values.float()
        last = torch.tensor([rollout.prompt_width + length - 1 for length in rollout.response_lengths],
                            device=self.device)
        return values.gather(1, last[:, None]).squeeze(1)

    def sample(self, batch: dict, group_size: int, greedy: bool = False,
               generator: Optional[torch.Generator] = None) -> Rollout:
        """Answers to the batch's prompts (group_size each), laid out for the forwards that read them."""
        generation = self.generate(batch["prompt_ids"], group_size, greedy, generator)
        prompts = [prompt for prompt in batch["prompt_ids"] for _ in range(group_size)]
        rollout = self.layout(prompts, generation)
        rollout.answers = [answer for answer in batch["answers"] for _ in range(group_size)]
        rollout.samples_per_prompt = group_size
        return rollout

    @torch.no_grad()
    def read_logprobs(self, policy: Optional[TrainedModel], rollout: Rollout) -> None:
        """The log-probs of the policy that generated (unless policy is None: the update's forward reads them) and of
        the frozen reference, and the KL between them."""
        chunk_tokens = self.cfg.loss_chunk_tokens
        policy_logps = response_logps(policy, rollout, True, chunk_tokens)[:2] if policy is not None else None
        rollout.ref_logps, _, _ = response_logps(self.reference, rollout, chunk_tokens=chunk_tokens)
        if policy_logps is not None:
            rollout.set_policy_logps(*policy_logps)
