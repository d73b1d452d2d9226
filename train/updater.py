"""The one way any stage changes weights: the step's loss normalised over its micro-batches and ranks, backward
per micro-batch, one optimizer step, and the step's outcome handed to the metrics.

The objective of a step is (Σ over ranks and micro-batches of the loss sums) / (Σ of their loss units), so every
token (or pair) weighs the same whatever micro-batch or rank it landed in; the units are counted on the host
before the forward, and one all-reduce per step makes them global. An auxiliary loss (MoE load balance) is
already a mean per micro-batch: its share is its mean over the step's micro-batches and ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from train import distributed
from train.backend import TrainedModel, Update


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # summed over the micro-batch's loss units (tokens, pairs, ...)
    aux_loss: Optional[torch.Tensor] = None  # already weighted, a mean over the micro-batch
    extras: dict = field(default_factory=dict)  # metric name -> (device sum, host count)


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return tensor
    # From pinned memory the copy is queued; from pageable memory it would wait for the stream (a host sync).
    return tensor.pin_memory().to(device, non_blocking=True)


class Updater:
    def __init__(self, device: torch.device, on_update: Callable[[Update], None]):
        self.device = device
        self.on_update = on_update  # the metrics' hook: every update's grad norm and hold-back flags

    def normaliser(self, local_units: float) -> torch.Tensor:
        """1 / the step's loss units over all ranks (one all-reduce): multiplies a micro-batch's loss sum into its
        share of the step's objective."""
        units = distributed.sum_over_ranks(host_to_device(torch.tensor(float(local_units)), self.device))
        return 1.0 / units.clamp_min(1.0)

    def update(self, model: TrainedModel, micro_batches: Sequence, loss: Callable[[TrainedModel, object], LossOutput],
               normaliser: torch.Tensor) -> tuple[list[LossOutput], Update]:
        """One optimizer step of `model` on `loss` over the step's micro-batches."""
        outputs = []
        for batch in micro_batches:
            output = loss(model, batch)
            objective = output.loss_sum * normaliser
            if output.aux_loss is not None:
                objective = objective + output.aux_loss / (len(micro_batches) * distributed.world_size())
            model.backward(objective)
            outputs.append(output)
        update = model.step()
        self.on_update(update)
        return outputs, update
