"""The one owner of metrics: accumulation, cross-rank reduction, rates, MFU, ETA and memory.

Costs nothing per micro-step beyond adding tensors: losses and stage sums stay on the device, token and
FLOP counts are host integers made from the CPU batch before it moves. Once per log step, one all-gather of
named values (reduce_over_ranks), the non-finite step flags of train/nonfinite.py among them, and one copy to
the host; the clock is read after a device synchronize at both ends of each rate window. The data wait inside
it is host time alone (loading and preparing batches is host work). Definitions of every key are in
docs/metrics.md.
"""
from __future__ import annotations

import math
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from train import distributed
from train.nonfinite import Flag, NonfiniteWatch, StepOutcome


@dataclass
class BatchStats:
    """Counts of one micro-batch, made on the host from the batch itself."""
    computed_tokens: int  # positions the trained model computed, padding included (rows × width)
    input_tokens: int  # non-padding tokens fed to the trained model(s)
    supervised_tokens: int  # tokens with a loss target
    samples: int  # sequences (or pairs, or prompts) of the micro-batch
    model_flops: float  # model FLOPs of the whole micro-batch step (forward + backward, all models)
    recomputed_flops: float = 0.0  # forward FLOPs run again in the backward (activation checkpointing, chunked loss)


def peak_memory_gb() -> tuple[Optional[float], Optional[float]]:
    """(allocated, reserved) peak since the last reset_peak_memory(), in GB. CUDA: the caching allocator's tensors
    and what it holds from the driver, the one that runs out. CPU: the process's peak resident set (VmHWM), and no
    reserve apart from it; None where /proc/self/status cannot be read (not Linux: getrusage's lifetime peak cannot
    be reset, so it is no window's peak)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024 / 1e9, None
    except (OSError, AttributeError) as error:
        _peak_memory_unknown(f"/proc/self/status gave no VmHWM ({error})")
        return None, None


def reset_peak_memory() -> bool:
    """Start a new peak: each window reports its own steps' memory, not evaluation's, generation's or an export's
    before it (on CPU, Linux's clear_refs resets VmHWM). False where the reset failed: the next read is then a peak
    of an earlier, longer span, not the window's."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError as error:
        _peak_memory_unknown(f"/proc/self/clear_refs could not be written ({error})")
        return False


def _peak_memory_unknown(reason: str) -> None:
    """Name, once per process and reason, why system/peak_memory_gb is logged as null."""
    if reason not in _peak_memory_warnings:
        _peak_memory_warnings.add(reason)
        print(f"WARNING: peak memory unknown: {reason}; system/peak_memory_gb logged as null", file=sys.stderr,
              flush=True)


_peak_memory_warnings: set[str] = set()


def device_clock():
    """A mark on the device's timeline without waiting for it: a recorded CUDA event on a GPU (its time is read
    once the device has caught up), the host clock elsewhere (CPU work is done when the call returns)."""
    if torch.cuda.is_available():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def mark_seconds(start, end) -> float:
    return start.elapsed_time(end) / 1000 if isinstance(start, torch.cuda.Event) else end - start


def reduce_over_ranks(values: dict, device: torch.device) -> dict:
    """name -> (value, how) to name -> the value reduced over ranks, `how` being "sum", "max" or "rank0" (rank 0's).

    Values are device tensors or host numbers; one float64 vector, one all-gather, one copy to the host. Every
    rank passes the same names in the same order; no names, no collective."""
    if not values:
        return {}

    def as_tensor(value) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.to(device, torch.float64).reshape(())
        return torch.tensor(float(value), dtype=torch.float64, device=device)

    rows = distributed.gather_rows(torch.stack([as_tensor(value) for value, _ in values.values()])).cpu()
    columns = {"sum": rows.sum(dim=0).tolist(), "max": rows.amax(dim=0).tolist(), "rank0": rows[0].tolist()}
    return {name: columns[how][i] for i, (name, (_, how)) in enumerate(values.items())}


@dataclass
class Phase:
    """One step's time in a named part of its work (RL: generate, score, reference, update) between two
    `device_clock()` marks, with the work done in it where it is known: logged as timing/<name>_s and, over the
    rate window, perf/<name>_mfu_percent (flops), perf/<name>_tokens_per_second (tokens) and
    perf/<name>_mbu_percent (bytes_read: memory traffic over the device's peak bandwidth)."""
    name: str
    start: object
    end: object
    flops: Optional[float] = None
    tokens: Optional[int] = None
    bytes_read: Optional[float] = None


PHASE_WORK = ("flops", "tokens", "bytes_read")


@dataclass
class _Window:
    loss_sum: Optional[torch.Tensor] = None  # device
    loss_weight: int = 0
    aux_loss_sum: Optional[torch.Tensor] = None
    micro_batches: int = 0
    computed_tokens: int = 0
    input_tokens: int = 0
    supervised_tokens: int = 0
    # The rate window: only steps after warm-up count towards rates.
    rate_tokens: int = 0
    rate_samples: int = 0
    rate_flops: float = 0.0
    rate_hardware_flops: float = 0.0  # rate_flops + the recomputed FLOPs
    rate_steps: int = 0
    rate_data_wait: float = 0.0  # host seconds spent getting and preparing the rate window's micro-batches
    extra_sums: dict = field(default_factory=dict)  # name -> device tensor
    extra_counts: dict = field(default_factory=dict)  # name -> float


class MetricsTracker:
    def __init__(self, *, world_size: int, device: torch.device, peak_flops: Optional[float],
                 total_steps: int, warmup_steps: int, enabled: bool = True, eval_interval: int = 0,
                 save_interval: int = 0, peak_bandwidth: Optional[float] = None,
                 compile_seconds: Optional[Callable[[], float]] = None):
        self.world_size = world_size
        self.device = device
        self.peak_flops = peak_flops
        self.peak_bandwidth = peak_bandwidth  # bytes/s, for perf/*_mbu_percent
        self.compile_seconds = compile_seconds  # --compile: the process's time compiling so far
        self.window_compile_start = 0.0
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.enabled = enabled
        self.tokens_seen = 0  # global, cumulative (restored on resume): non-padding input tokens
        self.computed_tokens_seen = 0  # every position computed, padding included
        self.supervised_tokens_seen = 0
        self.steps_this_process = 0
        self.nonfinite_watch = NonfiniteWatch()
        self.window = _Window()
        self.rate_window_start: Optional[float] = None
        self.last_grad_norm: Optional[torch.Tensor] = None
        self.last_step_skipped = False
        self._warned: set[str] = set()
        self.peak_memory_reset = reset_peak_memory()  # whether the window's peak is its own (reset at its start)
        # Cumulative over the run, across resumes (state_dict): the training time of the current epoch (evaluation
        # and checkpointing left out), and every rate window's tokens, FLOPs and seconds (summary.json's means).
        self.epoch_seconds = 0.0
        self.epoch_clock = time.perf_counter()
        self.rate_totals = {"tokens": 0.0, "flops": 0.0, "seconds": 0.0}
        self.last_values: dict[str, Optional[torch.Tensor]] = {}  # name -> the window's last step's value, or None
        self.phases: list[tuple[Phase, bool]] = []  # the window's phases, in the rate window or not
        # ETA: evaluations and checkpoints still to come, at the mean duration measured so far in this process.
        self.intervals = {"eval": eval_interval, "save": save_interval}
        self.overheads = {kind: [0.0, 0] for kind in self.intervals}  # kind -> [seconds, count]
        if warmup_steps == 0:
            self._start_rate_window()

    @property
    def skipped_steps(self) -> int:
        return self.nonfinite_watch.skipped_steps

    @property
    def nonfinite_steps(self) -> int:
        return self.nonfinite_watch.nonfinite_steps

    @property
    def window_open(self) -> bool:
        """Steps were taken since the last collect."""
        return bool(self.nonfinite_watch.steps)

    @property
    def window_nonfinite(self) -> list[StepOutcome]:
        """The last collected window's non-finite steps, flags resolved."""
        return self.nonfinite_watch.window_nonfinite

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned and distributed.is_main():
            self._warned.add(key)
            print(f"WARNING: {message}", file=sys.stderr, flush=True)

    def _start_rate_window(self) -> None:
        distributed.synchronize()
        self.rate_window_start = time.perf_counter()
        self.window_compile_start = self._compile_clock()

    def _compile_clock(self) -> float:
        return self.compile_seconds() if self.compile_seconds else 0.0

    def restart_rate_clock(self) -> None:
        """Leave the time since the last window out of the next window's rates and of the epoch time (start-up,
        evaluation, checkpointing)."""
        if self.rate_window_start is not None:
            self._start_rate_window()
        self.epoch_clock = time.perf_counter()
        self.peak_memory_reset = reset_peak_memory()

    def start_epoch(self, resumed: bool = False) -> None:
        """A new epoch's clock (`resumed`: the epoch a checkpoint stopped in goes on from its saved time)."""
        if not resumed:
            self.epoch_seconds = 0.0
        self.epoch_clock = time.perf_counter()

    def add_overhead(self, kind: str, seconds: float) -> None:
        """The measured duration of one evaluation ("eval") or checkpoint ("save")."""
        self.overheads[kind][0] += seconds
        self.overheads[kind][1] += 1

    def _remaining_overheads(self, global_step: int) -> float:
        """Seconds the evaluations and checkpoints after global_step will take (each also falls on the last step);
        a kind not measured yet counts nothing."""
        total = 0.0
        for kind, interval in self.intervals.items():
            seconds, count = self.overheads[kind]
            if not count or global_step >= self.total_steps:
                continue
            due = self.total_steps // interval - global_step // interval if interval else 0
            final_extra = not interval or self.total_steps % interval
            total += (due + bool(final_extra)) * seconds / count
        return total

    def set_last(self, name: str, value: Optional[torch.Tensor]) -> None:
        """A metric logged as its value at the window's last step (rank 0's), like train/grad_norm; None: unknown
        at that step (a skipped update), logged as null."""
        self.last_values[name] = value

    def add_phase(self, phase: Phase) -> None:
        """One step's phase: its time is logged as the mean per step over the window and the ranks, its work as
        rates over the rate window's steps. The marks are read at the next collect, after its device synchronize."""
        self.phases.append((phase, self.rate_window_start is not None))

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
        self.nonfinite_watch.begin_step(step, epoch, first_micro_batch)

    def add_update(self, grad_norm: Optional[torch.Tensor], held_back: Flag) -> None:
        """One optimizer update of the current step: its pre-clip norm (None: unknown) and whether it was not
        applied. Several per step when a stage updates more than once (PPO epochs, a critic)."""
        self.nonfinite_watch.add_update(grad_norm, held_back)

    def add_micro_batch(self, loss_sum: torch.Tensor, loss_weight: int, stats: BatchStats,
                        aux_loss: Optional[torch.Tensor] = None, extras: Optional[dict] = None) -> None:
        """`extras`: name -> (device sum, host count); logged as the global sum / global count."""
        if not self.enabled:
            return
        w = self.window
        loss_sum = loss_sum.detach().to(torch.float64)
        self.nonfinite_watch.add_loss_sum(loss_sum)
        w.loss_sum = loss_sum if w.loss_sum is None else w.loss_sum + loss_sum
        w.loss_weight += loss_weight
        if aux_loss is not None:
            aux = aux_loss.detach().to(torch.float64)
            w.aux_loss_sum = aux if w.aux_loss_sum is None else w.aux_loss_sum + aux
        w.micro_batches += 1
        w.computed_tokens += stats.computed_tokens
        w.input_tokens += stats.input_tokens
        w.supervised_tokens += stats.supervised_tokens
        if self.rate_window_start is not None:
            w.rate_tokens += stats.input_tokens
            w.rate_samples += stats.samples
            w.rate_flops += stats.model_flops
            w.rate_hardware_flops += stats.model_flops + stats.recomputed_flops
        for name, (value_sum, count) in (extras or {}).items():
            value_sum = value_sum.detach().to(torch.float64)
            w.extra_sums[name] = value_sum + w.extra_sums[name] if name in w.extra_sums else value_sum
            w.extra_counts[name] = w.extra_counts.get(name, 0.0) + float(count)

    def add_optimizer_step(self, grad_norm: Optional[torch.Tensor], applied: bool) -> None:
        """Record the step just taken; `grad_norm` is its pre-clip global norm (None when unknown)."""
        self.steps_this_process += 1
        self.nonfinite_watch.end_step(grad_norm, applied)
        if not self.enabled:
            return
        self.last_step_skipped = not applied
        self.last_grad_norm = grad_norm if applied else None
        if self.rate_window_start is not None:
            self.window.rate_steps += 1
        elif self.steps_this_process == self.warmup_steps:
            self._start_rate_window()

    def collect_step_outcomes(self) -> None:
        """The non-finite check alone, for a run that collects no metrics: one all-gather of the flags."""
        self.nonfinite_watch.resolve(reduce_over_ranks(self.nonfinite_watch.flags(), self.device))
        self.window = _Window()

    def collect(self, *, global_step: int, learning_rate: float) -> dict:
        """End the window: reduce over ranks, compute rates, reset. Called on every rank (collective)."""
        distributed.synchronize()
        now = time.perf_counter()
        w = self.window
        extra_names = sorted(w.extra_sums)
        # Without the reset the peak is an earlier, longer span's: unknown (reset_peak_memory warned), not wrong.
        peak_allocated, peak_reserved = peak_memory_gb() if self.peak_memory_reset else (None, None)
        local = {
            "loss_sum": (w.loss_sum if w.loss_sum is not None else 0.0, "sum"),
            "loss_weight": (w.loss_weight, "sum"),
            "aux_loss_sum": (w.aux_loss_sum if w.aux_loss_sum is not None else 0.0, "sum"),
            "micro_batches": (w.micro_batches, "sum"), "input_tokens": (w.input_tokens, "sum"),
            "computed_tokens": (w.computed_tokens, "sum"),
            "supervised_tokens": (w.supervised_tokens, "sum"),
            "rate_tokens": (w.rate_tokens, "sum"), "rate_samples": (w.rate_samples, "sum"),
            "rate_flops": (w.rate_flops, "sum"), "rate_hardware_flops": (w.rate_hardware_flops, "sum"),
            "grad_norm": (self.last_grad_norm if self.last_grad_norm is not None else float("nan"), "rank0"),
            "peak_memory_gb": (peak_allocated if peak_allocated is not None else float("nan"), "max"),
            "peak_reserved_gb": (peak_reserved if peak_reserved is not None else float("nan"), "max"),
            # The rank that waited longest holds the others up at the next collective.
            "data_wait": (w.rate_data_wait, "max"),
            # A (re)compile inside the rate window is not a step's cost; the ranks wait for the slowest to finish.
            "compile_seconds": (self._compile_clock() - self.window_compile_start
                                if self.rate_window_start is not None else 0.0, "max"),
        }
        for name in extra_names:
            local[("extra_sum", name)] = (w.extra_sums[name], "sum")
            local[("extra_count", name)] = (w.extra_counts[name], "sum")
        phase_names = sorted({phase.name for phase, _ in self.phases})
        for name in phase_names:
            seconds = [(mark_seconds(phase.start, phase.end), phase, rated) for phase, rated in self.phases
                       if phase.name == name]
            local[("phase_sum", name)] = (sum(s for s, _, _ in seconds), "sum")
            local[("phase_count", name)] = (len(seconds), "sum")
            local[("phase_rate_seconds", name)] = (sum(s for s, _, rated in seconds if rated), "sum")
            for work in PHASE_WORK:
                if getattr(seconds[0][1], work) is not None:
                    local[(work, name)] = (sum(getattr(p, work) for _, p, rated in seconds if rated), "sum")
        last_names = sorted(self.last_values)
        for name in last_names:
            value = self.last_values[name]
            local[("last", name)] = (value if value is not None else float("nan"), "rank0")
        reduced = reduce_over_ranks({**local, **self.nonfinite_watch.flags()}, self.device)
        self.nonfinite_watch.resolve(reduced)

        self.tokens_seen += int(reduced["input_tokens"])
        self.computed_tokens_seen += int(reduced["computed_tokens"])
        self.supervised_tokens_seen += int(reduced["supervised_tokens"])
        record = {
            "train/loss": reduced["loss_sum"] / reduced["loss_weight"] if reduced["loss_weight"] else None,
            "train/learning_rate": learning_rate,
            "train/grad_norm": None,
            "train/global_step": global_step,
            "train/num_input_tokens_seen": self.tokens_seen,
            "train/num_computed_tokens_seen": self.computed_tokens_seen,
            "train/padding_percent": (100 * (1 - reduced["input_tokens"] / reduced["computed_tokens"])
                                      if reduced["computed_tokens"] else None),
            "train/num_supervised_tokens_seen": self.supervised_tokens_seen,
            "train/skipped_steps": self.skipped_steps,
            "train/nonfinite_steps": self.nonfinite_steps,
            "system/peak_memory_gb": (reduced["peak_memory_gb"] if math.isfinite(reduced["peak_memory_gb"])
                                      else None),
        }
        if peak_reserved is not None:
            record["system/peak_memory_reserved_gb"] = reduced["peak_reserved_gb"]
        if self.last_grad_norm is None and not self.last_step_skipped:
            self.warn_once("grad_norm", "grad norm unknown for this step: logged as null")
        elif math.isfinite(reduced["grad_norm"]):
            record["train/grad_norm"] = reduced["grad_norm"]
        elif not self.last_step_skipped:
            self.warn_once("grad_norm_nonfinite", f"non-finite grad norm at step {global_step}: logged as null")
        if w.aux_loss_sum is not None:
            micro_batches = reduced["micro_batches"]
            record["train/aux_loss"] = reduced["aux_loss_sum"] / micro_batches if micro_batches else None

        steps = w.rate_steps
        elapsed = 0.0
        if self.rate_window_start is not None:
            elapsed = now - self.rate_window_start - reduced["compile_seconds"]
        rates_known = steps > 0 and elapsed > 0
        if not rates_known:
            self.warn_once("rates", f"no rate window yet at step {global_step} (the first "
                                    f"{self.warmup_steps} steps are warm-up): rates logged as null")
        per_device_flops = reduced["rate_flops"] / elapsed / self.world_size if rates_known else None
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
        if rates_known:
            self.rate_totals["tokens"] += reduced["rate_tokens"]
            self.rate_totals["flops"] += reduced["rate_flops"]
            self.rate_totals["seconds"] += elapsed
        self.epoch_seconds += now - self.epoch_clock
        self.epoch_clock = now
        record.update({
            "train/tokens_per_second": reduced["rate_tokens"] / elapsed if rates_known else None,
            "train/samples_per_second": reduced["rate_samples"] / elapsed if rates_known else None,
            "train/steps_per_second": steps / elapsed if rates_known else None,
            "train/tflops_per_device": per_device_flops / 1e12 if rates_known else None,
            "train/mfu_percent": mfu,
            # The same rate with recomputation counted (what the device ran); equal to MFU without any.
            "train/hfu_percent": (mfu * reduced["rate_hardware_flops"] / reduced["rate_flops"]
                                  if mfu is not None and reduced["rate_flops"] else None),
            "system/step_time_s": step_time,
            "system/data_wait_percent": 100 * reduced["data_wait"] / elapsed if rates_known else None,
            "train/eta_minutes": (max(0, self.total_steps - global_step) * step_time
                                  + self._remaining_overheads(global_step)) / 60 if rates_known else None,
            "system/epoch_time": self.epoch_seconds / 60,
        })
        if self.compile_seconds:
            record["system/compile_time_s"] = reduced["compile_seconds"]
        for name in extra_names:
            count = reduced[("extra_count", name)]
            record[name] = reduced[("extra_sum", name)] / count if count else None
        for name in phase_names:
            record.update(self._phase_record(name, reduced))
        for name in last_names:
            value = reduced[("last", name)]
            record[name] = value if math.isfinite(value) else None
            if record[name] is None:
                self.warn_once(f"last_{name}", f"{name} unknown at step {global_step} (its update was skipped or not "
                                               f"finite): logged as null")
        self.phases, self.last_values = [], {}

        self.window = _Window()
        self.peak_memory_reset = reset_peak_memory()
        if self.rate_window_start is not None:
            self.rate_window_start = time.perf_counter()
            self.window_compile_start = self._compile_clock()
        return record

    def _phase_record(self, name: str, reduced: dict) -> dict:
        """timing/<name>_s, and the rates of the phase's work over its rate-window time on every rank: FLOPs and
        bytes per device-second against the device's peaks, tokens per second of the whole job."""
        record = {f"timing/{name}_s": reduced[("phase_sum", name)] / reduced[("phase_count", name)]}
        device_seconds = reduced[("phase_rate_seconds", name)]  # summed over ranks
        if ("flops", name) in reduced:
            per_device = reduced[("flops", name)] / device_seconds if device_seconds else None
            record[f"perf/{name}_mfu_percent"] = (100 * per_device / self.peak_flops
                                                  if per_device is not None and self.peak_flops else None)
        if ("tokens", name) in reduced:
            record[f"perf/{name}_tokens_per_second"] = (reduced[("tokens", name)] * self.world_size / device_seconds
                                                        if device_seconds else None)
        if ("bytes_read", name) in reduced:
            bytes_read = reduced[("bytes_read", name)]
            if self.peak_bandwidth is None:
                self.warn_once("peak_bandwidth", f"device peak memory bandwidth unknown: perf/{name}_mbu_percent "
                                                 f"logged as null")
            elif not math.isfinite(bytes_read):
                self.warn_once(f"bytes_{name}", f"bytes read by the {name} phase unknown (a mixture-of-experts model "
                                                f"reads the experts its tokens route to): perf/{name}_mbu_percent "
                                                f"logged as null")
            record[f"perf/{name}_mbu_percent"] = (100 * bytes_read / device_seconds / self.peak_bandwidth
                                                  if device_seconds and self.peak_bandwidth
                                                  and math.isfinite(bytes_read) else None)
        return record

    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "supervised_tokens_seen": self.supervised_tokens_seen,
                "computed_tokens_seen": self.computed_tokens_seen,
                "skipped_steps": self.skipped_steps, "nonfinite_steps": self.nonfinite_steps,
                "epoch_seconds": self.epoch_seconds, "rate_totals": dict(self.rate_totals)}

    def load_state_dict(self, state: dict) -> None:
        self.tokens_seen = state["tokens_seen"]
        self.supervised_tokens_seen = state["supervised_tokens_seen"]
        self.nonfinite_watch.skipped_steps = state["skipped_steps"]
        self.nonfinite_watch.nonfinite_steps = state["nonfinite_steps"]
        # Checkpoints from before these were kept start them at zero.
        self.computed_tokens_seen = state.get("computed_tokens_seen", 0)
        self.epoch_seconds = state.get("epoch_seconds", 0.0)
        self.rate_totals = dict(state.get("rate_totals", self.rate_totals))

    def run_means(self) -> tuple[Optional[float], Optional[float]]:
        """(tokens/s, MFU %) over every rate window of the run, across resumes: totals over total time."""
        seconds = self.rate_totals["seconds"]
        if not seconds:
            return None, None
        tokens_per_second = self.rate_totals["tokens"] / seconds
        per_device = self.rate_totals["flops"] / seconds / self.world_size
        return tokens_per_second, 100 * per_device / self.peak_flops if self.peak_flops else None
