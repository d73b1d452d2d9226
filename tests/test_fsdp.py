"""The FSDP2 backend against DeepSpeed ZeRO-2 on the same seed (pretrain at 2 ranks, DPO at 1), its grad norm,
checkpoints and export, and the ZeRO/FSDP comparison tool (bench/compare.py), whose two runs the FSDP tests reuse."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from tests.launch import (CONTRACT, REPO_ROOT, TORCHRUN, free_port, read_metrics, read_run_config, run_command,
                          run_stage)
from train.config import ConfigError, parse_config

STEPS = 4
# Stage flags of the comparison run; the tool adds --max_steps, --log_interval, --throughput_warmup_steps, --out_dir.
STAGE_FLAGS = ["--accumulation_steps", "2", "--save_interval", "2", "--keep_checkpoints", "3"]
TOOL = ["pretrain", "--configs", "2,fsdp", "--model", "tiny", "--steps", str(STEPS), "--warmup_steps", "1",
        "--log_interval", "1", "--batch_size", "4", "--max_seq_len", "128", *STAGE_FLAGS]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """bash launch/compare_zero.sh over ZeRO-2 and FSDP2 at 2 ranks: the results folder and the tool's exit."""
    out = tmp_path_factory.mktemp("compare")
    result = subprocess.run(["bash", "launch/compare_zero.sh", *TOOL, "--out", str(out)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=900, env={**os.environ, "WANDB_MODE": "offline"})
    return out, result


def test_fsdp_run_matches_zero2_loss_curve_and_grad_norm(comparison):
    out, result = comparison
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    zero2, fsdp = read_metrics(out / "runs" / "2"), read_metrics(out / "runs" / "fsdp")
    assert [r["train/global_step"] for r in fsdp] == list(range(1, STEPS + 1))
    for ours, theirs in zip(fsdp, zero2):
        assert ours["train/loss"] == pytest.approx(theirs["train/loss"], rel=1e-6)
        # Both take per-tensor float64 norms (FSDP's is checked against the full gradients' in
        # test_fsdp_grad_norm_is_the_full_gradient_norm); what is left is the fp32 gradients' own sum order. With
        # clip_grad_norm_'s fp32 norm, FSDP's was 4e-5 to 6e-5 low here.
        assert ours["train/grad_norm"] == pytest.approx(theirs["train/grad_norm"], rel=1e-6)
        assert ours["train/learning_rate"] == pytest.approx(theirs["train/learning_rate"], rel=1e-9)
        assert ours["train/num_input_tokens_seen"] == theirs["train/num_input_tokens_seen"]
    config = read_run_config(out / "runs" / "fsdp")
    assert config["backend"] == "fsdp" and "deepspeed" not in config and "zero_stage" not in config
    assert config["fsdp"]["reduce_dtype"] == "fp32" and config["world_size"] == 2
    assert "FSDP2" in (out / "runs" / "fsdp.log").read_text()


def test_fsdp_run_logs_every_contract_key_finite(comparison):
    out, _ = comparison
    for record in read_metrics(out / "runs" / "fsdp")[1:]:  # the first step is the rate warm-up
        for key in CONTRACT:
            assert record[key] is not None and math.isfinite(record[key]), (key, record)


def test_fsdp_checkpoint_resume_continues_the_uninterrupted_curve(comparison, tmp_path):
    out, _ = comparison
    straight = out / "runs" / "fsdp"
    assert (straight / "checkpoints" / "step_00000002" / ".metadata").is_file()  # a DCP folder
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS:08d}")
    (resumed / "checkpoints" / "latest").write_text("step_00000002")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()[:2]
    (resumed / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    run = next(r for r in json.loads((out / "results.json").read_text())["results"] if r["config"] == "fsdp")
    command = [arg if arg != str(straight) else str(resumed) for arg in run["command"]] + ["--from_resume"]
    port = free_port()
    result = run_command(command, {**os.environ, **run["environment"], "MASTER_PORT": str(port)},
                         port, check=True, timeout=600)
    assert "resumed from" in result.stdout and "step 2" in result.stdout
    records, reference = read_metrics(resumed), read_metrics(straight)
    assert [r["train/global_step"] for r in records] == list(range(1, STEPS + 1))
    for ours, theirs in zip(records[2:], reference[2:]):
        assert ours["train/loss"] == pytest.approx(theirs["train/loss"], rel=1e-6)
        assert ours["train/grad_norm"] == pytest.approx(theirs["train/grad_norm"], rel=1e-6)
        assert ours["train/learning_rate"] == pytest.approx(theirs["train/learning_rate"], rel=1e-9)
        assert ours["train/num_input_tokens_seen"] == theirs["train/num_input_tokens_seen"]


def test_one_rank_fsdp_dpo_from_the_fsdp_export_matches_zero2(comparison, tmp_path):
    """The consolidated export loads with --from_weight, and at world size 1 the curves agree as at 2; DPO's frozen
    reference is copied from the sharded policy."""
    out, _ = comparison
    export = out / "runs" / "fsdp" / "export"
    flags = ["--from_weight", str(export), "--batch_size", "2", "--max_steps", "3", "--log_interval", "1",
             "--eval_interval", "0", "--eval_batches", "1", "--throughput_warmup_steps", "1"]
    run_stage("dpo", tmp_path / "fsdp", *flags, world_size=1, zero="fsdp")
    run_stage("dpo", tmp_path / "zero2", *flags, world_size=1, zero="2")
    fsdp, zero2 = read_metrics(tmp_path / "fsdp"), read_metrics(tmp_path / "zero2")
    assert read_run_config(tmp_path / "fsdp")["from_weight_path"] == str(export)
    assert len(fsdp) == len(zero2) == 3
    assert fsdp[0]["train/loss"] == pytest.approx(math.log(2), rel=1e-6)  # the reference is the starting policy
    for ours, theirs in zip(fsdp, zero2):
        assert ours["train/loss"] == pytest.approx(theirs["train/loss"], rel=1e-6)
        # At one rank too (clip_grad_norm_'s fp32 norm of the unsharded gradients was 1e-4 low here, and lower
        # than at 2 ranks: the norm of the same gradient depended on the world size).
        assert ours["train/grad_norm"] == pytest.approx(theirs["train/grad_norm"], rel=1e-6)


def test_fsdp_grad_norm_is_the_full_gradient_norm(tmp_path):
    port = free_port()
    result_file = tmp_path / "norm.json"
    run_command([str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(port),
                 str(REPO_ROOT / "tests" / "fsdp_grad_norm.py"), str(result_file)],
                {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                 "PYTHONPATH": str(REPO_ROOT)}, port, check=True, timeout=300)
    norms = json.loads(result_file.read_text())
    assert norms["world_size"] == 2
    # Both are float64 norms of the same fp32 gradients, summed in other orders. clip_grad_norm_'s fp32 norm was
    # 6e-5 low here (torch's CPU vector_norm drops small squares against its running sums: train/fsdp.py); a
    # shard's norm alone, or the clipped norm, would be off by far more.
    assert norms["engine"] == pytest.approx(norms["float64"], rel=1e-9)
    assert norms["engine"] > 0.5  # above the clip threshold: the norm reported is the one before clipping


def test_comparison_results_hold_the_table_json_and_chart(comparison):
    out, result = comparison
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    meta, rows = results["meta"], results["results"]
    assert [r["config"] for r in rows] == ["2", "fsdp"]
    assert meta["world_size"] == 2 and meta["steps"] == STEPS and meta["reference"] == "ZeRO-2"
    fsdp_metrics = read_metrics(out / "runs" / "fsdp")[-1]
    for row in rows:
        assert row["agrees"] is True and row["step"] == STEPS
        for key in ("tokens_per_second", "mfu_percent", "tflops_per_device", "step_time_s", "peak_memory_gb",
                    "loss", "grad_norm"):
            assert row[key] is not None and math.isfinite(row[key]) and row[key] > 0, (row["config"], key)
    assert rows[1]["loss"] == fsdp_metrics["train/loss"]
    assert rows[1]["tokens_per_second"] == fsdp_metrics["train/tokens_per_second"]
    table = (out / "results.md").read_text()
    assert "| ZeRO-2 |" in table and "| FSDP2 |" in table and "peak memory per rank" in table
    assert f"loss at step {STEPS}" in table and "All configurations agree" in table and "NO:" not in table
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_comparison_flags_a_row_that_differs():
    from bench.compare import check_agreement, table

    def row(config, losses):
        return {"config": config, "label": config, "dtype": "fp32", "global_batch": 8, "step": 2,
                "curve": [{"step": i + 1, "loss": loss, "grad_norm": 1.0} for i, loss in enumerate(losses)],
                **{key: 1.0 for key in ("tokens_per_second", "mfu_percent", "tflops_per_device", "step_time_s",
                                        "peak_memory_gb", "loss", "grad_norm")}}

    rows = [row("2", [2.0, 1.5]), row("fsdp", [2.0, 1.5000001]), row("3", [2.0, 1.6])]
    check_agreement(rows)
    assert [r["agrees"] for r in rows] == [True, True, False]
    assert "**NO: loss off by" in table(rows, {"reference": "2", "steps": 2}).splitlines()[-1]


def test_compare_tool_rejects_bad_options():
    for argv, message in ((["--configs", "2,zero9"], "zero9"), (["--steps", "2", "--warmup_steps", "2"], "--steps"),
                          (["--max_steps", "3"], "--max_steps is set by the tool")):
        result = subprocess.run([sys.executable, "-m", "bench.compare", *argv], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_backend_option_is_checked():
    with pytest.raises(ConfigError, match="--backend: 'ddp' is not one of deepspeed, fsdp"):
        parse_config({"stage": "pretrain", "data_config": "x.yaml"}, ["--backend", "ddp"])
