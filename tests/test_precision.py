"""Mixed precision (--dtype): the default each device gets, and bf16 under ZeRO 0, 2, 3 and FSDP computing one model.

Two shared sets of runs at 2 CPU ranks: a short bf16 pretrain per backend (their metrics, run configs and
exports), and tests/precision_probe.py, which builds each backend's model on the same weights in one torchrun
launch (step-0 forwards of the trained model and its frozen copy, DeepSpeed's reduction dtypes, fp16 grad norms).
"""
from __future__ import annotations

import json
import math
import os
import types

import pytest
import torch
from safetensors.torch import load_file

from model import attention
from tests.launch import CONTRACT, REPO_ROOT, TORCHRUN, free_port, read_metrics, read_run_config, run_command, run_stage
from train.backend import resolve_dtype
from train.config import ConfigError, parse_config
from train.deepspeed_backend import build_ds_config

BACKENDS = ["0", "2", "3", "fsdp"]
STEPS = 4
RUN = ["--model", "tiny", "--batch_size", "4", "--max_seq_len", "128", "--max_steps", str(STEPS), "--log_interval",
       "1", "--eval_interval", "0", "--eval_batches", "1", "--save_interval", "0", "--throughput_warmup_steps", "1",
       "--dtype", "bf16"]
DEFAULTS = dict(data_config="config/data/posttrain/sft/general.yaml")


