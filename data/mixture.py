"""Data-mixture YAML -> DataConfig, fully validated before any tokenization starts.

    kind: sft                 # pretrain | sft | dpo | rl   (midtrain is pretrain-kind data)
    max_seq_len: 256
    sources:
      - {path: dataset/sft.jsonl, weight: 1.0, max_samples: null, min_length: null, max_length: null}
    validation: {fraction: 0.05}   # or {path: dataset/sft_val.jsonl}; omitted: no validation split
    seed: 42

Relative paths resolve against the repository root (the directory holding pyproject.toml).
MiniMind's `--data_path FILE` is the shorthand for a mixture of that one file (one_source_config): weight 1, no
validation split.
weight is the fraction of each epoch's documents drawn from that source; weights sum to 1.
max_samples keeps the first N records of a source; min_length/max_length filter on token count.
"""

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from data.formats import KINDS
from train.config import REPO_ROOT, ConfigError, read_yaml

WEIGHT_TOLERANCE = 1e-6


@dataclass(frozen=True)
class SourceConfig:
    path: Path
    weight: float
    max_samples: int | None = None
    min_length: int | None = None
    max_length: int | None = None


@dataclass(frozen=True)
class ValidationConfig:
    fraction: float = 0.0
    path: Path | None = None


@dataclass(frozen=True)
class DataConfig:
    kind: str
    max_seq_len: int
    sources: tuple[SourceConfig, ...]
    validation: ValidationConfig = ValidationConfig()
    seed: int = 42
    config_file: Path | None = field(default=None, compare=False)  # where it was read from; not an option
    one_source: bool = field(default=False, compare=False)  # made from --data_path (config_file is that jsonl)

    @property
    def weights(self) -> list[float]:
        return [source.weight for source in self.sources]

    def resolved(self) -> dict:
        """Every option with absolute paths: what the prepared-data cache key hashes."""
        options = asdict(self)
        del options["config_file"], options["one_source"]
        return _json_ready(options)

    @property
    def prepare_arguments(self) -> str:
        """The data options of the `python -m data.prepare` command that prepares this config."""
        if self.one_source:
            return f"--data_path {self.config_file} --kind {self.kind} --max_seq_len {self.max_seq_len}"
        return f"--data_config {self.config_file}"


def _json_ready(value):
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return str(value) if isinstance(value, Path) else value


def option_names(config_class) -> list[str]:
    return [f.name for f in fields(config_class) if f.name not in ("config_file", "one_source")]


def resolve_path(value) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


class _Checker:
    """Type and range checks whose errors name the YAML file and the option."""

    def __init__(self, config_file):
        self.config_file = config_file

    def fail(self, option, problem):
        raise ConfigError(f"{self.config_file}: option '{option}': {problem}")

    def known_keys(self, mapping, config_class, prefix=""):
        valid = option_names(config_class)
        for key in mapping:
            if key not in valid:
                raise ConfigError(f"{self.config_file}: unknown option '{prefix}{key}' "
                                  f"(valid: {', '.join(prefix + name for name in valid)})")

    def mapping(self, value, option):
        if not isinstance(value, dict):
            self.fail(option, f"must be a mapping, got {type(value).__name__}")
        return value

    def integer(self, value, option, minimum, optional=False):
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(option, f"must be an integer >= {minimum}{' or null' if optional else ''}, got {value!r}")
        return value

    def number(self, value, option):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(option, f"must be a number, got {value!r}")
        return float(value)

    def existing_file(self, value, option):
        if not isinstance(value, str) or not value:
            self.fail(option, f"must be a file path, got {value!r}")
        path = resolve_path(value)
        if not path.is_file():
            self.fail(option, f"file not found: {path}")
        return path


def _source(check, raw, index):
    prefix = f"sources[{index}]."
    check.mapping(raw, prefix[:-1])
    check.known_keys(raw, SourceConfig, prefix)
    for required in ("path", "weight"):
        if required not in raw:
            check.fail(prefix + required, "missing")
    weight = check.number(raw["weight"], prefix + "weight")
    if weight <= 0:
        check.fail(prefix + "weight", f"must be > 0 (remove the source instead), got {weight}")
    source = SourceConfig(
        path=check.existing_file(raw["path"], prefix + "path"),
        weight=weight,
        max_samples=check.integer(raw.get("max_samples"), prefix + "max_samples", 1, optional=True),
        min_length=check.integer(raw.get("min_length"), prefix + "min_length", 0, optional=True),
        max_length=check.integer(raw.get("max_length"), prefix + "max_length", 1, optional=True),
    )
    if source.min_length is not None and source.max_length is not None and source.min_length > source.max_length:
        check.fail(prefix + "min_length", f"{source.min_length} exceeds max_length {source.max_length}")
    return source


def _validation(check, raw):
    if raw is None:
        return ValidationConfig()
    check.mapping(raw, "validation")
    check.known_keys(raw, ValidationConfig, "validation.")
    if ("fraction" in raw) == ("path" in raw):
        check.fail("validation", "give exactly one of 'fraction' or 'path'")
    if "path" in raw:
        return ValidationConfig(path=check.existing_file(raw["path"], "validation.path"))
    fraction = check.number(raw["fraction"], "validation.fraction")
    if not 0 <= fraction < 1:
        check.fail("validation.fraction", f"must be in [0, 1), got {fraction}")
    return ValidationConfig(fraction=fraction)


def load_data_config(path) -> DataConfig:
    config_file = Path(path).resolve()
    if not config_file.is_file():
        raise FileNotFoundError(f"data config not found: {config_file}")
    raw = read_yaml(config_file, str(config_file))
    check = _Checker(config_file)
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_file}: expected a mapping of options, got {type(raw).__name__}")
    check.known_keys(raw, DataConfig)
    for required in ("kind", "max_seq_len", "sources"):
        if required not in raw:
            check.fail(required, "missing")
    if raw["kind"] not in KINDS:
        check.fail("kind", f"unknown kind {raw['kind']!r} (valid: {', '.join(KINDS)})")
    if not isinstance(raw["sources"], list) or not raw["sources"]:
        check.fail("sources", "must be a non-empty list of {path, weight, ...}")
    sources = tuple(_source(check, source, i) for i, source in enumerate(raw["sources"]))
    total_weight = sum(source.weight for source in sources)
    if abs(total_weight - 1) > WEIGHT_TOLERANCE:
        check.fail("sources[*].weight", f"weights must sum to 1, got {total_weight:g} "
                                        f"({' + '.join(f'{s.weight:g}' for s in sources)})")
    return DataConfig(
        kind=raw["kind"],
        max_seq_len=check.integer(raw["max_seq_len"], "max_seq_len", 2),
        sources=sources,
        validation=_validation(check, raw.get("validation")),
        seed=check.integer(raw.get("seed", DataConfig.seed), "seed", 0),
        config_file=config_file,
    )


def one_source_config(path, kind: str, max_seq_len: int, option: str = "--data_path") -> DataConfig:
    """MiniMind's --data_path: a mixture of the one jsonl file, weight 1, no validation split."""
    file = resolve_path(path)
    if not file.is_file():
        raise ConfigError(f"{option}: file not found: {file}")
    if kind not in KINDS:
        raise ConfigError(f"{option}: unknown data kind {kind!r} (valid: {', '.join(KINDS)})")
    if max_seq_len < 2:
        raise ConfigError(f"{option} {file}: max_seq_len must be >= 2, got {max_seq_len}")
    return DataConfig(kind=kind, max_seq_len=max_seq_len, sources=(SourceConfig(path=file, weight=1.0),),
                      config_file=file, one_source=True)
