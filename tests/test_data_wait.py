"""system/data_wait_percent against a loader whose waits are known: it sleeps before each batch and clocks its
own sleeps, and the test clocks the steps from outside the tracker."""
from __future__ import annotations

import time

import pytest
import torch

from train.metrics import BatchStats, MetricsTracker

LOAD_S, COMPUTE_S = 0.02, 0.03
STATS = BatchStats(computed_tokens=8, input_tokens=8, supervised_tokens=8, samples=1, model_flops=1e6)


class SlowLoader:
    """Yields batches after sleeping LOAD_S each, adding up the time it really spent asleep."""

    def __init__(self):
        self.slept = 0.0

    def __iter__(self):
        while True:
            started = time.perf_counter()
            time.sleep(LOAD_S)
            self.slept += time.perf_counter() - started
            yield {"input_ids": torch.zeros(1, 8)}


def run_steps(metrics: MetricsTracker, batches, steps: int, accumulation: int = 2) -> None:
    """The trainer's loop in miniature: fetch the step's micro-batches as Trainer.train does, then compute."""
    for _ in range(steps):
        with metrics.waiting_for_data():
            micro_batches = [next(batches) for _ in range(accumulation)]
        for _ in micro_batches:
            time.sleep(COMPUTE_S)
            metrics.add_micro_batch(torch.tensor(1.0), 8, STATS)
        metrics.add_optimizer_step(torch.tensor(1.0), True)


def tracker(warmup_steps: int, enabled: bool = True) -> MetricsTracker:
    return MetricsTracker(world_size=1, device=torch.device("cpu"), peak_flops=None, total_steps=100,
                          warmup_steps=warmup_steps, enabled=enabled)


def test_data_wait_is_the_loaders_share_of_the_window_wall_time():
    loader = SlowLoader()
    batches = iter(loader)
    metrics = tracker(warmup_steps=0)
    started = time.perf_counter()
    run_steps(metrics, batches, steps=4)
    wall = time.perf_counter() - started
    record = metrics.collect(global_step=4, learning_rate=1e-3)
    expected = 100 * loader.slept / wall  # about 40%: 2 × 20 ms of loading to 2 × 30 ms of compute per step
    assert record["system/data_wait_percent"] == pytest.approx(expected, abs=2.0)


def test_warm_up_and_time_between_windows_stay_out_of_it():
    loader = SlowLoader()
    batches = iter(loader)
    metrics = tracker(warmup_steps=1)
    run_steps(metrics, batches, steps=1)  # warm-up: its loading counts nowhere
    warm_up = metrics.collect(global_step=1, learning_rate=1e-3)
    assert warm_up["system/data_wait_percent"] is None  # no rate window yet, like every rate

    time.sleep(0.1)  # an evaluation or a checkpoint, between two windows
    next(batches)  # loading outside the loop's fetch (an evaluation's batches) is not the loop waiting
    metrics.restart_rate_clock()
    loader.slept = 0.0
    started = time.perf_counter()
    run_steps(metrics, batches, steps=3)
    wall = time.perf_counter() - started
    record = metrics.collect(global_step=4, learning_rate=1e-3)
    assert record["system/data_wait_percent"] == pytest.approx(100 * loader.slept / wall, abs=2.0)


def test_a_loader_that_never_waits_shows_almost_nothing():
    metrics = tracker(warmup_steps=0)
    run_steps(metrics, iter(lambda: {"input_ids": torch.zeros(1, 8)}, None), steps=3)
    assert metrics.collect(global_step=3, learning_rate=1e-3)["system/data_wait_percent"] < 1.0


def test_metrics_off_reads_no_clock(monkeypatch):
    metrics = tracker(warmup_steps=0, enabled=False)
    reads = []
    monkeypatch.setattr(time, "perf_counter", lambda: reads.append(1) or 0.0)
    with metrics.waiting_for_data():
        pass
    assert reads == [] and metrics.window.rate_data_wait == 0.0
