"""The one owner of metrics: accumulation, cross-rank reduction, rates, MFU, ETA and memory.

Costs nothing per micro-step beyond adding tensors: losses and stage sums stay on the device, token and
FLOP counts are host integers made from the CPU batch before it moves. Once per log step, one all-gather of
one packed vector and one copy to the host; the clock is read after a device synchronize at both ends of
each rate window. The data wait inside it is host time alone (loading and preparing batches is host work).
Definitions of every key are in docs/metrics.md.

Non-finite steps are found the same way: each step's flags (a NaN/Inf loss or gradient norm; an update held
back) stay on the device, with the step's data position on the host, and travel in that one all-gather.
"""
from __future__ import annotations

import math
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.distributed as dist

from train import distributed


@dataclass
class BatchStats:
    """Counts of one micro-batch, made on the host from the batch itself."""
    input_tokens: int  # non-padding tokens fed to the trained model(s)
    supervised_tokens: int  # tokens with a loss target
    samples: int  # sequences (or pairs, or prompts) of the micro-batch
    model_flops: float  # model FLOPs of the whole micro-batch step (forward + backward, all models)


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


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


@dataclass
class _Window:
    loss_sum: Optional[torch.Tensor] = None  # device
    loss_weight: int = 0
    aux_loss_sum: Optional[torch.Tensor] = None
    micro_batches: int = 0
    input_tokens: int = 0
    supervised_tokens: int = 0
    samples: int = 0
    # The rate window: only steps after warm-up count towards rates.
    rate_tokens: int = 0
    rate_samples: int = 0
    rate_flops: float = 0.0
    rate_steps: int = 0
    rate_data_wait: float = 0.0  # host seconds spent getting and preparing the rate window's micro-batches
    extra_sums: dict = field(default_factory=dict)  # name -> device tensor
    extra_counts: dict = field(default_factory=dict)  # name -> float
    steps: list = field(default_factory=list)  # StepOutcome of every step of the window


