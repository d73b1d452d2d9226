"""Per-device peak FLOP/s, the denominator of MFU.

GPUs: a table of dense (no sparsity) peaks by device and dtype, from the vendors' data sheets as collected by
torchtitan (`tools/utils.py: get_peak_flops`) and Lightning (`fabric/utilities/throughput.py`). Names vary
("NVIDIA H100" may be SXM or PCIe), so variants are told apart by the name, then by the SM count.
An unknown device gives None and one warning: a wrong default has produced MFU above 500% elsewhere.

CPU: no table can know the machine, so the peak is measured: the best rate of a large GEMM in the training
dtype, run by every rank at once (ranks share the cores), cached per CPU model, thread count and dtype.
"""
from __future__ import annotations

import json
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from train import distributed
from train.distributed import local_world_size

T = 1e12
# dtype keys: fp32 (CUDA cores), tf32, bf16, fp16 — dense tensor-core figures.
GPU_PEAKS: dict[str, dict[str, float]] = {
    "h100-sxm": {"fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T},
    "h100-pcie": {"fp32": 51.2 * T, "tf32": 378 * T, "bf16": 756 * T, "fp16": 756 * T},
    "h100-nvl": {"fp32": 60 * T, "tf32": 417.5 * T, "bf16": 835 * T, "fp16": 835 * T},
    "h200-sxm": {"fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T},
    "h200-nvl": {"fp32": 60 * T, "tf32": 417.5 * T, "bf16": 835 * T, "fp16": 835 * T},
    "gh200": {"fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T},
    "b200": {"tf32": 1100 * T, "bf16": 2250 * T, "fp16": 2250 * T},
    "a100": {"fp32": 19.5 * T, "tf32": 156 * T, "bf16": 312 * T, "fp16": 312 * T},
    "a10g": {"fp32": 31.2 * T, "tf32": 62.5 * T, "bf16": 125 * T, "fp16": 125 * T},
    "a6000": {"fp32": 38.7 * T, "tf32": 77.4 * T, "bf16": 154.8 * T, "fp16": 154.8 * T},
    "l4": {"fp32": 30.3 * T, "tf32": 60 * T, "bf16": 121 * T, "fp16": 121 * T},
    "l40s": {"fp32": 91.6 * T, "tf32": 183 * T, "bf16": 362.05 * T, "fp16": 362.05 * T},
    "t4": {"fp32": 8.1 * T, "fp16": 65 * T},
    "v100-sxm": {"fp32": 15.7 * T, "fp16": 125 * T},
    "v100-pcie": {"fp32": 14 * T, "fp16": 112 * T},
    "rtx3090": {"fp32": 35.6 * T, "tf32": 35.6 * T, "bf16": 71 * T, "fp16": 71 * T},
    "rtx4090": {"fp32": 82.6 * T, "tf32": 82.6 * T, "bf16": 165.2 * T, "fp16": 165.2 * T},
    "mi250x": {"fp32": 47.9 * T, "bf16": 191.5 * T, "fp16": 191.5 * T},  # per GCD (a card has two)
    "mi300x": {"fp32": 163.4 * T, "tf32": 653.7 * T, "bf16": 1307.4 * T, "fp16": 1307.4 * T},
}


def identify_gpu(name: str, sm_count: int = 0, memory_gb: float = 0.0) -> Optional[str]:
    """Map a device name (plus SM count and memory, which tell variants apart) to a GPU_PEAKS key."""
    n = name.lower().replace(" ", "").replace("-", "")
    if "gh200" in n:
        return "gh200"
    if "h200" in n:
        return "h200-nvl" if "nvl" in n else "h200-sxm"
    if "h100" in n:
        if "nvl" in n or memory_gb > 90:
            return "h100-nvl"
        if "pcie" in n:
            return "h100-pcie"
        if "hbm3" in n or "sxm" in n:
            return "h100-sxm"
        # Both 80 GB variants report plain "H100" at times; the SXM part has 132 SMs, PCIe 114.
        return {132: "h100-sxm", 114: "h100-pcie"}.get(sm_count)
    if "b200" in n:
        return "b200"
    if "a100" in n:
        return "a100"
    if "a10g" in n:
        return "a10g"
    if "a6000" in n:
        return "a6000"
    if "l40s" in n:
        return "l40s"
    if n.endswith("l4") or "nvidial4" in n:
        return "l4"
    if "t4" in n and "rtx" not in n:
        return "t4"
    if "v100" in n:
        return "v100-pcie" if "pcie" in n else "v100-sxm"
    if "3090" in n:
        return "rtx3090"
    if "4090" in n:
        return "rtx4090"
    if "mi250" in n:
        return "mi250x"
    if "mi300x" in n or "mi325" in n:
        return "mi300x"
    return None


@dataclass
class PeakFlops:
    flops_per_second: Optional[float]  # per device; None when unknown
    basis: str  # how it was obtained, recorded in the run config


def _effective_fp32_key() -> str:
    # fp32 matmuls run on TF32 tensor cores unless precision is "highest".
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def gpu_peak(dtype: str) -> PeakFlops:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    key = identify_gpu(props.name, props.multi_processor_count, props.total_memory / 2**30)
    dtype_key = _effective_fp32_key() if dtype == "fp32" else dtype
    peak = GPU_PEAKS.get(key, {}).get(dtype_key) if key else None
    if peak is None:
        return PeakFlops(None, f"unknown peak for device {props.name!r} ({props.multi_processor_count} SMs) in {dtype_key}")
    return PeakFlops(peak, f"table: {key} {dtype_key} dense peak ({props.name})")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Measured on this 2-core machine (fp32, GFLOP/s of n³ GEMMs, n = 256 / 512 / 1024 / 2048 / 3072): 1 process × 2
# threads 258 / 260 / 256 / 260 / 244; 2 processes × 1 thread at once, each 162 / 162 / 156 / 159 / 150. The rate
# peaks at different sizes run to run, within 5%: the peak is the best over three sizes, not 1024³ alone.
GEMM_SIZES = (512, 1024, 2048)


def measure_gemm_flops(dtype: torch.dtype, sizes: tuple[int, ...] = GEMM_SIZES, repeats: int = 3) -> float:
    """Best FLOP/s of n³ matmuls over the sizes, on this process's threads (2·n³ FLOPs each)."""
    best_rate = 0.0
    for size in sizes:
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)  # first call pays for allocation and kernel selection
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best_rate = max(best_rate, 2 * size**3 / (time.perf_counter() - start))
    return best_rate


def cpu_peak(dtype: str, cache_dir: Path) -> PeakFlops:
    """Measured CPU GEMM peak, averaged over ranks that ran at once: the best rate this machine has shown.

    Every run measures again (about half a second) and keeps the higher of that and the cached figure. A
    single measurement on a loaded machine comes out several times too low and would then inflate MFU past 100%
    for every later run; a peak only ever rises towards what the hardware does.
    """
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    threads = torch.get_num_threads()
    ranks_on_node = local_world_size()
    key = f"{_cpu_model()}|threads={threads}|ranks_on_node={ranks_on_node}|{dtype}|torch={torch.__version__}"
    cache_file = cache_dir / "cpu_peak_flops.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    distributed.barrier()  # the ranks of a node measure at once, as they will train
    measured = distributed.reduce_values([measure_gemm_flops(torch_dtype)], "mean")[0]
    # The ranks may have read different cache files (one per node): the lowest keeps every rank on one figure.
    cached = distributed.reduce_values([float(cache.get(key) or 0.0)], "min")[0]
    peak = max(measured, cached)
    if peak > float(cache.get(key) or 0.0):
        cache[key] = peak
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(cache_file)
        except OSError as error:
            warnings.warn(f"could not cache the CPU peak in {cache_file}: {error}")
    return PeakFlops(peak, f"measured: best {'/'.join(map(str, GEMM_SIZES))}^3 {dtype} GEMM per rank, {threads} threads, "
                           f"{ranks_on_node} ranks on the node at once ({_cpu_model()}), the highest of this run's "
                           f"{measured / T:.4f} TFLOP/s and the cached best; key {key}")


def device_peak(dtype: str, override_tflops: Optional[float], cache_dir: Path) -> PeakFlops:
    """Collective on CPU: the per-device dense peak of the training dtype."""
    if override_tflops:
        return PeakFlops(override_tflops * T, f"--peak_tflops {override_tflops}")
    if torch.cuda.is_available():
        return gpu_peak(dtype)
    return cpu_peak(dtype, cache_dir)


def describe(peak: PeakFlops) -> dict:
    return asdict(peak)
