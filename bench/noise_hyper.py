"""Cost of noise hyperparameters (docs/design.md, noise).

For MLPs of widths 256..4096 and a small CNN, with input and hidden Gaussian noise plus a per-layer
L2 penalty, this times, side by side in one process:

- one T1 step (``opt.step(closure)`` on an iteration that is not a hyper iteration): the unit;
- a hyper iteration: its T1 step (which also stashes θ and, for "fd", records ∇σL) plus
  ``opt.hyper_step``, with ``noise_hypergrad`` = fd, fd-central and exact, and for the same network
  without noise modules (penalties only). Reported: its extra cost over a plain T1 step, as a
  multiple of that step (the validation forward/backward alone is about 1x);

and the activation memory autograd keeps for one training forward: GaussianNoise (ε regenerated in
the backward from its counter-based key) against the same layer written as ``x + σ·ε`` with ε
materialized and saved. The memory is the total size of the distinct tensors autograd saves for
backward (``torch.autograd.graph.saved_tensors_hooks``), which is what the noise changes: exact on
any device, unlike a process-wide peak on a CPU.

    python bench/noise_hyper.py [--widths 256 1024 4096] [--batch 128] [--repeats 10]

Writes CSV and markdown under bench/results/ (or --out) and prints the table.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import machine  # noqa: E402

import t1t2_fast as t1t2  # noqa: E402
from t1t2_fast.apps.models import make_model  # noqa: E402  (the models of `t1t2 overhead`)
from t1t2_fast.rng import philox_randn  # noqa: E402

MODES = ("fd", "fd-central", "exact")


class StoredNoise(nn.Module):
    """The baseline: additive per-layer noise with ε materialized, and kept by autograd for ∂L/∂σ
    (σ requires grad, as it does on a T1 step that feeds a noise hypergradient)."""

    def __init__(self, std):
        super().__init__()
        self.sigma = nn.Parameter(torch.tensor(float(std)))

    def forward(self, x):
        eps = philox_randn(1234, torch.arange(x.numel(), device=x.device)).reshape(x.shape).to(x.dtype)
        return x + self.sigma.to(x.dtype) * eps


def data(kind, batch, g):
    x = torch.randn(batch, 784, generator=g) if kind == "mlp" else torch.randn(batch, 1, 28, 28, generator=g)
    return x, torch.randint(0, 10, (batch,), generator=g)


def saved_bytes(model, x, y) -> int:
    """Bytes of the distinct tensors autograd saves for the backward of one training forward,
    parameters excluded (they exist anyway)."""
    seen: dict[tuple, int] = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    for m in model.modules():
        if isinstance(m, t1t2.GaussianNoise):
            m.reset_calls()
            m.record_grad(True)  # σ a leaf that requires grad, as on a hyper iteration's T1 step
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), y)
    for m in model.modules():
        if isinstance(m, t1t2.GaussianNoise):
            m.record_grad(False)
    params = {(p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape)) for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in params)


def time_model(name, make, make_plain, kind, args, g):
    x, y = data(kind, args.batch, g)
    xv, yv = data(kind, args.batch, g)
    rows = []
    base = make()
    opts = {}
    for mode in MODES:
        model = copy.deepcopy(base)
        opts[mode] = (model, t1t2.T1T2(model, [t1t2.L2(1e-4)], hyper_every=2, lr=0.01, momentum=0.9,
                                       noise_hypergrad=mode, backend=args.backend))
    plain = make_plain()  # the same network without noise modules: the penalty hypergradient alone
    opts["penalties only"] = (plain, t1t2.T1T2(plain, [t1t2.L2(1e-4)], hyper_every=2, lr=0.01, momentum=0.9,
                                                backend=args.backend))

    # hyper_every=2: odd steps are plain T1 steps (the unit), even steps are hyper iterations (the
    # T1 step then also stashes θ and, for "fd", records ∇σL; then the hyper step).
    samples = {k: {"t1": [], "t1_hyper": [], "hyper": []} for k in opts}
    for r in range(args.repeats + 1):  # round 0 warms up
        for k, (model, opt) in opts.items():
            t0 = time.perf_counter()
            opt.step(lambda: F.cross_entropy(model(x), y))
            t1 = time.perf_counter()
            opt.step(lambda: F.cross_entropy(model(x), y))
            t2 = time.perf_counter()
            opt.hyper_step(lambda: F.cross_entropy(model(xv), yv))
            t3 = time.perf_counter()
            if r:
                samples[k]["t1"].append(t1 - t0)
                samples[k]["t1_hyper"].append(t2 - t1)
                samples[k]["hyper"].append(t3 - t2)
    stored = copy.deepcopy(base)
    for i, m in enumerate(stored):
        if isinstance(m, t1t2.GaussianNoise):
            stored[i] = StoredNoise(0.1)
    mem_regen = saved_bytes(base, x, y)
    mem_stored = saved_bytes(stored, x, y)
    params = sum(p.numel() for p in base.parameters())
    for k, s in samples.items():
        t1_med, t1h_med, hyper_med = (statistics.median(s[c]) for c in ("t1", "t1_hyper", "hyper"))
        extra = t1h_med + hyper_med - t1_med
        rows.append(dict(model=name, params=params, batch=args.batch, mode=k, t1_ms=1e3 * t1_med,
                         t1_hyper_ms=1e3 * t1h_med, hyper_ms=1e3 * hyper_med, extra_over_t1=extra / t1_med,
                         saved_MB_regenerated=mem_regen / 2 ** 20, saved_MB_stored_eps=mem_stored / 2 ** 20))
    return rows


def markdown(rows, description):
    head = ("| model | params | noise hypergrad | T1 step ms | T1 step of a hyper iteration ms | hyper_step ms | "
            "extra cost of a hyper iteration / T1 step | saved for backward, ε regenerated | with ε stored |\n"
            "|---|---:|---|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(f"| {r['model']} | {r['params']:,} | {r['mode']} | {r['t1_ms']:.2f} | {r['t1_hyper_ms']:.2f} | "
                   f"{r['hyper_ms']:.2f} | {r['extra_over_t1']:.2f}x | {r['saved_MB_regenerated']:.2f} MB | "
                   f"{r['saved_MB_stored_eps']:.2f} MB |\n" for r in rows)
    return f"{description}\n\n{head}{body}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-cnn", action="store_true")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    rows = []
    t_start = time.perf_counter()
    for w in args.widths:
        rows += time_model(f"MLP 784-{w}-{w}-10", lambda w=w: make_model(f"mlp{w}", 0.1),
                           lambda w=w: make_model(f"mlp{w}", None), "mlp", args, g)
        print(f"  width {w} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    if not args.no_cnn:
        rows += time_model("CNN 1-16-32 on 28x28", lambda: make_model("cnn", 0.1), lambda: make_model("cnn", None),
                           "cnn", args, g)
    description = (f"Noise hyper step cost, float32, batch {args.batch}, {machine(torch.device('cpu'))}, "
                   f"torch {torch.__version__}, python {platform.python_version()}; median of {args.repeats}; "
                   f"{time.perf_counter() - t_start:.0f} s")
    md = markdown(rows, description)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "noise_hyper.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "noise_hyper.md"), "w") as f:
        f.write(md)
    print(f"wrote {args.out}/noise_hyper.csv and noise_hyper.md", file=sys.stderr)


if __name__ == "__main__":
    main()
