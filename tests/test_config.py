"""The run configuration: flags from fields, YAML stage files, precedence and clear errors."""
import json

import pytest

from train.config import ConfigError, parse_config
from train.backend import lr_lambda
from train.deepspeed_backend import build_ds_config

DEFAULTS = dict(stage="sft", data_config="config/data/posttrain/sft/general.yaml")


def test_flags_override_yaml_which_overrides_stage_defaults(tmp_path):
    stage_file = tmp_path / "sft.yaml"
    stage_file.write_text("learning_rate: 1.0e-3\nbatch_size: 4\nuse_wandb: true\n")
    cfg = parse_config({**DEFAULTS, "batch_size": 2, "epochs": 3}, ["--config", str(stage_file), "--batch_size", "8"])
    assert (cfg.learning_rate, cfg.batch_size, cfg.epochs, cfg.use_wandb) == (1e-3, 8, 3, True)
    assert cfg.out_dir == "out/sft"


def test_boolean_flags_accept_bare_and_valued_forms():
    assert parse_config(DEFAULTS, ["--from_resume"]).from_resume is True
    assert parse_config(DEFAULTS, ["--from_resume", "0"]).from_resume is False
    assert parse_config(DEFAULTS, ["--max_steps", "none"]).max_steps is None


def test_unknown_yaml_key_is_named_with_a_suggestion(tmp_path):
    stage_file = tmp_path / "bad.yaml"
    stage_file.write_text("learning_rat: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown option 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        parse_config(DEFAULTS, ["--config", str(stage_file)])


def test_mistyped_yaml_value_names_the_option(tmp_path):
    stage_file = tmp_path / "bad.yaml"
    stage_file.write_text("batch_size: many\n")
    with pytest.raises(ConfigError, match="option 'batch_size' expects int"):
        parse_config(DEFAULTS, ["--config", str(stage_file)])


def test_unknown_flag_suggests_the_close_one(capsys):
    with pytest.raises(SystemExit):
        parse_config(DEFAULTS, ["--learning_rat", "1"])
    assert "did you mean --learning_rate" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,message", [
    ("--batch_size", "0", "--batch_size: must be >= 1"),
    ("--packing", "zip", "--packing: 'zip' is not one of auto, packed, padded"),
    ("--dtype", "int8", "--dtype: 'int8' is not one of"),
])
def test_invalid_values_fail_before_any_work(flag, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(DEFAULTS, [flag, value])


def test_ds_config_fills_auto_fields_from_the_flags():
    cfg = parse_config(DEFAULTS, ["--batch_size", "4", "--accumulation_steps", "3", "--grad_clip", "0.5",
                                  "--deepspeed", "ds_configs/zero3.json"])
    ds = build_ds_config(cfg, world_size=2, dtype="fp32")
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3


def test_impossible_batch_arithmetic_is_a_clear_error(tmp_path):
    ds_file = tmp_path / "fixed.json"
    ds_file.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 1}}))
    cfg = parse_config(DEFAULTS, ["--batch_size", "4", "--deepspeed", str(ds_file)])
    with pytest.raises(ConfigError, match="'train_batch_size' is 64 but --batch_size 4 × --accumulation_steps 1 × world size 2 gives 8"):
        build_ds_config(cfg, world_size=2, dtype="fp32")


def test_missing_ds_config_lists_the_choices():
    cfg = parse_config(DEFAULTS, ["--deepspeed", "ds_configs/zero9.json"])
    with pytest.raises(ConfigError, match=r"zero9.json does not exist; choices: .*zero2.json"):
        build_ds_config(cfg, world_size=1, dtype="fp32")


def test_lr_schedule_warms_up_linearly_then_decays_to_the_floor():
    multiplier = lr_lambda(total_steps=100, warmup_steps=10, min_ratio=0.1)
    assert [multiplier(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert multiplier(9) == pytest.approx(1.0)
    assert multiplier(10) == pytest.approx(1.0)
    assert multiplier(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert multiplier(100) == pytest.approx(0.1)
    values = [multiplier(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
