"""Preemption: SIGTERM or SIGUSR1 (what SLURM sends before a time limit) ends the run cleanly.

The handler only records the signal. After each optimizer step every rank asks, in one small collective over
a CPU (gloo) group, whether any rank received one — so all ranks stop at the same step, save one checkpoint
together and exit with REQUEUE_EXIT_CODE, which launch scripts and the SLURM template read as "requeue me".
A second signal while saving changes nothing: the flag is already set, and the checkpoint's `latest` is
written last, atomically.
"""
from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist

from train import distributed

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure, try again
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatch:
    def __init__(self):
        self.received: Optional[int] = None
        for signum in SIGNALS:
            signal.signal(signum, self._record)
        # A CPU group: on GPUs the question would otherwise cost a device synchronization every step.
        self.group = dist.new_group(backend="gloo") if distributed.world_size() > 1 else None

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def requested(self) -> bool:
        """Collective: True on every rank as soon as any rank has received a signal."""
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
