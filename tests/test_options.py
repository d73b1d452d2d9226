"""Every option and configuration file checked before any heavy work, each error naming the option or file, the
value and what is valid.

All of these run in process and start nothing: the checks live in TrainConfig.validate (parse_config calls it before
the trainer exists), in build_ds_config (the trainer builds the backend first) and in ModelConfig.from_dict (before
the Transformer is made, and the model before the data is tokenised), so no training run is needed to show that
they come first. The launch scripts' own checks (NUM_GPUS, CUDA_VISIBLE_DEVICES) are in tests/test_launch.py.
"""
import json
import os
import re

import pytest

from data.mixture import load_data_config
from model import ModelConfig, Transformer, save_pretrained
from tests.launch import tmpfs
from train.config import REPO_ROOT, ConfigError, TrainConfig, parse_config
from train.deepspeed_backend import build_ds_config
from train.dpo import DPOConfig
from train.ppo import PPOConfig
from train.stage import build_language_model

DEFAULTS = dict(stage="sft", data_config="config/data/posttrain/sft/general.yaml")


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


# ----- numbers on the command line -----
@pytest.mark.parametrize("cls,argv,message", [
    (None, ["--weight_decay", "inf"], "--weight_decay: must be a finite number, got inf"),
    (None, ["--learning_rate", "inf"], "--learning_rate: must be a finite number, got inf"),
    (None, ["--learning_rate", "nan"], "--learning_rate: must be a finite number, got nan"),
    (None, ["--learning_rate", "-inf"], "--learning_rate: must be a finite number, got -inf"),
    (None, ["--grad_clip", "nan"], "--grad_clip: must be a finite number, got nan"),
    (None, ["--warmup_ratio", "nan"], "--warmup_ratio: must be a finite number, got nan"),
    (None, ["--min_lr_ratio", "nan"], "--min_lr_ratio: must be a finite number, got nan"),
    (None, ["--adam_beta2", "nan"], "--adam_beta2: must be a finite number, got nan"),
    (None, ["--peak_tflops", "inf"], "--peak_tflops: must be a finite number, got inf"),
    (DPOConfig, ["--beta", "nan"], "--beta: must be a finite number, got nan"),
    (PPOConfig, ["--temperature", "inf"], "--temperature: must be a finite number, got inf"),
    (PPOConfig, ["--kl_coef", "nan"], "--kl_coef: must be a finite number, got nan"),
    (PPOConfig, ["--gamma", "nan"], "--gamma: must be a finite number, got nan"),
])
def test_non_finite_floats_are_refused(cls, argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(DEFAULTS, argv, cls=cls or TrainConfig)


def test_non_finite_yaml_value_is_refused(tmp_path):
    stage_file = tmp_path / "stage.yaml"
    stage_file.write_text("weight_decay: .inf\n")
    with pytest.raises(ConfigError, match="--weight_decay: must be a finite number, got inf"):
        parse_config(DEFAULTS, ["--config", str(stage_file)])


@pytest.mark.parametrize("cls,argv,message", [
    (None, ["--adam_beta1", "1"], r"--adam_beta1: must be in \[0, 1\), got 1.0"),
    (None, ["--adam_beta1", "-0.1"], r"--adam_beta1: must be in \[0, 1\), got -0.1"),
    (None, ["--adam_beta2", "1.5"], r"--adam_beta2: must be in \[0, 1\), got 1.5"),
    (None, ["--seed", "-1"], r"--seed: must be in \[0, 2\*\*32\), got -1"),
    (None, ["--seed", str(2**32)], rf"--seed: must be in \[0, 2\*\*32\), got {2**32}"),
    (None, ["--max_seq_len", "0"], r"--max_seq_len: must be >= 2 \(or none: the data config's value\), got 0"),
    (None, ["--max_seq_len", "1"], r"--max_seq_len: must be >= 2 \(or none: the data config's value\), got 1"),
    (PPOConfig, ["--critic_learning_rate", "0"], "--critic_learning_rate: must be > 0, got 0.0"),
    (PPOConfig, ["--value_clip", "-0.2"], "--value_clip: must be > 0, got -0.2"),
    (PPOConfig, ["--gamma", "1.5"], r"--gamma: must be in \[0, 1\], got 1.5"),
    (PPOConfig, ["--lam", "-0.1"], r"--lam: must be in \[0, 1\], got -0.1"),
])
def test_out_of_range_values_name_the_valid_range(cls, argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(DEFAULTS, argv, cls=cls or TrainConfig)


def test_max_seq_len_none_still_means_the_data_configs_value():
    assert parse_config(DEFAULTS, ["--max_seq_len", "none"]).max_seq_len is None
    assert parse_config(DEFAULTS, ["--max_seq_len", "2"]).max_seq_len == 2


@pytest.mark.parametrize("value,shown", [("-1e-3", "-0.001"), ("-1E+2", "-100.0"), ("-.5e1", "-5.0")])
def test_a_negative_number_with_an_exponent_reaches_validation(value, shown):
    """argparse alone takes "-1e-3" for an option and says "expected one argument"."""
    with pytest.raises(ConfigError, match=f"--learning_rate: must be > 0, got {shown}$"):
        parse_config(DEFAULTS, ["--learning_rate", value])


# ----- --out_dir -----
@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may write to, root included: mode 0555, or under root a read-only tmpfs."""
    directory = tmp_path / "read_only"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)
        return
    with tmpfs(directory, "ro,size=1m"):
        yield directory


def test_out_dir_that_is_a_file_is_refused_and_left_alone(tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me\n")
    with pytest.raises(ConfigError, match=exactly(f"--out_dir: {existing} exists and is not a directory")):
        parse_config(DEFAULTS, ["--out_dir", str(existing)])
    message = f"--out_dir: {existing / 'run'} cannot be created: {existing} is not a writable directory"
    with pytest.raises(ConfigError, match=exactly(message)):
        parse_config(DEFAULTS, ["--out_dir", str(existing / "run")])
    assert existing.read_text() == "keep me\n"


def test_out_dir_under_a_read_only_directory_is_refused(read_only_dir):
    out_dir = read_only_dir / "runs" / "sft"
    with pytest.raises(ConfigError, match=exactly(f"--out_dir: {out_dir} cannot be created: {read_only_dir} is not a "
                                                  f"writable directory")):
        parse_config(DEFAULTS, ["--out_dir", str(out_dir)])
    assert list(read_only_dir.iterdir()) == []


# ----- DeepSpeed JSON -----
@pytest.mark.parametrize("content,message", [
    ([{"zero_optimization": {"stage": 2}}], "must hold a JSON object at the top level, got list"),
    ({"bf16": True}, "'bf16' must be an object, got true"),
    ({"zero_optimization": [2]}, "'zero_optimization' must be an object, got [2]"),
    ({"zero_optimization": {"stage": "2"}}, "'zero_optimization.stage' must be one of the numbers 0, 1, 2, 3, "
                                            "got \"2\""),
    ({"zero_optimization": {"stage": True}}, "'zero_optimization.stage' must be one of the numbers 0, 1, 2, 3, "
                                             "got true"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}},
     "'zero_optimization.offload_optimizer' must be an object, got \"cpu\""),
    ({"train_micro_batch_size_per_gpu": "4"}, "'train_micro_batch_size_per_gpu' must be an integer >= 1 or \"auto\", "
                                              "got \"4\""),
    ({"gradient_accumulation_steps": 0}, "'gradient_accumulation_steps' must be an integer >= 1 or \"auto\", got 0"),
    ({"gradient_clipping": "1.0"}, "'gradient_clipping' must be a number >= 0 or \"auto\", got \"1.0\""),
    ({"gradient_clipping": float("nan")}, "'gradient_clipping' must be a number >= 0 or \"auto\", got NaN"),
    ({"fp16": {"enabled": "yes"}}, "'fp16.enabled' must be true, false or \"auto\", got \"yes\""),
])
def test_deepspeed_json_of_the_wrong_shape_names_the_file_and_key(tmp_path, content, message):
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps(content))
    cfg = parse_config(DEFAULTS, ["--deepspeed", str(ds_file)])
    where = f"--deepspeed: {ds_file} " if isinstance(content, list) else f"{ds_file}: "
    with pytest.raises(ConfigError, match=exactly(where + message)):
        build_ds_config(cfg, world_size=1, dtype="fp32")


def test_deepspeed_json_that_is_not_utf8_names_the_byte(tmp_path):
    ds_file = tmp_path / "ds.json"
    ds_file.write_bytes(b'{"zero_optimization": {"stage": 2}, "note": "caf\xe9"}')
    cfg = parse_config(DEFAULTS, ["--deepspeed", str(ds_file)])
    message = (f"--deepspeed: {ds_file} is not valid UTF-8 JSON: 'utf-8' codec can't decode byte 0xe9 in position 48: "
               f"invalid continuation byte")
    with pytest.raises(ConfigError, match=exactly(message)):
        build_ds_config(cfg, world_size=1, dtype="fp32")


# ----- a model's config.json -----
def test_unknown_model_config_key_names_the_file_and_the_nearest_key(tmp_path):
    values = {**ModelConfig.from_preset("tiny").to_dict(), "num_head": 4}
    with pytest.raises(ValueError, match=r"x.json: unknown key 'num_head' \(did you mean 'num_heads'\?\)"):
        ModelConfig.from_dict(values, "x.json")
    model_dir = tmp_path / "my_model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(values))
    cfg = parse_config(DEFAULTS, ["--model", str(model_dir)])
    with pytest.raises(ConfigError, match=re.escape(f"--model: {model_dir / 'config.json'}: unknown key 'num_head' "
                                                     f"(did you mean 'num_heads'?); valid keys: vocab_size, ")):
        build_language_model(cfg, None)


def test_from_weight_with_an_unknown_config_key_is_refused_and_left_alone(tmp_path):
    export = save_pretrained(Transformer(ModelConfig.from_preset("tiny")), tmp_path / "export")
    values = json.loads((export / "config.json").read_text())
    values["rope_thetta"] = values.pop("rope_theta")
    (export / "config.json").write_text(json.dumps(values))
    saved = {path.name: path.read_bytes() for path in export.iterdir()}
    cfg = parse_config(DEFAULTS, ["--from_weight", str(export)])
    message = f"--from_weight: {export / 'config.json'}: unknown key 'rope_thetta' (did you mean 'rope_theta'?)"
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_language_model(cfg, export)
    assert {path.name: path.read_bytes() for path in export.iterdir()} == saved


# ----- YAML read strictly -----
def test_duplicated_key_in_the_stage_yaml_names_both_lines(tmp_path):
    stage_file = tmp_path / "stage.yaml"
    stage_file.write_text("learning_rate: 1.0e-3\nbatch_size: 4\nlearning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match=exactly(f"--config: {stage_file} is not valid YAML: duplicate key "
                                                  f"'learning_rate' on line 1 and on line 3")):
        parse_config(DEFAULTS, ["--config", str(stage_file)])


def test_duplicated_key_in_the_data_config_names_both_lines(tmp_path):
    data_file = tmp_path / "data.jsonl"
    data_file.write_text('{"text": "hello"}\n')
    config_file = tmp_path / "mix.yaml"
    config_file.write_text(f"kind: pretrain\nmax_seq_len: 32\nsources:\n  - path: {data_file}\n"
                           f"    weight: 1.0\n    path: {data_file}\n")
    message = f"{config_file} is not valid YAML: duplicate key 'path' on line 4 and on line 6"
    with pytest.raises(ConfigError, match=exactly(message)):
        load_data_config(config_file)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    stage_file = tmp_path / "stage.yaml"
    stage_file.write_text("<<: {batch_size: 4, epochs: 2}\nbatch_size: 2\n")
    cfg = parse_config(DEFAULTS, ["--config", str(stage_file)])
    assert (cfg.batch_size, cfg.epochs) == (2, 2)


@pytest.mark.parametrize("reader", ["stage", "data"])
def test_a_yaml_file_that_is_not_utf8_names_the_byte(tmp_path, reader):
    config_file = tmp_path / "conf.yaml"
    config_file.write_bytes("epochs: 1\n# résumé\n".encode("latin-1"))
    where = f"--config: {config_file}" if reader == "stage" else str(config_file)
    with pytest.raises(ConfigError, match=exactly(f"{where} is not UTF-8 text: byte 0xe9 at position 13 (line 2) "
                                                  f"invalid continuation byte")):
        if reader == "stage":
            parse_config(DEFAULTS, ["--config", str(config_file)])
        else:
            load_data_config(config_file)
