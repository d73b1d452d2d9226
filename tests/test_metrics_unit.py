"""The metrics tracker and the logging back-ends in one process: windows, unknown values, failing back-ends."""
from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time

import pytest
import torch

from train.config import REPO_ROOT
from train.loggers import JsonlLogger, Logger, MultiLogger, console_line
from train.metrics import BatchStats, MetricsTracker, Phase
from train.trainer import finite_or_null


def tracker(**overrides) -> MetricsTracker:
    options = dict(world_size=1, device=torch.device("cpu"), peak_flops=1e12, total_steps=10, warmup_steps=1)
    return MetricsTracker(**{**options, **overrides})


def add_step(metrics: MetricsTracker, loss_sum: float, tokens: int, grad_norm=1.0, applied=True):
    stats = BatchStats(computed_tokens=tokens + 5, input_tokens=tokens + 3, supervised_tokens=tokens, samples=2, model_flops=1e9)
    metrics.add_micro_batch(torch.tensor(loss_sum), tokens, stats)
    metrics.add_optimizer_step(None if grad_norm is None else torch.tensor(grad_norm), applied)


def test_loss_is_token_weighted_over_the_window_and_counts_accumulate():
    metrics = tracker(warmup_steps=0)
    add_step(metrics, loss_sum=10.0, tokens=5)
    add_step(metrics, loss_sum=30.0, tokens=15)
    record = metrics.collect(global_step=2, learning_rate=1e-3)
    assert record["train/loss"] == pytest.approx(40.0 / 20)  # not the mean of 2.0 and 2.0 by batch, by token
    assert record["train/num_supervised_tokens_seen"] == 20
    assert record["train/num_input_tokens_seen"] == 26
    add_step(metrics, loss_sum=4.0, tokens=4)
    record = metrics.collect(global_step=3, learning_rate=1e-3)
    assert record["train/loss"] == pytest.approx(1.0)
    assert record["train/num_input_tokens_seen"] == 33


def test_rates_are_null_during_warm_up_then_cover_only_later_steps():
    metrics = tracker(warmup_steps=2, peak_flops=1e18)  # these steps take microseconds: far from any real peak
    add_step(metrics, 1.0, 10)
    first = metrics.collect(global_step=1, learning_rate=1e-3)
    assert first["train/tokens_per_second"] is None and first["train/mfu_percent"] is None
    assert first["train/eta_minutes"] is None
    add_step(metrics, 1.0, 10)  # the last warm-up step: starts the rate window
    add_step(metrics, 1.0, 10)
    add_step(metrics, 1.0, 10)
    record = metrics.collect(global_step=4, learning_rate=1e-3)
    step_time = record["system/step_time_s"]
    assert record["train/steps_per_second"] == pytest.approx(1 / step_time)
    assert record["train/tokens_per_second"] == pytest.approx(13 / step_time)  # 2 steps of 13 tokens / 2 steps
    assert record["train/tflops_per_device"] == pytest.approx(1e9 / step_time / 1e12)
    assert record["train/mfu_percent"] == pytest.approx(100 * 1e9 / step_time / 1e18)
    assert record["train/eta_minutes"] == pytest.approx(6 * step_time / 60)


def test_mfu_above_the_peak_is_null_with_a_warning(capsys):
    metrics = tracker(warmup_steps=0, peak_flops=1.0)  # a peak no step can stay under
    add_step(metrics, 1.0, 10)
    record = metrics.collect(global_step=1, learning_rate=1e-3)
    assert record["train/tflops_per_device"] > 0 and record["train/mfu_percent"] is None
    assert "below what this run achieves" in capsys.readouterr().err


def test_skipped_step_counts_and_its_norm_is_null_not_stale():
    metrics = tracker()
    add_step(metrics, 1.0, 10, grad_norm=2.5)
    assert metrics.collect(global_step=1, learning_rate=1e-3)["train/grad_norm"] == pytest.approx(2.5)
    add_step(metrics, 1.0, 10, grad_norm=2.5, applied=False)  # an fp16 overflow leaves DeepSpeed's value stale
    record = metrics.collect(global_step=2, learning_rate=1e-3)
    assert record["train/grad_norm"] is None
    assert record["train/skipped_steps"] == 1


