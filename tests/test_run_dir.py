"""One run owns its out_dir, and a resume is the same run or refused (train/run_dir.py), provoked for real with
stage runs: the same command twice, two runs at once, a resume after each unsafe and after safe changes, weights
of another tokenizer, --model beside --from_weight. Each refusal is one ERROR line, exit 2, and leaves every file
already saved as it was."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.launch import REPO_ROOT, read_metrics, run_stage, stage_command, start
from train import checkpoint, run_dir
from train.config import TrainConfig

TINY = ["--model", "tiny", "--max_seq_len", "64", "--batch_size", "2", "--eval_batches", "1", "--log_interval", "1"]
RUN = [*TINY, "--max_steps", "2", "--save_interval", "2"]


def snapshot(out_dir: Path) -> dict[str, str]:
    """Every file of a run (the lock aside) by its content hash."""
    return {str(p.relative_to(out_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


def assert_refused(result, *fragments: str) -> str:
    """Exit 2 with one ERROR line holding every fragment, and no traceback."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> tuple[Path, dict]:
    """One finished 2-step run (checkpoint at step 2, export) and the snapshot of its files."""
    out_dir = tmp_path_factory.mktemp("saved") / "run"
    run_stage("pretrain", out_dir, *RUN, world_size=1, zero="2")
    return out_dir, snapshot(out_dir)


def resumable_copy(saved_run, tmp_path: Path) -> tuple[Path, dict]:
    out_dir = tmp_path / "run"
    shutil.copytree(saved_run[0], out_dir)
    return out_dir, snapshot(out_dir)


def test_the_same_command_twice_is_refused_and_start_over_moves_the_earlier_run_aside(saved_run, tmp_path):
    out_dir, before = resumable_copy(saved_run, tmp_path)
    result = run_stage("pretrain", out_dir, *RUN, world_size=1, zero="2", check=False)
    assert_refused(result, f"--out_dir {out_dir} holds an earlier run: checkpoints (", "metrics.jsonl (2 lines)",
                   "--from_resume", "--start_over")
    assert snapshot(out_dir) == before

    result = run_stage("pretrain", out_dir, *RUN, "--start_over", world_size=1, zero="2")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert len(aside) == 1 and f"moved the earlier run in {out_dir}" in result.stdout
    assert snapshot(aside[0]) == before  # moved whole, not a byte changed
    assert [r["train/global_step"] for r in read_metrics(out_dir)] == [1, 2]  # a fresh metrics.jsonl
    assert checkpoint.verify(out_dir / "checkpoints" / "step_00000002") == []


def test_a_second_run_on_a_locked_out_dir_is_refused_naming_the_first(tmp_path):
    """The first run holds the lock; the second is refused with its pid and host while it trains. Once the first
    is killed outright (no handler runs), its lock is gone with it: a new run may start over."""
    out_dir = tmp_path / "run"
    # Far more steps than the test lasts (it kills the run): a run that ended while the second one started up
    # would leave an earlier run, not a lock, and the refusal would be another one.
    command, env, _ = stage_command("pretrain", out_dir, *TINY, "--max_steps", "100000", "--epochs", "1000",
                                    world_size=1, zero="2")
    first = start(command, env)
    try:
        deadline = time.monotonic() + 120
        while not ((out_dir / "metrics.jsonl").is_file() and (out_dir / "metrics.jsonl").read_text()):
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended before its first step"
            time.sleep(0.1)
        second = run_stage("pretrain", out_dir, *TINY, "--max_steps", "2", world_size=1, zero="2", check=False)
        assert_refused(second, f"--out_dir {out_dir} is in use by another run (pid {first.pid} on "
                               f"{socket.gethostname()}, started ")
        assert first.poll() is None  # untouched by the refused one
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate()
    steps = [r["train/global_step"] for r in read_metrics(out_dir)]
    assert steps == list(range(1, len(steps) + 1))  # the first run's lines alone, none interleaved
    run_stage("pretrain", out_dir, *RUN, "--start_over", world_size=1, zero="2")


