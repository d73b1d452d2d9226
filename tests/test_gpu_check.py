"""bench/gpu_check.py, the one command for a first GPU run, rehearsed on CPU: its dry run takes every step it can
without CUDA (device report, real stage runs, the curve check, the table), and a curve that drifts fails it."""
from __future__ import annotations

import subprocess
import sys

from bench import gpu_check
from tests.launch import REPO_ROOT


def test_the_dry_run_passes_end_to_end():
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry_run", "--stages", "pretrain",
                             "--backends", "zero2,fsdp"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "device: CPU (no CUDA device): a dry run" in out and "attention (attn_impl auto" in out
    rows = [line for line in out.splitlines() if line.startswith("| pretrain | tiny |")]
    assert [row.split("|")[3].strip() for row in rows] == ["zero2", "fsdp"]
    assert all(row.split("|")[5].strip().endswith("%") for row in rows)  # each compared with ZeRO-2's curve
    assert out.rstrip().endswith("gpu check: passed")


def test_a_curve_beyond_the_tolerance_or_a_failed_run_fails_the_check(monkeypatch, capsys):
    curves = {"zero2": [8.0, 7.0, 6.0], "zero3": [8.0, 7.0, 6.0 * (1 + 2 * gpu_check.LOSS_TOLERANCE)]}

    def fake_run(stage, preset, backend, args, out_dir):
        if backend == "fsdp":
            return {"error": "exit 1: CUDA out of memory", "seconds": 1.0}
        return {"loss": curves[backend], "tokens_per_second": 1.0, "mfu_percent": 1.0, "peak_memory_gb": 1.0,
                "peak_reserved_gb": None, "seconds": 1.0}

    monkeypatch.setattr(gpu_check, "run", fake_run)
    monkeypatch.setattr(gpu_check, "describe_device", lambda dtype: [])
    assert gpu_check.main(["--dry_run", "--stages", "pretrain"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: pretrain tiny zero3: loss curve differs from zero2's by 4.00% (tolerance 2%)" in out
    assert "FAILED: pretrain tiny fsdp: exit 1: CUDA out of memory" in out
    assert out.rstrip().endswith("gpu check: FAILED")


def test_without_a_gpu_it_says_to_use_the_dry_run(capsys):
    assert gpu_check.main([]) == 2
    assert "use --dry_run for the CPU rehearsal" in capsys.readouterr().err