def test_unknown_norm_and_unknown_peak_are_null_with_one_warning(capsys):
    metrics = tracker(peak_flops=None, warmup_steps=0)
    add_step(metrics, 1.0, 10, grad_norm=None)
    add_step(metrics, 1.0, 10, grad_norm=None)
    first = metrics.collect(global_step=2, learning_rate=1e-3)
    add_step(metrics, 1.0, 10, grad_norm=None)
    metrics.collect(global_step=3, learning_rate=1e-3)
    assert first["train/grad_norm"] is None and first["train/mfu_percent"] is None
    assert first["train/tflops_per_device"] > 0  # FLOP/s are known; only the ratio to a peak is not
    err = capsys.readouterr().err
    assert err.count("grad norm unknown") == 1 and err.count("peak FLOP/s unknown") == 1


def test_non_finite_grad_norm_is_null():
    metrics = tracker()
    add_step(metrics, 1.0, 10, grad_norm=float("inf"))
    assert metrics.collect(global_step=1, learning_rate=1e-3)["train/grad_norm"] is None


class Exploding(Logger):
    name = "exploding"

    def __init__(self):
        self.calls = 0

    def log(self, record, step):
        self.calls += 1
        raise ConnectionError("server unreachable")


def test_a_failing_backend_warns_once_and_the_others_keep_logging(tmp_path, capsys):
    exploding = Exploding()
    jsonl = JsonlLogger(tmp_path / "metrics.jsonl")
    loggers = MultiLogger([exploding, jsonl])
    with pytest.warns(UserWarning, match="exploding logging failed at step 1"):
        loggers.log({"train/loss": 1.0, "train/grad_norm": math.nan}, step=1)
    loggers.log({"train/loss": 0.5}, step=2)
    loggers.close()
    assert exploding.calls == 1
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"train/loss": 1.0, "train/grad_norm": None}, {"train/loss": 0.5}]


def test_console_line_shows_unknown_values_as_na():
    line = console_line({"progress/epoch_index": 0, "progress/epochs": 2, "progress/epoch_step": 29,
                         "progress/steps_per_epoch": 297, "train/global_step": 29, "train/loss": 4.63,
                         "train/learning_rate": 5e-8, "train/grad_norm": 0.82, "train/tokens_per_second": None,
                         "train/mfu_percent": 2.514, "train/eta_minutes": 3.14})
    assert line == ("Epoch:[1/2](29/297) step:29 loss:4.6300 lr:5.00e-08 grad_norm:0.820 tokens/s:n/a "
                    "MFU:2.51% eta:3.1min")


def test_nonfinite_steps_are_found_at_the_log_step_with_their_data_position():
    metrics = tracker()
    metrics.begin_step(1, epoch=0, first_micro_batch=0)
    add_step(metrics, 1.0, 10)
    metrics.begin_step(2, epoch=0, first_micro_batch=1)
    stats = BatchStats(computed_tokens=10, input_tokens=10, supervised_tokens=10, samples=2, model_flops=1e9)
    metrics.add_micro_batch(torch.tensor(float("nan")), 10, stats)  # a NaN loss with a finite norm: applied
    metrics.add_update(torch.tensor(1.0), held_back=torch.tensor(False))
    metrics.add_optimizer_step(torch.tensor(1.0), True)
    metrics.begin_step(3, epoch=1, first_micro_batch=4)
    metrics.add_micro_batch(torch.tensor(1.0), 10, stats)
    metrics.add_update(torch.tensor(float("inf")), held_back=torch.tensor(True))  # decided on the device
    metrics.add_optimizer_step(torch.tensor(float("inf")), True)
    record = metrics.collect(global_step=3, learning_rate=1e-3)
    assert [(o.step, o.epoch, o.first_micro_batch, o.held_back) for o in metrics.window_nonfinite] == \
        [(2, 0, 1, False), (3, 1, 4, True)]
    assert record["train/nonfinite_steps"] == 2 and record["train/skipped_steps"] == 1
    add_step(metrics, 1.0, 10)
    metrics.collect(global_step=4, learning_rate=1e-3)
    assert metrics.window_nonfinite == [] and metrics.state_dict()["nonfinite_steps"] == 2


