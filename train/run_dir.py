"""One run owns its out_dir: a lock for the run's life, no fresh run over an earlier run's results, and a resume
that is the same run or refused.

Rank 0 holds an exclusive `flock` on <out_dir>/.lock, which the kernel releases however the process ends (a crash
or SIGKILL leaves no stale lock; the file stays and names the last holder). A fresh run (no --from_resume) into an
out_dir that holds an earlier run's checkpoints, metrics or export is refused; --start_over moves them aside to
<out_dir>.<date-time> first. Nothing is ever deleted here.

A checkpoint records what makes its run itself (train/trainer.py's run_identity); --from_resume compares it with
this run's: a difference that would corrupt the run is refused with the differences listed, the options a resume
may change (learning rate, intervals, max_steps, ...) are reported and take effect. The number of ranks is not part
of the run: its global batch is (the rows each optimizer step reads, data/layout.py), and a resume on another number
of ranks keeps it by changing --accumulation_steps (keep_global_batch).
"""
from __future__ import annotations

import copy
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from train import distributed
from train.config import ConfigError, TrainConfig

LOCK_FILE = ".lock"


def earlier_run(out_dir: Path) -> list[str]:
    """What in out_dir belongs to an earlier run (empty: nothing)."""
    found = []
    checkpoints = out_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append(f"checkpoints ({', '.join(sorted(p.name for p in checkpoints.iterdir())[:4])})")
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:  # a symlink to a device or an empty file holds nothing
        found.append(f"metrics.jsonl ({sum(1 for _ in metrics.open())} lines)")
    for name in ("export", "summary.json"):
        if (out_dir / name).exists():
            found.append(name)
    return found


