"""The SLURM template (launch/slurm/train.sbatch + node.sh) under a real SLURM started on this machine, on two hosts.

Debian's munged, slurmctld and two slurmd daemons make a two-node cluster with its own config and munge socket.
Each node is a host of its own: a network namespace with its own address on a veth pair between the two, its own
hostname, and an /etc/hosts that resolves both names, so every byte between the nodes crosses that veth. The
template is submitted with sbatch as a user would, and the test reads the job state from `scontrol show job`
(there is no accounting database, so no sacct), the job's log, the veth's byte counters and the run's
metrics.jsonl / export. What this proves and what it does not: docs/slurm.md, "What the test covers".

Needs root (it installs slurmctld, slurmd and munge with apt-get when they are missing, runs the daemons and
creates network namespaces); skipped when not root, when SLURM is missing and there is no apt-get, when ip,
nsenter or unshare is missing, or when a network namespace cannot be created.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.launch import REPO_ROOT

TEMPLATE = REPO_ROOT / "launch" / "slurm" / "train.sbatch"
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel", "munged"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}
SHORT_RUN = ["--model", "tiny", "--max_steps", "6", "--log_interval", "2", "--eval_interval", "0",
             "--eval_batches", "1", "--save_interval", "3", "--from_weight", "none"]
# Variables of the submitting shell that would leak into the job (sbatch passes the environment on).
LEAKY = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "STAGE", "ZERO_STAGE",
         "DS_CONFIG", "OUT_ROOT", "OUT_DIR", "EXTRA_ARGS", "GPUS_PER_NODE", "LAUNCHER", "NUM_GPUS", "MAX_REQUEUES",
         "REPO_ROOT", "VENV", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR", "GLOO_SOCKET_IFNAME",
         "NCCL_SOCKET_IFNAME", "ALLOW_CPU"}
SUBNET = "10.250.0"         # the hosts' network; it exists only inside their namespaces
SLURMD_TIMEOUT = 10         # s without an answer before slurmctld declares a node DOWN (SLURM's default: 300)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: installs SLURM with apt-get, runs slurmctld/slurmd/munged, creates network namespaces"
    if any(shutil.which(b, path=_sbin_path()) is None for b in BINARIES) and shutil.which("apt-get") is None:
        return "SLURM (slurmctld, slurmd, munge) is not installed and there is no apt-get to install it"
    missing = [b for b in ("ip", "nsenter", "unshare") if shutil.which(b, path=_sbin_path()) is None]
    if missing:
        return f"no {', '.join(missing)} (iproute2, util-linux) to make the two hosts' namespaces"
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
class Host:
    """One "machine": a network namespace with one end of the veth pair and its own address, its own /etc/hosts
    (bind-mounted in a mount namespace) and its own hostname (a UTS namespace), for every process started on it."""
    name: str
    netns: str
    dev: str
    addr: str
    hosts_file: Path

    def run(self, *cmd: str) -> list[str]:
        """The command line that runs `cmd` on this host."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--uts", "sh", "-c",
                'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"', "sh", str(self.hosts_file),
                self.name, *cmd]

    def veth_bytes(self) -> int:
        """Bytes received plus sent on this host's end of the veth pair."""
        stats = json.loads(_run(["ip", "-n", self.netns, "-j", "-s", "link", "show", "dev", self.dev], 10).stdout)
        return stats[0]["stats64"]["rx"]["bytes"] + stats[0]["stats64"]["tx"]["bytes"]

    def power_off(self) -> None:
        """What a machine that dies does to the others: it stops answering. Its link goes down first (so no
        connection of a killed process is closed towards the other host), then every process on it is killed."""
        _run(["ip", "-n", self.netns, "link", "set", self.dev, "down"], 10)
        self.kill_all()

    def kill_all(self) -> None:
        """SIGKILL to every process in this host's network namespace."""
        listed = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True, timeout=10)
        for pid in listed.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _make_hosts(names: list[str], root: Path) -> list[Host]:
    """Two network namespaces joined by a veth pair, one address each, each name resolving to its address on
    both. The caller removes them with _remove_hosts, also after a failure here."""
    tag = uuid.uuid4().hex[:6]
    hosts_file = root / "hosts"
    hosts = [Host(name, f"zs-{name}-{tag}", f"{name}{tag}", f"{SUBNET}.{i + 1}", hosts_file)
             for i, name in enumerate(names)]
    hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{h.addr} {h.name}\n" for h in hosts))
    for host in hosts:
        made = subprocess.run(["ip", "netns", "add", host.netns], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    a, b = hosts
    _run(["ip", "link", "add", a.dev, "netns", a.netns, "type", "veth", "peer", "name", b.dev, "netns", b.netns], 10)
    for host in hosts:
        for command in (f"addr add {host.addr}/24 dev {host.dev}", f"link set {host.dev} up", "link set lo up"):
            _run(["ip", "-n", host.netns, *command.split()], 10)
    return hosts


def _remove_hosts(hosts: list[Host]) -> None:
    """Kills whatever still runs in the namespaces and deletes them (and with them the veth pair)."""
    for host in hosts:
        if not Path(f"/run/netns/{host.netns}").exists():
            continue
        host.kill_all()
        subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)


