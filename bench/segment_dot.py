"""Microbenchmark of the T2 penalty reduction ``penalty_segment_dot`` (compiled vs reference),
against this machine's copy bandwidth (the roofline for a kernel that streams two arrays once).

    python bench/segment_dot.py [--sizes 1e6 2e7] [--repeats 20] [--out bench/results]

Prints a markdown table and writes CSV + markdown. Times are medians (20/80th percentiles in the
CSV), all measured side by side in this one process.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

from t1t2_fast import _extension, reference

from kernels import machine  # bench/ is on sys.path when a script here runs


def timeit(fn, repeats):
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    q = statistics.quantiles(samples, n=5)
    return statistics.median(samples), q[0], q[3]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6, 2e7])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    if not _extension.AVAILABLE:
        raise SystemExit(f"the compiled extension is not built ({_extension.LOAD_ERROR}); "
                         f"run `pip install --no-build-isolation -e .` first")
    from t1t2_fast import ops

    dtype = getattr(torch, args.dtype)
    rows = []
    for size in args.sizes:
        n = int(size)
        rows_per_unit = 1024
        n -= n % rows_per_unit
        u, theta = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
        # Roofline: copy_ between two arrays of n elements touches the same two-array working set
        # the op streams (it reads u and θ), so both see the same cache level.
        dst = torch.empty_like(u)
        t_copy, _, _ = timeit(lambda: dst.copy_(u), args.repeats)
        copy_bw = 2 * n * u.element_size() / t_copy  # read + write
        # copy_ pays write-allocate traffic; a read-only op can beat it. torch.sum over both arrays
        # is the read-only reference point.
        t_sum, _, _ = timeit(lambda: (u.sum(), theta.sum()), args.repeats)
        read_bw = 2 * n * u.element_size() / t_sum
        op_bytes = 2 * n * u.element_size()                      # read u and θ once
        for per, groups in (("layer", 1), ("unit", rows_per_unit), ("element", n)):
            t_ref, ref20, ref80 = timeit(lambda: reference.penalty_segment_dot(u, theta, groups, "l2"), args.repeats)
            t_cpp, cpp20, cpp80 = timeit(lambda: ops.penalty_segment_dot(u, theta, groups, "l2"), args.repeats)
            out_bytes = groups * (8 if dtype == torch.float64 else 4)
            bw = (op_bytes + out_bytes) / t_cpp
            rows.append(dict(numel=n, dtype=args.dtype, per=per, groups=groups,
                             cpp_ms=t_cpp * 1e3, cpp_p20_ms=cpp20 * 1e3, cpp_p80_ms=cpp80 * 1e3,
                             reference_ms=t_ref * 1e3, reference_p20_ms=ref20 * 1e3, reference_p80_ms=ref80 * 1e3,
                             speedup=t_ref / t_cpp, cpp_GBps=bw / 1e9, copy_GBps=copy_bw / 1e9,
                             sum_GBps=read_bw / 1e9, frac_of_copy=bw / copy_bw, frac_of_sum=bw / read_bw))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "segment_dot.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"`penalty_segment_dot` (l2), {args.dtype}, {machine(torch.device('cpu'))}", "",
             "| numel | per | cpp ms | reference ms | speedup | cpp GB/s | copy_ GB/s | sum GB/s | of copy_ | of sum |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['numel']:,} | {r['per']} | {r['cpp_ms']:.2f} | {r['reference_ms']:.2f} | "
                     f"{r['speedup']:.1f}x | {r['cpp_GBps']:.1f} | {r['copy_GBps']:.1f} | {r['sum_GBps']:.1f} | "
                     f"{r['frac_of_copy']:.0%} | {r['frac_of_sum']:.0%} |")
    table = "\n".join(lines)
    (out / "segment_dot.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {out / 'segment_dot.csv'} and {out / 'segment_dot.md'}")


if __name__ == "__main__":
    main()
