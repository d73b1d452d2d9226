"""What a stage is: its data, its loss, its FLOPs and its extra metrics. The loop lives in train/trainer.py.

The language-model stage here serves pretrain, midtrain and SFT, which differ only by configuration.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from model import ModelConfig, forward_flops
from train.metrics import BatchStats

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # summed over the micro-batch's loss units (tokens, pairs, ...)
    aux_loss: Optional[torch.Tensor] = None  # already weighted; added to the objective as is
    extras: dict = field(default_factory=dict)  # metric name -> (device sum, host count)


def document_lengths(doc_ids: torch.Tensor) -> torch.Tensor:
    """Lengths of every document segment in a [B, T] doc-id tensor (padding, -1, left out)."""
    rows = torch.arange(doc_ids.shape[0]).unsqueeze(1) * (doc_ids.shape[1] + 1)
    keys = (doc_ids + rows)[doc_ids >= 0]  # unique per (row, doc), in order
    return torch.unique_consecutive(keys, return_counts=True)[1]


class Stage:
    """Interface every stage implements; see LanguageModelStage for the reference one."""
    name: str = "stage"
    data_kind: str = "pretrain"
    default_packing: str = "padded"

    def loss_weight(self, batch: dict) -> int:
        """The micro-batch's count of loss units, known before the forward (the step's normaliser)."""
        raise NotImplementedError

    def batch_stats(self, batch: dict, model_config: ModelConfig) -> BatchStats:
        raise NotImplementedError

    def loss(self, engine, batch: dict) -> LossOutput:
        raise NotImplementedError


class LanguageModelStage(Stage):
    """Next-token cross-entropy over the supervised tokens (all text tokens for pretrain, assistant turns for SFT)."""
    data_kind = "pretrain"

    def __init__(self, name: str, data_kind: str, default_packing: str):
        self.name = name
        self.data_kind = data_kind
        self.default_packing = default_packing

    def loss_weight(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def batch_stats(self, batch: dict, model_config: ModelConfig) -> BatchStats:
        lengths = document_lengths(batch["doc_ids"])
        return BatchStats(
            input_tokens=int(lengths.sum()),
            supervised_tokens=self.loss_weight(batch),
            samples=int(batch["input_ids"].shape[0]),
            model_flops=3.0 * forward_flops(model_config, lengths),  # backward = 2 × forward
        )

    def loss(self, engine, batch: dict) -> LossOutput:
        output = engine(batch["input_ids"], doc_ids=batch["doc_ids"], position_ids=batch["position_ids"])
        loss_sum = F.cross_entropy(output.logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        return LossOutput(loss_sum=loss_sum, aux_loss=output.aux_loss)
