"""Metrics at the edges, provoked for real: a preemption signal between two log steps, then the resume. The token
counts are checked against a count made from the loader's own batches, the run's means against its windows."""
from __future__ import annotations

import json
import os
import re
import signal
import time
from itertools import islice
from pathlib import Path

import pytest

from data.loader import BatchLoader
from data.mixture import load_data_config
from data.prepare import load_prepared
from data.tokenizer import load_tokenizer
from tests.launch import REPO_ROOT, rank_pid, read_metrics, run_stage, stage_command, start
from train.preemption import REQUEUE_EXIT_CODE

ROWS, SEQ_LEN, STEPS, LOG_INTERVAL, WARMUP = 2, 64, 60, 50, 2
RUN = ["--model", "tiny", "--max_seq_len", str(SEQ_LEN), "--batch_size", str(ROWS), "--max_steps", str(STEPS),
       "--log_interval", str(LOG_INTERVAL), "--save_interval", "0", "--eval_interval", "0", "--eval_batches", "1",
       "--throughput_warmup_steps", str(WARMUP)]


def tokens_after(steps: int, world_size: int) -> int:
    """Non-padding input tokens of the first `steps` micro-batches of every rank, counted from the loaders' batches."""
    config = load_data_config(REPO_ROOT / "config" / "data" / "pretrain" / "demo.yaml")
    prepared = load_prepared(config, load_tokenizer())
    total = 0
    for rank in range(world_size):
        loader = BatchLoader(prepared.split("train"), ROWS, SEQ_LEN, rank, world_size, 42, "packed",
                             weights=prepared.weights)
        total += sum(int((batch["doc_ids"] >= 0).sum()) for batch in islice(loader.iterate(0), steps))
    return total


@pytest.fixture(scope="module", params=[1, 2], ids=["ws1", "ws2"])
def preempted(request, tmp_path_factory) -> tuple[Path, int, list[dict], dict, int]:
    """SIGUSR1 just after the first log step (50), to the one process or to rank 1 of two: the run stops a step or
    two later, between log steps, then resumes to the end. Returns the out_dir, the stop step, the records, the
    summary and the world size."""
    world_size = request.param
    out_dir = tmp_path_factory.mktemp("preempted") / "run"
    command, env, _ = stage_command("pretrain", out_dir, *RUN, world_size=world_size, zero="2")
    process = start(command, env)
    metrics = out_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.01)
    os.kill(process.pid if world_size == 1 else rank_pid(out_dir, 1), signal.SIGUSR1)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == REQUEUE_EXIT_CODE, output[-3000:]
    stop = int(re.search(r"stopping at step (\d+)", output).group(1))
    run_stage("pretrain", out_dir, *RUN, "--from_resume", world_size=world_size, zero="2")
    return out_dir, stop, read_metrics(out_dir), json.loads((out_dir / "summary.json").read_text()), world_size


def test_a_preemption_between_log_steps_counts_every_step(preempted):
    """The steps since the last log step are gathered before the preemption checkpoint: a metric line covers
    them, and the counts after the resume are those of the loader's batches."""
    _, stop, records, summary, world_size = preempted
    assert LOG_INTERVAL < stop < STEPS - WARMUP  # the resumed process has a rate window of its own
    assert [r["train/global_step"] for r in records] == [LOG_INTERVAL, stop, STEPS]
    assert records[1]["train/num_input_tokens_seen"] == tokens_after(stop, world_size)
    assert records[2]["train/num_input_tokens_seen"] == summary["tokens_seen"] == tokens_after(STEPS, world_size)


def test_epoch_time_goes_on_across_the_resume(preempted):
    """system/epoch_time is the training time of the epoch so far, the resumed process's added to the saved."""
    _, _, records, _, _ = preempted
    times = [r["system/epoch_time"] for r in records]
    assert 0 < times[0] < times[1] < times[2]
    # The resumed process trained STEPS - stop steps: its share is about that many step times, not the whole epoch.
    step_time = records[0]["system/step_time_s"] / 60
    assert times[2] - times[1] < (STEPS - records[1]["train/global_step"] + WARMUP) * step_time * 10


def test_summary_means_are_totals_over_the_whole_run(preempted):
    """mean_tokens_per_second: every rate window's tokens over every rate window's seconds, both processes'. A
    window's rate steps are its steps less the warm-up steps each process starts with."""
    out_dir, stop, records, summary, _ = preempted
    rate_steps = [LOG_INTERVAL - WARMUP, stop - LOG_INTERVAL, STEPS - stop - WARMUP]
    seconds = [steps / r["train/steps_per_second"] for steps, r in zip(rate_steps, records)]
    tokens = [r["train/tokens_per_second"] * s for r, s in zip(records, seconds)]
    assert summary["mean_tokens_per_second"] == pytest.approx(sum(tokens) / sum(seconds), rel=1e-6)
    flops = [r["train/tflops_per_device"] * 1e12 * s for r, s in zip(records, seconds)]
    peak = json.loads((out_dir / "run_config.json").read_text())["peak_flops"]["flops_per_second"]
    assert summary["mean_mfu_percent"] == pytest.approx(100 * sum(flops) / sum(seconds) / peak, rel=1e-6)
