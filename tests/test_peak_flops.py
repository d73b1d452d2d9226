"""Device peaks: GPUs told apart from the names CUDA reports (CUDA faked at torch.cuda), the CPU's measured."""
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from train import peak_flops
from train.peak_flops import device_peak, identify_gpu

# (name as torch.cuda.get_device_name reports it, SMs and memory (GiB) as get_device_properties reports them,
#  dense data-sheet TFLOP/s by dtype ("tf32": fp32 matmuls at precision "high"), data-sheet bandwidth in GB/s).
# A MIG slice reports its own SMs and memory: the whole GPU's peak × its SMs ÷ the GPU's, and the bandwidth × its
# memory slices (eighths).
DEVICES = [
    ("NVIDIA H100 80GB HBM3", 132, 79.1, {"bf16": 989.4, "tf32": 494.7, "fp32": 67}, 3350),
    ("NVIDIA H100 PCIe", 114, 79.6, {"bf16": 756, "tf32": 378, "fp32": 51.2}, 2000),
    ("NVIDIA H100", 114, 79.6, {"bf16": 756}, 2000),
    ("NVIDIA H100", 132, 79.1, {"bf16": 989.4}, 3350),
    ("NVIDIA H100 NVL", 132, 93.1, {"bf16": 835, "tf32": 417.5, "fp32": 60}, 3900),
    ("NVIDIA H100 SXM5 94GB", 132, 93.1, {"bf16": 989.4}, None),  # was taken for an NVL (memory > 90 GB)
    ("NVIDIA H800", 132, 79.1, {"bf16": 989.4}, 3350),
    ("NVIDIA H800 PCIe", 114, 79.6, {"bf16": 756}, 2000),
    ("NVIDIA H200", 132, 139.8, {"bf16": 989.4, "fp32": 67}, 4800),
    ("NVIDIA H200 NVL", 132, 139.8, {"bf16": 835}, 4800),
    ("NVIDIA GH200 480GB", 132, 94.5, {"bf16": 989.4}, 4000),
    ("NVIDIA GH200 144G HBM3e", 132, 142.0, {"bf16": 989.4}, 4900),
    ("NVIDIA B200", 148, 178.4, {"bf16": 2250, "tf32": 1100, "fp32": 75}, 7700),
    ("NVIDIA GB200", 152, 184.0, {"bf16": 2500, "tf32": 1250, "fp32": 80}, 8000),  # was taken for a B200
    ("NVIDIA A100-SXM4-80GB", 108, 79.2, {"bf16": 312, "tf32": 156, "fp32": 19.5}, 2039),
    ("NVIDIA A100-SXM4-40GB", 108, 39.4, {"bf16": 312}, 1555),
    ("NVIDIA A100-PCIE-40GB", 108, 39.4, {"bf16": 312}, 1555),
    ("NVIDIA A100 80GB PCIe", 108, 79.2, {"bf16": 312}, 1935),
    ("NVIDIA A800-SXM4-80GB", 108, 79.2, {"bf16": 312}, 2039),
    ("NVIDIA A30", 56, 23.5, {"bf16": 165, "tf32": 82, "fp32": 10.3}, 933),
    ("NVIDIA A10", 72, 22.1, {"bf16": 125, "tf32": 62.5, "fp32": 31.2}, 600),  # was unknown
    ("NVIDIA A10G", 80, 22.0, {"bf16": 125}, None),
    ("NVIDIA A40", 84, 44.4, {"bf16": 149.7, "tf32": 74.8, "fp32": 37.4}, 696),
    ("NVIDIA RTX A6000", 84, 47.5, {"bf16": 154.8}, 768),
    ("NVIDIA L4", 58, 22.0, {"bf16": 121, "tf32": 60, "fp32": 30.3}, 300),
    ("NVIDIA L40", 142, 44.4, {"bf16": 181.05, "tf32": 90.5, "fp32": 90.5}, 864),  # was taken for an L4
    ("NVIDIA L40S", 142, 44.4, {"bf16": 362.05, "tf32": 183, "fp32": 91.6}, 864),
    ("Tesla T4", 40, 14.6, {"fp16": 65, "fp32": 8.1, "bf16": None}, 320),  # no bf16 tensor cores
    ("Tesla V100-SXM2-32GB", 80, 31.7, {"fp16": 125, "fp32": 15.7}, 900),
    ("Tesla V100-PCIE-16GB", 80, 15.8, {"fp16": 112, "fp32": 14}, 900),
    ("Tesla V100S-PCIE-32GB", 80, 31.7, {"fp16": 130, "fp32": 16.4}, 1134),  # was taken for a V100 PCIe
    ("NVIDIA GeForce RTX 4090", 128, 23.6, {"bf16": 165.2, "tf32": 82.6}, 1008),
    ("NVIDIA GeForce RTX 3090", 82, 23.7, {"bf16": 71, "tf32": 35.6}, 936),
    ("AMD Instinct MI300X", 304, 191.5, {"bf16": 1307.4, "tf32": 653.7}, 5300),
    ("AMD Instinct MI325X", 304, 255.9, {"bf16": 1307.4}, 6000),
    ("AMD Instinct MI250X/MI250", 110, 64.0, {"bf16": 191.5}, 1600),  # one GCD of the card
    ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", 42, 19.5, {"bf16": 312 * 42 / 108}, 1555 * 4 / 8),
    ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", 14, 4.75, {"bf16": 312 * 14 / 108}, 1555 / 8),
    ("NVIDIA A100-SXM4-80GB MIG 7g.80gb", 98, 79.0, {"bf16": 312 * 98 / 108}, 2039),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 16, 9.75, {"bf16": 989.4 * 16 / 132}, 3350 / 8),
    ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", 60, 39.25, {"bf16": 989.4 * 60 / 132}, 3350 / 2),
    ("NVIDIA H200 MIG 1g.18gb", 16, 16.5, {"bf16": 989.4 * 16 / 132}, 4800 / 8),
    ("NVIDIA A30 MIG 1g.6gb", 14, 5.75, {"bf16": 165 * 14 / 56}, 933 / 4),
]


