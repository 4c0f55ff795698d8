"""Smoke test of bench/kernels.py: a tiny run writes its CSV (no timing is asserted: timings depend on the machine)."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

from t1t2_fast import _extension

ROOT = Path(__file__).resolve().parents[2]


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
    # also the float32 validation gradient (noise needs the ranks' mean v)
    assert float(rows["penalties", "2"]["t1t2_bytes_per_hyper_step"]) == 8 * (3 + 2)
    assert float(rows["noise", "2"]["t1t2_bytes_per_hyper_step"]) == 8 * (6 + 2) + 4 * params
    assert float(rows["penalties", "2"]["ddp_bytes_per_step"]) == 4 * params
    assert float(rows["penalties", "1"]["t1t2_bytes_per_hyper_step"]) == 0


def test_long_run_bench_quick_run_writes_csv_table_and_plot(tmp_path):
    """bench/long_run.py at tiny size: rows at 0, every --every iterations and the last, the verdict
    line, and a PNG (the memory figures are reported, not asserted)."""
    cmd = [sys.executable, str(ROOT / "bench" / "long_run.py"), "--iters", "12", "--every", "5", "--model", "mlp8",
           "--batch", "4", "--backend", "reference", "--threads", "1", "--quiet", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "long_run.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [0, 5, 10, 12]
    assert all(float(r["peak_rss_MB"]) >= float(r["rss_MB"]) > 0 for r in rows)
    assert [int(r["graph_tensors_alive"]) for r in rows] == [0, 0, 0, 0]
    assert rows[1]["live_tensors"] == rows[-1]["live_tensors"] and float(rows[1]["optimizer_MB"]) > 0
    md = (tmp_path / "long_run.md").read_text()
    assert md.startswith("Long run: mlp8") and "Peak RSS at iteration 5:" in md
    assert (tmp_path / "long_run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_api_bench_quick_run_prints_ratios_and_host_reads():
    """bench/api.py at a tiny size: both tables, every row with a ratio, and the host-read counts it
    reports (0 per step with the defaults, 1 per hyper step; the "grads" guard reads back)."""
    import os
    cmd = [sys.executable, str(ROOT / "bench" / "api.py"), "--sizes", "2e4", "--rounds", "1", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {}
    for line in done.stdout.splitlines():
        if line.startswith("## "):
            family = line.split(",")[0][3:]
        elif line.startswith("| ") and not line.startswith("| step"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[family, cells[0]] = cells
    for family in ("sgd", "adamw"):
        assert float(rows[family, "torch foreach"][2]) > 0
        assert rows[family, "T1T2 step(loss=)"][3] == "0"
        assert rows[family, "T1T2 step + hyper/10"][3:] == ["0", "1"]
        assert int(rows[family, 'T1T2 guard "grads"'][3]) >= 1
