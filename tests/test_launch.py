"""launch/common.sh and launch/probe.sh without GPUs or a second machine: the launcher command line built for a
GPU set (stub python/nvidia-smi/deepspeed/torchrun first on PATH), the refusal to run CPU ranks on GPUs torch
cannot use, and the network interface derived from the kernel's route to MASTER_ADDR (real `ip route get`, on
loopback and on a veth pair between two network namespaces)."""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.launch import REPO_ROOT

PORT = "29555"


def launch(tmp_path: Path, torch_gpus: str, listed_gpus: int = 0, stage_args: tuple = ("--max_steps", "1"),
           **env: str) -> tuple[subprocess.CompletedProcess, list[str], dict]:
    """`launch_stage sft --max_steps 1` with stubs first on PATH (set after common.sh prepends .venv/bin): python
    answers the GPU probe with `torch_gpus` ("fail": torch does not import), nvidia-smi lists `listed_gpus`, and the
    launcher stub records its argv and the variables it was started with. Returns the result, the launcher's
    argv (empty when none started) and those variables."""
    stubs, argv_file, env_file = tmp_path / "bin", tmp_path / "argv", tmp_path / "env"
    stubs.mkdir()
    record = (f'printf "%s\\n" "$(basename "$0")" "$@" > {argv_file}\n'
              f'echo "CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES-<unset>}}" > {env_file}\n'
              f'echo "DS_ACCELERATOR=${{DS_ACCELERATOR-<unset>}}" >> {env_file}\n')
    python = "exit 1" if torch_gpus == "fail" else f"echo {torch_gpus}"
    smi = ('echo "No devices were found"; exit 6' if listed_gpus == 0 else
           f'for i in $(seq 0 {listed_gpus - 1}); do echo "GPU $i: NVIDIA H200 (UUID: GPU-0000000$i)"; done')
    for name, body in (("deepspeed", record), ("torchrun", record), ("python", python), ("nvidia-smi", smi)):
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    full_env = {key: value for key, value in os.environ.items()
                if key not in ("BACKEND", "ZERO_STAGE", "NUM_GPUS", "CUDA_VISIBLE_DEVICES", "ALLOW_CPU",
                               "DS_ACCELERATOR")}
    full_env.update(STUBS=str(stubs), MASTER_PORT=PORT, **env)
    result = subprocess.run(["bash", "-c", 'source launch/common.sh; PATH="$STUBS:$PATH"; launch_stage sft "$@"',
                             "_", *stage_args], cwd=REPO_ROOT, env=full_env, capture_output=True, text=True,
                            timeout=60)
    argv = argv_file.read_text().splitlines() if argv_file.exists() else []
    started_env = dict(line.split("=", 1) for line in env_file.read_text().splitlines()) if env_file.exists() else {}
    return result, argv, started_env


DEEPSPEED_TAIL = ["--log_level", "error", "--master_port", PORT, "train/sft.py", "--deepspeed", "auto", "--max_steps", "1"]


@pytest.mark.parametrize("env,torch_gpus,ranks", [
    ({}, "4", ["--num_gpus", "4"]),
    ({"NUM_GPUS": "2"}, "4", ["--num_gpus", "2"]),
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, "2", ["--include", "localhost:2,3"]),
    ({"CUDA_VISIBLE_DEVICES": "2,3", "NUM_GPUS": "1"}, "2", ["--include", "localhost:2"]),
], ids=["all-gpus", "NUM_GPUS=2", "CVD=2,3", "CVD=2,3-NUM_GPUS=1"])
def test_deepspeed_gets_the_visible_gpus_by_index(tmp_path, env, torch_gpus, ranks):
    """The deepspeed launcher ignores CUDA_VISIBLE_DEVICES beside --num_gpus (runner.py: "ignoring it because one
    or several of --include/--exclude/--num_gpus/--num_nodes cl args were used") and would train on GPUs 0..N-1;
    --include localhost:<ids> (NODE_SPEC=NAME[:SLOT[,SLOT ...]]) names the devices instead."""
    result, argv, started_env = launch(tmp_path, torch_gpus, listed_gpus=4, **env)
    assert result.returncode == 0, result.stderr
    assert argv == ["deepspeed", *ranks, *DEEPSPEED_TAIL]
    assert started_env["DS_ACCELERATOR"] == "<unset>"


