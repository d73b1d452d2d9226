"""Direct Preference Optimization: raise the policy's log-likelihood of the chosen answer over the rejected one,
relative to a frozen reference (the starting policy), without a reward model.

    python train/dpo.py --from_weight sft --beta 0.1
    bash launch/run_dpo.sh --dpo_loss ipo

The implicit reward of an answer is β·(log π(y|x) − log π_ref(y|x)), log-probabilities summed over its tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from model import ModelConfig, forward_flops, num_params
from model.flops import recomputed_flops
from train import distributed
from train.config import ConfigError, TrainConfig
from data.loader import IGNORE_INDEX
from train.backend import local_numel, unwrap
from train.metrics import BatchStats
from train.stage import PairedStage, StageContext, document_lengths
from train.updater import LossOutput

LOSSES = ("sigmoid", "ipo")


@dataclass
class DPOConfig(TrainConfig):
    beta: float = field(default=0.1, metadata={"help": "strength of the pull towards the reference (DPO's β)"})
    dpo_loss: str = field(default="sigmoid", metadata={"help": "sigmoid: −log σ(β·h), the DPO paper | ipo: "
                                                               "(h − 1/(2β))² on per-token mean log-probs"})

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ConfigError(f"--beta: must be > 0, got {self.beta}")
        if self.dpo_loss not in LOSSES:
            raise ConfigError(f"--dpo_loss: {self.dpo_loss!r} is not one of {', '.join(LOSSES)}")


def sequence_logps(model, batch: dict, chunk_tokens: int = 0) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """([2P] Σ log p(label) over each answer's supervised positions in fp32, the MoE aux loss). Logits are
    computed at those positions only, chunk_tokens at a time (Transformer.label_logps; 0: all at once)."""
    output = model(batch["input_ids"], doc_ids=batch["doc_ids"], position_ids=batch["position_ids"],
                   return_hidden=True, documents=batch.get("documents"))
    positions = batch["target_positions"]
    token_logps, _ = unwrap(model).label_logps(output.hidden.flatten(0, 1)[positions],
                                               batch["labels"].flatten()[positions], chunk_tokens)
    answers = torch.zeros(2 * len(batch["real_pairs"]), device=token_logps.device)
    return answers.index_add(0, batch["target_answers"], token_logps), output.aux_loss


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float,
             kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and (chosen, rejected) rewards from [2B] log-probs (IPO: per-token means)."""
    chosen, rejected = (policy - reference).chunk(2)
    h = chosen - rejected
    losses = -F.logsigmoid(beta * h) if kind == "sigmoid" else (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen, beta * rejected


class DPOStage(PairedStage):
    name = "dpo"
    config_class = DPOConfig

    def setup(self, ctx: StageContext) -> None:
        super().setup(ctx)
        self.beta, self.kind = ctx.cfg.beta, ctx.cfg.dpo_loss
        self.reference = ctx.backend.frozen_copy(ctx.model)
        if distributed.is_main():
            print(f"[dpo] frozen reference: {local_numel(self.reference) / 1e6:.2f}M of its "
                  f"{num_params(ctx.model_config) / 1e6:.2f}M parameters on this rank; β {self.beta}, "
                  f"{self.kind} loss", flush=True)

    def prepare_batch(self, batch: dict) -> dict:
        batch = super().prepare_batch(batch)
        # On the host, where the count is known: on a GPU, boolean indexing would wait for the device.
        batch["target_positions"] = (batch["labels"].flatten() != IGNORE_INDEX).nonzero().squeeze(1)
        batch["target_answers"] = batch["sequence_ids"].flatten()[batch["target_positions"]]  # which of the 2P
        batch["targets_per_answer"] = torch.bincount(batch["target_answers"], minlength=2 * len(batch["real_pairs"]))
        return batch

    def batch_stats(self, batch: dict, model_config: ModelConfig) -> BatchStats:
        lengths = document_lengths(batch["doc_ids"])
        targets = len(batch["target_positions"])
        forward = forward_flops(model_config, lengths, lm_head_tokens=targets)
        # Policy forward + backward (3×) and reference forward (1×), chosen and rejected rows alike.
        return BatchStats(computed_tokens=batch["input_ids"].numel(), input_tokens=int(lengths.sum()),
                          supervised_tokens=targets, samples=batch["pairs"],
                          model_flops=4.0 * forward)

    def recomputed_flops(self, batch: dict, model_config: ModelConfig) -> float:
        cfg = self.ctx.cfg  # the policy's backward only: the reference runs without one
        head_tokens = len(batch["target_positions"]) if cfg.loss_chunk_tokens else 0
        return float(recomputed_flops(model_config, document_lengths(batch["doc_ids"]), cfg.activation_checkpointing,
                                      head_tokens))

    def loss(self, model, batch: dict) -> LossOutput:
        policy, aux_loss = sequence_logps(model, batch, self.loss_chunk_tokens)
        with torch.no_grad():
            reference, _ = sequence_logps(self.reference, batch, self.loss_chunk_tokens)
        policy_chosen, policy_rejected = policy.detach().chunk(2)  # logps/*: sums over the answer, IPO or not
        if self.kind == "ipo":
            tokens = batch["targets_per_answer"].clamp_min(1)
            policy, reference = policy / tokens, reference / tokens
        losses, chosen, rejected = dpo_loss(policy, reference, self.beta, self.kind)
        real = batch["real_pairs"].float()
        extras = {name: ((value.detach() * real).sum(), batch["pairs"]) for name, value in [
            ("rewards/chosen", chosen), ("rewards/rejected", rejected),
            ("rewards/accuracies", (chosen > rejected).float()),  # a tie (policy == reference) is not a win
            ("rewards/margins", chosen - rejected),
            ("logps/chosen", policy_chosen), ("logps/rejected", policy_rejected)]}
        return LossOutput(loss_sum=(losses * real).sum(), aux_loss=aux_loss, extras=extras)


if __name__ == "__main__":
    from train.cli import main  # the script's entry point: the trainer runs this stage

    # The tiny demo model needs a larger step than DPO's usual 5e-7 for its held-out accuracy to rise
    # (docs/results.md: 1e-5 barely moved it in 3 epochs; 5e-5 to 2e-4 all reach about the same plateau).
    main(DPOStage(), dict(data_config="config/data/posttrain/dpo/demo.yaml", from_weight="sft", learning_rate=5e-5,
                          epochs=2))
