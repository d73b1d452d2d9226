"""Non-finite step detection: each step's flags (a NaN/Inf loss or gradient norm; an update held back) stay on
the device, with the step's data position on the host, until a log step reduces them over ranks (max: any rank)
in the same collective as the metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

Flag = Union[torch.Tensor, bool]  # a device bool where the device decided, a host bool where the host knows


def _either(a: Optional[Flag], b: Optional[Flag]) -> Optional[Flag]:
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, bool) and isinstance(b, bool):
        return a or b
    return torch.logical_or(torch.as_tensor(a), torch.as_tensor(b))


@dataclass
class StepOutcome:
    """One global step: where its data came from and whether it went wrong (flags read at the next log step)."""
    step: int
    epoch: int  # 0-based
    first_micro_batch: int  # this rank's micro-batch index in the epoch; the step used accumulation_steps of them
    nonfinite: Flag  # a NaN/Inf loss sum or pre-clip gradient norm
    held_back: Flag  # an update of the step was not applied


class NonfiniteWatch:
    """The window's steps with their unread flags; resolved into counts and the non-finite steps at a log step."""

    def __init__(self):
        self.skipped_steps = 0  # cumulative (restored on resume)
        self.nonfinite_steps = 0
        self.window_nonfinite: list[StepOutcome] = []  # the last resolved window's non-finite steps
        self.steps: list[StepOutcome] = []  # every step of the window, flags unread
        self._position = (0, 0, 0)
        self._nonfinite: Optional[Flag] = None
        self._held_back: Optional[Flag] = None

    def begin_step(self, step: int, epoch: int, first_micro_batch: int) -> None:
        self._position = (step, epoch, first_micro_batch)
        self._nonfinite = self._held_back = None

    def add_update(self, grad_norm: Optional[torch.Tensor], held_back: Flag) -> None:
        if grad_norm is not None:
            self._nonfinite = _either(self._nonfinite, ~torch.isfinite(grad_norm))
        self._held_back = _either(self._held_back, held_back)

    def add_loss_sum(self, loss_sum: torch.Tensor) -> None:
        self._nonfinite = _either(self._nonfinite, ~torch.isfinite(loss_sum))

    def end_step(self, grad_norm: Optional[torch.Tensor], applied: bool) -> None:
        if self._held_back is None:  # a step that reported no update through the Updater
            self.add_update(grad_norm, not applied)
        step, epoch, first_micro_batch = self._position
        self.steps.append(StepOutcome(step, epoch, first_micro_batch,
                                      False if self._nonfinite is None else self._nonfinite, self._held_back))
        self._nonfinite = self._held_back = None

    def flags(self) -> dict:
        """The window's flags as named values for MetricsTracker's reduction: name -> (flag, "max")."""
        named = {}
        for i, outcome in enumerate(self.steps):
            named[("step_nonfinite", i)] = (outcome.nonfinite, "max")
            named[("step_held_back", i)] = (outcome.held_back, "max")
        return named

    def resolve(self, reduced: dict) -> None:
        """Count the window's non-finite and held-back steps from the flags reduced over ranks; start a new window."""
        self.window_nonfinite = []
        for i, outcome in enumerate(self.steps):
            nonfinite, held_back = bool(reduced[("step_nonfinite", i)]), bool(reduced[("step_held_back", i)])
            self.skipped_steps += held_back
            if nonfinite:
                self.nonfinite_steps += 1
                self.window_nonfinite.append(StepOutcome(outcome.step, outcome.epoch, outcome.first_micro_batch,
                                                         True, held_back))
        self.steps = []
