"""Checkpoints: each trained model's state as its backend writes it (DeepSpeed's folders, or under FSDP
torch.distributed.checkpoint's), the trainer's state, and per-rank RNG.

Layout under <out_dir>/checkpoints: one folder per tag (`step_00000120`) and a `latest` file naming the
newest complete one. `latest` is written last, atomically, after every rank has finished its part, so a run
killed mid-save leaves the previous checkpoint as the one to resume from.

Each folder carries manifest.json, the size and CRC-32 of every file in it, written just before `latest`.
Resuming checks it: a truncated, corrupt or missing file is reported by path and the previous checkpoint is
used instead. The ranks share the hashing (file i goes to rank i mod world size), on save and on load.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import sys
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from train import distributed
from train.backend import TrainedModel
from train.config import ConfigError

LATEST = "latest"
MANIFEST = "manifest.json"
RUN_FILE = "run.json"


def tag_for(global_step: int) -> str:
    return f"step_{global_step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _mine(items: list) -> list:
    """This rank's share of a list every rank holds in the same order."""
    return items[distributed.rank()::distributed.world_size()]


def _flatten(parts: list[list]) -> list:
    return [item for part in parts for item in part]


def _write_manifest(directory: Path) -> None:
    """Collective: size and CRC-32 of every file of a finished save, written by rank 0."""
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    mine = [(name, (directory / name).stat().st_size, _crc32(directory / name)) for name in _mine(files)]
    entries = _flatten(distributed.gather_objects(mine))
    if distributed.is_main():
        manifest = {name: {"bytes": size, "crc32": crc} for name, size, crc in sorted(entries)}
        _write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1))