@pytest.mark.parametrize("zero_stage,config", [(None, "auto"), ("3", "ds_configs/zero3.json"),
                                               ("2_offload", "ds_configs/zero2_offload.json")])
def test_zero_stage_names_the_config_and_unset_leaves_it_to_the_stage(tmp_path, zero_stage, config):
    """ZERO_STAGE unset passes --deepspeed auto (ZeRO-0 on one rank, ZeRO-2 on more: tests/test_run_dir.py)."""
    result, argv, _ = launch(tmp_path, "2", **({"ZERO_STAGE": zero_stage} if zero_stage else {}))
    assert result.returncode == 0, result.stderr
    assert argv[argv.index("--deepspeed") + 1] == config


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_bad_num_gpus_stops_before_the_launcher(tmp_path, value):
    result, argv, _ = launch(tmp_path, "2", NUM_GPUS=value)
    assert result.returncode == 2, result.stderr
    assert f"NUM_GPUS={value}: must be a whole number >= 1 (ranks on this node), or unset" in result.stderr
    assert argv == []


@pytest.mark.parametrize("stage_args,level", [
    (("--max_steps", "1"), "error"), (("--verbose",), "info"), (("--verbose", "--max_steps", "1"), "info"),
    (("--verbose", "true"), "info"), (("--verbose=1",), "info"), (("--verbose", "false"), "error"),
    (("--verbose=false",), "error")])
def test_the_launchers_own_info_lines_show_only_with_verbose(tmp_path, stage_args, level):
    """The deepspeed launcher logs at INFO by default (its command, world info, each spawn and exit): the run's
    console gets its errors only, unless the stage's --verbose asks for everything."""
    result, argv, _ = launch(tmp_path, "0", stage_args=stage_args)
    assert result.returncode == 0, result.stderr
    assert argv[argv.index("--log_level") + 1] == level


@pytest.mark.parametrize("env,torch_gpus,nproc", [
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, "2", "2"),
    ({"CUDA_VISIBLE_DEVICES": "2,3", "NUM_GPUS": "1"}, "2", "1"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-5e2f6c1a"}, "1", "1"),
], ids=["CVD=2,3", "CVD=2,3-NUM_GPUS=1", "CVD=uuid"])
def test_torchrun_keeps_cuda_visible_devices(tmp_path, env, torch_gpus, nproc):
    """torchrun passes CUDA_VISIBLE_DEVICES on to its ranks (local_elastic_agent.py, the default non-virtual local
    rank), whose LOCAL_RANK counts within it: the variable goes through unchanged, UUIDs included."""
    result, argv, started_env = launch(tmp_path, torch_gpus, listed_gpus=4, BACKEND="fsdp", **env)
    assert result.returncode == 0, result.stderr
    assert argv == ["torchrun", "--nproc_per_node", nproc, "--master_port", PORT, "train/sft.py", "--backend", "fsdp",
                    "--max_steps", "1"]
    assert started_env["CUDA_VISIBLE_DEVICES"] == env["CUDA_VISIBLE_DEVICES"]


