"""Process-group set-up for one process (`python train/sft.py`) or many (deepspeed launcher, torchrun)."""
from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_world_size() -> int:
    """Ranks on this node: torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "WORLD_SIZE"):
        if key in os.environ:
            return max(1, int(os.environ[key]))
    return 1


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _prefer_environment_tools() -> None:
    """Put this interpreter's bin directory first on PATH, so DeepSpeed's op builds use the environment's ninja.

    A system ninja of another version (Debian's 1.11 beside the venv's 1.13) reads the other's build log as
    stale: runs that alternate between them (a launch script that puts .venv/bin on PATH, then a bare
    `deepspeed` call) rebuilt the CPU shared-memory op, about 3 minutes on 2 cores, every time.
    """
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir


def init_distributed() -> None:
    """Join (or create) the process group DeepSpeed will use.

    Without a launcher there is no RANK/WORLD_SIZE and DeepSpeed would try MPI discovery (and fail without
    mpi4py), so a lone process declares itself rank 0 of 1.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))  # a port the user chose is kept
    if device_type() == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Ranks sharing a CPU would oversubscribe its cores with torch's default of one thread per core.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size()))
    _prefer_environment_tools()
    import deepspeed  # after DS_ACCELERATOR is set: the accelerator is chosen at import

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device_type() == "cuda" else "gloo")
        _unlink_shm_allreduce_buffer()
    if device_type() == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    """Destroy the process groups before interpreter exit does, in whatever order: a CPU rank of several gloo groups
    (ZeRO-3, FSDP's mesh) once aborted (std::terminate) at about the time it exits, and its launcher then killed
    the rank still writing its results. The run's last collective: every rank calls it."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def _unlink_shm_allreduce_buffer() -> None:
    """Remove the name of DeepSpeed's CPU shared-memory all-reduce buffer once every rank has mapped it.

    Under the deepspeed launcher on CPU, each rank creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>
    _<rank> (about 70 MB) and never unlinks it, so every run leaves its buffers in RAM until reboot. Unlinking
    after the barrier keeps the mappings valid for this run and frees the memory when its processes exit,
    however they exit.
    """
    if device_type() != "cpu":
        return
    barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass  # no shared-memory path (ranks on several nodes, a lone process, or torchrun)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def device() -> torch.device:
    if device_type() == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def synchronize() -> None:
    """Wait for queued device work, so a clock read after it measures finished work."""
    if device_type() == "cuda":
        torch.cuda.synchronize()


# ----- cross-rank reductions: every collective the training code runs on the default group -----
def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over every rank, in place (no-op on one rank)."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def reduce_values(values: list[float], op: str = "sum") -> list[float]:
    """Host numbers reduced over the ranks (sum, mean, min or max), in one collective."""
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                                "max": dist.ReduceOp.MAX}[op])
    return [value / world_size() if op == "mean" else value for value in tensor.tolist()]


def gather_rows(vector: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D `vector` as the rows of a [world, K] tensor (one all-gather)."""
    if world_size() == 1:
        return vector.unsqueeze(0)
    gathered = [torch.empty_like(vector) for _ in range(world_size())]
    dist.all_gather(gathered, vector)
    return torch.stack(gathered)


def gather_objects(value) -> list:
    """Every rank's picklable `value`, in rank order (one all-gather)."""
    if world_size() == 1:
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values