@dataclass
class Cluster:
    root: Path
    conf: Path
    env: dict
    hosts: list[Host]
    daemons: list[subprocess.Popen] = field(default_factory=list)
    daemon_logs: list = field(default_factory=list)

    @property
    def nodes(self) -> list[str]:
        return [host.name for host in self.hosts]

    def cmd(self, *args: str, timeout: float = 30, check: bool = True, env: dict | None = None,
            **kw) -> subprocess.CompletedProcess:
        """A SLURM client command, run on the first host (where slurmctld runs, as on a login node)."""
        return _run(self.hosts[0].run(*args), timeout=timeout, env=env or self.env, check=check, **kw)

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
    """Two hosts zs1 and zs2, each a network namespace with its own address on a veth pair and its own hostname;
    zs1 runs slurmctld and a slurmd, zs2 a slurmd. munged runs in this machine's namespace: its socket is a file,
    which every namespace reaches."""
    _install_slurm()
    root = tmp_path_factory.mktemp("slurm")
    names = ["zs1", "zs2"]
    for sub in ("munge", "state", "log", "run", "tmp", *(f"spool/{n}" for n in names)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    key, sock = root / "munge" / "munge.key", root / "munge" / "munge.sock"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    cpus = os.cpu_count() or 1
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=zerostage-test",
        "SlurmctldHost=zs1",  # a name, resolved on each host through its /etc/hosts
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
        "SlurmdParameters=config_overrides", "ReturnToService=2", f"SlurmdTimeout={SLURMD_TIMEOUT}",
        "InactiveLimit=0", "KillWait=5", "MinJobAge=600", "JobRequeue=1",
        # No NodeAddr: slurmctld and the hosts find each node by its name.
        *(f"NodeName={name} CPUs={cpus} RealMemory=1000 State=UNKNOWN" for name in names),
        f"PartitionName=test Nodes={','.join(names)} Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM") and k not in LEAKY}
    # TMPDIR: what a killed host's jobs leave (node.sh's hostfile) stays in the test's own directory.
    env.update(SLURM_CONF=str(conf), PATH=_sbin_path(), WANDB_MODE="offline", TMPDIR=str(root / "tmp"),
               VENV=str(Path(sys.executable).parent.parent))
    state = Cluster(root=root, conf=conf, env=env, hosts=[])

    def start(cmd: list[str], log: str) -> subprocess.Popen:
        handle = open(root / "log" / log, "ab")
        state.daemon_logs.append(handle)
        process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        state.daemons.append(process)
        return process

    def finalize():
        try:
            ids = state.cmd("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()
            for job_id in ids:
                state.cmd("scancel", job_id, check=False, timeout=10)
            _wait_until(lambda: not state.cmd("squeue", "-h", "-t", "running", "-o", "%i", check=False,
                                              timeout=10).stdout.strip(), timeout=30, what="the jobs to end")
        except Exception:  # the daemons are stopped whatever happened to the jobs
            pass
        for process in reversed(state.daemons):  # slurmds, then slurmctld, then munged
            _stop(process)
        for handle in state.daemon_logs:
            handle.close()
        _remove_hosts(state.hosts)

    try:
        state.hosts = _make_hosts(names, root)
        munged = start(["munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                        f"--log-file={root}/log/munged.log", f"--pid-file={root}/run/munged.pid",
                        f"--seed-file={root}/munge/munged.seed"], log="munged.out.log")
        _wait_until(lambda: sock.exists() or munged.poll() is not None, 20, "munged's socket", state.logs)
        assert munged.poll() is None, f"munged exited\n{state.logs()}"
        start(state.hosts[0].run("slurmctld", "-D", "-i", "-f", str(conf)), log="slurmctld.out.log")
        _wait_until(lambda: state.cmd("scontrol", "ping", check=False, timeout=10).returncode == 0, 30,
                    "slurmctld to answer", state.logs)
        for host in state.hosts:
            start(host.run("slurmd", "-D", "-N", host.name, "-f", str(conf)), log=f"slurmd-{host.name}.out.log")

        def idle_nodes() -> list[str]:
            out = state.cmd("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10).stdout.split("\n")
            return [line.split()[0] for line in out if line.split()[1:2] == ["idle"]]

        _wait_until(lambda: idle_nodes() == names, 30, f"both nodes {names} to come up idle", state.logs)
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
    return _run_to_end(cluster, name, {"GPUS_PER_NODE": "1", "LAUNCHER": launcher}, ["--nodes=2"], SHORT_RUN)


def _assert_network(cluster: Cluster, run: JobRun) -> None:
    """Each node logged the interface of its route to MASTER_ADDR: its end of the veth pair and its own address
    (on zs1 the address is its own, which the kernel routes through lo: the interface holding it is taken)."""
    master = cluster.hosts[0]
    for rank, host in enumerate(cluster.hosts):
        line = (f"[node {rank} {host.name} ", f"] network: MASTER_ADDR={master.name} ({master.addr}) reached through "
                f"{host.dev} ({host.addr}): GLOO_SOCKET_IFNAME={host.dev} (from the route) NCCL_SOCKET_IFNAME="
                f"{host.dev} (from the route)\n")
        assert re.search(re.escape(line[0]) + r"[\d:]+" + re.escape(line[1]), run.text), run.text[-3000:]
    assert f"nodes 2: {master.name} {cluster.hosts[1].name}; rendezvous {master.name}:" in run.text


def _assert_traffic(run: JobRun, crossed: int, steps: int) -> None:
    """The ranks' collectives crossed the veth: at least one fp32 copy of the model per step (a two-rank
    all-reduce or reduce-scatter + all-gather moves about two each way), far more than SLURM's own messages."""
    params = float(re.search(r"([\d.]+)M params, world 2", run.text).group(1)) * 1e6
    assert crossed >= steps * params * 4, f"only {crossed} bytes crossed the veth for {steps} steps of {params:.0f} params"


def test_single_node_two_ranks(single_node):
    """1 node × 2 CPU ranks under the deepspeed launcher, to the end: exit state, metrics, export, log header."""
    _assert_completed(single_node, nodes=1)
    assert "2 ranks per node (CPU, DS_ACCELERATOR=cpu)" in single_node.text
    assert "launcher deepspeed" in single_node.text
    assert "] network:" not in single_node.text  # one node: the ranks' interfaces are left alone


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_two_hosts_one_rank_each(cluster, single_node, launcher):
    """2 hosts × 1 rank: the rendezvous comes from the allocation (the first node's name, resolved on each host),
    node ranks from SLURM_NODEID (deepspeed's hostfile) or the c10d rendezvous (torchrun), and every byte between
    the ranks crosses the veth pair; the same world size as the single-node run, so the same losses."""
    before = cluster.hosts[1].veth_bytes()
    run = _two_nodes(cluster, f"two-hosts-{launcher}", launcher)
    crossed = cluster.hosts[1].veth_bytes() - before
    _assert_completed(run, nodes=2)
    node_rank = {"deepspeed": "--node_rank {}", "torchrun": "--rdzv_backend c10d"}[launcher]  # c10d: its own ranks
    for rank, host in enumerate(cluster.hosts):
        assert re.search(rf"\[node {rank} {host.name} .*\] launching: {launcher} .*{node_rank.format(rank)}", run.text), \
            run.text[-3000:]
        assert re.search(rf"\[node {rank} {host.name} .*\] launcher exited with 0", run.text)
    _assert_network(cluster, run)
    _assert_traffic(run, crossed, steps=6)
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
        # Requeued, and its first start's processes gone (COMPLETING until then).
        info = cluster.wait(job_id, lambda i: i["Restarts"] not in (None, "0") and i["JobState"] != "COMPLETING", 110,
                            log, "the requeue")
    finally:
        cluster.cmd("scancel", job_id, check=False)
    text = log.read_text(errors="replace")
    assert info["JobState"] in {"PENDING", "REQUEUED", "REQUEUE_HOLD"}, info
    assert "SIGUSR1: the time limit is near" in text
    assert "stop requested: SIGUSR1 -> ranks" in text
    assert re.search(r"requeuing; (the next start resumes from step_\d+|WARNING: no checkpoint yet)", text), text[-4000:]


@dataclass
class Interrupted(JobRun):
    crossed: int = 0                                # bytes through the veth pair during the first start
    stop_checkpoint: tuple[str, set] = ("", set())  # checkpoints/latest at the requeue, and its files
    requeued_after: float = 0.0                     # seconds from the host's death to the second requeue

    def start_text(self, number: int) -> str:
        """The log of one start (1, 2, 3)."""
        parts = re.split(r"start \d \(SLURM_RESTART_COUNT=\d\)", self.text)
        assert len(parts) > number, f"no start {number} in the log\n{self.text[-6000:]}"
        return parts[number]


@pytest.fixture(scope="module")
def interrupted(cluster) -> Interrupted:
    """One job on both hosts, interrupted twice, as a long job is (one job and its start-up instead of two):
    1. after its first checkpoint, warned the way SLURM warns before the time limit (SIGUSR1 to the batch shell
       only: `scancel --signal=USR1 --batch`), then left to the template: relay, requeue, resume on both hosts;
    2. after the second start's first checkpoint, its second host dies: its link goes down and every process on it
       is killed. The requeued job still asks for two nodes; with one left, it is shrunk to one (`scontrol update
       NumNodes=1 NumTasks=1`, what its user would do; SLURM itself gives a `--nodes=1-2` job one node even when
       two are idle), and the third start finishes on the one host left.
    Last in this file: zs2 stays DOWN."""
    name = "interrupted"
    workdir = cluster.root / "jobs" / name
    out_dir = workdir / "out"
    # Steps enough that the second start is still training when its checkpoint after the stop's is seen.
    args = ["--model", "tiny", "--max_steps", "20", "--log_interval", "5", "--eval_interval", "0",
            "--eval_batches", "1", "--save_interval", "5", "--from_weight", "none"]
    before = cluster.hosts[1].veth_bytes()
    job_id = cluster.submit(name, workdir, {"STAGE": "pretrain", "OUT_DIR": str(out_dir), "GPUS_PER_NODE": "1"},
                            ["--nodes=2"], args)
    log = workdir / f"{name}-{job_id}.out"
    latest = out_dir / "checkpoints" / "latest"

    def restarts(count: int):
        return lambda info: info["Restarts"] not in (None, *map(str, range(count)))

    cluster.wait(job_id, lambda i: latest.is_file(), 180, log, "the first checkpoint")
    cluster.cmd("scancel", "--signal=USR1", "--batch", job_id)
    cluster.wait(job_id, restarts(1), 120, log, "the requeue")
    crossed = cluster.hosts[1].veth_bytes() - before
    tag = latest.read_text().strip()  # before later checkpoints of the second start replace it
    stop_checkpoint = (tag, {p.name for p in (latest.parent / tag).iterdir()})
    # The requeued job starts again by itself once its hold (cred_expire, 10 s here) has passed.
    cluster.wait(job_id, lambda i: i["JobState"] == "RUNNING" and latest.read_text().strip() > tag, 240, log,
                 "the second start's first checkpoint")
    died = time.monotonic()
    cluster.hosts[1].power_off()
    cluster.wait(job_id, restarts(2), SLURMD_TIMEOUT + 120, log, "the requeue after the host's death")
    requeued_after = time.monotonic() - died
    # Once requeued (its second start's processes ended) the job waits for a second node that will not come:
    # (Reason=ReqNodeNotAvail,_UnavailableNodes:zs2 or Nodes_required_for_job_are_DOWN,..., by SLURM's timing).
    cluster.wait(job_id, lambda i: i["JobState"] == "PENDING" and re.search(r"ReqNodeNotAvail|DOWN", i["Reason"] or ""),
                 120, log, "the wait for zs2")
    cluster.cmd("scontrol", "update", f"JobId={job_id}", "NumNodes=1", "NumTasks=1")
    info = cluster.wait(job_id, lambda i: i["JobState"] in FINAL_STATES, 240, log, "the end")
    return Interrupted(job_id, info, log, out_dir, crossed, stop_checkpoint, requeued_after)


def test_requeue_resumes_from_latest_checkpoint(cluster, interrupted):
    """The template's half of preemption on two hosts: it relays the warning to the ranks (and only them) on both
    hosts, requeues the job itself, and the second start resumes from checkpoints/latest on both; one log,
    appended."""
    first, second = interrupted.start_text(1), interrupted.start_text(2)
    assert "SIGUSR1: the time limit is near" in first
    for rank, host in enumerate(cluster.hosts):  # one rank per host, each signalled by its own node.sh
        relayed = re.findall(rf"\[node {rank} {host.name} [\d:]+\] stop requested: SIGUSR1 -> ranks ((?:\d+ ?)+)\n", first)
        assert len(relayed) == 1 and len(relayed[0].split()) == 1, f"node {rank}: {relayed}\n{first[-4000:]}"
    _assert_traffic(interrupted, interrupted.crossed, steps=5)
    requeue = re.search(r"requeuing; the next start resumes from (step_\d+)", first)
    assert requeue, first[-4000:]
    tag = requeue.group(1)
    assert "nodes 2: zs1 zs2;" in second, second[:3000]
    assert f"resuming from checkpoint {tag}" in second and "--from_resume" in second
    assert re.search(rf"resumed from \S+/{tag}: step {int(tag.split('_')[1])},", second), second[-4000:]
    assert re.search(r"saved checkpoint \S+/step_\d+", second), second[-4000:]  # it trained on from there


def test_trainer_checkpoints_and_exits_on_sigusr1(interrupted):
    """The trainer's half: on SIGUSR1 both ranks finish the same step, each saves its part of one checkpoint and the
    step exits 75, so the requeued job resumes exactly where the warning stopped it (not from the last periodic
    checkpoint)."""
    first = interrupted.start_text(1)
    after_signal = first.partition("stop requested: SIGUSR1 -> ranks")[2]
    assert "training step ended with exit code 75" in after_signal, after_signal[-4000:]
    for rank, host in enumerate(("zs1", "zs2")):
        assert re.search(rf"\[node {rank} {host} [\d:]+\] launcher exited with 75", first), first[-4000:]
    saved = re.findall(r"saved checkpoint \S+/(step_\d+)", after_signal)
    assert saved, f"no checkpoint saved after the signal\n{after_signal[-4000:]}"
    assert f"the next start resumes from {saved[-1]}" in after_signal
    tag, parts = interrupted.stop_checkpoint
    assert tag == saved[-1], interrupted.stop_checkpoint
    for rank in (0, 1):  # the rank on zs2 wrote its optimizer shard and RNG state at the same step
        assert {f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", f"rng_rank{rank}.pt"} <= parts, parts


def test_a_lost_host_ends_the_start_and_the_job_is_requeued(cluster, interrupted):
    """A host that dies mid-run: slurmctld declares it DOWN after SlurmdTimeout, ends the start (NODE_FAIL) and
    requeues the job; the template names the lost node; the next start gets the one host left."""
    second, third = interrupted.start_text(2), interrupted.start_text(3)
    assert interrupted.requeued_after < SLURMD_TIMEOUT + 60, \
        f"requeued {interrupted.requeued_after:.0f} s after the death"
    lost = re.search(r"ERROR: lost node\(s\): zs2 \(State=\S*DOWN\S*, Reason=Not responding\); SLURM ends this start "
                     r"\(NODE_FAIL\) and requeues the job \(--requeue\): the next start resumes from (step_\d+) on the "
                     r"nodes it gets", second)
    assert lost, second[-5000:]
    assert "nodes 1: zs1;" in third and f"resuming from checkpoint {lost.group(1)}" in third, third[:3000]


def test_the_one_host_left_resumes(interrupted):
    """The third start runs on one host, so one rank resumes what two ranks saved (the resume on another world
    size, issue 17's first bullet): the same global batch (twice the accumulation), the counters and the data
    position continue, and the run finishes; metrics.jsonl holds each step once."""
    run = interrupted
    assert run.info["JobState"] == "COMPLETED" and run.info["ExitCode"] == "0:0", f"{run.info}\n{_tail(run.log, 6000)}"
    assert run.info["Restarts"] == "2" and run.info["NumNodes"] == "1", run.info
    third = run.start_text(3)
    assert re.search(r"resuming with changed options: layout: .* 2 ranks = (\d+) rows -> .* 1 rank = \1 rows "
                     r"\(the same global batch\)", third), third[-5000:]
    assert "world 1," in third and "] done" in third
    records = run.metrics()
    steps = [r["train/global_step"] for r in records]
    assert steps == sorted(set(steps)) and {5, 10, 20} <= set(steps) and steps[-1] == 20, steps
    # Packed rows without padding: every step reads the same number of tokens, before and after each resume.
    per_step = records[0]["train/num_input_tokens_seen"] / 5
    assert [r["train/num_input_tokens_seen"] for r in records] == [per_step * s for s in steps], records
    assert all(math.isfinite(r["train/loss"]) for r in records)
    assert (run.out_dir / "export" / "model.safetensors").is_file()