@pytest.mark.parametrize("env,torch_gpus,message", [
    ({"CUDA_VISIBLE_DEVICES": "GPU-5e2f6c1a"}, "1",
     "CUDA_VISIBLE_DEVICES=GPU-5e2f6c1a: the deepspeed launcher takes GPU indices (e.g. 2,3), not UUIDs or MIG names; "
     "give indices, or use BACKEND=fsdp (torchrun keeps CUDA_VISIBLE_DEVICES as it is)"),
    ({"CUDA_VISIBLE_DEVICES": "2,x"}, "1", "CUDA_VISIBLE_DEVICES=2,x: the deepspeed launcher takes GPU indices"),
    ({"CUDA_VISIBLE_DEVICES": "2,3", "NUM_GPUS": "3"}, "2",
     "NUM_GPUS=3: torch sees only 2 GPU(s) (CUDA_VISIBLE_DEVICES=2,3); set NUM_GPUS <= 2 or unset it"),
    ({"NUM_GPUS": "5"}, "4", "NUM_GPUS=5: torch sees only 4 GPU(s); set NUM_GPUS <= 4 or unset it"),
], ids=["CVD=uuid", "CVD=2,x", "NUM_GPUS>CVD", "NUM_GPUS>GPUs"])
def test_gpu_sets_the_launcher_cannot_take_are_refused(tmp_path, env, torch_gpus, message):
    result, argv, _ = launch(tmp_path, torch_gpus, listed_gpus=4, **env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert argv == []


@pytest.mark.parametrize("torch_gpus,torch_says", [("0", "torch.cuda.device_count() is 0"),
                                                   ("fail", "'import torch' fails")])
def test_gpus_that_torch_cannot_use_stop_the_launch(tmp_path, torch_gpus, torch_says):
    """nvidia-smi lists GPUs, torch uses none (a CPU-only torch, a driver older than its CUDA): an error naming both,
    not 2 CPU ranks on a GPU machine."""
    result, argv, _ = launch(tmp_path, torch_gpus, listed_gpus=2)
    assert result.returncode == 2
    stub = tmp_path / "bin" / "python"
    assert (f"nvidia-smi lists 2 GPU(s) but torch cannot use them ({torch_says} with {stub}). Install a torch built "
            f"for this machine's CUDA driver") in result.stderr
    assert "or set ALLOW_CPU=1 to run on CPU anyway" in result.stderr
    assert argv == []


def test_allow_cpu_runs_cpu_ranks_beside_unusable_gpus(tmp_path):
    result, argv, started_env = launch(tmp_path, "0", listed_gpus=2, ALLOW_CPU="1")
    assert result.returncode == 0, result.stderr
    assert "ALLOW_CPU=1: running on CPU although nvidia-smi lists 2 GPU(s) (torch.cuda.device_count() is 0)" \
        in result.stderr
    assert argv == ["deepspeed", "--num_gpus", "2", *DEEPSPEED_TAIL]
    assert started_env["DS_ACCELERATOR"] == "cpu"


def test_no_gpu_anywhere_runs_two_cpu_ranks_quietly(tmp_path):
    result, argv, started_env = launch(tmp_path, "0", listed_gpus=0, CUDA_VISIBLE_DEVICES="2,3")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert argv == ["deepspeed", "--num_gpus", "2", *DEEPSPEED_TAIL]
    assert started_env["DS_ACCELERATOR"] == "cpu"


# ----- the network interface towards MASTER_ADDR -----
def select(master: str, netns: str | None = None, path: str | None = None, **env: str) -> tuple[str, str]:
    """select_network_interface in a fresh bash (inside `netns` when given): its log line and what it exported."""
    script = ('source launch/probe.sh; select_network_interface echo "$1"; '
              'echo "GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME-<unset>} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME-<unset>}"')
    full_env = {key: value for key, value in os.environ.items()
                if key not in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    full_env.update(env)
    if path is not None:
        full_env["PATH"] = path
    command = [shutil.which("bash") or "/bin/bash", "-c", script, "_", master]
    if netns:
        command = ["ip", "netns", "exec", netns, *command]
    result = subprocess.run(command, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    line, exported = result.stdout.splitlines()
    return line, exported


def test_loopback_master_is_reached_through_lo():
    line, exported = select("127.0.0.1")
    assert line == ("network: MASTER_ADDR=127.0.0.1 (127.0.0.1) reached through lo (127.0.0.1): GLOO_SOCKET_IFNAME=lo "
                    "(from the route) NCCL_SOCKET_IFNAME=lo (from the route); loopback: right only when every node "
                    "is this host")
    assert exported == "GLOO_SOCKET_IFNAME=lo NCCL_SOCKET_IFNAME=lo"
    assert select("localhost")[0].startswith("network: MASTER_ADDR=localhost (127.0.0.1) reached through lo ")


def test_a_setting_of_the_users_wins():
    line, exported = select("127.0.0.1", GLOO_SOCKET_IFNAME="eth9")
    assert "GLOO_SOCKET_IFNAME=eth9 (set by you) NCCL_SOCKET_IFNAME=lo (from the route)" in line
    assert exported == "GLOO_SOCKET_IFNAME=eth9 NCCL_SOCKET_IFNAME=lo"
    line, exported = select("127.0.0.1", GLOO_SOCKET_IFNAME="eth9", NCCL_SOCKET_IFNAME="^docker,lo")
    assert line == "network: MASTER_ADDR=127.0.0.1; GLOO_SOCKET_IFNAME=eth9 NCCL_SOCKET_IFNAME=^docker,lo (both set by you)"
    assert exported == "GLOO_SOCKET_IFNAME=eth9 NCCL_SOCKET_IFNAME=^docker,lo"


def test_without_ip_nothing_is_chosen_and_the_log_says_what_to_set(tmp_path):
    line, exported = select("10.1.2.3", path=str(tmp_path))  # an empty PATH directory: no `ip`
    assert line == ("network: WARNING: no 'ip' command (iproute2) to find the interface towards MASTER_ADDR=10.1.2.3; "
                    "gloo and NCCL choose from the hostname: set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME to the "
                    "interface on the network between the nodes if start-up fails or hangs")
    assert exported == "GLOO_SOCKET_IFNAME=<unset> NCCL_SOCKET_IFNAME=<unset>"


def _netns_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: creates network namespaces and a veth pair"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    return None


@pytest.fixture
def veth_pair():
    """Namespaces A and B joined by a veth pair (A: 10.251.7.1/24, B: .2), and in A a route to 10.252.0.0/16 via B.
    Nothing changes in this machine's own namespace."""
    reason = _netns_skip_reason()
    if reason:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:6]
    ns_a, ns_b, dev_a, dev_b = f"zsA{tag}", f"zsB{tag}", f"zsa{tag}", f"zsb{tag}"
    created = []
    try:
        for ns in (ns_a, ns_b):
            made = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
            if made.returncode != 0:
                pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
            created.append(ns)
        for command in ([f"link add {dev_a} netns {ns_a} type veth peer name {dev_b} netns {ns_b}"] +
                        [f"-n {ns_a} addr add 10.251.7.1/24 dev {dev_a}", f"-n {ns_b} addr add 10.251.7.2/24 dev {dev_b}",
                         f"-n {ns_a} link set {dev_a} up", f"-n {ns_b} link set {dev_b} up", f"-n {ns_a} link set lo up",
                         f"-n {ns_a} route add 10.252.0.0/16 via 10.251.7.2"]):
            subprocess.run(["ip", *command.split()], check=True, capture_output=True, text=True)
        yield ns_a, dev_a
    finally:
        for ns in created:  # deleting a namespace deletes its end of the pair, and with it the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_the_interface_is_the_one_routing_to_master_not_lo(veth_pair):
    ns, dev = veth_pair
    for master in ("10.251.7.2", "10.252.3.4"):  # on the veth's subnet; behind a gateway on it
        line, exported = select(master, netns=ns)
        assert line == (f"network: MASTER_ADDR={master} ({master}) reached through {dev} (10.251.7.1): "
                        f"GLOO_SOCKET_IFNAME={dev} (from the route) NCCL_SOCKET_IFNAME={dev} (from the route)")
        assert exported == f"GLOO_SOCKET_IFNAME={dev} NCCL_SOCKET_IFNAME={dev}"
    # The master node itself: the kernel routes its own address through lo, the other nodes reach it on the veth.
    line, exported = select("10.251.7.1", netns=ns)
    assert line.startswith(f"network: MASTER_ADDR=10.251.7.1 (10.251.7.1) reached through {dev} (10.251.7.1): ")
    assert exported == f"GLOO_SOCKET_IFNAME={dev} NCCL_SOCKET_IFNAME={dev}"
    assert select("127.0.0.1", netns=ns)[1] == "GLOO_SOCKET_IFNAME=lo NCCL_SOCKET_IFNAME=lo"


def test_no_route_to_master_exports_nothing_and_says_so(veth_pair):
    ns, _ = veth_pair
    line, exported = select("192.0.2.9", netns=ns)  # the namespace has no default route
    assert line.startswith("network: WARNING: no route to MASTER_ADDR=192.0.2.9 (192.0.2.9): ")
    assert "Network is unreachable" in line and line.endswith("if start-up fails or hangs")
    assert exported == "GLOO_SOCKET_IFNAME=<unset> NCCL_SOCKET_IFNAME=<unset>"
