"""The SLURM template (launch/slurm/train.sbatch + node.sh) under a real SLURM started on this machine.

Debian's munged, slurmctld and two slurmd daemons (SLURM's multiple-slurmd mode, which Debian's build has) make
a two-node cluster on localhost with its own config, ports and munge socket; the template is submitted with
sbatch as a user would, and the test reads the job state from `scontrol show job` (there is no accounting
database, so no sacct), the job's log and the run's metrics.jsonl / export. What this proves and what it does
not: docs/slurm.md, "What the test covers".

Needs root (it installs slurmctld, slurmd and munge with apt-get when they are missing, and runs the daemons);
skipped only when not root or when SLURM is missing and there is no apt-get.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.launch import REPO_ROOT, free_port

TEMPLATE = REPO_ROOT / "launch" / "slurm" / "train.sbatch"
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel", "munged"]
NODES = ["zs1", "zs2"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}
SHORT_RUN = ["--model", "tiny", "--max_steps", "6", "--log_interval", "2", "--eval_interval", "0",
             "--eval_batches", "1", "--save_interval", "3", "--from_weight", "none"]
# Variables of the submitting shell that would leak into the job (sbatch passes the environment on).
LEAKY = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "STAGE", "ZERO_STAGE",
         "DS_CONFIG", "OUT_ROOT", "OUT_DIR", "EXTRA_ARGS", "GPUS_PER_NODE", "LAUNCHER", "NUM_GPUS", "MAX_REQUEUES",
         "REPO_ROOT", "VENV", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR", "GLOO_SOCKET_IFNAME",
         "NCCL_SOCKET_IFNAME", "ALLOW_CPU"}


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: installs SLURM with apt-get and runs slurmctld/slurmd/munged"
    if any(shutil.which(b, path=_sbin_path()) is None for b in BINARIES) and shutil.which("apt-get") is None:
        return "SLURM (slurmctld, slurmd, munge) is not installed and there is no apt-get to install it"
    return None


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"])


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _run(cmd: list[str], timeout: float, env: dict | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _install_slurm() -> None:
    if all(shutil.which(b, path=_sbin_path()) for b in BINARIES):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], timeout=300, env=env)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], timeout=600, env=env)
    missing = [b for b in BINARIES if not shutil.which(b, path=_sbin_path())]
    assert not missing, f"apt-get installed {PACKAGES} but {missing} are still missing"


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return f"--- {path} ---\n{path.read_text(errors='replace')[-chars:]}"
    except OSError:
        return f"--- {path}: missing ---"


@dataclass
class Cluster:
    root: Path
    conf: Path
    env: dict
    nodes: list[str]          # the nodes that came up idle
    multiple_slurmd: str      # scontrol show config's MULTIPLE_SLURMD
    daemons: list[subprocess.Popen] = field(default_factory=list)
    daemon_logs: list = field(default_factory=list)

    def cmd(self, *args: str, timeout: float = 30, check: bool = True, env: dict | None = None,
            **kw) -> subprocess.CompletedProcess:
        return _run(list(args), timeout=timeout, env=env or self.env, check=check, **kw)

    def logs(self) -> str:
        return "\n".join(_tail(p, 2500) for p in sorted((self.root / "log").glob("*.log")))

    def job(self, job_id: str) -> dict:
        out = self.cmd("scontrol", "show", "job", "-o", job_id, check=False).stdout
        fields = {}
        for key in ("JobState", "Reason", "ExitCode", "Restarts", "NumNodes", "NodeList", "BatchHost"):
            match = re.search(rf"\b{key}=(\S+)", out)
            fields[key] = match.group(1) if match else None
        return fields

    def submit(self, name: str, workdir: Path, env: dict, sbatch_args: list[str], stage_args: list[str]) -> str:
        workdir.mkdir(parents=True, exist_ok=True)
        out = self.cmd("sbatch", "--parsable", f"--job-name={name}", *sbatch_args, str(TEMPLATE), *stage_args,
                       cwd=workdir, env={**self.env, **env}).stdout.strip()
        return out.split(";")[0]

    def wait(self, job_id: str, until, timeout: float, log: Path, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            if info["JobState"] in FINAL_STATES or time.monotonic() > deadline:
                reason = "ended" if info["JobState"] in FINAL_STATES else f"still {info['JobState']} after {timeout:.0f} s"
                self.cmd("scancel", job_id, check=False)
                raise AssertionError(f"job {job_id} {reason} before {what}: {info}\n{_tail(log, 6000)}\n{self.logs()}")
            time.sleep(0.5)


def _wait_until(predicate, timeout: float, what: str, diagnostics=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnostics()}")
        time.sleep(0.5)


def _stop(process: subprocess.Popen, timeout: float = 15) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _install_slurm()
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "state", "log", "run", *(f"spool/{n}" for n in NODES)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    key, sock = root / "munge" / "munge.key", root / "munge" / "munge.sock"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    ctld_port, *node_ports = free_port(), free_port(), free_port()
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=zerostage-test",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root", "SlurmdUser=root",
        # cred_expire: how long a requeued job waits before it may start again (default 120 s; also the life of
        # a job credential, which is all this cluster's jobs need).
        "AuthType=auth/munge", f"AuthInfo=socket={sock},cred_expire=10", "CredType=cred/munge",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid", f"SlurmdPidFile={root}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log", f"SlurmdLogFile={root}/log/slurmd-%n.log",
        # No cgroups: process tracking by the parent-pid tree, no task binding, no accounting database.
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
        "SwitchType=switch/none", "MpiDefault=none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=2,bf_interval=2",  # a requeued job starts as soon as its hold ends
        "SlurmdParameters=config_overrides", "ReturnToService=2", "SlurmdTimeout=60", "InactiveLimit=0",
        "KillWait=5", "MinJobAge=600", "JobRequeue=1",
        # Two slurmd on this machine: one node each, told apart by their ports (slurmd -N <name>).
        *(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} RealMemory=1000 "
          f"State=UNKNOWN" for name, port in zip(NODES, node_ports)),
        f"PartitionName=test Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM") and k not in LEAKY}
    env.update(SLURM_CONF=str(conf), PATH=_sbin_path(), WANDB_MODE="offline",
               VENV=str(Path(sys.executable).parent.parent))
    state = Cluster(root=root, conf=conf, env=env, nodes=[], multiple_slurmd="?")

    def start(*cmd: str, log: str) -> subprocess.Popen:
        handle = open(root / "log" / log, "ab")
        state.daemon_logs.append(handle)
        process = subprocess.Popen(list(cmd), stdout=handle, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        state.daemons.append(process)
        return process

    def finalize():
        try:
            ids = state.cmd("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()
            for job_id in ids:
                state.cmd("scancel", job_id, check=False, timeout=10)
            _wait_until(lambda: not state.cmd("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.strip(),
                        timeout=30, what="the jobs to end")
        except Exception:  # the daemons are stopped whatever happened to the jobs
            pass
        for process in reversed(state.daemons):  # slurmds, then slurmctld, then munged
            _stop(process)
        for handle in state.daemon_logs:
            handle.close()

    try:
        munged = start("munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                       f"--log-file={root}/log/munged.log", f"--pid-file={root}/run/munged.pid",
                       f"--seed-file={root}/munge/munged.seed", log="munged.out.log")
        _wait_until(lambda: sock.exists() or munged.poll() is not None, 20, "munged's socket", state.logs)
        assert munged.poll() is None, f"munged exited\n{state.logs()}"
        start("slurmctld", "-D", "-i", "-f", str(conf), log="slurmctld.out.log")
        _wait_until(lambda: state.cmd("scontrol", "ping", check=False, timeout=10).returncode == 0, 30,
                    "slurmctld to answer", state.logs)
        for name in NODES:
            start("slurmd", "-D", "-N", name, "-f", str(conf), log=f"slurmd-{name}.out.log")
        config = state.cmd("scontrol", "show", "config").stdout
        match = re.search(r"MULTIPLE_SLURMD\s*=\s*(\S+)", config)
        state.multiple_slurmd = match.group(1) if match else "not reported"

        def idle_nodes() -> list[str]:
            out = state.cmd("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10).stdout.split("\n")
            return [line.split()[0] for line in out if line.split()[1:2] == ["idle"]]

        # Every node that can come up does so within seconds; without multiple-slurmd only the first one will.
        deadline = time.monotonic() + 30
        while len(idle_nodes()) < len(NODES) and time.monotonic() < deadline:
            time.sleep(0.5)
        state.nodes = idle_nodes()
        assert state.nodes, f"no SLURM node came up idle\n{state.logs()}"
    except BaseException:
        finalize()
        raise
    yield state
    finalize()


@dataclass
class JobRun:
    job_id: str
    info: dict
    log: Path
    out_dir: Path

    @property
    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.out_dir / "metrics.jsonl").read_text().splitlines()]


def _run_to_end(cluster: Cluster, name: str, env: dict, sbatch_args: list[str], stage_args: list[str],
                timeout: float = 300) -> JobRun:
    workdir = cluster.root / "jobs" / name
    out_dir = workdir / "out"
    job_id = cluster.submit(name, workdir, {"STAGE": "pretrain", "OUT_DIR": str(out_dir), **env}, sbatch_args,
                            stage_args)
    log = workdir / f"{name}-{job_id}.out"  # the template's own --output=%x-%j.out, in the submission directory
    info = cluster.wait(job_id, lambda i: i["JobState"] in FINAL_STATES, timeout, log, "the end")
    return JobRun(job_id, info, log, out_dir)


def _assert_completed(run: JobRun, nodes: int) -> None:
    assert run.info["JobState"] == "COMPLETED" and run.info["ExitCode"] == "0:0", \
        f"job {run.job_id}: {run.info}\n{_tail(run.log, 8000)}"
    assert run.info["NumNodes"] == str(nodes) and run.info["Restarts"] == "0", run.info
    assert re.search(r"at commit ([0-9a-f]{40}|unknown)", run.text), "the job log names no git commit"
    assert "no checkpoint: fresh start" in run.text and "] done" in run.text
    steps = [r["train/global_step"] for r in run.metrics()]
    assert {2, 4, 6} <= set(steps) and steps[-1] == 6 and steps == sorted(steps), steps
    assert all(math.isfinite(r["train/loss"]) for r in run.metrics())
    assert (run.out_dir / "export" / "model.safetensors").is_file()
    assert (run.out_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert json.loads((run.out_dir / "run_config.json").read_text())["world_size"] == 2


@pytest.fixture(scope="module")
def single_node(cluster) -> JobRun:
    return _run_to_end(cluster, "one-node", {}, [], SHORT_RUN)


def _two_nodes(cluster: Cluster, name: str, launcher: str) -> JobRun:
    if len(cluster.nodes) < 2:
        pytest.skip(f"only {cluster.nodes} came up: two slurmd on one machine need SLURM built with "
                    f"--enable-multiple-slurmd (MULTIPLE_SLURMD={cluster.multiple_slurmd})")
    return _run_to_end(cluster, name, {"GPUS_PER_NODE": "1", "LAUNCHER": launcher}, ["--nodes=2"], SHORT_RUN)


def test_single_node_two_ranks(single_node):
    """1 node × 2 CPU ranks under the deepspeed launcher, to the end: exit state, metrics, export, log header."""
    _assert_completed(single_node, nodes=1)
    assert "2 ranks per node (CPU, DS_ACCELERATOR=cpu)" in single_node.text
    assert "launcher deepspeed" in single_node.text
    assert "] network:" not in single_node.text  # one node: the ranks' interfaces are left alone


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_two_nodes_one_rank_each(cluster, single_node, launcher):
    """2 nodes × 1 rank: the rendezvous comes from the allocation, node ranks from SLURM_NODEID; the same world
    size as the single-node run, so the same losses."""
    run = _two_nodes(cluster, f"two-nodes-{launcher}", launcher)
    _assert_completed(run, nodes=2)
    node_rank = {"deepspeed": "--node_rank {}", "torchrun": "--rdzv_backend c10d"}[launcher]  # c10d: its own ranks
    for rank in (0, 1):
        assert re.search(rf"\[node {rank} .*\] launching: {launcher} .*{node_rank.format(rank)}", run.text), \
            run.text[-3000:]
        assert re.search(rf"\[node {rank} .*\] launcher exited with 0", run.text)
        # Each node picks the interface of its route to MASTER_ADDR (loopback here: both nodes are this host).
        assert re.search(rf"\[node {rank} .*\] network: MASTER_ADDR=127\.0\.0\.1 \(127\.0\.0\.1\) reached through "
                         rf"lo \(127\.0\.0\.1\): GLOO_SOCKET_IFNAME=lo \(from the route\) NCCL_SOCKET_IFNAME=lo \(from "
                         rf"the route\)", run.text), run.text[-3000:]
    assert f"nodes 2: {cluster.nodes[0]} {cluster.nodes[1]}; rendezvous 127.0.0.1:" in run.text
    reference = {r["train/global_step"]: r["train/loss"] for r in single_node.metrics()}
    for record in run.metrics():
        assert record["train/loss"] == pytest.approx(reference[record["train/global_step"]], rel=1e-5)


def test_gpus_torch_cannot_use_fail_the_job(cluster, tmp_path):
    """A node where nvidia-smi lists GPUs but torch uses none (here: a stub nvidia-smi beside the CPU-only torch)
    ends the job at once with the reason, instead of training on CPU ranks."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-00000000)"\n')
    (stubs / "nvidia-smi").chmod(0o755)
    run = _run_to_end(cluster, "unusable-gpus", {"PATH": f"{stubs}:{cluster.env['PATH']}"}, [], SHORT_RUN)
    assert run.info["JobState"] == "FAILED" and run.info["ExitCode"] == "2:0", f"{run.info}\n{_tail(run.log)}"
    assert "nvidia-smi lists 1 GPU(s) but torch cannot use them (torch.cuda.device_count() is 0 with " in run.text
    assert "ERROR: GPUs that torch cannot use (the line above); ALLOW_CPU=1 runs on CPU anyway" in run.text
    assert "launching:" not in run.text