def test_without_metrics_the_step_flags_are_still_collected():
    metrics = tracker(enabled=False)
    metrics.begin_step(1, epoch=0, first_micro_batch=0)
    metrics.add_update(torch.tensor(float("nan")), held_back=torch.tensor(True))
    metrics.add_optimizer_step(torch.tensor(float("nan")), True)
    metrics.begin_step(2, epoch=0, first_micro_batch=1)
    metrics.add_update(torch.tensor(0.5), held_back=False)
    metrics.add_optimizer_step(torch.tensor(0.5), True)
    metrics.collect_step_outcomes()
    assert [(o.step, o.held_back) for o in metrics.window_nonfinite] == [(1, True)]
    assert (metrics.skipped_steps, metrics.nonfinite_steps) == (1, 1)
    metrics.collect_step_outcomes()  # an empty window
    assert metrics.window_nonfinite == []


def test_a_last_value_metric_is_the_last_steps_and_null_when_its_update_was_skipped(capsys):
    """critic/grad_norm's kind: the value of the window's last step, not the window's mean; a skipped update's
    (None) is null with one warning, never a stale or averaged number."""
    metrics = tracker()
    for norm in (1.0, 3.0):
        add_step(metrics, 1.0, 10)
        metrics.set_last("critic/grad_norm", torch.tensor(norm))
    assert metrics.collect(global_step=2, learning_rate=1e-3)["critic/grad_norm"] == pytest.approx(3.0)
    add_step(metrics, 1.0, 10)
    metrics.set_last("critic/grad_norm", None)
    assert metrics.collect(global_step=3, learning_rate=1e-3)["critic/grad_norm"] is None
    add_step(metrics, 1.0, 10)
    metrics.set_last("critic/grad_norm", torch.tensor(float("nan")))
    assert metrics.collect(global_step=4, learning_rate=1e-3)["critic/grad_norm"] is None
    assert capsys.readouterr().err.count("critic/grad_norm unknown") == 1
    add_step(metrics, 1.0, 10)  # a window whose steps set no value: the key is absent, not the last window's again
    assert "critic/grad_norm" not in metrics.collect(global_step=5, learning_rate=1e-3)


def test_compiling_inside_the_rate_window_is_left_out_of_its_rates():
    compiled = [0.0]
    metrics = tracker(warmup_steps=0, compile_seconds=lambda: compiled[0])
    add_step(metrics, 1.0, 10)
    time.sleep(0.3)
    compiled[0] += 0.25  # a recompile took 0.25 s of the 0.3 s
    record = metrics.collect(global_step=1, learning_rate=1e-3)
    assert record["system/compile_time_s"] == 0.25
    assert 0.05 <= record["system/step_time_s"] < 0.2
    add_step(metrics, 1.0, 10)
    time.sleep(0.1)
    record = metrics.collect(global_step=2, learning_rate=1e-3)  # the next window starts from the new total
    assert record["system/compile_time_s"] == 0.0 and record["system/step_time_s"] >= 0.1
    assert "system/compile_time_s" not in tracker(warmup_steps=0).collect(global_step=1, learning_rate=1e-3)


def test_phase_times_are_the_mean_per_step_of_host_clock_marks():
    metrics = tracker(warmup_steps=0)
    for start, middle, end in ((0.0, 0.5, 2.0), (10.0, 10.25, 11.0)):
        add_step(metrics, 1.0, 10)
        metrics.add_phase(Phase("generate", start, middle))
        metrics.add_phase(Phase("update", middle, end))
    record = metrics.collect(global_step=2, learning_rate=1e-3)
    assert record["timing/generate_s"] == pytest.approx((0.5 + 0.25) / 2)
    assert record["timing/update_s"] == pytest.approx((1.5 + 0.75) / 2)
    assert not [key for key in record if key.startswith("perf/")]  # no work given, no rates


