"""Faults provoked for real: a learning rate that makes the gradient norm overflow, malformed data records, a full
disk, a SIGKILL in the middle of a save, offload options the machine cannot honour."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from model import ModelConfig
from tests.launch import REPO_ROOT, read_metrics, read_run_config, run_stage, stage_command, start, tmpfs
from train import checkpoint
from train.config import ConfigError, TrainConfig
from train.data_loading import build_data
from train.deepspeed_backend import build_ds_config
from train.loggers import JsonlLogger, Logger, MultiLogger
from train.stage import LanguageModelStage

# With warm-up off, the first update moves every weight by about 1e30; the gradient of the next step overflows.
BLOW_UP = ["--model", "tiny", "--batch_size", "2", "--accumulation_steps", "2", "--max_seq_len", "64",
           "--learning_rate", "1e30", "--warmup_ratio", "0", "--eval_interval", "0", "--eval_batches", "1",
           "--save_interval", "0", "--throughput_warmup_steps", "0"]


def latest_checkpoint(out_dir: Path) -> Path:
    return out_dir / "checkpoints" / (out_dir / "checkpoints" / "latest").read_text().strip()


def adam_steps_taken(folder: Path) -> set[int]:
    """The AdamW step counts in a DeepSpeed checkpoint (ZeRO-0: the model states; ZeRO 1-3: the optimizer shards)."""
    counts = set()
    for path in folder.glob("*.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("optimizer") is not None:
            counts.update(int(s["step"]) for s in state["optimizer"]["state"].values())
        if "optimizer_state_dict" in state:
            counts.update(int(s["step"]) for s in state["optimizer_state_dict"]["base_optimizer_state"]["state"].values())
    return counts


def finite_weights(folder: Path) -> bool:
    module = torch.load(next(folder.glob("*model_states.pt")), map_location="cpu", weights_only=False)["module"]
    return all(torch.isfinite(t).all() for t in module.values() if t.is_floating_point() and t.numel())


def data_with_bad_records(directory: Path) -> tuple[Path, Path]:
    """A pretrain mixture over 300 demo documents with a malformed line (2) and a mistyped field (5) among them."""
    lines = (REPO_ROOT / "dataset" / "pretrain.jsonl").read_text().splitlines()[:300]
    lines[1:1] = ['{"text": "cut off']
    lines[4:4] = ['{"text": ["not", "a", "string"]}']
    source = directory / "pretrain_with_bad_records.jsonl"
    source.write_text("\n".join(lines) + "\n")
    config = directory / "mixture.yaml"
    config.write_text(f"kind: pretrain\nmax_seq_len: 64\nsources:\n  - {{path: {source}, weight: 1.0}}\n"
                      f"validation: {{fraction: 0.05}}\n")
    return config, source


def test_nonfinite_steps_are_skipped_and_bad_records_counted(tmp_path):
    """One run, 1 rank, ZeRO-0 (where the trainer, not DeepSpeed, holds a non-finite update back).

    --nonfinite skip (the default): every step after the first overflows; none is applied, all are counted, and
    each is named with its data position. --skip_bad_records: the two bad lines are skipped, named and counted."""
    config, source = data_with_bad_records(tmp_path)
    out_dir = tmp_path / "run"
    result = run_stage("pretrain", out_dir, *BLOW_UP, "--max_steps", "4", "--log_interval", "2",
                       "--data_config", str(config), "--skip_bad_records", "1", world_size=1, zero="0")
    assert f"skipped 2 bad record(s) of {source} (--skip_bad_records); the first: {source}:2: malformed JSON" \
        in result.stderr
    assert read_run_config(out_dir)["data"]["skipped_records"] == {str(source): 2}
    assert {r["data/skipped_records"] for r in read_metrics(out_dir)} == {2}
    assert json.loads((out_dir / "summary.json").read_text())["skipped_records"] == {str(source): 2}

    assert "non-finite loss or gradient norm at step 2 (epoch 1, micro-batches 2-3)" in result.stderr
    assert "step 4 (epoch 1, micro-batches 6-7): 2 update(s) not applied (--nonfinite skip)" in result.stderr
    records = read_metrics(out_dir)
    assert [r["train/skipped_steps"] for r in records] == [1, 3]
    assert [r["train/nonfinite_steps"] for r in records] == [1, 3]
    assert all(r["train/grad_norm"] is None for r in records)
    folder = latest_checkpoint(out_dir)
    assert adam_steps_taken(folder) == {1}  # only the first update reached AdamW's state
    assert finite_weights(folder)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["skipped_steps"] == 3 and summary["nonfinite_steps"] == 3


def test_nonfinite_stop_checkpoints_the_last_good_state_and_exits_non_zero(tmp_path):
    """--nonfinite stop, 2 ranks, ZeRO-2 (DeepSpeed holds the update back): the run stops at the log step that
    sees the overflow, with a checkpoint whose optimizer took only the good update."""
    result = run_stage("pretrain", tmp_path, *BLOW_UP, "--max_steps", "4", "--log_interval", "1",
                       "--nonfinite", "stop", world_size=2, zero="2", check=False)
    assert result.returncode != 0
    error = re.search(r"ERROR: non-finite loss or gradient norm at step 2 \(epoch 1, micro-batches 2-3\).*",
                      result.stderr)
    assert error and "--nonfinite stop" in error.group(0) and "step 2" in error.group(0), result.stderr[-3000:]
    folder = latest_checkpoint(tmp_path)
    assert folder.name == "step_00000002"
    assert adam_steps_taken(folder) == {1}
    assert finite_weights(folder)
    records = read_metrics(tmp_path)
    assert [r["train/global_step"] for r in records] == [1, 2]
    assert [r["train/nonfinite_steps"] for r in records] == [0, 1]
    assert not (tmp_path / "summary.json").exists()


def test_a_tokenizer_whose_vocabulary_does_not_fit_the_model_is_named():
    cfg = TrainConfig(data_config="config/data/pretrain/demo.yaml")
    model_config = dataclasses.replace(ModelConfig.from_preset("tiny"), vocab_size=100)
    stage = LanguageModelStage("pretrain", data_kind="pretrain", default_packing="packed")
    with pytest.raises(ConfigError, match=r"--tokenizer .*model/tokenizer: its vocabulary \(6400\) does not fit "
                                          r"the model's vocab_size \(100\)"):
        build_data(cfg, stage, model_config, rank=0, world_size=1)


class Recording(Logger):
    name = "recording"

    def __init__(self):
        self.steps = []

    def log(self, record, step):
        self.steps.append(step)


def test_metrics_jsonl_on_a_full_disk_warns_once_and_the_other_loggers_go_on(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.symlink_to("/dev/full")  # every write to it fails with ENOSPC
    recording = Recording()
    loggers = MultiLogger([JsonlLogger(path), recording])
    with pytest.warns(UserWarning, match=f"jsonl logging failed at step 1 .*disk full writing {path}"):
        for step in (1, 2, 3):
            loggers.log({"train/loss": 1.0}, step)
    loggers.close()
    assert recording.steps == [1, 2, 3]
    assert capsys.readouterr().err.count("jsonl logging disabled") == 1


@pytest.fixture
def small_checkpoint_disk(tmp_path):
    """out_dir/checkpoints on its own 20 MiB tmpfs: room for one ZeRO-0 checkpoint of the tiny model (~14 MB),
    not for two."""
    out_dir = tmp_path / "run"
    mount_point = out_dir / "checkpoints"
    mount_point.mkdir(parents=True)
    with tmpfs(mount_point, "size=20m"):
        yield out_dir


def test_a_resume_moves_the_lines_a_crash_left_after_its_checkpoint_aside(tmp_path, capsys):
    """A crash between a log line and the next checkpoint leaves lines of steps the resumed run redoes, the last
    perhaps cut off mid-write; without the rewind they would count twice in metrics.jsonl. (A real resume over
    such lines, at 2 -> 1 -> 2 ranks: tests/test_elastic_resume.py.)"""
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"train/global_step": step, "train/loss": 9.0 - step}) + "\n" for step in range(1, 7)]
    path.write_text("".join(lines) + '{"train/global_step": 7, "train/lo')
    logger = JsonlLogger(path, resumed_step=4)
    logger.log({"train/global_step": 5, "train/loss": 3.5}, 5)
    logger.close()
    assert [json.loads(line)["train/global_step"] for line in path.open()] == [1, 2, 3, 4, 5]
    assert path.read_text().startswith("".join(lines[:4]))
    side = tmp_path / "metrics.redone.jsonl"
    assert side.read_text() == "".join(lines[4:]) + '{"train/global_step": 7, "train/lo\n'  # nothing lost
    assert f"{path}: 3 line(s) after step 4, the checkpoint resumed, moved to {side}" in capsys.readouterr().out
    JsonlLogger(path, resumed_step=5).close()  # nothing after the step: nothing moved, nothing said
    assert side.read_text().count("\n") == 3 and capsys.readouterr().out == ""


def test_a_full_disk_names_itself_and_keeps_the_previous_checkpoint(small_checkpoint_disk):
    """A real ENOSPC on both: metrics.jsonl is /dev/full (one warning, training goes on) and the second checkpoint
    does not fit its tmpfs (a "disk full" error naming it; `latest` still names the first, which verifies)."""
    out_dir = small_checkpoint_disk
    (out_dir / "metrics.jsonl").symlink_to("/dev/full")
    result = run_stage("pretrain", out_dir, "--model", "tiny", "--batch_size", "2", "--max_seq_len", "64",
                       "--eval_interval", "0", "--eval_batches", "1", "--save_interval", "1", "--max_steps", "3",
                       "--log_interval", "1", world_size=1, zero="0", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("jsonl logging disabled") == 1 and "step:2 " in output  # logged to the console after it
    first, second = (out_dir / "checkpoints" / checkpoint.tag_for(step) for step in (1, 2))
    assert re.search(rf"disk full while saving checkpoint {second} \(\d[\d,]* bytes free, the previous checkpoint "
                     rf"took [\d,]+; .*\); the previous checkpoint {first} is untouched and 'latest' still names it",
                     result.stderr), result.stderr[-3000:]
    assert checkpoint.latest_tag(out_dir / "checkpoints") == first.name
    assert checkpoint.verify(first) == []


def test_sigkill_in_the_middle_of_a_save_leaves_the_previous_checkpoint_latest(tmp_path):
    """SIGKILL to the launcher's process group as soon as the save of step 2 has begun writing its model states: the
    small model's (weights and Adam state, about 300 MB) take far longer to write than the 10 ms poll, so the kill
    lands inside that save. (A save removes a folder of its step left by an earlier attempt, so a stalling file
    planted there beforehand would not stay.)"""
    out_dir = tmp_path / "run"
    second = out_dir / "checkpoints" / checkpoint.tag_for(2)
    command, env, _ = stage_command("pretrain", out_dir, "--model", "small", "--batch_size", "2", "--max_seq_len",
                                    "64", "--eval_interval", "0", "--eval_batches", "1", "--save_interval", "1",
                                    "--max_steps", "3", "--log_interval", "1", world_size=1, zero="0")
    process = start(command, env)
    try:
        deadline = time.monotonic() + 300
        while not (second / "mp_rank_00_model_states.pt").is_file():  # the save of step 2 has begun
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
            time.sleep(0.01)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
    first = out_dir / "checkpoints" / checkpoint.tag_for(1)
    assert checkpoint.latest_tag(out_dir / "checkpoints") == first.name
    assert checkpoint.verify(first) == []
    assert not (second / checkpoint.MANIFEST).exists()
    for path in first.glob("*.pt"):
        torch.load(path, map_location="cpu", weights_only=False)


def offload_config(directory: Path, offload: dict) -> Path:
    config = json.loads((REPO_ROOT / "ds_configs" / "zero3_offload.json").read_text())
    config["zero_optimization"]["offload_optimizer"] = offload
    path = directory / "zero3_custom_offload.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("offload, expected", [
    ({"device": "gpu"}, r"offload_optimizer\.device is 'gpu'; valid choices: none, cpu, nvme"),
    ({"device": "nvme"}, r"offload_optimizer\.device is 'nvme' but zero_optimization\.offload_optimizer\.nvme_path "
                         r"is not set"),
    ({"device": "nvme", "nvme_path": "/no/such/nvme"}, r"offload_optimizer\.nvme_path /no/such/nvme is not an "
                                                        r"existing directory"),
], ids=["unknown-device", "nvme-without-path", "nvme-path-missing"])
def test_offload_targets_the_machine_cannot_serve_fail_naming_the_option(tmp_path, offload, expected):
    cfg = TrainConfig(data_config="config/data/pretrain/demo.yaml", deepspeed=str(offload_config(tmp_path, offload)))
    with pytest.raises(ConfigError, match=expected):
        build_ds_config(cfg, world_size=1, dtype="fp32")


def test_nvme_offload_without_async_io_is_refused_naming_the_choices(tmp_path):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if AsyncIOBuilder().is_compatible(verbose=False):
        pytest.skip("this machine can build DeepSpeed's async_io op, so nvme offload is possible here")
    config = offload_config(tmp_path, {"device": "nvme", "nvme_path": str(tmp_path)})
    cfg = TrainConfig(data_config="config/data/pretrain/demo.yaml", deepspeed=str(config))
    with pytest.raises(ConfigError, match=r"offload_optimizer\.device 'nvme' needs DeepSpeed's async_io op \(libaio\), "
                                          r"which cannot be built on this machine; valid choices here: none, cpu"):
        build_ds_config(cfg, world_size=1, dtype="fp32")
