"""Preemption with real signals to real ranks under the deepspeed launcher (2 CPU ranks): every rank finishes the
same step, one checkpoint is saved, the run exits 75 (requeue), and --from_resume continues the uninterrupted loss
curve. A storm of signals during the save changes nothing."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.launch import read_metrics, run_stage, stage_command, start
from train.preemption import REQUEUE_EXIT_CODE

RUN = ["--model", "tiny", "--batch_size", "4", "--accumulation_steps", "2", "--log_interval", "1",
       "--eval_interval", "0", "--eval_batches", "1", "--save_interval", "0", "--throughput_warmup_steps", "1",
       "--max_steps", "12"]


def rank_pid(out_dir: Path, rank: int) -> int:
    pattern = f"--local_rank={rank} .*--out_dir {out_dir}( |$)"
    pids = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True).stdout.split()
    assert len(pids) == 1, (pattern, pids)
    return int(pids[0])


def interrupt(out_dir: Path, after_lines: int, signum: int, rank: int, storm: bool) -> tuple[int, str, float]:
    """Start a run, signal one rank once `after_lines` steps are logged (every 20 ms until it exits when `storm`).
    Returns the launcher's exit status, its output, and the seconds from the signal to its exit."""
    command, env, _ = stage_command("pretrain", out_dir, *RUN, zero="2")
    process = start(command, env)
    metrics = out_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= after_lines):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be signalled"
        time.sleep(0.05)
    pid = rank_pid(out_dir, rank)
    signalled = time.monotonic()
    os.kill(pid, signum)
    while storm and process.poll() is None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return process.returncode, output, time.monotonic() - signalled


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("straight")
    run_stage("pretrain", out_dir, *RUN, zero="2")
    return read_metrics(out_dir)


@pytest.mark.parametrize("signum,rank,storm", [(signal.SIGUSR1, 1, False), (signal.SIGTERM, 0, True)],
                         ids=["SIGUSR1-to-rank1", "SIGTERM-storm-to-rank0"])
def test_signal_checkpoints_every_rank_at_one_step_exits_75_and_resume_continues(tmp_path, reference, signum,
                                                                                  rank, storm):
    code, output, _ = interrupt(tmp_path, 3, signum, rank, storm)
    assert code == REQUEUE_EXIT_CODE, output[-4000:]
    stop = re.search(r"stopping at step (\d+) on (\S+)", output)
    assert stop, output[-4000:]
    step = int(stop.group(1))
    assert 3 <= step < 12
    # Rank 0 names the signal when it got it, or says another rank did.
    assert stop.group(2) == (signal.Signals(signum).name + ":" if rank == 0 else "a")
    tag = f"step_{step:08d}"
    assert (tmp_path / "checkpoints" / "latest").read_text() == tag
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [tag]
    assert [r["train/global_step"] for r in read_metrics(tmp_path)] == list(range(1, step + 1))

    result = run_stage("pretrain", tmp_path, *RUN, "--from_resume", zero="2")
    assert f"resumed from {tmp_path / 'checkpoints' / tag}: step {step}," in result.stdout
    records = read_metrics(tmp_path)
    assert [r["train/global_step"] for r in records] == list(range(1, 13))
    for ours, theirs in zip(records[step:], reference[step:]):
        assert ours["train/loss"] == pytest.approx(theirs["train/loss"], rel=1e-6)
        assert ours["train/grad_norm"] == pytest.approx(theirs["train/grad_norm"], rel=1e-6)
        assert ours["train/num_input_tokens_seen"] == theirs["train/num_input_tokens_seen"]


def test_a_rank_killed_outright_brings_the_run_down_within_seconds(tmp_path):
    """SIGKILL (no handler can run) on rank 1 mid-training: rank 0, blocked in the next collective, does not hang;
    the launcher notices the dead rank, stops the other, and exits non-zero naming it."""
    code, output, seconds = interrupt(tmp_path, 3, signal.SIGKILL, rank=1, storm=False)
    assert code not in (0, REQUEUE_EXIT_CODE), output[-3000:]
    assert re.search(r"--local_rank=1'.*exits with return code = -9", output), output[-3000:]
    assert seconds < 30, f"the run took {seconds:.0f}s to come down"  # the launcher polls every second
    assert not (tmp_path / "checkpoints" / "latest").exists()  # nothing half-written claims to be complete