def test_phase_rates_divide_the_rate_windows_work_by_its_phase_time():
    """The work and seconds of the warm-up step stay out of the rates, not out of the times."""
    metrics = tracker(warmup_steps=1, peak_flops=1e12, peak_bandwidth=1e10)
    for seconds, flops, tokens, bytes_read in ((9.0, 5e12, 99, 9e10), (2.0, 1e12, 40, 1e10), (3.0, 2e12, 20, 2e10)):
        metrics.add_phase(Phase("generate", 0.0, seconds, flops=flops, tokens=tokens, bytes_read=bytes_read))
        metrics.add_phase(Phase("update", 0.0, seconds / 2, flops=3 * flops))
        add_step(metrics, 1.0, 10)
    record = metrics.collect(global_step=3, learning_rate=1e-3)
    assert record["timing/generate_s"] == pytest.approx((9 + 2 + 3) / 3)  # times: every step
    assert record["perf/generate_tokens_per_second"] == pytest.approx(60 / 5)  # rates: the last two
    assert record["perf/generate_mfu_percent"] == pytest.approx(100 * 3e12 / 5 / 1e12)
    assert record["perf/generate_mbu_percent"] == pytest.approx(100 * 3e10 / 5 / 1e10)
    assert record["perf/update_mfu_percent"] == pytest.approx(100 * 9e12 / 2.5 / 1e12)
    assert "perf/update_mbu_percent" not in record and "perf/update_tokens_per_second" not in record


def test_phase_rates_are_null_and_announced_when_a_peak_or_the_bytes_are_unknown(capsys):
    metrics = tracker(warmup_steps=0, peak_bandwidth=None)
    for _ in range(2):
        metrics.add_phase(Phase("generate", 0.0, 1.0, flops=1e9, tokens=4, bytes_read=1e9))
        add_step(metrics, 1.0, 10)
        assert metrics.collect(global_step=1, learning_rate=1e-3)["perf/generate_mbu_percent"] is None
    metrics = tracker(warmup_steps=0, peak_bandwidth=1e10)
    metrics.add_phase(Phase("generate", 0.0, 1.0, flops=1e9, tokens=4, bytes_read=float("nan")))  # MoE
    add_step(metrics, 1.0, 10)
    record = metrics.collect(global_step=1, learning_rate=1e-3)
    assert record["perf/generate_mbu_percent"] is None and record["perf/generate_tokens_per_second"] == 4
    err = capsys.readouterr().err
    assert err.count("peak memory bandwidth unknown") == 1 and err.count("mixture-of-experts") == 1


def test_epoch_time_leaves_out_the_time_between_windows_and_goes_on_after_a_resume():
    metrics = tracker(warmup_steps=0)
    metrics.start_epoch()
    time.sleep(0.05)
    add_step(metrics, 1.0, 10)
    first = metrics.collect(global_step=1, learning_rate=1e-3)["system/epoch_time"] * 60
    time.sleep(0.6)  # an evaluation and a checkpoint: not training time
    metrics.restart_rate_clock()
    time.sleep(0.05)
    add_step(metrics, 1.0, 10)
    second = metrics.collect(global_step=2, learning_rate=1e-3)["system/epoch_time"] * 60
    assert 0.05 <= first < 0.3 and 0.1 <= second < 0.5
    resumed = tracker(warmup_steps=0)
    resumed.load_state_dict(metrics.state_dict())
    resumed.start_epoch(resumed=True)
    time.sleep(0.05)
    add_step(resumed, 1.0, 10)
    assert second + 0.05 <= resumed.collect(global_step=3, learning_rate=1e-3)["system/epoch_time"] * 60 < second + 0.4


