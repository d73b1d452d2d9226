"""Reward model: a scalar score per answer, trained on preference pairs to rank the chosen one higher
(Bradley-Terry: P(chosen ≻ rejected) = σ(r_chosen − r_rejected)). Its export, with the value head, is what PPO
loads as its reward model.

    python train/reward.py --from_weight sft
    bash launch/run_reward.sh --epochs 2

The score of a sequence is the value head's output at its last token, the first position that has read it all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from model import ModelConfig, RewardModel, save_reward_model
from model.value_head import is_reward_model, load_reward_model, value_forward_flops
from train.config import TrainConfig
from train.metrics import BatchStats
from train.stage import PairedStage, build_language_model, document_lengths
from train.updater import LossOutput


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair −log σ(r_chosen − r_rejected)."""
    return -F.logsigmoid(chosen - rejected)


class RewardStage(PairedStage):
    name = "reward"

    def build_model(self, cfg: TrainConfig, source: Optional[Path]) -> RewardModel:
        if source is not None and is_reward_model(source):
            return load_reward_model(source)  # a reward model trained further
        language_model = build_language_model(cfg, source)
        return RewardModel(language_model.config, backbone=language_model)

    def export(self, state_dict: dict, model_config: ModelConfig, directory: Path) -> Path:
        return save_reward_model(state_dict, model_config, directory)

    def prepare_batch(self, batch: dict) -> dict:
        batch = super().prepare_batch(batch)
        # [2P] index into the flattened tokens of each answer's last token (0 for a padding pair's empty answers).
        flat = batch["sequence_ids"].flatten()
        positions = (flat >= 0).nonzero().squeeze(1)
        answers = torch.zeros(2 * len(batch["real_pairs"]), dtype=torch.long)
        batch["last_positions"] = answers.scatter_reduce(0, flat[positions], positions, "amax")
        return batch

    def batch_stats(self, batch: dict, model_config: ModelConfig) -> BatchStats:
        lengths = document_lengths(batch["doc_ids"])
        return BatchStats(computed_tokens=batch["input_ids"].numel(), input_tokens=int(lengths.sum()),
                          supervised_tokens=2 * batch["pairs"], samples=batch["pairs"],  # one score a row
                          model_flops=3.0 * value_forward_flops(model_config, lengths))

    def loss(self, model, batch: dict) -> LossOutput:
        output = model(batch["input_ids"], doc_ids=batch["doc_ids"], position_ids=batch["position_ids"],
                       documents=batch.get("documents"))
        scores = output.values.float().flatten()[batch["last_positions"]]
        chosen, rejected = scores.chunk(2)
        real = batch["real_pairs"].float()
        margins = (chosen - rejected).detach()
        extras = {"reward/accuracy": (((margins > 0).float() * real).sum(), batch["pairs"]),  # a tie is not a win
                  "reward/margin": ((margins * real).sum(), batch["pairs"])}
        return LossOutput(loss_sum=(bradley_terry_loss(chosen, rejected) * real).sum(), aux_loss=output.aux_loss,
                          extras=extras)


if __name__ == "__main__":
    from train.cli import main  # the script's entry point: the trainer runs this stage

    main(RewardStage(), dict(data_config="config/data/posttrain/dpo/demo.yaml", from_weight="sft",
                             learning_rate=1e-4, epochs=2))