@pytest.mark.parametrize("stage, change, differs", [
    ("pretrain", ["--batch_size", "4"], "global batch: --batch_size 2 × --accumulation_steps 1 × 1 rank = 2 rows -> "
                                         "--batch_size 4 × --accumulation_steps 1 × 1 rank = 4 rows"),
    ("pretrain", ["--accumulation_steps", "2"], "-> --batch_size 2 × --accumulation_steps 2 × 1 rank = 4 rows"),
    ("pretrain", ["--seed", "7"], "seed: 42 -> 7"),
    ("pretrain", ["--max_seq_len", "32"], "seq_len: 64 -> 32"),
    ("pretrain", ["--model", "tiny-moe"], "model: {"),
    ("pretrain", ["--deepspeed", "ds_configs/zero0.json"], "backend: 'ZeRO-2' -> 'ZeRO-0'"),
    ("pretrain", ["--adam_beta2", "0.99"], "adam_beta2: 0.95 -> 0.99"),
    ("midtrain", ["--data_config", "config/data/pretrain/demo.yaml", "--from_weight", "none"], "stage: 'pretrain' -> 'midtrain'"),
], ids=["batch_size", "accumulation", "seed", "seq_len", "model", "zero_stage", "optimizer", "stage"])
def test_a_resume_that_is_not_the_same_run_is_refused(saved_run, tmp_path, stage, change, differs):
    out_dir, before = resumable_copy(saved_run, tmp_path)
    result = run_stage(stage, out_dir, *RUN, "--from_resume", *change, world_size=1, zero="2", check=False)
    assert_refused(result, f"--from_resume: this is not the run saved in {out_dir / 'checkpoints' / 'step_00000002'}",
                   differs)
    assert snapshot(out_dir) == before


def test_a_resume_on_a_number_of_ranks_that_cannot_keep_the_global_batch_is_refused(saved_run, tmp_path):
    """Another number of ranks resumes (tests/test_elastic_resume.py) when a whole --accumulation_steps keeps the
    global batch; 2 ranks of --batch_size 2 cannot read the 2 rows a step of the saved run read."""
    out_dir, before = resumable_copy(saved_run, tmp_path)
    result = run_stage("pretrain", out_dir, *RUN, "--from_resume", world_size=2, zero="2", check=False)
    assert_refused(result, f"--from_resume: {out_dir / 'checkpoints' / 'step_00000002'} was saved with a global "
                   "batch of --batch_size 2 × --accumulation_steps 1 × 1 rank = 2 rows per optimizer step, which 2 "
                   "ranks of --batch_size 2 cannot split into whole accumulation steps: resume on 1 rank(s), or give "
                   "--batch_size B and --accumulation_steps A with B × A × 2 = 2")
    assert result.stderr.count("ERROR:") == 1  # rank 0 alone says it
    assert snapshot(out_dir) == before


def test_safe_changes_are_applied_and_reported_and_a_save_holds_only_its_own_files(saved_run, tmp_path):
    """--learning_rate, --max_steps and --log_interval change on resume: reported, and the logged rate is the new
    peak on the new schedule. The save of step 4 lands where an earlier attempt left a half-written step 4 (one
    stray file) and beside an abandoned step 9: its manifest lists its own files, and rotation keeps steps 2 and 4."""
    out_dir, _ = resumable_copy(saved_run, tmp_path)
    stray = out_dir / "checkpoints" / "step_00000004" / "left_by_a_killed_save.pt"
    stray.parent.mkdir()
    stray.write_bytes(b"x" * 100)
    (out_dir / "checkpoints" / "step_00000009").mkdir()
    result = run_stage("pretrain", out_dir, *TINY, "--from_resume", "--learning_rate", "1e-4", "--max_steps", "4",
                       "--log_interval", "2", "--save_interval", "2", "--keep_checkpoints", "2",
                       world_size=1, zero="2")
    assert "resuming with changed options: max_steps: 2 -> 4; learning_rate: 0.0005 -> 0.0001" in result.stdout
    records = read_metrics(out_dir)
    assert [r["train/global_step"] for r in records] == [1, 2, 4]
    # Step 4 is update index 3 of 4, no warm-up (int(0.05 × 4) = 0): cosine from the new peak to 10% of it.
    expected = 1e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert records[-1]["train/learning_rate"] == pytest.approx(expected, rel=1e-9)
    folder = out_dir / "checkpoints" / "step_00000004"
    assert not stray.exists() and checkpoint.verify(folder) == []
    assert stray.name not in json.loads((folder / "manifest.json").read_text())
    assert sorted(p.name for p in (out_dir / "checkpoints").glob("step_*")) == \
        ["step_00000002", "step_00000004", "step_00000009"]
    assert checkpoint.latest_tag(out_dir / "checkpoints") == "step_00000004"


