"""One typed configuration for every stage, with a YAML stage file and command-line overrides.

Precedence, lowest first: dataclass defaults < the stage script's defaults < `--config` YAML < flags.
Flags are generated from the dataclass fields, so a new option is one field with its help text.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Optional, get_args, get_origin, get_type_hints

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent  # relative paths in options and data configs start here


class ConfigError(ValueError):
    """A configuration that cannot run (a training option or a data config); the message names the file or option
    and the valid choices."""


@dataclass
class TrainConfig:
    # The options the user set (YAML or flags), not defaults: parse_config fills it.
    explicit_options: ClassVar[frozenset] = frozenset()
    # What to train
    stage: str = field(default="pretrain", metadata={"help": "stage name; set by the stage script"})
    model: str = field(default="tiny", metadata={"help": "model preset (tiny, small, base, moe, tiny-moe, minimind3) or a directory with config.json"})
    data_config: str = field(default="", metadata={"help": "data mixture YAML, e.g. config/data/posttrain/sft/general.yaml"})
    data_path: str = field(default="", metadata={"help": "MiniMind's shorthand for a one-source mixture: one jsonl file of the stage's data kind, max_seq_len from --max_seq_len or else the stage's default mixture, no validation split; instead of --data_config"})
    split_special_tokens: bool = field(default=False, metadata={"help": "encode special-token strings (<|im_start|>, ...) in pretrain text as plain text; by default they map to their ids, as the Hugging Face tokenizer does"})
    tokenizer: str = field(default="model/tokenizer", metadata={"help": "tokenizer directory (tokenizer.json + tokenizer_config.json)"})
    from_weight: str = field(default="none", metadata={"help": "none | a stage name (its exported weights under out_root) | an export directory | a Hugging Face Llama/Qwen2/Qwen3 directory (safetensors) | a MiniMind .pth file (its config from a config.json beside it or --model)"})
    from_resume: bool = field(default=False, metadata={"help": "resume from the latest checkpoint in out_dir"})
    start_over: bool = field(default=False, metadata={"help": "move an earlier run found in out_dir aside (to <out_dir>.<date-time>) and start fresh; without it, a fresh run into a used out_dir is refused"})
    allow_tokenizer_change: bool = field(default=False, metadata={"help": "let --from_weight start from weights trained with another tokenizer (refused by default)"})
    use_prepared: bool = field(default=False, metadata={"help": "require the prepared token store to exist and be fresh"})
    skip_bad_records: bool = field(default=False, metadata={"help": "skip and count malformed records (per file, in run_config.json, data/skipped_records and summary.json) instead of stopping at the first"})
    max_seq_len: Optional[int] = field(default=None, metadata={"help": "override the data config's max_seq_len"})
    packing: str = field(default="auto", metadata={"help": "auto | packed | padded (auto: packed for pretrain/midtrain, padded otherwise)"})

    # Optimization
    epochs: int = field(default=1, metadata={"help": "passes over the training data"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "micro-batch size per device (rows)"})
    accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=5e-4, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor as a fraction of the peak"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "fraction of optimizer steps spent in linear warm-up"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices (not norms/biases)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "global gradient-norm clip (0 disables)"})
    dtype: str = field(default="auto", metadata={"help": "auto | fp32 | bf16 | fp16: training precision, fp32 master weights (auto: bf16 on GPUs with native bf16, Ampere and newer; fp16 on older GPUs under DeepSpeed, fp32 there under FSDP; fp32 on CPU)"})
    seed: int = field(default=42, metadata={"help": "seed for init, data order and sampling"})
    compile: bool = field(default=False, metadata={"help": "torch.compile each transformer block's training forward (KV-cache decoding stays eager); the first steps pay the compile"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute each transformer block's forward in the backward instead of keeping its activations (torch.utils.checkpoint): less memory for about one more forward of the blocks; logged as train/hfu_percent beside train/mfu_percent"})
    loss_chunk_tokens: int = field(default=0, metadata={"help": "positions per chunk of the LM head + cross-entropy (and DPO/RL log-prob reads), each chunk's logits recomputed in the backward: never [tokens, vocab] fp32 logits at once, for one more LM-head forward (0: all positions at once, logits kept)"})
    nonfinite: str = field(default="skip", metadata={"help": "a NaN/Inf loss or gradient norm: skip (the update is not applied, counted in train/skipped_steps) | stop (checkpoint, error, exit 1); checked at each log step"})

    # Parallelism
    backend: str = field(default="deepspeed", metadata={"help": "deepspeed (ZeRO as --deepspeed says) | fsdp (PyTorch FSDP2 full sharding, started with torchrun; --deepspeed is not read)"})
    deepspeed: str = field(default="auto", metadata={"help": "DeepSpeed config (ZeRO/offload choices; batch fields are filled from these flags); auto: ds_configs/zero0.json on one rank (plain fused AdamW: ZeRO's flat buffers shard nothing there and cost 1.2x in step time), ds_configs/zero2.json on more; a resume keeps the run's stage"})
    local_rank: int = field(default=-1, metadata={"help": "set by the deepspeed launcher"})

    # Logging, evaluation, checkpoints
    out_root: str = field(default="out", metadata={"help": "root of every stage's out_dir; --from_weight <stage> looks here"})
    out_dir: str = field(default="", metadata={"help": "this run's directory (default: <out_root>/<stage>)"})
    log_interval: int = field(default=10, metadata={"help": "optimizer steps between metric lines"})
    eval_interval: int = field(default=100, metadata={"help": "optimizer steps between evaluations (0: only at the end)"})
    eval_batches: int = field(default=20, metadata={"help": "validation batches per evaluation (0: the whole split)"})
    save_interval: int = field(default=200, metadata={"help": "optimizer steps between checkpoints (0: only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept in out_dir/checkpoints"})
    throughput_warmup_steps: int = field(default=2, metadata={"help": "first optimizer steps left out of the rate windows"})
    peak_tflops: Optional[float] = field(default=None, metadata={"help": "per-device peak TFLOP/s for MFU (overrides the device table)"})
    peak_memory_gb_per_s: Optional[float] = field(default=None, metadata={"help": "per-device peak memory bandwidth in GB/s for RL generation's MBU (overrides the table, or the measurement on CPU)"})
    metrics: bool = field(default=True, metadata={"help": "collect and log metrics (off only for overhead benchmarks)"})
    verbose: bool = field(default=False, metadata={"help": "also print the libraries' deprecation warnings (torch.distributed calls made inside DeepSpeed) and the deepspeed launcher's INFO lines, hidden by default"})
    use_wandb: bool = field(default=False, metadata={"help": "log to Weights & Biases (offline when no API key is configured)"})
    wandb_project: str = field(default="zerostage", metadata={"help": "W&B project"})
    wandb_run_name: str = field(default="", metadata={"help": "W&B run name (default: stage-zeroN-wsW)"})
    wandb_group: str = field(default="", metadata={"help": "W&B group (default: the pipeline, which every stage under "
                                                           "one out_root shares: its name and a hash of its path)"})

    def __post_init__(self):
        if not self.out_dir:
            self.out_dir = str(Path(self.out_root) / self.stage)

    def validate(self) -> None:
        def require(ok: bool, option: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"--{option}: {message}")

        require(bool(self.data_config or self.data_path), "data_config",
                "is required (a data mixture YAML under config/data/, or --data_path FILE)")
        require(not {"data_config", "data_path"} <= self.explicit_options, "data_path",
                "give --data_path or --data_config, not both")
        types = _field_types(type(self))
        for f in fields(self):  # first: NaN passes every range check below
            value = getattr(self, f.name)
            if types[f.name][0] is float and value is not None:
                require(math.isfinite(value), f.name, f"must be a finite number, got {value}")
        require(self.packing in ("auto", "packed", "padded"), "packing", f"{self.packing!r} is not one of auto, packed, padded")
        require(self.dtype in ("auto", "fp32", "bf16", "fp16"), "dtype", f"{self.dtype!r} is not one of auto, fp32, bf16, fp16")
        require(self.backend in ("deepspeed", "fsdp"), "backend", f"{self.backend!r} is not one of deepspeed, fsdp")
        require(self.nonfinite in ("skip", "stop"), "nonfinite", f"{self.nonfinite!r} is not one of skip, stop")
        for name in ("epochs", "batch_size", "accumulation_steps", "log_interval"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("eval_interval", "eval_batches", "save_interval", "throughput_warmup_steps", "grad_clip", "weight_decay",
                     "loss_chunk_tokens"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        require(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        require(self.max_steps is None or self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        require(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", f"must be > 0, got {self.peak_tflops}")
        require(self.peak_memory_gb_per_s is None or self.peak_memory_gb_per_s > 0, "peak_memory_gb_per_s",
                f"must be > 0, got {self.peak_memory_gb_per_s}")
        for name in ("adam_beta1", "adam_beta2"):
            require(0 <= getattr(self, name) < 1, name, f"must be in [0, 1), got {getattr(self, name)}")
        require(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32), got {self.seed}")
        require(self.max_seq_len is None or self.max_seq_len >= 2, "max_seq_len",
                f"must be >= 2 (or none: the data config's value), got {self.max_seq_len}")
        self._check_out_dir()

    def _check_out_dir(self) -> None:
        out_dir = self.resolve_path(self.out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise ConfigError(f"--out_dir: {out_dir} exists and is not a directory")
        existing = next(path for path in (out_dir, *out_dir.parents) if path.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"--out_dir: {out_dir} cannot be created: {existing} is not a writable directory")

    def resolve_path(self, path: str) -> Path:
        """Relative paths are taken from the repository root, so runs work from any directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else REPO_ROOT / p

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0/true/false), got {text!r}")