def verify(directory: Path) -> list[str]:
    """Collective: what is wrong with a checkpoint folder (nothing: an empty list), the same on every rank."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return [f"{manifest_path} is missing: the save did not finish"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        return [f"{manifest_path} is unreadable: {error}"]
    problems = []
    for name in _mine(sorted(manifest)):
        path, saved = directory / name, manifest[name]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != saved["bytes"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, {saved['bytes']} were saved (truncated?)")
        elif _crc32(path) != saved["crc32"]:
            problems.append(f"{path} is corrupt: its CRC-32 differs from the one saved")
    return sorted(_flatten(distributed.gather_objects(problems)))


def step_of(tag: str) -> int:
    return int(tag.split("_", 1)[1])


def _tags(checkpoint_dir: Path) -> list[str]:
    """The checkpoint folders, oldest step first."""
    return sorted((p.name for p in checkpoint_dir.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), key=step_of)


def save(model: TrainedModel, checkpoint_dir: Path, global_step: int, client_state: dict, keep: int,
         extra_models: Optional[dict[str, TrainedModel]] = None, run: Optional[dict] = None) -> Path:
    """Collective: every rank calls it. `extra_models` (name -> model, e.g. PPO's critic) go in subfolders; `run`
    (what makes the run itself, train/trainer.py) is written to run.json for a resume to compare."""
    tag = tag_for(global_step)
    if distributed.is_main() and (checkpoint_dir / tag).exists():
        # Not `latest` (that is older than this step): an earlier attempt's save of this step that did not finish,
        # or one past a corrupt checkpoint a resume fell back from. Its files must not enter this save's manifest.
        print(f"removing {checkpoint_dir / tag}, an earlier attempt's save of step {global_step} that 'latest' "
              f"({latest_tag(checkpoint_dir)}) does not name", flush=True)
        shutil.rmtree(checkpoint_dir / tag)
    distributed.barrier()
    model.save(checkpoint_dir, tag, client_state)
    for name, extra in (extra_models or {}).items():
        extra.save(checkpoint_dir / tag, name, {})  # DeepSpeed requires a dict
    torch.save(rng_state(), checkpoint_dir / tag / f"rng_rank{distributed.rank()}.pt")
    if distributed.is_main() and run is not None:
        _write_atomic(checkpoint_dir / tag / RUN_FILE, json.dumps(run, indent=1, default=str))
    distributed.barrier()
    _write_manifest(checkpoint_dir / tag)
    if distributed.is_main():
        _write_atomic(checkpoint_dir / LATEST, tag)
        kept = [t for t in _tags(checkpoint_dir) if step_of(t) <= global_step]
        for old in kept[:-keep]:
            shutil.rmtree(checkpoint_dir / old, ignore_errors=True)
    distributed.barrier()
    return checkpoint_dir / tag


def latest_tag(checkpoint_dir: Path) -> Optional[str]:
    path = checkpoint_dir / LATEST
    return path.read_text().strip() if path.is_file() else None


def usable_tag(checkpoint_dir: Path) -> str:
    """Collective: the latest checkpoint that verifies, else the newest older one that does (each skipped one is
    reported)."""
    latest = latest_tag(checkpoint_dir)
    if latest is None:
        raise ConfigError(f"--from_resume: no checkpoint to resume in {checkpoint_dir} (no '{LATEST}' file); "
                                f"run without --from_resume to start fresh")
    older = [tag for tag in reversed(_tags(checkpoint_dir)) if step_of(tag) < step_of(latest)]
    candidates = [latest, *older]
    for index, tag in enumerate(candidates):
        problems = verify(checkpoint_dir / tag)
        if not problems:
            return tag
        if distributed.is_main():
            print(f"WARNING: checkpoint {checkpoint_dir / tag} is not usable: {'; '.join(problems[:5])}"
                  + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
                  + ("; trying the one before it" if index + 1 < len(candidates) else ""), flush=True)
    raise ConfigError(f"--from_resume: no usable checkpoint in {checkpoint_dir} (see the warnings above); "
                       f"run without --from_resume to start fresh")


def read_run(folder: Path) -> Optional[dict]:
    """What the run that saved `folder` recorded of itself (None: a checkpoint from before run.json existed)."""
    path = folder / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def newest_run(checkpoint_dir: Path) -> tuple[Optional[Path], Optional[dict]]:
    """Before any checkpoint is verified: the newest folder whose run.json reads, and what it holds (every
    checkpoint of one run has the same global batch, which is what a resume on another world size needs early)."""
    for tag in reversed(_tags(checkpoint_dir)):
        try:
            run = read_run(checkpoint_dir / tag)
        except (OSError, ValueError):  # a damaged checkpoint: usable_tag names it later
            continue
        if run is not None:
            return checkpoint_dir / tag, run
    return None, None


def load(model: TrainedModel, checkpoint_dir: Path, tag: str, extra_models: Optional[dict[str, TrainedModel]] = None
         ) -> dict:
    """Collective: restore the models and this rank's RNG from checkpoint_dir/tag; returns the client state."""
    loaded, client_state = model.load(checkpoint_dir, tag)
    if not loaded:
        raise RuntimeError(f"--from_resume: DeepSpeed could not load checkpoint {checkpoint_dir / tag}")
    for name, extra in (extra_models or {}).items():
        if not extra.load(checkpoint_dir / tag, name)[0]:
            raise RuntimeError(f"--from_resume: DeepSpeed could not load the {name} of {checkpoint_dir / tag}")
    rng_file = checkpoint_dir / tag / f"rng_rank{distributed.rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def disk_full_error(error: Exception, folder: Path, previous: Optional[str]) -> Optional[OSError]:
    """An error that says "disk full" when `error`, raised while saving `folder`, comes from a full disk: ENOSPC,
    or less space left than the previous checkpoint took (torch.save reports ENOSPC as a bare RuntimeError from
    its zip writer). None when the disk is not the cause."""
    free = shutil.disk_usage(folder.parent).free
    needed = folder_bytes(folder.parent / previous) if previous else None
    if getattr(error, "errno", None) != errno.ENOSPC and (needed is None or free >= needed):
        return None
    kept = (f"the previous checkpoint {folder.parent / previous} is untouched and 'latest' still names it"
            if previous else "no earlier checkpoint exists")
    full = OSError(errno.ENOSPC, f"disk full while saving checkpoint {folder} ({free:,} bytes free"
                                 + (f", the previous checkpoint took {needed:,}" if needed else "")
                                 + f"; {type(error).__name__}: {error}); {kept}", str(folder))
    print(f"ERROR: {full.strerror}", file=sys.stderr, flush=True)
    return full
