"""`--compile` (train/compile.py): the compiled blocks train like the eager ones under ZeRO-2 and FSDP2, evaluation
and KV-cache generation still agree with an eager copy, changing sequence widths retrace once rather than every
step, more traces than expected warn once, and ZeRO-3 and MoE models are refused naming the options.

One process (tests/compile_runs.py) runs every engine, so the compile is paid once.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

from tests.launch import REPO_ROOT, free_port, run_command
from model import ModelConfig, Transformer
from train import compile as compiling
from train.config import ConfigError, TrainConfig, parse_config
from train.deepspeed_backend import build_ds_config

STEPS = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    result_file = tmp_path_factory.mktemp("compile") / "runs.json"
    port = free_port()
    run_command([sys.executable, str(REPO_ROOT / "tests" / "compile_runs.py"), str(result_file)],
                {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT),
                 "MASTER_PORT": str(port)},
                port, check=True, timeout=600)
    return json.loads(result_file.read_text())


def test_compiled_zero2_trains_like_eager(runs):
    eager, compiled = runs["eager_zero2"], runs["compiled_zero2"]
    assert len(compiled["loss"]) == STEPS
    # Inductor may fuse and reorder fp32 reductions; seen identical here, a wrong graph is off by far more.
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5)
    assert compiled["grad_norm"] == pytest.approx(eager["grad_norm"], rel=1e-5)
    assert eager["loss"][0] != pytest.approx(eager["loss"][-1], rel=1e-5)  # the steps do differ


def test_compiled_fsdp_trains_like_eager_zero2(runs):
    eager, compiled = runs["eager_zero2"], runs["compiled_fsdp"]
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-6)
    # FSDP's and ZeRO's fp32 norms reduce in different orders (tests/test_fsdp.py: 2e-4 relative).
    assert compiled["grad_norm"] == pytest.approx(eager["grad_norm"], rel=2e-4)


def test_width_changes_retrace_once_and_generation_stays_eager(runs):
    compiled = runs["compiled_zero2"]
    assert runs["eager_zero2"]["traces_after_training"] == 0
    # Widths 40, 40, 24, 56: one static trace, one with the width dynamic, none for the last width.
    assert compiled["traces_after_training"] == 2
    assert compiled["traces_after_generation"] == compiled["traces_after_training"]  # decoding never traced
    assert compiled["tokens"]["compiled"] == compiled["tokens"]["eager"]


def test_the_compile_clock_holds_the_retrace_and_nothing_else(runs):
    """What train/metrics.py leaves out of a rate window (system/compile_time_s): the time of the step that retraces
    is mostly compiling, against the host clock around the step; a step that reuses a graph compiles nothing."""
    compiled, eager = runs["compiled_zero2"], runs["eager_zero2"]
    assert eager["compile_seconds"] == [0.0] * STEPS
    retrace, reuse = compiled["compile_seconds"][2], compiled["compile_seconds"][3]  # widths 24 (dynamic), then 56
    assert 0 < retrace < compiled["step_seconds"][2]
    assert compiled["step_seconds"][2] - retrace < 3 * compiled["step_seconds"][3]  # the rest: about a plain step
    assert reuse == 0.0


def test_compiled_evaluation_matches_eager_copy(runs):
    compiled = runs["compiled_zero2"]
    assert compiled["eval_logits_max_difference"] < 1e-4  # logits of order 1
    assert compiled["traces_at_end"] <= compiled["traces_after_training"] + 1  # eval mode, no grad: one more


def test_zero3_is_refused_naming_the_options():
    cfg = TrainConfig(data_config="unused", compile=True, deepspeed="ds_configs/zero3.json")
    with pytest.raises(ConfigError, match=r"--compile: not supported under ZeRO-3.*ds_configs/zero2\.json.*"
                                          r"--backend fsdp.*--compile false"):
        build_ds_config(cfg, 1, "fp32")
    cfg.compile = False
    assert build_ds_config(cfg, 1, "fp32")["zero_optimization"]["stage"] == 3


def test_compile_flag_parses_and_defaults_off():
    assert parse_config({"data_config": "x"}, []).compile is False
    assert parse_config({"data_config": "x"}, ["--compile", "true"]).compile is True
    assert parse_config({"data_config": "x"}, ["--compile"]).compile is True


def test_moe_model_is_refused_naming_the_options():
    with pytest.raises(ConfigError, match=r"--compile: not supported for mixture-of-experts.*tiny-moe.*--compile false"):
        compiling.compile_blocks(Transformer(ModelConfig.from_preset("tiny-moe")))


def test_traces_past_the_expected_number_warn_once(monkeypatch, capsys):
    from torch._dynamo.callback import CallbackArgs, CallbackTrigger

    monkeypatch.setattr(compiling, "_traces", {"count": compiling.EXPECTED_TRACES - 1, "warned": False})
    compiling._count_trace(CallbackArgs(CallbackTrigger.DYNAMO, "0/0"))
    compiling._count_trace(CallbackArgs(CallbackTrigger.LAZY_BACKWARD, "0/0"))  # a backward graph, not a retrace
    assert compiling.trace_count() == compiling.EXPECTED_TRACES and capsys.readouterr().out == ""
    for _ in range(3):
        compiling._count_trace(CallbackArgs(CallbackTrigger.DYNAMO, "0/1"))
    warnings = capsys.readouterr().out.count("WARNING: --compile: torch.compile has traced the transformer block")
    assert warnings == 1 and compiling.trace_count() == compiling.EXPECTED_TRACES + 3
