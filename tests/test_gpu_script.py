"""benchmarks/gpu.sh: its --smoke run (every step on the CPU, smallest sizes) and its early exit without CUDA."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
STEPS = ("bench", "e2e", "amp-bf16", "layers", "road", "detection", "sanity")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout")


def _env(out: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GPU_SH_SMOKE", "GPU_WHEELS")}
    env.update(OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    return env


@pytest.mark.slow
def test_smoke_run_writes_one_row_per_step(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "--smoke"], env=_env(tmp_path), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = (tmp_path / "gpu-results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| step ")]
    assert [row.split("|")[1].strip() for row in rows] == list(STEPS), table
    assert all(row.split("|")[2].strip() == "ok" for row in rows), table
    assert "failed" not in table and "skipped" not in table
    assert (tmp_path / "gpu-log.txt").stat().st_size > 0


def test_without_cuda_or_smoke_it_stops_early(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    r = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 3
    assert "no CUDA GPU" in r.stderr and "--smoke" in r.stderr
    assert not (tmp_path / "gpu-results.md").exists()
