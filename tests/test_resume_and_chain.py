"""Checkpoints, resume, W&B offline and the stage chain, through real launcher runs on CPU ranks."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys

import matplotlib.image as mpimg
import pytest
from safetensors.torch import load_file
from torch.utils.cpp_extension import _get_build_directory

from tests.launch import CONTRACT, REPO_ROOT, read_metrics, read_run_config, run_launch_script, run_stage
from train.config import parse_config
from train.exports import resolve_from_weight

SHORT_RUN = ["--model", "tiny", "--batch_size", "4", "--accumulation_steps", "2", "--log_interval", "1",
             "--eval_interval", "0", "--eval_batches", "1", "--throughput_warmup_steps", "1"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """zero -> the out_dir of an uninterrupted 2-rank run of 6 steps with checkpoints at steps 3 and 6 (made once)."""
    runs = {}

    def run(zero: str):
        if zero not in runs:
            runs[zero] = tmp_path_factory.mktemp(f"straight_zero{zero}")
            run_stage("pretrain", runs[zero], *SHORT_RUN, "--max_steps", "6", "--save_interval", "3",
                      "--keep_checkpoints", "3", zero=zero)
        return runs[zero]
    return run


@pytest.mark.parametrize("zero", ["2", "3"])
def test_resumed_run_continues_the_uninterrupted_loss_curve(tmp_path, straight_run, zero):
    straight = straight_run(zero)
    reference = read_metrics(straight)

    # The state a crash right after step 3's checkpoint leaves behind.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    (resumed / "checkpoints" / "latest").write_text("step_00000003")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()[:3]
    (resumed / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    result = run_stage("pretrain", resumed, *SHORT_RUN, "--max_steps", "6", "--save_interval", "3",
                       "--keep_checkpoints", "3", "--from_resume", zero=zero)
    assert "resumed from" in result.stdout and "step 3" in result.stdout
    records = read_metrics(resumed)
    assert [r["train/global_step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for ours, theirs in zip(records[3:], reference[3:]):
        assert ours["train/loss"] == pytest.approx(theirs["train/loss"], rel=1e-6)
        assert ours["train/grad_norm"] == pytest.approx(theirs["train/grad_norm"], rel=1e-6)
        assert ours["train/learning_rate"] == pytest.approx(theirs["train/learning_rate"], rel=1e-9)
        assert ours["train/num_input_tokens_seen"] == theirs["train/num_input_tokens_seen"]
        assert ours["train/epoch"] == pytest.approx(theirs["train/epoch"])


def test_checkpoints_keep_the_last_k_and_latest_names_a_complete_one(tmp_path):
    run_stage("pretrain", tmp_path, *SHORT_RUN, "--max_steps", "6", "--save_interval", "2",
              "--keep_checkpoints", "2", world_size=1, zero="0")
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000004", "step_00000006"]
    assert (checkpoints / "latest").read_text() == "step_00000006"
    assert (checkpoints / "step_00000006" / "rng_rank0.pt").is_file()


def test_wandb_defaults_to_offline_and_logs_the_contract(tmp_path):
    out_dir = tmp_path / "run"
    # No key, no mode: offline. A bare HOME has no ~/.netrc; DeepSpeed's CPU op is read from the folder it was built
    # in, or the run compiles it again (40-130 s). A TORCH_EXTENSIONS_DIR is taken as it is, without the py311_cpu
    # folder torch adds to its default: torch's own function names it.
    extensions = os.path.dirname(_get_build_directory("deepspeed_shm_comm", verbose=False))
    env = {"HOME": str(tmp_path), "WANDB_MODE": None, "WANDB_API_KEY": None, "TORCH_EXTENSIONS_DIR": extensions}
    result = run_stage("sft", out_dir, *SHORT_RUN, "--from_weight", "none", "--max_steps", "3",
                       "--save_interval", "0", "--use_wandb", "--out_root", str(tmp_path), world_size=1, zero="0", env=env)
    assert "W&B disabled" not in result.stdout + result.stderr
    runs = list((out_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out_dir / "wandb").iterdir())
    # The offline run file stores each logged item as its key and its JSON-encoded value, in plain bytes.
    run_file = next(runs[0].glob("*.wandb")).read_bytes()
    # One group per pipeline (the out_root), the stage as the job type: what the default out_root's stages share.
    group = f"{tmp_path.name}-{hashlib.sha256(str(tmp_path.resolve()).encode()).hexdigest()[:8]}"
    assert group.encode() in run_file and b"sft" in run_file
    for record in read_metrics(out_dir):
        for key, value in record.items():
            assert key.encode() in run_file, key
            if value is not None:
                assert json.dumps(value).encode() in run_file, (key, value)


def test_stage_chain_starts_each_stage_from_the_previous_export(tmp_path):
    common = [*SHORT_RUN, "--max_steps", "2", "--save_interval", "0", "--out_root", str(tmp_path)]
    for stage in ("pretrain", "midtrain"):
        run_stage(stage, tmp_path / stage, *common, world_size=1, zero="0")
    # The last stage with the options that change a step's cost, which its start-up line names.
    sft = run_stage("sft", tmp_path / "sft", *common, "--activation_checkpointing", "--loss_chunk_tokens", "64",
                    world_size=1, zero="0")
    assert "M params, world 1, ZeRO-0, fp32, activation checkpointing, loss chunks of 64 tokens, 2 steps" in sft.stdout
    report = subprocess.run([sys.executable, "-m", "train.report", str(tmp_path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True)
    assert report.stdout.strip() == f"wrote {tmp_path / 'report.png'} (pretrain, midtrain, sft)"
    page = mpimg.imread(tmp_path / "report.png")
    assert page.shape[:2] == (1300, 1100) and page.std() > 0.01  # five panels drawn, not a blank page
    for stage, previous in (("midtrain", "pretrain"), ("sft", "midtrain")):
        config = read_run_config(tmp_path / stage)
        assert config["from_weight_path"] == str(tmp_path / previous / "export")
        before = load_file(tmp_path / previous / "export" / "model.safetensors")
        after = load_file(tmp_path / stage / "export" / "model.safetensors")
        assert before.keys() == after.keys()
        assert any(not (before[k] == after[k]).all() for k in before)  # the stage trained


def test_missing_from_weight_names_the_stage_to_run_first(tmp_path):
    cfg = parse_config({"stage": "sft", "data_config": "x.yaml"}, ["--out_root", str(tmp_path),
                                                                  "--from_weight", "midtrain"])
    with pytest.raises(ValueError, match=r"no exported weights at .*midtrain/export; run the midtrain stage first "
                                         r"\(bash launch/run_midtrain.sh"):
        resolve_from_weight(cfg)
    cfg = parse_config({"stage": "sft", "data_config": "x.yaml"}, ["--from_weight", str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match="holds no model.safetensors"):
        resolve_from_weight(cfg)


# ZeRO-3's keys are checked finite in tests/test_distributed_metrics.py; here the launch script's own path.
@pytest.mark.parametrize("zero", ["2"])
def test_launch_script_writes_every_contract_key_finite_on_every_line(tmp_path, zero):
    result = run_launch_script("sft", "--from_weight", "none", "--max_steps", "8", "--log_interval", "4",
                               "--eval_interval", "4", "--eval_batches", "1", "--out_dir", str(tmp_path), zero=zero)
    console = [line for line in result.stdout.splitlines() if line.startswith("Epoch:[1/1]")]
    assert [line.split()[1] for line in console] == ["step:4", "step:8"]
    records = read_metrics(tmp_path)
    assert read_run_config(tmp_path)["zero_stage"] == int(zero) and read_run_config(tmp_path)["world_size"] == 2
    for record in records:
        for key in CONTRACT + ["eval/loss", "eval/perplexity"]:
            assert record[key] is not None and math.isfinite(record[key]), (record["train/global_step"], key)


def test_epochs_of_a_subsampled_mixture_each_run_their_own_length(tmp_path):
    """Subsampling a source gives each epoch a different token count, so a different number of packed steps."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jumbo box".split()
    for name, offset in (("a", 0), ("b", 7)):
        with open(tmp_path / f"{name}.jsonl", "w") as handle:
            for i in range(40):
                text = " ".join(words[(i + offset + j) % len(words)] for j in range(3 + (i * 7) % 50))
                handle.write(json.dumps({"text": text}) + "\n")
    data_config = tmp_path / "mixture.yaml"
    data_config.write_text(f"kind: pretrain\nmax_seq_len: 32\nsources:\n  - {{path: {tmp_path}/a.jsonl, weight: 0.75}}\n"
                           f"  - {{path: {tmp_path}/b.jsonl, weight: 0.25}}\nvalidation: {{fraction: 0.1}}\nseed: 3\n")
    out_dir = tmp_path / "run"
    run_stage("pretrain", out_dir, "--data_config", str(data_config), "--model", "tiny", "--batch_size", "2",
              "--epochs", "3", "--log_interval", "1000", "--eval_batches", "1", world_size=1, zero="0")
    steps_per_epoch = read_run_config(out_dir)["steps_per_epoch"]
    assert len(set(steps_per_epoch)) > 1, steps_per_epoch
    last = read_metrics(out_dir)[-1]
    assert last["train/global_step"] == sum(steps_per_epoch)
    assert last["train/epoch"] == pytest.approx(3.0)


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "missing"])
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_resumed(tmp_path, straight_run, damage):
    """Rank 1's optimizer shard of the newest checkpoint is cut in half, has one byte flipped, or is gone: the
    resume names the file, falls back to the checkpoint before it on every rank, and continues the curve."""
    straight = straight_run("2")
    reference = read_metrics(straight)
    manifest = json.loads((straight / "checkpoints" / "step_00000006" / "manifest.json").read_text())
    assert "rng_rank1.pt" in manifest and all(entry["bytes"] > 0 for entry in manifest.values())

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shard = next((resumed / "checkpoints" / "step_00000006").glob("zero_pp_rank_1_*optim_states.pt"))
    data = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "corrupt":
        middle = len(data) // 2
        shard.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    else:
        shard.unlink()
    lines = (resumed / "metrics.jsonl").read_text().splitlines()[:3]
    (resumed / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    result = run_stage("pretrain", resumed, *SHORT_RUN, "--max_steps", "6", "--save_interval", "3",
                       "--keep_checkpoints", "3", "--from_resume", zero="2")
    expected = {"truncated": r"has \d+ bytes, \d+ were saved", "corrupt": "is corrupt", "missing": "is missing"}[damage]
    assert re.search(rf"WARNING: checkpoint \S+step_00000006 is not usable: {re.escape(str(shard))} {expected}"
                     r".*; trying the one before it", result.stdout), result.stdout[-3000:]
    assert f"resumed from {resumed / 'checkpoints' / 'step_00000003'}: step 3," in result.stdout
    records = read_metrics(resumed)
    assert [r["train/global_step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for ours, theirs in zip(records[3:], reference[3:]):
        assert ours["train/loss"] == pytest.approx(theirs["train/loss"], rel=1e-6)