def test_a_non_finite_value_is_announced_once_per_key_when_logged_as_null(tmp_path, capsys):
    loggers = MultiLogger([JsonlLogger(tmp_path / "metrics.jsonl")])
    loggers.log({"train/loss": math.inf, "eval/loss": 1.0}, step=1)
    loggers.log({"train/loss": math.nan, "eval/loss": math.nan}, step=2)
    loggers.close()
    err = capsys.readouterr().err
    assert err.count("train/loss was inf at step 1: logged as null") == 1 and "train/loss was nan" not in err
    assert err.count("eval/loss was nan at step 2: logged as null") == 1
    assert [json.loads(line)["train/loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        [None, None]


def test_summary_values_are_json_with_null_for_non_finite():
    assert finite_or_null({"final_loss": math.nan, "eval": {"eval/loss": math.inf, "eval/reward": 0.5}, "n": 3}) == \
        {"final_loss": None, "eval": {"eval/loss": None, "eval/reward": 0.5}, "n": 3}


def test_eta_adds_the_evaluations_and_checkpoints_still_to_come_at_their_measured_cost():
    metrics = tracker(warmup_steps=0, total_steps=10, eval_interval=4, save_interval=0)
    add_step(metrics, 1.0, 10)
    add_step(metrics, 1.0, 10)
    unmeasured = metrics.collect(global_step=2, learning_rate=1e-3)
    assert unmeasured["train/eta_minutes"] == pytest.approx(8 * unmeasured["system/step_time_s"] / 60)
    metrics.add_overhead("eval", 2.0)
    metrics.add_overhead("eval", 4.0)  # mean 3 s
    metrics.add_overhead("save", 1.5)
    add_step(metrics, 1.0, 10)
    record = metrics.collect(global_step=3, learning_rate=1e-3)
    # Evaluations after step 3: steps 4 and 8, and the last step (10); one checkpoint, at the end.
    assert record["train/eta_minutes"] == pytest.approx((7 * record["system/step_time_s"] + 3 * 3.0 + 1.5) / 60)


def test_peak_memory_is_each_windows_own():
    """CPU: the process's peak resident set of the window, against a tensor of known size made and freed in it; in a
    process of its own, where no earlier test's thread moves the resident set between the two windows."""
    script = """if True:
        import json, torch
        from tests.test_metrics_unit import add_step, tracker
        metrics = tracker(warmup_steps=0)
        metrics.restart_rate_clock()
        add_step(metrics, 1.0, 10)
        block = torch.ones(100_000_000)  # 0.4 GB
        del block
        first = metrics.collect(global_step=1, learning_rate=1e-3)
        add_step(metrics, 1.0, 10)
        second = metrics.collect(global_step=2, learning_rate=1e-3)
        print(json.dumps([first, second]))"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout.splitlines()[-1])
    assert first["system/peak_memory_gb"] - second["system/peak_memory_gb"] == pytest.approx(0.4, abs=0.05), \
        result.stderr
    assert "system/peak_memory_reserved_gb" not in second  # CPU: no allocator reserve apart from the resident set


def test_peak_memory_is_null_in_a_window_whose_peak_could_not_be_reset(monkeypatch, capsys):
    """No file descriptor left when the window starts: VmHWM is not reset, so what it then holds is an earlier, longer
    span's peak: null with a warning naming the file, and the next window, reset again, has its own number."""
    from train import metrics as metrics_module

    monkeypatch.setattr(metrics_module, "_peak_memory_warnings", set())
    metrics = tracker(warmup_steps=0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (0, hard))  # every open() now fails with EMFILE
    try:
        metrics.restart_rate_clock()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    add_step(metrics, 1.0, 10)
    assert metrics.collect(global_step=1, learning_rate=1e-3)["system/peak_memory_gb"] is None
    assert "/proc/self/clear_refs could not be written" in capsys.readouterr().err
    add_step(metrics, 1.0, 10)
    resident_kb = int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS:")).split()[1])
    assert metrics.collect(global_step=2, learning_rate=1e-3)["system/peak_memory_gb"] >= resident_kb * 1024 / 1e9


def test_peak_memory_on_cuda_reads_allocated_and_reserved_and_resets(monkeypatch):
    from train import metrics as metrics_module

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 2.5e9)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 4e9)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: calls.append("reset"))
    assert metrics_module.peak_memory_gb() == (2.5, 4.0)
    metrics_module.reset_peak_memory()
    assert calls == ["reset"]