@pytest.fixture
def fake_cuda(monkeypatch):
    """Replace torch.cuda's device queries with one device of this name, SM count and memory."""
    def install(name: str, sms: int, memory_gib: float) -> None:
        props = SimpleNamespace(name=name, multi_processor_count=sms, total_memory=int(memory_gib * 2**30))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    return install


def flops_peak(dtype: str, tmp_path) -> float:
    """device_peak of a dtype, "tf32" meaning fp32 at matmul precision "high"."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
    try:
        return device_peak("fp32" if dtype == "tf32" else dtype, None, tmp_path).flops_per_second
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("name,sms,memory_gib,tflops,gb_per_s", DEVICES, ids=[d[0] + f" {d[1]}" for d in DEVICES])
def test_devices_get_their_data_sheet_flops(fake_cuda, tmp_path, name, sms, memory_gib, tflops, gb_per_s):
    fake_cuda(name, sms, memory_gib)
    for dtype, expected in tflops.items():
        assert flops_peak(dtype, tmp_path) == (None if expected is None else pytest.approx(expected * 1e12)), dtype


@pytest.mark.parametrize("name,sms,memory_gib,tflops,gb_per_s", DEVICES, ids=[d[0] + f" {d[1]}" for d in DEVICES])
def test_devices_get_their_data_sheet_bandwidth(fake_cuda, name, sms, memory_gib, tflops, gb_per_s):
    fake_cuda(name, sms, memory_gib)
    bandwidth = peak_flops.peak_memory_bandwidth(torch.device("cuda", 0))
    assert bandwidth == (None if gb_per_s is None else pytest.approx(gb_per_s * 1e9))


@pytest.mark.parametrize("name,sms,memory_gib", [
    ("Some Future Accelerator X1", 100, 64), ("NVIDIA H100", 120, 80),  # an SM count no variant has
    ("NVIDIA GeForce RTX 4090 D", 114, 23.6), ("NVIDIA GB200 MIG 1g.23gb", 19, 22.5)])  # no GB200 SM count
def test_unknown_device_is_none_and_one_warning(fake_cuda, monkeypatch, tmp_path, name, sms, memory_gib):
    fake_cuda(name, sms, memory_gib)
    monkeypatch.setattr(peak_flops, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [device_peak("bf16", None, tmp_path).flops_per_second for _ in range(3)] == [None] * 3
    assert len(caught) == 1 and name in str(caught[0].message)


def test_unknown_bandwidth_is_none_and_one_warning(fake_cuda, monkeypatch):
    fake_cuda("Some Future Accelerator X1", 100, 64)
    monkeypatch.setattr(peak_flops, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [peak_flops.peak_memory_bandwidth(torch.device("cuda", 0)) for _ in range(3)] == [None] * 3
    assert len(caught) == 1 and "Some Future Accelerator X1" in str(caught[0].message)


def test_overrides_replace_the_table(fake_cuda, tmp_path):
    fake_cuda("NVIDIA H100 80GB HBM3", 132, 79.1)
    assert device_peak("bf16", 500.0, tmp_path).flops_per_second == 500e12
    assert peak_flops.peak_memory_bandwidth(torch.device("cuda", 0), override_gb_per_s=2500.0) == 2500e9
    assert peak_flops.peak_memory_bandwidth(torch.device("cpu"), override_gb_per_s=12.5) == 12.5e9


def test_names_alone_decide_where_they_can():
    # A MIG slice's SMs and memory are the slice's: its variant comes from the name.
    assert identify_gpu("NVIDIA A100-SXM4-80GB MIG 1g.10gb", 14, 9.5) == "a100-80gb-sxm"
    assert identify_gpu("NVIDIA H100 NVL", 132, 93.1) == "h100-nvl"
    assert identify_gpu("NVIDIA H100", 132, 93.1) == "h100-sxm-94gb"  # the NVL names itself


def numpy_copy_rate(src: np.ndarray, dst: np.ndarray) -> float:
    """Bytes/s of one numpy copy, read and write counted as STREAM does."""
    start = time.perf_counter()
    np.copyto(dst, src)
    return 2 * src.nbytes / (time.perf_counter() - start)


def test_cpu_bandwidth_agrees_with_a_numpy_copy():
    src = np.ones(peak_flops.STREAM_MIB * 2**20 // 4, dtype=np.float32)
    dst = np.zeros_like(src)
    torch_best = numpy_best = 0.0
    for _ in range(3):  # interleaved: both see the same load from other processes
        torch_best = max(torch_best, peak_flops.measure_memory_bandwidth())
        numpy_best = max(numpy_best, *(numpy_copy_rate(src, dst) for _ in range(5)))
    # The same traffic counted the same way: a byte count off by 2× (read only, or write-allocate) falls outside.
    assert 0.6 < torch_best / numpy_best < 1.7, (torch_best / 1e9, numpy_best / 1e9)


def test_cpu_bandwidth_is_the_best_cached(monkeypatch, tmp_path):
    measured = peak_flops.peak_memory_bandwidth(torch.device("cpu"), cache_dir=tmp_path)
    assert measured > 1e9  # any memory system of this century
    monkeypatch.setattr(peak_flops, "measure_memory_bandwidth", lambda: 1.0)  # a run on a loaded machine
    assert peak_flops.peak_memory_bandwidth(torch.device("cpu"), cache_dir=tmp_path) == measured
    monkeypatch.setattr(peak_flops, "measure_memory_bandwidth", lambda: 2 * measured)
    assert peak_flops.peak_memory_bandwidth(torch.device("cpu"), cache_dir=tmp_path) == 2 * measured
