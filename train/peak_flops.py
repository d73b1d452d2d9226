"""Per-device peaks: dense FLOP/s (the denominator of MFU) and memory bandwidth (of MBU).

GPUs: a table of dense (no sparsity) peaks by device and dtype and of peak DRAM bandwidth, from the vendors' data
sheets (torchtitan's `tools/utils.py: get_peak_flops` and Lightning's `fabric/utilities/throughput.py` collect some).
Names vary, so variants are told apart by the name first, then by the SM count, memory size only as a last resort.
A MIG slice gets its share of the whole GPU: the compute peak scaled by its SMs, the bandwidth by its memory slices.
An unknown device gives None and one warning: a wrong default has produced MFU above 500% elsewhere.

CPU: no table can know the machine, so the peaks are measured: the best rate of a large GEMM in the training dtype
and STREAM's copy and add, run by every rank at once (ranks share the cores and the memory bus), cached per CPU
model, thread count and rank count.
"""
from __future__ import annotations

import json
import os
import platform
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from train import distributed
from train.config import REPO_ROOT
from train.distributed import local_world_size

T = 1e12  # FLOP/s per TFLOP/s
TB = 1e12  # bytes/s per TB/s
GB = 1e9  # bytes/s per GB/s


@dataclass(frozen=True)
class GpuSpec:
    """One GPU product's data-sheet figures."""
    peaks: dict[str, float]  # dense FLOP/s by dtype key: fp32 (CUDA cores), tf32, bf16, fp16 (tensor cores)
    bandwidth: Optional[float]  # peak DRAM/HBM bytes/s; None where no data sheet gives it
    sms: Optional[int] = None  # SMs of the whole GPU, for MIG slices (MIG-capable parts only)
    memory_gib: Optional[float] = None  # memory of the whole GPU, for MIG slices


