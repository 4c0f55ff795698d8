"""Smoke test of bench/kernels.py: a tiny run writes its CSV (no timing is asserted, DESIGN.md §5)."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

from t1t2_fast import _extension

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not _extension.AVAILABLE, reason=f"compiled extension not built ({_extension.LOAD_ERROR})")
def test_kernels_bench_quick_run_writes_csv(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "kernels.py"), "--quick", "--sizes", "2e4", "--repeats", "1",
           "--threads", "1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "kernels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"resnet50", "transformer"}
    assert {r["kernel"] for r in rows} == {"T1 sgd", "T1 adam", "T2 sgd", "T2 adam-exact"}
    fused = [r for r in rows if r["impl"] == "t1t2 fused"]
    assert fused and all(float(r["ms"]) > 0 for r in fused)
    assert (tmp_path / "kernels.md").read_text().startswith("T1 / T2 kernels")


def test_distributed_bench_quick_run_counts_bytes(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "distributed.py"), "--widths", "8", "--iters", "2", "--warmup", "1",
           "--batch", "8", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "distributed.csv", newline="") as f:
        rows = {(r["setting"], r["processes"]): r for r in csv.DictReader(f)}
    params = int(rows["penalties", "1"]["params"])
    # per hyper step: 3 per-layer L2 hypergradients + one λ hash per rank, float64; with noise
    # also the float32 validation gradient (DESIGN: noise needs the ranks' mean v)
    assert float(rows["penalties", "2"]["t1t2_bytes_per_hyper_step"]) == 8 * (3 + 2)
    assert float(rows["noise", "2"]["t1t2_bytes_per_hyper_step"]) == 8 * (6 + 2) + 4 * params
    assert float(rows["penalties", "2"]["ddp_bytes_per_step"]) == 4 * params
    assert float(rows["penalties", "1"]["t1t2_bytes_per_hyper_step"]) == 0