class MetricsTracker:
    def __init__(self, *, world_size: int, device: torch.device, peak_flops: Optional[float],
                 total_steps: int, warmup_steps: int, enabled: bool = True):
        self.world_size = world_size
        self.device = device
        self.peak_flops = peak_flops
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.enabled = enabled
        self.tokens_seen = 0  # global, cumulative (restored on resume)
        self.supervised_tokens_seen = 0
        self.skipped_steps = 0
        self.nonfinite_steps = 0
        self.steps_this_process = 0
        self.window_nonfinite: list[StepOutcome] = []  # the last collected window's non-finite steps, flags resolved
        self._position = (0, 0, 0)
        self._step_nonfinite: Optional[Flag] = None
        self._step_held_back: Optional[Flag] = None
        self.window = _Window()
        self.rate_window_start: Optional[float] = None
        self.last_grad_norm: Optional[torch.Tensor] = None
        self.last_step_skipped = False
        self._warned: set[str] = set()
        self.epoch_start = time.perf_counter()
        if warmup_steps == 0:
            self._start_rate_window()

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned and distributed.is_main():
            self._warned.add(key)
            print(f"WARNING: {message}", file=sys.stderr, flush=True)

    def _start_rate_window(self) -> None:
        distributed.synchronize()
        self.rate_window_start = time.perf_counter()

    def restart_rate_clock(self) -> None:
        """Leave the time since the last window out of the next (evaluation, checkpointing)."""
        if self.rate_window_start is not None:
            self._start_rate_window()

    def start_epoch(self) -> None:
        self.epoch_start = time.perf_counter()

    @contextmanager
    def waiting_for_data(self):
        """Count the block's host time as waiting for data (no device sync: the loader and batch preparation
        run on the host). Only inside the rate window, so warm-up, evaluation and saving stay out of it."""
        if not self.enabled:
            yield
            return
        started = time.perf_counter()
        yield
        if self.rate_window_start is not None:
            self.window.rate_data_wait += time.perf_counter() - started

    def begin_step(self, step: int, epoch: int, first_micro_batch: int) -> None:
        """Where the step about to run takes its data from (reported if it turns out non-finite)."""
        self._position = (step, epoch, first_micro_batch)
        self._step_nonfinite = self._step_held_back = None

    def add_update(self, grad_norm: Optional[torch.Tensor], held_back: Flag) -> None:
        """One optimizer update of the current step: its pre-clip norm (None: unknown) and whether it was not
        applied. Several per step when a stage updates more than once (PPO epochs, a critic)."""
        if grad_norm is not None:
            self._step_nonfinite = _either(self._step_nonfinite, ~torch.isfinite(grad_norm))
        self._step_held_back = _either(self._step_held_back, held_back)

    def add_micro_batch(self, loss_sum: torch.Tensor, loss_weight: int, stats: BatchStats,
                        aux_loss: Optional[torch.Tensor] = None, extras: Optional[dict] = None) -> None:
        """`extras`: name -> (device sum, host count); logged as the global sum / global count."""
        if not self.enabled:
            return
        w = self.window
        loss_sum = loss_sum.detach().to(torch.float64)
        self._step_nonfinite = _either(self._step_nonfinite, ~torch.isfinite(loss_sum))
        w.loss_sum = loss_sum if w.loss_sum is None else w.loss_sum + loss_sum
        w.loss_weight += loss_weight
        if aux_loss is not None:
            aux = aux_loss.detach().to(torch.float64)
            w.aux_loss_sum = aux if w.aux_loss_sum is None else w.aux_loss_sum + aux
        w.micro_batches += 1
        w.input_tokens += stats.input_tokens
        w.supervised_tokens += stats.supervised_tokens
        w.samples += stats.samples
        if self.rate_window_start is not None:
            w.rate_tokens += stats.input_tokens
            w.rate_samples += stats.samples
            w.rate_flops += stats.model_flops
        for name, (value_sum, count) in (extras or {}).items():
            value_sum = value_sum.detach().to(torch.float64)
            w.extra_sums[name] = value_sum + w.extra_sums[name] if name in w.extra_sums else value_sum
            w.extra_counts[name] = w.extra_counts.get(name, 0.0) + float(count)

    def add_optimizer_step(self, grad_norm: Optional[torch.Tensor], applied: bool) -> None:
        """Record the step just taken; `grad_norm` is its pre-clip global norm (None when unknown)."""
        self.steps_this_process += 1
        if self._step_held_back is None:  # a stage that updates without Trainer.backward_step
            self.add_update(grad_norm, not applied)
        step, epoch, first_micro_batch = self._position
        self.window.steps.append(StepOutcome(step, epoch, first_micro_batch,
                                             False if self._step_nonfinite is None else self._step_nonfinite,
                                             self._step_held_back))
        self._step_nonfinite = self._step_held_back = None
        if not self.enabled:
            return
        self.last_step_skipped = not applied
        self.last_grad_norm = grad_norm if applied else None
        if self.rate_window_start is not None:
            self.window.rate_steps += 1
        elif self.steps_this_process == self.warmup_steps:
            self._start_rate_window()

    def _gather(self, local: list) -> torch.Tensor:
        """One collective for the whole record: every rank's vector, as a [world, K] float64 host tensor."""
        def as_tensor(value) -> torch.Tensor:
            if isinstance(value, torch.Tensor):
                return value.to(self.device, torch.float64).reshape(())
            return torch.tensor(float(value), dtype=torch.float64, device=self.device)

        vector = torch.stack([as_tensor(value) for value in local])
        if self.world_size > 1:
            gathered = [torch.empty_like(vector) for _ in range(self.world_size)]
            dist.all_gather(gathered, vector)
            vector = torch.stack(gathered)
        else:
            vector = vector.unsqueeze(0)
        return vector.cpu()

    def _resolve_steps(self, flags: torch.Tensor) -> None:
        """Count the window's non-finite and held-back steps from their gathered flags ([world, 2 × steps])."""
        steps = self.window.steps
        either_rank = flags.amax(dim=0).tolist() if len(steps) else []
        self.window_nonfinite = []
        for i, outcome in enumerate(steps):
            nonfinite, held_back = bool(either_rank[i]), bool(either_rank[len(steps) + i])
            self.skipped_steps += held_back
            if nonfinite:
                self.nonfinite_steps += 1
                self.window_nonfinite.append(StepOutcome(outcome.step, outcome.epoch, outcome.first_micro_batch,
                                                         True, held_back))

    def _step_flags(self) -> list:
        return [o.nonfinite for o in self.window.steps] + [o.held_back for o in self.window.steps]

    def collect_step_outcomes(self) -> None:
        """The non-finite check alone, for a run that collects no metrics: one all-gather of the flags."""
        self._resolve_steps(self._gather(self._step_flags()) if self.window.steps else torch.zeros(1, 0))
        self.window = _Window()

    def collect(self, *, global_step: int, learning_rate: float) -> dict:
        """End the window: reduce over ranks, compute rates, reset. Called on every rank (collective)."""
        distributed.synchronize()
        now = time.perf_counter()
        w = self.window
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        extra_names = sorted(w.extra_sums)
        grad_norm = self.last_grad_norm
        local = [
            w.loss_sum if w.loss_sum is not None else zero, w.loss_weight,
            w.aux_loss_sum if w.aux_loss_sum is not None else zero, w.micro_batches,
            w.input_tokens, w.supervised_tokens, w.samples,
            w.rate_tokens, w.rate_samples, w.rate_flops,
            grad_norm if grad_norm is not None else float("nan"),
            peak_memory_gb(), w.rate_data_wait,
            *[w.extra_sums[n] for n in extra_names], *[w.extra_counts[n] for n in extra_names],
            *self._step_flags(),
        ]
        rows = self._gather(local)
        extras_end = 13 + 2 * len(extra_names)
        self._resolve_steps(rows[:, extras_end:])
        totals = rows[:, :extras_end].sum(dim=0).tolist()
        (loss_sum, loss_weight, aux_sum, micro_batches, input_tokens, supervised_tokens, samples,
         rate_tokens, rate_samples, rate_flops) = totals[:10]
        extras_total = totals[13:]
        grad_norm_value = rows[0, 10].item()
        memory = rows[:, 11].max().item()
        data_wait = rows[:, 12].max().item()  # the rank that waited longest holds the others up at the next collective

        self.tokens_seen += int(input_tokens)
        self.supervised_tokens_seen += int(supervised_tokens)
        record = {
            "train/loss": loss_sum / loss_weight if loss_weight else None,
            "train/learning_rate": learning_rate,
            "train/grad_norm": None,
            "train/global_step": global_step,
            "train/num_input_tokens_seen": self.tokens_seen,
            "train/num_supervised_tokens_seen": self.supervised_tokens_seen,
            "train/skipped_steps": self.skipped_steps,
            "train/nonfinite_steps": self.nonfinite_steps,
            "system/peak_memory_gb": memory,
        }
        if self.last_grad_norm is None and not self.last_step_skipped:
            self.warn_once("grad_norm", "grad norm unknown for this step: logged as null")
        elif math.isfinite(grad_norm_value):
            record["train/grad_norm"] = grad_norm_value
        elif not self.last_step_skipped:
            self.warn_once("grad_norm_nonfinite", f"non-finite grad norm at step {global_step}: logged as null")
        if w.aux_loss_sum is not None:
            record["train/aux_loss"] = aux_sum / micro_batches if micro_batches else None

        steps = w.rate_steps
        elapsed = now - self.rate_window_start if self.rate_window_start is not None else 0.0
        rates_known = steps > 0 and elapsed > 0
        if not rates_known:
            self.warn_once("rates", f"no rate window yet at step {global_step} (the first "
                                    f"{self.warmup_steps} steps are warm-up): rates logged as null")
        per_device_flops = rate_flops / elapsed / self.world_size if rates_known else None
        step_time = elapsed / steps if rates_known else None
        if self.peak_flops is None:
            self.warn_once("peak", "device peak FLOP/s unknown: MFU logged as null (set --peak_tflops)")
        mfu = 100 * per_device_flops / self.peak_flops if rates_known and self.peak_flops else None
        if mfu is not None and mfu > 100:
            # More than the peak is impossible: the peak is wrong (a CPU measured while loaded, a GPU misnamed).
            self.warn_once("mfu_over_peak", f"MFU came out at {mfu:.0f}% at step {global_step}: the device peak of "
                                            f"{self.peak_flops / 1e12:.4g} TFLOP/s is below what this run achieves; "
                                            f"MFU logged as null (set --peak_tflops)")
            mfu = None
        record.update({
            "train/tokens_per_second": rate_tokens / elapsed if rates_known else None,
            "train/samples_per_second": rate_samples / elapsed if rates_known else None,
            "train/steps_per_second": steps / elapsed if rates_known else None,
            "train/tflops_per_device": per_device_flops / 1e12 if rates_known else None,
            "train/mfu_percent": mfu,
            "system/step_time_s": step_time,
            "system/data_wait_percent": 100 * data_wait / elapsed if rates_known else None,
            "train/eta_minutes": max(0, self.total_steps - global_step) * step_time / 60 if rates_known else None,
            "system/epoch_time": (now - self.epoch_start) / 60,
        })
        for i, name in enumerate(extra_names):
            total, count = extras_total[i], extras_total[len(extra_names) + i]
            record[name] = total / count if count else None

        self.window = _Window()
        if self.rate_window_start is not None:
            self.rate_window_start = time.perf_counter()
        return record

    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "supervised_tokens_seen": self.supervised_tokens_seen,
                "skipped_steps": self.skipped_steps, "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict) -> None:
        self.tokens_seen = state["tokens_seen"]
        self.supervised_tokens_seen = state["supervised_tokens_seen"]
        self.skipped_steps = state["skipped_steps"]
        self.nonfinite_steps = state["nonfinite_steps"]