def _optional(kind):
    def parse(text: str):
        return None if str(text).lower() in ("none", "null", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _field_types(cls) -> dict[str, tuple[type, bool]]:
    """(base type, optional?) of each dataclass field."""
    result = {}
    for name, hint in get_type_hints(cls).items():
        optional = get_origin(hint) is not None and type(None) in get_args(hint)
        base = next(a for a in get_args(hint) if a is not type(None)) if optional else hint
        result[name] = (base, optional)
    return result


def _coerce(cls, name: str, value: Any, source: str):
    base, optional = _field_types(cls)[name]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: option '{name}' cannot be null")
    try:
        if base is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("not an integer")
        return base(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
        raise ConfigError(f"{source}: option '{name}' expects {base.__name__}, got {value!r} ({error})") from None


def unknown_key_message(key: str, valid: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{where}: unknown option '{key}'{hint}. Valid options: {', '.join(sorted(valid))}"


class StrictYAMLLoader(yaml.SafeLoader):
    """SafeLoader that refuses a duplicated key in a mapping: PyYAML silently keeps the last one."""

    def construct_mapping(self, node, deep=False):
        first_lines = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                if key in first_lines:
                    raise yaml.constructor.ConstructorError(
                        problem=f"duplicate key {key!r} on line {first_lines[key]} and on line {line}")
                first_lines[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, where: str) -> Any:
    """The YAML document in path, read as UTF-8 with StrictYAMLLoader; errors start with where (naming the file)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ConfigError(f"{where} is not UTF-8 text: byte {data[error.start]:#04x} at position {error.start} "
                          f"(line {line}) {error.reason}") from None
    loader = StrictYAMLLoader(text)
    loader.name = str(path)  # marks in errors name the file, not "<unicode string>"
    try:
        return loader.get_single_data()
    except yaml.YAMLError as error:
        raise ConfigError(f"{where} is not valid YAML: {error}") from None
    finally:
        loader.dispose()


def load_yaml_overrides(path: Path, cls=TrainConfig) -> dict:
    if not path.is_file():
        raise ConfigError(f"--config: stage config {path} does not exist")
    content = read_yaml(path, f"--config: {path}") or {}
    if not isinstance(content, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of option: value")
    valid = [f.name for f in fields(cls)]
    overrides = {}
    for key, value in content.items():
        if key not in valid:
            raise ConfigError(unknown_key_message(str(key), valid, str(path)))
        overrides[key] = _coerce(cls, key, value, str(path))
    return overrides


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse takes "-1e-3" (an exponent) or "-inf" for an option and fails with "expected one argument".
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^-(inf|infinity|nan)$",
                                                   re.IGNORECASE)

    def error(self, message):  # name the close valid option, not only argparse's usage dump
        if "unrecognized arguments" in message:
            valid = [a.option_strings[0] for a in self._actions if a.option_strings]
            for token in message.split(":", 1)[1].split():
                if token.startswith("--"):
                    close = difflib.get_close_matches(token.split("=")[0], valid, n=1)
                    if close:
                        message += f" (did you mean {close[0]}?)"
        super().error(message)


def build_parser(cls=TrainConfig, description: str = "") -> argparse.ArgumentParser:
    parser = _Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                     allow_abbrev=False)  # a prefix silently matching another option hides typos
    parser.add_argument("--config", type=str, default=None, help="stage YAML whose keys are the options below")
    types = _field_types(cls)
    for f in fields(cls):
        base, optional = types[f.name]
        kind = _parse_bool if base is bool else base
        kwargs = dict(type=_optional(kind) if optional else kind, default=argparse.SUPPRESS, help=f.metadata.get("help", ""))
        if base is bool:
            kwargs.update(nargs="?", const=True)  # both `--use_wandb` and `--use_wandb 1`
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def parse_config(stage_defaults: dict, argv: Optional[list[str]] = None, cls=TrainConfig, description: str = ""):
    """Build the config of a stage script from its defaults, an optional YAML and the command line."""
    args = vars(build_parser(cls, description).parse_args(argv))
    yaml_path = args.pop("config", None)
    overrides = {**(load_yaml_overrides(Path(yaml_path), cls) if yaml_path else {}), **args}
    values = {**stage_defaults, **overrides}
    if "out_dir" not in values:
        values["out_dir"] = ""
    config = cls(**values)
    config.explicit_options = frozenset(overrides)
    if config.local_rank < 0 and "LOCAL_RANK" in os.environ:
        config.local_rank = int(os.environ["LOCAL_RANK"])
    config.validate()
    return config
