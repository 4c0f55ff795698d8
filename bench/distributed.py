"""T1-T2 across processes: bytes communicated per hyper step, and step time with 1 vs 2
processes.

For MLPs 784-w-w-10 with per-layer L2 ("penalties") and with input + hidden Gaussian noise too
("noise", noise_hypergrad="fd", distributed_noise="exact"), momentum SGD, float32, a global batch of
--batch examples, a hyper step every iteration:

- 1 process: plain ``T1T2`` on the whole batch (no process group, no DDP);
- N processes (gloo on CPU, 1 thread each): the model in DistributedDataParallel, each rank on
  1/N of every batch, so the global batch is the same.

Measured: the time of one iteration (``step`` + ``hyper_step``), median over --iters after
--warmup, on rank 0; the payload bytes DDP all-reduces per T1 step (counted in a DDP comm hook
around the default all-reduce) and those T1T2 all-reduces per hyper step (``opt.comm_bytes``),
against the parameter and hyperparameter counts.

    python bench/distributed.py [--widths 256 1024] [--procs 2] [--batch 128] [--iters 30]

Writes bench/results/distributed.csv and .md (or --out) and prints the table.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from kernels import machine  # noqa: E402

import t1t2_fast as t1t2  # noqa: E402
from t1t2_fast.apps.models import make_model as overhead_model  # noqa: E402

SETTINGS = ("penalties", "noise")


def make_model(width: int, noise: bool) -> nn.Module:
    """`t1t2 overhead`'s MLP 784-w-w-10 (noise on the input and after each hidden ReLU), seeded."""
    torch.manual_seed(0)
    return overhead_model(f"mlp{width}", 0.1 if noise else None)


def measure(width: int, setting: str, batch: int, iters: int, warmup: int, rank: int, world: int) -> dict:
    """Time iterations of one configuration in this process (one rank of ``world``)."""
    inner = make_model(width, setting == "noise")
    model, ddp_bytes = inner, [0]
    if world > 1:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(inner)

        def counting_hook(state, bucket):  # DDP's own all-reduce, with its payload counted
            ddp_bytes[0] += bucket.buffer().numel() * bucket.buffer().element_size()
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_hook)
    opt = t1t2.T1T2(model, [t1t2.L2(1e-4, per="layer")], optimizer="sgd", lr=0.01, momentum=0.9, hyper_every=1)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(4)]
    shards = [tuple(t.tensor_split(world)[rank] for t in xy) for xy in data]
    times, hyper_times = [], []
    for k in range(warmup + iters):
        x, y = shards[k % 4]
        xv, yv = shards[(k + 1) % 4]
        if k == warmup:
            ddp_bytes[0] = 0
            comm0 = opt.comm_bytes
        t0 = time.perf_counter()
        opt.step(lambda: F.cross_entropy(model(x), y))
        t1 = time.perf_counter()
        opt.hyper_step(lambda: F.cross_entropy(model(xv), yv))
        times.append(time.perf_counter() - t0)
        hyper_times.append(time.perf_counter() - t1)
    return {"width": width, "setting": setting, "processes": world,
            "params": sum(p.numel() for p in inner.parameters()),
            "hyperparameters": sum(r.numel() for r in opt.raw_hyperparameters().values()),
            "iteration_ms": 1e3 * statistics.median(times[warmup:]),
            "hyper_step_ms": 1e3 * statistics.median(hyper_times[warmup:]),
            "ddp_bytes_per_step": ddp_bytes[0] / iters,
            "t1t2_bytes_per_hyper_step": (opt.comm_bytes - comm0) / iters}


def worker(args) -> int:
    """One rank (or the single process): every configuration in turn; rank 0 saves the rows."""
    torch.set_num_threads(1)
    world, rank = args.world, args.rank
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{args.init}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
    rows = [measure(w, s, args.batch, args.iters, args.warmup, rank, world) for w in args.widths for s in SETTINGS]
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        torch.save(rows, args.result)
    return 0


def launch(args, world: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "rows.pt")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        common = ["--widths", *map(str, args.widths), "--batch", str(args.batch), "--iters", str(args.iters),
                  "--warmup", str(args.warmup), "--world", str(world), "--init", os.path.join(tmp, "init"),
                  "--result", result]
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--rank", str(r), *common], env=env)
                 for r in range(world)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"a worker failed (exit codes {codes})")
        return torch.load(result)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--procs", type=int, default=2, help="processes of the distributed runs")
    ap.add_argument("--batch", type=int, default=128, help="global batch (training and validation)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--init", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    t0 = time.perf_counter()
    rows = launch(args, 1) + launch(args, args.procs)
    one = {(r["width"], r["setting"]): r["iteration_ms"] for r in rows if r["processes"] == 1}
    for r in rows:
        r["vs_1_process"] = r["iteration_ms"] / one[(r["width"], r["setting"])]
    os.makedirs(args.out, exist_ok=True)
    keys = list(rows[0])
    with open(os.path.join(args.out, "distributed.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    torch.set_num_threads(1)
    lines = [f"T1-T2 with 1 vs {args.procs} processes (gloo, 1 thread each), global batch {args.batch}, "
             f"momentum SGD + per-layer L2 (+ noise, fd), a hyper step every iteration, median of {args.iters}; "
             f"{machine(torch.device('cpu'))}", "",
             "| model | params | setting | hyperparameters | processes | iteration ms | vs 1 process | of which "
             "hyper_step ms | DDP bytes / T1 step | T1T2 bytes / hyper step |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| MLP 784-{r['width']}-{r['width']}-10 | {r['params']:,} | {r['setting']} | "
                     f"{r['hyperparameters']} | {r['processes']} | {r['iteration_ms']:.2f} | {r['vs_1_process']:.2f}x | "
                     f"{r['hyper_step_ms']:.2f} | "
                     f"{r['ddp_bytes_per_step']:,.0f} | {r['t1t2_bytes_per_hyper_step']:,.0f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "distributed.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"run time {time.perf_counter() - t0:.1f} s; wrote {os.path.join(args.out, 'distributed.csv')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