@pytest.fixture(scope="module")
def requeued(cluster) -> JobRun:
    """A run stopped after its first checkpoint the way SLURM warns before the time limit (SIGUSR1 to the batch
    shell only: `scancel --signal=USR1 --batch`), then left to the template: relay, requeue, resume, finish."""
    name = "requeue"
    workdir = cluster.root / "jobs" / name
    out_dir = workdir / "out"
    args = ["--model", "tiny", "--max_steps", "25", "--log_interval", "5", "--eval_interval", "0",
            "--eval_batches", "1", "--save_interval", "5", "--from_weight", "none"]
    job_id = cluster.submit(name, workdir, {"STAGE": "pretrain", "OUT_DIR": str(out_dir)}, [], args)
    log = workdir / f"{name}-{job_id}.out"
    latest = out_dir / "checkpoints" / "latest"
    cluster.wait(job_id, lambda i: latest.is_file(), 120, log, "the first checkpoint")
    cluster.cmd("scancel", "--signal=USR1", "--batch", job_id)
    # The requeued job starts again by itself once its hold (cred_expire, 10 s here) has passed.
    info = cluster.wait(job_id, lambda i: i["JobState"] in FINAL_STATES, 240, log, "the end")
    return JobRun(job_id, info, log, out_dir)


def test_requeue_resumes_from_latest_checkpoint(requeued):
    """The template's half of preemption: it relays the warning to the ranks (and only them), requeues the job
    itself, and the second start resumes from checkpoints/latest and finishes; one log, appended."""
    run, text = requeued, requeued.text
    assert run.info["JobState"] == "COMPLETED" and run.info["ExitCode"] == "0:0", f"{run.info}\n{_tail(run.log, 8000)}"
    assert run.info["Restarts"] == "1", run.info
    first, _, second = text.partition("start 2 (SLURM_RESTART_COUNT=1)")
    assert second, f"no second start in the log\n{text[-6000:]}"
    assert "SIGUSR1: the time limit is near" in first
    relayed = re.search(r"stop requested: SIGUSR1 -> ranks ((?:\d+ ?)+)", first)
    assert relayed and len(relayed.group(1).split()) == 2, "the warning did not reach exactly the 2 rank processes"
    requeue = re.search(r"requeuing; the next start resumes from (step_\d+)", first)
    assert requeue, first[-4000:]
    tag = requeue.group(1)
    assert f"resuming from checkpoint {tag}" in second and "--from_resume" in second
    resumed_step = int(tag.split("_")[1])
    assert re.search(rf"resumed from \S+/{tag}: step {resumed_step},", second), second[-4000:]
    assert "] done" in second
    steps = [r["train/global_step"] for r in run.metrics()]
    assert set(range(5, 26, 5)) <= set(steps) and steps[-1] == 25 and steps == sorted(steps), steps
    assert (run.out_dir / "export" / "model.safetensors").is_file()