def another_tokenizer(directory: Path) -> Path:
    """The project's tokenizer with two ordinary tokens' ids swapped: the same vocabulary size, other meanings."""
    shutil.copytree(REPO_ROOT / "model" / "tokenizer", directory)
    content = json.loads((directory / "tokenizer.json").read_text())
    vocab = content["model"]["vocab"]
    first, second = [token for token, index in vocab.items() if index in (1000, 1001)]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (directory / "tokenizer.json").write_text(json.dumps(content))
    return directory


def test_weights_of_another_tokenizer_are_refused_unless_asked_for(saved_run, tmp_path):
    other = another_tokenizer(tmp_path / "tokenizer")
    export = saved_run[0] / "export"
    trained_with = json.loads((export / "zerostage.json").read_text())["tokenizer"]
    assert trained_with["path"].endswith("model/tokenizer")
    before = snapshot(export)
    result = run_stage("sft", tmp_path / "sft", *RUN, "--from_weight", str(export), "--tokenizer", str(other),
                       world_size=1, zero="2", check=False)
    assert_refused(result, f"--from_weight {export} was trained with the tokenizer {trained_with['path']}",
                   f"this run's --tokenizer {other} is another", "--allow_tokenizer_change")
    assert snapshot(export) == before
    run_stage("sft", tmp_path / "sft", *RUN, "--from_weight", str(export), "--tokenizer", str(other),
              "--allow_tokenizer_change", world_size=1, zero="2")


def test_a_model_given_beside_from_weight_must_be_the_weights_model(saved_run, tmp_path):
    export = saved_run[0] / "export"
    result = run_stage("sft", tmp_path / "sft", *RUN, "--from_weight", str(export), "--model", "small",
                       world_size=1, zero="2", check=False)
    assert_refused(result, f"--model small is not the model --from_weight {export} holds: hidden_size 512 "
                           f"(the weights: 128)")
    run_stage("sft", tmp_path / "sft", *RUN, "--from_weight", str(export), "--model", "tiny", world_size=1, zero="2")


@pytest.mark.parametrize("world_size,saved_backend,config", [
    (1, None, "ds_configs/zero0.json"), (2, None, "ds_configs/zero2.json"), (8, None, "ds_configs/zero2.json"),
    (2, "ZeRO-0", "ds_configs/zero0.json"), (1, "ZeRO-2", "ds_configs/zero2.json"), (4, "ZeRO-3", "ds_configs/zero3.json"),
], ids=["one-rank", "two-ranks", "eight-ranks", "resume-zero0-on-2", "resume-zero2-on-1", "resume-zero3-on-4"])
def test_deepspeed_auto_is_zero0_on_one_rank_zero2_on_more_and_a_resume_keeps_its_stage(world_size, saved_backend,
                                                                                        config):
    """--deepspeed auto (the default): on one rank ZeRO's flat buffers shard nothing and cost 1.2x in step time
    (docs/performance.md), so plain ZeRO-0; a resume on another number of ranks stays the run it was (the identity
    check would refuse another stage)."""
    cfg = TrainConfig(data_config="unused")
    assert cfg.deepspeed == "auto"
    saved = {"identity": {"backend": saved_backend}} if saved_backend else None
    assert run_dir.resolve_deepspeed_config(cfg, saved, world_size).deepspeed == config
    explicit = TrainConfig(data_config="unused", deepspeed="ds_configs/zero3.json")
    assert run_dir.resolve_deepspeed_config(explicit, saved, world_size).deepspeed == "ds_configs/zero3.json"

