"""Run a stage script the way users do (the deepspeed launcher or torchrun, CPU ranks) and read what it wrote."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from train.config import REPO_ROOT
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
TORCHRUN = Path(sys.executable).parent / "torchrun"
# Keys every training log line carries (docs/metrics.md).
CONTRACT = ["train/loss", "train/learning_rate", "train/grad_norm", "train/epoch", "train/global_step",
            "train/tokens_per_second", "train/samples_per_second", "train/steps_per_second",
            "train/num_input_tokens_seen", "train/num_supervised_tokens_seen", "train/mfu_percent",
            "train/tflops_per_device", "train/eta_minutes", "system/epoch_time", "system/step_time_s",
            "system/peak_memory_gb", "system/data_wait_percent", "train/skipped_steps",
            "train/num_computed_tokens_seen", "train/padding_percent"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stage_command(stage: str, out_dir: Path, *args: str, world_size: int = 2, zero: str = "2",
                  env: dict | None = None) -> tuple[list[str], dict, int]:
    """The command line, environment and port of a stage run on CPU ranks: the deepspeed launcher with
    ds_configs/zero<zero>.json, or torchrun with --backend fsdp for zero="fsdp". One rank runs as one process
    without a launcher (`python train/<stage>.py`, the README's single-process form): a launcher adds two Python
    processes that import torch and DeepSpeed, several seconds a run, and is tested at two ranks."""
    port = free_port()
    script = str(REPO_ROOT / "train" / f"{stage}.py")
    backend = ["--backend", "fsdp"] if zero == "fsdp" else ["--deepspeed", f"ds_configs/zero{zero}.json"]
    if world_size == 1:
        command = [sys.executable, script, *backend]
    elif zero == "fsdp":
        command = [str(TORCHRUN), "--nproc_per_node", str(world_size), "--master_port", str(port), script, *backend]
    else:
        command = [str(DEEPSPEED), "--num_gpus", str(world_size), "--master_port", str(port), script, *backend]
    command += ["--out_dir", str(out_dir), *args]
    # One thread per rank: `make test` runs two files at once on two cores, and OpenMP threads that outnumber the
    # free cores spin at every barrier (a one-rank run of tiny steps took minutes instead of seconds).
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port),
                "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), **(env or {})}
    return command, {key: value for key, value in full_env.items() if value is not None}, port  # None: unset it


def run_stage(stage: str, out_dir: Path, *args: str, world_size: int = 2, zero: str = "2",
              env: dict | None = None, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    command, full_env, port = stage_command(stage, out_dir, *args, world_size=world_size, zero=zero, env=env)
    return run_command(command, full_env, port, check, timeout)


def rank_pid(out_dir: Path, rank: int) -> int:
    """The pid of one rank of a launcher's run (the run that writes to out_dir)."""
    pattern = f"--local_rank={rank} .*--out_dir {out_dir}( |$)"
    pids = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True, text=True).stdout.split()
    assert len(pids) == 1, (pattern, pids)
    return int(pids[0])


def start(command: list[str], env: dict) -> subprocess.Popen:
    """A launcher in its own session (os.killpg reaches its ranks), its output on one pipe."""
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def run_launch_script(stage: str, *args: str, zero: str, env: dict | None = None,
                      timeout: int = 600) -> subprocess.CompletedProcess:
    """`bash launch/run_<stage>.sh ARGS` as users start it: 2 CPU ranks, ZERO_STAGE from the environment."""
    port = free_port()
    full_env = {**os.environ, "ZERO_STAGE": zero, "MASTER_PORT": str(port),
                "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), **(env or {})}
    return run_command(["bash", f"launch/run_{stage}.sh", *args], full_env, port, True, timeout)


def run_command(command: list[str], env: dict, port: int, check: bool, timeout: int) -> subprocess.CompletedProcess:
    """Run a launcher in its own session, so a timeout kills its ranks too instead of leaving them running."""
    env = {key: value for key, value in env.items() if value is not None}  # None: unset it
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # like start(), with stderr apart
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{' '.join(command)} ran past {timeout}s:\n{stdout[-4000:]}\n{stderr[-6000:]}")
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-6000:]}")
    leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"the run left DeepSpeed's shared-memory buffers behind: {leaked}"
    return result


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def read_run_config(out_dir: Path) -> dict:
    return json.loads((out_dir / "run_config.json").read_text())


@contextmanager
def tmpfs(mount_point: Path, options: str):
    """A real tmpfs of its own at mount_point (mount options such as "size=1m" or "ro,size=1m"); the test is skipped
    where mounting is not permitted (it needs root, which CI has)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)  # lazy: also after a test left a file open


def same_work(a, b) -> bool:
    """Two BatchStats count the same tokens, samples and FLOPs; only the positions computed (the padding of each
    layout) may differ."""
    return dataclasses.replace(a, computed_tokens=0) == dataclasses.replace(b, computed_tokens=0)