# Dense figures: the data sheets' tensor-core figures "with sparsity" halved.
_H100_SXM = {"fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T}
_H100_NVL = {"fp32": 60 * T, "tf32": 417.5 * T, "bf16": 835 * T, "fp16": 835 * T}
_A100 = {"fp32": 19.5 * T, "tf32": 156 * T, "bf16": 312 * T, "fp16": 312 * T}
_A10 = {"fp32": 31.2 * T, "tf32": 62.5 * T, "bf16": 125 * T, "fp16": 125 * T}
_MI300 = {"fp32": 163.4 * T, "tf32": 653.7 * T, "bf16": 1307.4 * T, "fp16": 1307.4 * T}
GPUS: dict[str, GpuSpec] = {
    # H100 / H200 / GH200 data sheets and the H100 white paper (SMs: SXM 132, PCIe 114). The H800 and A800 (export
    # parts) have the H100's and A100's compute and memory; they differ in FP64 and NVLink only.
    "h100-sxm": GpuSpec(_H100_SXM, 3.35 * TB, 132, 80),
    "h100-sxm-94gb": GpuSpec(_H100_SXM, None, 132, 94),  # no data sheet gives this variant's bandwidth
    "h100-pcie": GpuSpec({"fp32": 51.2 * T, "tf32": 378 * T, "bf16": 756 * T, "fp16": 756 * T}, 2.0 * TB, 114, 80),
    "h100-nvl": GpuSpec(_H100_NVL, 3.9 * TB, 132, 94),
    "h200-sxm": GpuSpec(_H100_SXM, 4.8 * TB, 132, 141),
    "h200-nvl": GpuSpec(_H100_NVL, 4.8 * TB, 132, 141),
    "gh200": GpuSpec(_H100_SXM, 4.0 * TB, 132, 96),  # 96 GB HBM3
    "gh200-144gb": GpuSpec(_H100_SXM, 4.9 * TB, 132, 144),  # 144 GB HBM3e
    # nvidia.com's GB200 NVL72 and HGX B200 tables, per GPU: FP16/BF16 5 and 4.5 PFLOPS sparse, TF32 2.5 and 2.2
    # sparse, FP32 80 and 75 TFLOPS, 186 GB at 8 TB/s and 180 GB at 7.7 TB/s. No data sheet gives their SM counts.
    "gb200": GpuSpec({"fp32": 80 * T, "tf32": 1250 * T, "bf16": 2500 * T, "fp16": 2500 * T}, 8.0 * TB, None, 186),
    "b200": GpuSpec({"fp32": 75 * T, "tf32": 1100 * T, "bf16": 2250 * T, "fp16": 2250 * T}, 7.7 * TB, None, 180),
    # A100 data sheet: one compute peak; 1,555 GB/s (40 GB), 2,039 (80 GB SXM), 1,935 (80 GB PCIe). 108 SMs.
    "a100-40gb": GpuSpec(_A100, 1555 * GB, 108, 40),
    "a100-80gb-sxm": GpuSpec(_A100, 2039 * GB, 108, 80),
    "a100-80gb-pcie": GpuSpec(_A100, 1935 * GB, 108, 80),
    # The A30, A10, A40, RTX A6000, L4, L40, L40S, T4 and V100 data sheets (A30: 3,584 CUDA cores, 64 an SM).
    "a30": GpuSpec({"fp32": 10.3 * T, "tf32": 82 * T, "bf16": 165 * T, "fp16": 165 * T}, 933 * GB, 56, 24),
    "a10": GpuSpec(_A10, 600 * GB),
    "a10g": GpuSpec(_A10, None),  # AWS's A10 variant: compute as Lightning has it (the A10's); bandwidth unpublished
    "a40": GpuSpec({"fp32": 37.4 * T, "tf32": 74.8 * T, "bf16": 149.7 * T, "fp16": 149.7 * T}, 696 * GB),
    "a6000": GpuSpec({"fp32": 38.7 * T, "tf32": 77.4 * T, "bf16": 154.8 * T, "fp16": 154.8 * T}, 768 * GB),
    "l4": GpuSpec({"fp32": 30.3 * T, "tf32": 60 * T, "bf16": 121 * T, "fp16": 121 * T}, 300 * GB),
    "l40": GpuSpec({"fp32": 90.5 * T, "tf32": 90.5 * T, "bf16": 181.05 * T, "fp16": 181.05 * T}, 864 * GB),
    "l40s": GpuSpec({"fp32": 91.6 * T, "tf32": 183 * T, "bf16": 362.05 * T, "fp16": 362.05 * T}, 864 * GB),
    "t4": GpuSpec({"fp32": 8.1 * T, "fp16": 65 * T}, 320 * GB),
    "v100-sxm": GpuSpec({"fp32": 15.7 * T, "fp16": 125 * T}, 900 * GB),
    "v100-pcie": GpuSpec({"fp32": 14 * T, "fp16": 112 * T}, 900 * GB),
    "v100s-pcie": GpuSpec({"fp32": 16.4 * T, "fp16": 130 * T}, 1134 * GB),
    # GA102 and Ada white papers: FP16/BF16 tensor with FP32 accumulate (the rate of a bf16 matmul).
    "rtx3090": GpuSpec({"fp32": 35.6 * T, "tf32": 35.6 * T, "bf16": 71 * T, "fp16": 71 * T}, 936 * GB),
    "rtx4090": GpuSpec({"fp32": 82.6 * T, "tf32": 82.6 * T, "bf16": 165.2 * T, "fp16": 165.2 * T}, 1008 * GB),
    # AMD Instinct data sheets (FP32 matrix). An MI250X is two devices (GCDs, 110 CUs each): half the card's figures.
    "mi250x": GpuSpec({"fp32": 47.9 * T, "bf16": 191.5 * T, "fp16": 191.5 * T}, 1.6 * TB),
    "mi300x": GpuSpec(_MI300, 5.3 * TB),
    "mi325x": GpuSpec(_MI300, 6.0 * TB),
}
# One word of the name is enough for these.
_BY_WORD = {"gb200": "gb200", "b200": "b200", "a30": "a30", "a10": "a10", "a10g": "a10g", "a40": "a40",
            "a6000": "a6000", "l4": "l4", "l40": "l40", "l40s": "l40s", "t4": "t4", "v100s": "v100s-pcie",
            "mi300x": "mi300x", "mi325x": "mi325x"}


def identify_gpu(name: str, sm_count: int = 0, memory_gib: float = 0.0) -> Optional[str]:
    """The GPUS key of a device name as CUDA reports it; the SM count, then the memory, only where the name is
    ambiguous. A MIG slice is named after its GPU plus " MIG <profile>"; its SMs and memory, the slice's, are unused."""
    base, mig, _ = name.partition(" MIG ")
    if mig:
        sm_count, memory_gib = 0, 0.0
    words = set(re.split(r"[\s/_-]+", base.lower()))
    for word, key in _BY_WORD.items():
        if word in words:
            return key
    if "gh200" in words:
        return "gh200-144gb" if words & {"144g", "144gb", "hbm3e"} or memory_gib > 100 else "gh200"
    if "h200" in words:
        return "h200-nvl" if "nvl" in words else "h200-sxm"
    if words & {"h100", "h800"}:
        if "nvl" in words:
            return "h100-nvl"
        if words & {"pcie", "hbm2e"}:
            return "h100-pcie"
        if "94gb" in words:
            return "h100-sxm-94gb"
        if words & {"sxm", "sxm5", "hbm3"}:
            return "h100-sxm"
        # A bare "H100": the SXM part has 132 SMs, PCIe 114; the NVL (132 SMs, 94 GB) names itself.
        if sm_count == 132:
            return "h100-sxm-94gb" if memory_gib > 90 else "h100-sxm"
        return "h100-pcie" if sm_count == 114 else None
    if words & {"a100", "a800"}:
        if "40gb" in words or ("80gb" not in words and memory_gib <= 60):
            return "a100-40gb"
        return "a100-80gb-pcie" if "pcie" in words else "a100-80gb-sxm"
    if "v100" in words:
        return "v100-pcie" if "pcie" in words else "v100-sxm"
    if not words & {"ti", "d"}:  # the 3090 Ti and 4090 D have other peaks
        if "3090" in words:
            return "rtx3090"
        if "4090" in words:
            return "rtx4090"
    if "mi250x" in words and ("mi250" not in words or sm_count == 110):  # "MI250X/MI250" covers both parts
        return "mi250x"
    return None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned and distributed.is_main():
        _warned.add(message)
        warnings.warn(message)


def _identify(props) -> tuple[Optional[str], Optional[float], Optional[float]]:
    """A CUDA device's GPUS key and the share of that GPU it has, of SMs and of memory bandwidth: (key, 1, 1) for a
    whole GPU; for a MIG slice, its SMs ÷ the GPU's and its memory in eighths (NVIDIA's MIG guide: a memory slice is
    an eighth of the memory with its controllers and bandwidth; CUDA reports a little less than the nominal size).
    A share the table cannot give is None."""
    memory_gib = props.total_memory / 2**30
    key = identify_gpu(props.name, props.multi_processor_count, memory_gib)
    if key is None or " MIG " not in props.name:
        return key, 1.0, 1.0
    spec = GPUS[key]
    sm_share = props.multi_processor_count / spec.sms if spec.sms else None
    memory_share = max(1, round(8 * memory_gib / spec.memory_gib)) / 8 if spec.memory_gib else None
    return key, sm_share, memory_share


@dataclass
class PeakFlops:
    flops_per_second: Optional[float]  # per device; None when unknown
    basis: str  # how it was obtained, recorded in the run config


def _effective_fp32_key() -> str:
    # fp32 matmuls run on TF32 tensor cores unless precision is "highest".
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def gpu_peak(dtype: str) -> PeakFlops:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    key, sm_share, _ = _identify(props)
    dtype_key = _effective_fp32_key() if dtype == "fp32" else dtype
    peak = GPUS[key].peaks.get(dtype_key) if key else None
    if peak is None or sm_share is None:
        basis = f"unknown peak for device {props.name!r} ({props.multi_processor_count} SMs) in {dtype_key}"
        _warn_once(f"{basis}: MFU is logged as null (set --peak_tflops)")
        return PeakFlops(None, basis)
    mig = f", × {props.multi_processor_count}/{GPUS[key].sms} SMs (MIG slice)" if sm_share != 1 else ""
    return PeakFlops(peak * sm_share, f"table: {key} {dtype_key} dense peak ({props.name}){mig}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _measured_best(cache_file: Path, what: str, measure: Callable[[], float]) -> tuple[float, float, str]:
    """Collective: `measure()` run by the node's ranks at once and averaged over ranks, and the higher of that and
    the best cached for this machine, thread count and rank count: (peak, this run's measurement, cache key).

    A single measurement on a loaded machine comes out several times too low and would then inflate MFU (MBU) past
    100% for every later run; a peak only ever rises towards what the hardware does.
    """
    key = (f"{_cpu_model()}|threads={torch.get_num_threads()}|ranks_on_node={local_world_size()}|{what}"
           f"|torch={torch.__version__}")
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    distributed.barrier()  # the ranks of a node measure at once, as they will train
    measured = distributed.reduce_values([measure()], "mean")[0]
    # The ranks may have read different cache files (one per node): the lowest keeps every rank on one figure.
    cached = distributed.reduce_values([float(cache.get(key) or 0.0)], "min")[0]
    peak = max(measured, cached)
    if peak > float(cache.get(key) or 0.0):
        cache[key] = peak
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(cache_file)
        except OSError as error:
            warnings.warn(f"could not cache the CPU peak in {cache_file}: {error}")
    return peak, measured, key


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
    Every run measures again (about half a second) and keeps the higher of that and the cached figure."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    peak, measured, key = _measured_best(cache_dir / "cpu_peak_flops.json", dtype,
                                         lambda: measure_gemm_flops(torch_dtype))
    return PeakFlops(peak, f"measured: best {'/'.join(map(str, GEMM_SIZES))}^3 {dtype} GEMM per rank, "
                           f"{torch.get_num_threads()} threads, {local_world_size()} ranks on the node at once "
                           f"({_cpu_model()}), the highest of this run's {measured / T:.4f} TFLOP/s and the cached "
                           f"best; key {key}")


# Measured on this 2-core machine (260 MiB L3; GB/s a process, best of copy and add, arrays of 16 / 32 / 64 / 128 / 256
# / 512 MiB): 1 process × 1 thread 24 / 12 / 12 / 12 / 12 / 11; 1 × 2 threads 6 / 8 / 9 / 12 / 10 / 11; 2 processes
# × 1 thread at once, each 4–10 / 4–5 / 4 / 3–4 / 3–4 / 3–4 (noisy: other jobs share the cores). Below 32 MiB
# the cache counts. Shortcut: 64 MiB arrays (0.3 s a start, 0.6 s for 2 ranks), not STREAM's 4× the last-level cache
# (1 GiB here: seconds a start); where a cache holds them the peak comes out high and MBU errs low, never past 100%.
STREAM_MIB = 64


def measure_memory_bandwidth(mib: int = STREAM_MIB, repeats: int = 3) -> float:
    """Best bytes/s of STREAM's Copy (c = a) and Add (c = a + b) over fp32 arrays of `mib` MiB, on this process's
    threads, counting the bytes read and written as STREAM does (2 and 3 arrays a pass)."""
    n = mib * 2**20 // 4
    a, b, c = torch.ones(n), torch.ones(n), torch.empty(n)
    best_rate = 0.0
    for arrays, kernel in ((2, lambda: c.copy_(a)), (3, lambda: torch.add(a, b, out=c))):
        kernel()  # the first pass pays for c's page faults
        for _ in range(repeats):
            start = time.perf_counter()
            kernel()
            best_rate = max(best_rate, arrays * 4 * n / (time.perf_counter() - start))
    return best_rate


def peak_memory_bandwidth(device: torch.device, override_gb_per_s: Optional[float] = None,
                          cache_dir: Path = REPO_ROOT / ".cache") -> Optional[float]:
    """Peak memory bandwidth of `device` in bytes/s, the denominator of MBU; None and one warning when unknown.

    GPU: the data sheet's figure (a MIG slice: its memory slices' share). CPU: measured like the GEMM peak, so
    collective: every rank calls it at once, once a run. `override_gb_per_s` (GB/s, 10⁹ bytes) replaces either.
    """
    if override_gb_per_s:
        return override_gb_per_s * GB
    if device.type == "cpu":
        return _measured_best(cache_dir / "cpu_peak_bandwidth.json", f"stream_{STREAM_MIB}MiB",
                              measure_memory_bandwidth)[0]
    props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    key, _, memory_share = _identify(props) if props else (None, None, None)
    bandwidth = GPUS[key].bandwidth if key else None
    if bandwidth is None or memory_share is None:
        _warn_once(f"unknown peak memory bandwidth for device {props.name if props else device!r}: MBU is logged "
                   f"as null")
        return None
    return bandwidth * memory_share


def device_peak(dtype: str, override_tflops: Optional[float], cache_dir: Path) -> PeakFlops:
    """Collective on CPU: the per-device dense peak of the training dtype."""
    if override_tflops:
        return PeakFlops(override_tflops * T, f"--peak_tflops {override_tflops}")
    if torch.cuda.is_available():
        return gpu_peak(dtype)
    return cpu_peak(dtype, cache_dir)


def describe(peak: PeakFlops) -> dict:
    return asdict(peak)
