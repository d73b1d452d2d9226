"""Where a metric record goes: the console, a JSONL file and Weights & Biases, behind one interface.

Only rank 0 logs. A back-end that fails warns once and is dropped: the run and the other back-ends go on.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Optional


def _format(value, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def console_line(record: dict) -> str:
    epoch_line = f"Epoch:[{record['progress/epoch_index'] + 1}/{record['progress/epochs']}]"
    steps = f"({record['progress/epoch_step']}/{record['progress/steps_per_epoch']})"
    parts = [
        epoch_line + steps,
        f"step:{record['train/global_step']}",
        f"loss:{_format(record.get('train/loss'), '.4f')}",
        f"lr:{_format(record.get('train/learning_rate'), '.2e')}",
        f"grad_norm:{_format(record.get('train/grad_norm'), '.3f')}",
        f"tokens/s:{_format(record.get('train/tokens_per_second'), '.0f')}",
        f"MFU:{_format(record.get('train/mfu_percent'), '.2f', '%')}",
        f"eta:{_format(record.get('train/eta_minutes'), '.1f', 'min')}",
    ]
    if record.get("eval/loss") is not None:
        parts.append(f"eval_loss:{record['eval/loss']:.4f}")
    return " ".join(parts)


class Logger:
    name = "logger"

    def log(self, record: dict, step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ConsoleLogger(Logger):
    name = "console"

    def log(self, record, step):
        print(console_line(record), flush=True)


class JsonlLogger(Logger):
    name = "jsonl"

    def __init__(self, path: Path, resumed_step: Optional[int] = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        if resumed_step is not None and path.is_file():
            rewind(path, resumed_step)
        self.file = open(path, "a", encoding="utf-8")

    def log(self, record, step):
        # allow_nan=False: a NaN must never reach the file as invalid JSON; callers turn it into null.
        line = json.dumps(record, allow_nan=False) + "\n"
        try:
            self.file.write(line)
            self.file.flush()
        except OSError as error:  # the bare error names neither the file nor, plainly, a full disk
            cause = "disk full" if error.errno == errno.ENOSPC else error.strerror
            try:
                self.file.close()  # closes the descriptor even though the unwritten line cannot be flushed
            except OSError:
                pass
            raise OSError(error.errno, f"{cause} writing {self.path}: {error.strerror}") from error

    def close(self):
        self.file.close()


def rewind(path: Path, step: int) -> None:
    """Before a resumed run appends: the lines of steps after its checkpoint's (a crash logged them, the run redoes
    them; a line cut off by the crash too) move to metrics.redone.jsonl, so metrics.jsonl counts each step once.
    Rewritten through a temporary file: a crash here leaves the old file or the new one, whole."""
    kept, redone = [], []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            keep = line.endswith("\n") and json.loads(line)["train/global_step"] <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        (kept if keep else redone).append(line if line.endswith("\n") else line + "\n")
    if not redone:
        return
    side = path.with_name("metrics.redone.jsonl")
    with open(side, "a", encoding="utf-8") as file:
        file.writelines(redone)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(kept), encoding="utf-8")
    os.replace(temporary, path)
    print(f"{path}: {len(redone)} line(s) after step {step}, the checkpoint resumed, moved to {side} (this run "
          f"redoes those steps)", flush=True)


def pipeline_group(out_root: Path) -> str:
    """The W&B group of every stage run under one out_root: its name and a hash of its absolute path, so two
    pipelines in directories of the same name stay apart."""
    path = str(out_root.resolve())
    return f"{out_root.resolve().name}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def wandb_mode() -> str:
    """Offline unless the user set a mode or has an API key: W&B must never block a run on a login."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file() and \
        "api.wandb.ai" in (Path.home() / ".netrc").read_text(errors="ignore")
    return "online" if has_key else "offline"


class WandbLogger(Logger):
    name = "wandb"

    def __init__(self, project: str, run_name: str, group: str, job_type: str, config: dict, out_dir: Path,
                 run_id: Optional[str]):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, name=run_name, group=group, job_type=job_type, config=config,
                              dir=str(out_dir), id=run_id, resume="allow" if run_id else None, mode=wandb_mode())
        # Every stage's charts on the same x-axis; the group's panels can switch to system/unix_time (or W&B's
        # Wall Time) to lay the stages of a pipeline end to end, as python -m train.report does.
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step")

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, record, step):
        # W&B has no null: an unknown value is left out of that row rather than logged as a number.
        self.run.log({k: v for k, v in record.items() if v is not None})

    def close(self):
        self.run.finish()


class MultiLogger:
    """Fans a record out to every back-end; a failing back-end warns once and is dropped."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers
        self.nulled: set[str] = set()  # keys already announced as turned to null

    def log(self, record: dict, step: int) -> None:
        nonfinite = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        for key in nonfinite:
            if key not in self.nulled:
                self.nulled.add(key)
                print(f"WARNING: {key} was {record[key]} at step {step}: logged as null (said once per key)",
                      file=sys.stderr, flush=True)
        record = {k: (None if k in nonfinite else v) for k, v in record.items()}
        for logger in list(self.loggers):
            try:
                logger.log(record, step)
            except Exception as error:  # a logging back-end must not end a training run
                warnings.warn(f"{logger.name} logging failed at step {step} and is disabled for the rest of "
                              f"the run: {type(error).__name__}: {error}")
                print(f"WARNING: {logger.name} logging disabled: {error}", file=sys.stderr, flush=True)
                self.loggers.remove(logger)

    def close(self) -> None:
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as error:
                warnings.warn(f"{logger.name} failed to close: {error}")