# ----- the default precision, with torch.cuda faked at the boundary -----
def fake_gpu(monkeypatch, native_bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # As torch answers on a V100 or T4: bf16 is "supported" when emulation counts, not natively.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)


def test_auto_precision_is_what_the_device_does_best(monkeypatch):
    assert resolve_dtype("auto", "deepspeed") == "fp32"  # this machine: CPU
    fake_gpu(monkeypatch, native_bf16=True)  # Ampere and newer
    assert resolve_dtype("auto", "deepspeed") == resolve_dtype("auto", "fsdp") == "bf16"
    fake_gpu(monkeypatch, native_bf16=False)  # V100, T4
    assert resolve_dtype("auto", "deepspeed") == "fp16"  # DeepSpeed's dynamic loss scale
    assert resolve_dtype("auto", "fsdp") == "fp32"  # FSDP refuses fp16: no loss scaler
    assert resolve_dtype("bf16", "fsdp") == "bf16"  # an explicit choice is kept


@pytest.mark.parametrize("capability, expected", [((7, 0), "sdpa"), ((7, 5), "sdpa"), ((8, 0), "flash")])
def test_pre_ampere_gpus_attend_with_sdpa_not_flash_attn(monkeypatch, capability, expected):
    monkeypatch.setattr(attention, "flash_attn_func", object())  # installed
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    q = types.SimpleNamespace(is_cuda=True, dtype=torch.float16, shape=(2, 16, 4, 8), device="cuda:0")
    assert attention.resolve_impl("auto", q, q) == expected


@pytest.mark.parametrize("zero, accumulation", [("0", None), ("2", "fp32"), ("3", "fp32")])
def test_deepspeed_reduces_and_accumulates_gradients_in_fp32(zero, accumulation):
    cfg = parse_config(DEFAULTS, ["--deepspeed", f"ds_configs/zero{zero}.json"])
    ds = build_ds_config(cfg, world_size=2, dtype="bf16")
    assert ds["communication_data_type"] == "fp32"
    # ZeRO-0: DeepSpeed refuses an accumulation dtype other than the model's ("unsupported mix").
    assert ds.get("data_types", {}).get("grad_accum_dtype") == accumulation


def test_a_deepspeed_json_asking_for_bf16_reduction_is_refused(tmp_path):
    config = json.loads((REPO_ROOT / "ds_configs" / "zero2.json").read_text())
    (tmp_path / "z.json").write_text(json.dumps({**config, "communication_data_type": "bf16"}))
    cfg = parse_config(DEFAULTS, ["--deepspeed", str(tmp_path / "z.json")])
    with pytest.raises(ConfigError, match="'communication_data_type' is bf16 but"):
        build_ds_config(cfg, world_size=2, dtype="bf16")


# ----- the probe: every backend on the same weights, in one launch -----
@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    for zero in ("0", "2"):  # fp16 from a 2^12 scale: 2^16 overflows the tiny model's first step (CPU fp16)
        config = json.loads((REPO_ROOT / "ds_configs" / f"zero{zero}.json").read_text())
        config["fp16"]["initial_scale_power"] = 12
        (out / f"zero{zero}.json").write_text(json.dumps(config))
    port = free_port()
    command = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(port),
               str(REPO_ROOT / "tests" / "precision_probe.py"), str(out), str(out)]
    run_command(command, {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, port, True, 600)
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("config", ["zero0_bf16", "zero2_bf16", "zero3_bf16", "fsdp_bf16", "zero0_fp16"])
def test_frozen_copy_computes_the_policys_step0_forward_exactly(probe, config):
    """A DPO reference or PPO/GRPO reference made at step 0: margins and KL exactly 0, whatever the ZeRO stage."""
    _, results = probe
    result = results[config]
    assert result["reference_dtypes"] == [result["policy_dtype"]]
    assert result["reference_equal"], result


def test_fsdp_and_deepspeed_bf16_compute_the_same_forward(probe):
    out, _ = probe
    zero2 = torch.load(out / "logits_zero2_bf16.pt")
    for config in ("zero0_bf16", "zero3_bf16", "fsdp_bf16"):
        assert torch.equal(torch.load(out / f"logits_{config}.pt"), zero2), config


@pytest.mark.parametrize("config, accumulation", [("zero0_bf16", "bfloat16"), ("zero2_bf16", "float32"),
                                                  ("zero3_bf16", "float32")])
def test_deepspeed_engines_reduce_in_fp32(probe, config, accumulation):
    _, results = probe
    assert results[config]["communication_dtype"] == "torch.float32"
    assert results[config]["accumulation_dtype"] == f"torch.{accumulation}"


def test_zero0_fp16_scales_the_loss_and_reports_the_unscaled_grad_norm(probe):
    """DeepSpeed's ZeRO-0 fp16 wrapper unscales gradients and reports the norm of the scaled ones, but its engine
    scales the loss only for ZeRO 1-3: ZeRO-2, which does both itself, is the reference (fp16 rounding apart)."""
    _, results = probe
    zero0, zero2 = results["zero0_fp16"], results["zero2_fp16"]
    assert zero0["applied"] and zero2["applied"] and zero0["optimizer"] == "FP16_UnfusedOptimizer"
    assert zero0["reported_norm"] == pytest.approx(zero2["reported_norm"], rel=1e-3)
    assert zero0["module_grad_norm"] == pytest.approx(zero0["scale"] * zero2["reported_norm"], rel=1e-3)


@pytest.mark.parametrize("config", ["zero0_bf16", "zero0_fp16"])
def test_zero0_mixed_precision_reports_and_clips_with_the_float64_norm(probe, config):
    """DeepSpeed's ZeRO-0 bf16/fp16 wrapper would report and clip with a sum of per-tensor fp32 CPU norms, 8.2e-5
    (bf16) and 7.9e-5 (fp16) low here, so its clip left the gradients at 1 + 8.2e-5 of the threshold. The logged
    norm is the float64 norm of the reduced gradients, unscaled, and the fp32 masters are clipped to the threshold
    with it."""
    _, results = probe
    result = results[config]
    assert result["applied"] and result["optimizer"] == "FP16_UnfusedOptimizer"
    assert result["reported_norm"] > result["clip"]  # the step clips
    assert result["reported_norm"] == pytest.approx(result["module_grad_norm"] / result["scale"], rel=1e-9)
    assert abs(result["deepspeed_norm"] / result["reported_norm"] - 1) > 1e-6  # DeepSpeed's own is off by more
    assert result["received_norms"] == [pytest.approx(result["clip"], rel=1e-6)]


# ----- a short bf16 pretrain per backend -----
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    results = {}
    for backend in BACKENDS:
        out_dir = tmp_path_factory.mktemp(f"bf16_{backend}")
        run_stage("pretrain", out_dir, *RUN, zero=backend)
        results[backend] = (out_dir, read_metrics(out_dir), read_run_config(out_dir))
    return results


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_run_logs_every_contract_key_finite(runs, backend):
    _, records, config = runs[backend]
    assert config["dtype"] == "bf16" and [r["train/global_step"] for r in records] == list(range(1, STEPS + 1))
    for record in records[1:]:  # the first step is the rate warm-up
        for key in CONTRACT:
            assert record[key] is not None and math.isfinite(record[key]), (key, record)


def test_bf16_loss_curves_of_the_backends_agree(runs):
    """Step 1 is one forward of the same bf16 weights: equal up to the order of the ranks' sums. Later steps use
    the bf16 rounding of fp32 masters that agree to ~1e-6 relative (fp32 reduction in different orders); a master
    next to a rounding boundary rounds to the neighbouring bf16 value (2^-8 apart), in a few weights of 1.2M, so
    the losses agree far below bf16's resolution: 1e-3 relative, a quarter of 2^-8 (seen: under 2e-4)."""
    zero2 = runs["2"][1]
    for backend in ("0", "3", "fsdp"):
        records = runs[backend][1]
        assert records[0]["train/loss"] == pytest.approx(zero2[0]["train/loss"], rel=1e-6), backend
        for ours, theirs in zip(records[1:], zero2[1:]):
            assert ours["train/loss"] == pytest.approx(theirs["train/loss"], rel=1e-3), backend


@pytest.mark.parametrize("backend", ["0", "2", "3"])
def test_deepspeed_bf16_run_records_fp32_reduction(runs, backend):
    ds = runs[backend][2]["deepspeed"]
    assert ds["communication_data_type"] == "fp32" and ds["bf16"]["enabled"] is True
    assert ds.get("data_types", {}).get("grad_accum_dtype") == (None if backend == "0" else "fp32")


def test_bf16_exports_are_the_fp32_master_weights(runs):
    """FSDP's parameters are its fp32 masters; DeepSpeed's exports must be its optimizer's fp32 masters too, not their
    bf16 rounding (a median move of ~1.4e-5 here). The masters of two backends part by each step's bf16 gradient
    noise (~2^-8 relative) times the learning rate, in the median under 1e-6 after 4 steps (seen: at most 5.5e-7):
    an eighth of the rounding. The median: Adam turns a gradient that cancels to near 0 into a full ±lr step whose
    sign follows the order of the sums, so a few hundred of 1.2M weights differ by up to 2 lr a step."""
    exports = {backend: load_file(runs[backend][0] / "export" / "model.safetensors") for backend in BACKENDS}
    reference = exports["fsdp"]
    for backend, weights in exports.items():
        assert weights.keys() == reference.keys()
        assert {tensor.dtype for tensor in weights.values()} == {torch.float32}, backend
        for name, tensor in weights.items():
            rounding = (tensor - tensor.bfloat16().float()).abs().median()
            assert rounding > 0, (backend, name)  # not bf16 values stored as fp32
            assert (tensor - reference[name]).abs().median() < rounding / 8, (backend, name)