def test_trainer_checkpoints_and_exits_on_sigusr1(requeued):
    """The trainer's half: on SIGUSR1 every rank finishes its step, saves a checkpoint and exits 75, so the
    requeued job resumes exactly where the warning stopped it (not from the last periodic checkpoint)."""
    first = requeued.text.partition("start 2 (SLURM_RESTART_COUNT=1)")[0]
    after_signal = first.partition("stop requested: SIGUSR1 -> ranks")[2]
    assert "training step ended with exit code 75" in after_signal, after_signal[-4000:]
    saved = re.findall(r"saved checkpoint \S+/(step_\d+)", after_signal)
    assert saved, f"no checkpoint saved after the signal\n{after_signal[-4000:]}"
    assert f"the next start resumes from {saved[-1]}" in after_signal


def test_time_limit_warning_from_slurm(cluster):
    """SLURM itself delivers the template's `--signal=B:USR1@90`: with --time=2 the warning comes within the
    first 30 s (SLURM may send it up to 60 s early), and the job relays it and requeues itself."""
    name = "time-limit"
    workdir = cluster.root / "jobs" / name
    args = ["--model", "tiny", "--max_steps", "100000", "--log_interval", "5", "--eval_interval", "0",
            "--eval_batches", "1", "--save_interval", "5", "--from_weight", "none"]
    job_id = cluster.submit(name, workdir, {"STAGE": "pretrain", "OUT_DIR": str(workdir / "out")}, ["--time=2"], args)
    log = workdir / f"{name}-{job_id}.out"
    try:
        info = cluster.wait(job_id, lambda i: i["Restarts"] not in (None, "0"), 110, log, "the requeue")
    finally:
        cluster.cmd("scancel", job_id, check=False)
    text = log.read_text(errors="replace")
    assert info["JobState"] in {"PENDING", "REQUEUED", "REQUEUE_HOLD"}, info
    assert "SIGUSR1: the time limit is near" in text
    assert "stop requested: SIGUSR1 -> ranks" in text
    assert re.search(r"requeuing; (the next start resumes from step_\d+|WARNING: no checkpoint yet)", text), text[-4000:]
