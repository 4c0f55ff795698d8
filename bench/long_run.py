"""Long run: does anything grow over 2000 iterations?

A model of ``t1t2 overhead`` (t1t2_fast.apps.models.make_model: input noise and noise after each
hidden layer) trains with a T2 step after every T1 step (hyper_every=1), noise hyperparameters
(``--noise-hypergrad``, default fd) and penalties (L2 per layer, L1 per unit) on a fixed pool of
random batches. Before the first iteration and every ``--every`` iterations it records:

- the process's resident set and its peak since start (VmRSS, VmHWM from /proc/self/status),
- on CUDA, torch.cuda.memory_allocated and max_memory_allocated,
- the torch.Tensor objects Python can reach and their storage bytes (a gc scan),
- the bytes of every container the optimizer keeps, and the tensors saved for backward that are
  still alive (t1t2_fast.apps.footprint.GraphWatch; 0 when no graph outlives its iteration).

The criterion: the peak at iteration 100 and at the last one differ by less than 1%. The
memory is read right after each scan, so every recorded peak holds the scan's own transient alike.

    python bench/long_run.py [--iters 2000] [--every 100] [--model mlp1024] [--backend cpp]

Writes long_run.csv, long_run.md and long_run.png under bench/results/ (or --out) and prints the
table.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import textwrap
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import machine  # noqa: E402

import t1t2_fast as t1t2  # noqa: E402
from t1t2_fast.apps.footprint import GraphWatch, live_tensors, optimizer_footprint, process_memory  # noqa: E402
from t1t2_fast.apps.models import make_model  # noqa: E402
from t1t2_fast.apps.overhead import batches  # noqa: E402

MB = 2 ** 20
POOL = 16  # distinct training and validation batches, cycled


def measure(iteration: int, opt, watch: GraphWatch, device: torch.device, t0: float) -> dict:
    elapsed = time.perf_counter() - t0
    count, nbytes = live_tensors()
    row = {"iteration": iteration, "elapsed_s": elapsed, "live_tensors": count, "live_tensor_MB": nbytes / MB,
           "optimizer_MB": sum(b for _, b in optimizer_footprint(opt).values()) / MB,
           "graph_tensors_alive": watch.alive()}
    # after the scan, so that every peak holds the scan's own transient (a list of every object
    # Python tracks) on top of the same heap
    mem = process_memory() or {"rss": float("nan"), "peak_rss": float("nan")}
    row.update(rss_MB=mem["rss"] / MB, peak_rss_MB=mem["peak_rss"] / MB)
    if device.type == "cuda":
        row["cuda_allocated_MB"] = torch.cuda.memory_allocated(device) / MB
        row["cuda_max_allocated_MB"] = torch.cuda.max_memory_allocated(device) / MB
    return row


def run(args) -> tuple[list[dict], str]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = make_model(args.model, 0.1).to(device)
    penalties = [t1t2.L2(1e-4, per="layer"), t1t2.L1(1e-5, per="unit")]
    opt_kw = dict(optimizer="sgd", lr=0.01, momentum=0.9) if args.optimizer == "sgd" else \
        dict(optimizer="adam", lr=1e-3)
    opt = t1t2.T1T2(model, penalties, hyper_every=1, hyper_lr=1e-3, noise_hypergrad=args.noise_hypergrad,
                    backend=args.backend, **opt_kw)
    gen = torch.Generator().manual_seed(1)
    train = [(x.to(device), y.to(device)) for x, y in batches(args.model, args.batch, POOL, gen)]
    val = [(x.to(device), y.to(device)) for x, y in batches(args.model, args.batch, POOL, gen)]
    watch = GraphWatch()
    t0 = time.perf_counter()
    rows = [measure(0, opt, watch, device, t0)]

    from tqdm.auto import tqdm

    bar = tqdm(total=args.iters, disable=args.quiet, file=sys.stderr, dynamic_ncols=True, unit="it",
               desc=f"long run {args.model} {opt.backend.name}")
    try:
        for it in range(1, args.iters + 1):
            x, y = train[it % POOL]
            xv, yv = val[it % POOL]
            with watch.watching():
                opt.step(lambda: F.cross_entropy(model(x), y))
                opt.hyper_step(lambda: F.cross_entropy(model(xv), yv))
            bar.update(1)
            if it % args.every == 0 or it == args.iters:
                rows.append(measure(it, opt, watch, device, t0))
                r = rows[-1]
                bar.set_postfix_str(f"rss {r['rss_MB']:.1f} MB peak {r['peak_rss_MB']:.1f} MB "
                                    f"tensors {r['live_tensors']}", refresh=False)
    finally:
        bar.close()
    description = (f"Long run: {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters), "
                   f"{args.optimizer}, hyper_every=1, noise_hypergrad={args.noise_hypergrad}, L2 per layer + "
                   f"L1 per unit, batch {args.batch}, backend {opt.backend.name}, {args.iters} iterations; "
                   f"{machine(device)}, python {platform.python_version()}; "
                   f"{time.perf_counter() - t0:.0f} s")
    return rows, description


def verdict(rows: list[dict], base_iteration: int) -> dict:
    """Peak RSS (and CUDA peak) at ``base_iteration`` against the last row, and whether the
    footprint measurements stayed equal."""
    base = next((r for r in rows if r["iteration"] == base_iteration), None)
    last = rows[-1]
    if base is None or base is last:
        return {}
    out = {"base": base["iteration"], "last": last["iteration"], "peak_rss_base_MB": base["peak_rss_MB"],
           "peak_rss_last_MB": last["peak_rss_MB"],
           "peak_rss_change_pct": 100 * (last["peak_rss_MB"] / base["peak_rss_MB"] - 1),
           "same_live_tensors": (base["live_tensors"], base["live_tensor_MB"]) ==
                                (last["live_tensors"], last["live_tensor_MB"]),
           "same_optimizer_bytes": base["optimizer_MB"] == last["optimizer_MB"],
           "graph_tensors_alive": max(r["graph_tensors_alive"] for r in rows)}
    if "cuda_max_allocated_MB" in last:
        out["cuda_peak_change_pct"] = 100 * (last["cuda_max_allocated_MB"] / base["cuda_max_allocated_MB"] - 1)
    return out


def markdown(rows: list[dict], description: str, v: dict) -> str:
    cuda = "cuda_max_allocated_MB" in rows[-1]
    head = ("| iteration | peak RSS MB (VmHWM) | RSS MB | live tensors | live tensor MB | optimizer MB | "
            "saved tensors alive |" + (" CUDA allocated MB | CUDA peak MB |" if cuda else "") + "\n"
            "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if cuda else "") + "\n")
    body = "".join(
        f"| {r['iteration']} | {r['peak_rss_MB']:.1f} | {r['rss_MB']:.1f} | {r['live_tensors']} | "
        f"{r['live_tensor_MB']:.3f} | {r['optimizer_MB']:.3f} | {r['graph_tensors_alive']} |"
        + (f" {r['cuda_allocated_MB']:.1f} | {r['cuda_max_allocated_MB']:.1f} |" if cuda else "") + "\n"
        for r in rows)
    text = f"{description}\n\n{head}{body}"
    if v:
        change = v["peak_rss_change_pct"]
        text += (f"\nPeak RSS at iteration {v['base']}: {v['peak_rss_base_MB']:.1f} MB; at {v['last']}: "
                 f"{v['peak_rss_last_MB']:.1f} MB; change {change:+.2f}% "
                 f"({'< 1%: met' if abs(change) < 1 else '>= 1%: NOT met'})."
                 f" Live tensors {'unchanged' if v['same_live_tensors'] else 'CHANGED'}, optimizer containers "
                 f"{'unchanged' if v['same_optimizer_bytes'] else 'CHANGED'}, saved tensors alive after an "
                 f"iteration: at most {v['graph_tensors_alive']}.")
        if "cuda_peak_change_pct" in v:
            text += f" CUDA peak change {v['cuda_peak_change_pct']:+.2f}%."
        text += "\n"
    return text


def plot(path: str, rows: list[dict], title: str) -> None:
    from matplotlib.figure import Figure

    it = [r["iteration"] for r in rows]
    process = [("peak_rss_MB", "peak RSS (VmHWM)"), ("rss_MB", "RSS"),
               ("cuda_max_allocated_MB", "CUDA peak allocated")]
    kept = [("live_tensor_MB", "live tensors (gc scan)"), ("optimizer_MB", "optimizer containers")]
    fig = Figure(figsize=(10, 4))
    for ax, title, series in zip(fig.subplots(1, 2), ("process memory", "what Python keeps"), (process, kept)):
        for k, (key, label) in enumerate(s for s in series if s[0] in rows[-1]):
            ax.plot(it, [r[key] for r in rows], label=label, lw=1.6 if k == 0 else 1.2)
        ax.set_xlabel("iteration")
        ax.set_ylabel("MB")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100, help="record every this many iterations")
    ap.add_argument("--model", default="mlp1024", help="mlp<width> or cnn (t1t2_fast.apps.models.make_model)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    ap.add_argument("--noise-hypergrad", choices=("fd", "fd-central", "exact"), default="fd")
    ap.add_argument("--backend", default="cpp", choices=("reference", "cpp", "triton", "auto"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if args.iters < 1 or args.every < 1:
        ap.error("--iters and --every must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, description = run(args)
    v = verdict(rows, args.every)
    md = markdown(rows, description, v)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "long_run.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[-1]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "long_run.md"), "w") as f:
        f.write(md)
    plot(os.path.join(args.out, "long_run.png"), rows, description)
    print(f"wrote {args.out}/long_run.csv, long_run.md and long_run.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