class RunDirLock:
    """The exclusive lock of one run on its out_dir (rank 0), released at exit or by `release`."""

    def __init__(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(out_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = _read_holder(self.file.read())
            self.file.close()
            raise ConfigError(f"--out_dir {out_dir} is in use by another run ({holder}); wait for it to end, or give "
                              f"this run another --out_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        self.file.flush()

    def release(self) -> None:
        self.file.close()  # closing the file drops the flock


def _read_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def claim(cfg: TrainConfig, out_dir: Path) -> RunDirLock:
    """Rank 0: lock out_dir, then make sure a fresh run does not mix with an earlier one (moved aside under
    --start_over, refused otherwise)."""
    lock = RunDirLock(out_dir)
    found = [] if cfg.from_resume else earlier_run(out_dir)
    if found:
        aside = out_dir.with_name(f"{out_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        while aside.exists():  # two starts over within a second
            aside = aside.with_name(aside.name + "+")
        if not cfg.start_over:
            lock.release()
            raise ConfigError(f"--out_dir {out_dir} holds an earlier run: {', '.join(found)}. Continue it with "
                              f"--from_resume, give this run another --out_dir, or pass --start_over to move the "
                              f"earlier run aside (to {aside}) and start fresh")
        aside.mkdir()
        for entry in out_dir.iterdir():
            if entry.name != LOCK_FILE:
                entry.rename(aside / entry.name)
        print(f"--start_over: moved the earlier run in {out_dir} ({', '.join(found)}) to {aside}", flush=True)
    return lock


def claim_on_rank0(cfg: TrainConfig, out_dir: Path) -> Optional[RunDirLock]:
    """Every rank: rank 0 claims; its refusal is raised on every rank, so none waits in a later collective."""
    lock, error = None, None
    if distributed.is_main():
        try:
            lock = claim(cfg, out_dir)
        except (ConfigError, OSError) as caught:
            error = str(caught)
    error = next((e for e in distributed.gather_objects(error) if e), None)
    if error:
        raise ConfigError(error)
    return lock


# What a resume may change: options that do not move the data position, the model or the optimizer's state.
RESUMABLE_CHANGES = ("learning_rate", "min_lr_ratio", "warmup_ratio", "max_steps", "epochs", "log_interval",
                     "eval_interval", "eval_batches", "save_interval", "keep_checkpoints", "nonfinite", "metrics",
                     "use_wandb", "wandb_project", "wandb_run_name", "wandb_group", "throughput_warmup_steps",
                     "peak_tflops", "peak_memory_gb_per_s", "grad_clip", "critic_learning_rate", "use_prepared", "compile",
                     "verbose")
# Options that name a thing by path, or only say how this process starts: compared through what they resolve to.
NOT_COMPARED = ("from_resume", "start_over", "local_rank", "out_dir", "out_root", "from_weight", "model",
                "data_config", "tokenizer", "deepspeed", "backend", "allow_tokenizer_change", "reward_model")


def layout(cfg: TrainConfig, world_size: int) -> dict:
    """How a run splits its global batch: what may change on a resume as long as the product stays."""
    return {"world_size": world_size, "batch_size": cfg.batch_size, "accumulation_steps": cfg.accumulation_steps}


def global_batch(split: dict) -> int:
    """Rows per optimizer step: step s reads rows [s·G, (s+1)·G) of the epoch's order on any number of ranks."""
    return split["batch_size"] * split["accumulation_steps"] * split["world_size"]


def describe(split: dict) -> str:
    return (f"--batch_size {split['batch_size']} × --accumulation_steps {split['accumulation_steps']} × "
            f"{split['world_size']} rank{'s' if split['world_size'] > 1 else ''} = {global_batch(split)} rows")


def saved_layout(saved: dict) -> dict:
    """The layout a checkpoint's run.json records (before elastic resume it was part of the identity)."""
    return saved.get("layout") or {name: saved["identity"][name] for name in ("world_size", "batch_size",
                                                                                "accumulation_steps")}


def keep_global_batch(cfg: TrainConfig, saved: Optional[dict], world_size: int, where: Path) -> TrainConfig:
    """A resume on another number of ranks: `cfg` with the --accumulation_steps that keeps the saved global batch
    (whatever --accumulation_steps says: a requeued job repeats its first start's flags); refused when no whole
    accumulation does with this --batch_size."""
    if saved is None or saved_layout(saved)["world_size"] == world_size:
        return cfg  # the same shape: check_resume compares the global batch
    before = saved_layout(saved)
    wanted = global_batch(before)
    accumulation, rest = divmod(wanted, cfg.batch_size * world_size)
    if rest or not accumulation:
        ranks = [str(n) for n in range(1, wanted + 1) if wanted % (cfg.batch_size * n) == 0]
        ranks = " or ".join(filter(None, [", ".join(ranks[:-1]), ranks[-1]]))
        raise ConfigError(f"--from_resume: {where} was saved with a global batch of {describe(before)} per "
                          f"optimizer step, which {world_size} ranks of --batch_size {cfg.batch_size} cannot split "
                          f"into whole accumulation steps: resume on {ranks} rank(s), or give --batch_size B and "
                          f"--accumulation_steps A with B × A × {world_size} = {wanted}; or start a new run (another "
                          f"--out_dir, or --start_over)")
    adjusted = copy.copy(cfg)  # not dataclasses.replace: it would drop explicit_options, set on the instance
    adjusted.accumulation_steps = accumulation
    return adjusted


def resolve_deepspeed_config(cfg: TrainConfig, saved: Optional[dict], world_size: int) -> TrainConfig:
    """`cfg` with --deepspeed auto resolved (train/deepspeed_backend.py: auto_config), a resume keeping its stage."""
    if cfg.deepspeed != "auto" or cfg.backend != "deepspeed":
        return cfg
    from train.deepspeed_backend import auto_config  # DeepSpeed is imported only by runs that use it

    adjusted = copy.copy(cfg)  # not dataclasses.replace: it would drop explicit_options, set on the instance
    adjusted.deepspeed = auto_config(world_size, saved["identity"].get("backend", "") if saved else "")
    return adjusted


def check_resume(saved: Optional[dict], identity: dict, cfg: TrainConfig, world_size: int, where: Path) -> list[str]:
    """Refuse a resume that is not the same run; returns the options it changes ("name: before -> now")."""
    if saved is None:
        if distributed.is_main():
            print(f"WARNING: {where} records no run identity (saved before zerostage recorded one): the resume is "
                  f"not checked against it", flush=True)
        return []
    before, before_layout, now_layout = saved["identity"], saved_layout(saved), layout(cfg, world_size)
    before.setdefault("global_batch", global_batch(before_layout))  # a run.json from before elastic resume
    different = [f"global batch: {describe(before_layout)} -> {describe(now_layout)}" if name == "global_batch"
                 else f"{name}: {before.get(name)!r} -> {value!r}" for name, value in identity.items()
                 if before.get(name) != value]
    old_train, new_train = saved["train"], cfg.to_dict()
    different += [f"{name}: {old_train.get(name)!r} -> {value!r}" for name, value in new_train.items()
                  if name not in RESUMABLE_CHANGES + NOT_COMPARED and name not in identity and name not in now_layout
                  and name in old_train and old_train[name] != value]  # an option newer than the save: not compared
    if different:
        raise ConfigError(f"--from_resume: this is not the run saved in {where}; these differ: {'; '.join(different)}. "
                          f"Resume with the saved settings, or start a new run (another --out_dir, or --start_over)")
    changed = [f"{name}: {old_train[name]!r} -> {value!r}" for name, value in new_train.items()
               if name in RESUMABLE_CHANGES and name in old_train and old_train[name] != value]
    if before_layout != now_layout:
        changed.append(f"layout: {describe(before_layout)} -> {describe(now_layout)} (the same global batch)")
    return changed
