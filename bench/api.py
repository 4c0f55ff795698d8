"""Benchmark of the public API, not the ops: ``T1T2.step()`` and ``step()`` + ``hyper_step()`` against
torch.optim's for-loop, foreach and fused SGD (momentum + weight decay) and AdamW, with the number of
host reads (synchronizations) each call makes (docs/benchmarks.md, "The API").

    python bench/api.py [--sizes 3e5 2e6 2.5e7] [--rounds 7] [--threads N] [--device cpu|cuda] [--out DIR]

The model is an MLP of ``DEPTH`` square Linear layers (weights and biases: 2·DEPTH tensors) whose width
gives the parameter count. Gradients are random and set once; every optimizer steps from them:

- torch: ``SGD(momentum=0.9, weight_decay=2c)`` and ``AdamW(weight_decay=1e-2)`` with
  ``foreach=False`` (for-loop), ``foreach=True`` and ``fused=True``; ``opt.step()``.
- T1T2 sgd: ``T1T2(model, [L2(c, per="layer")], momentum=0.9)`` (L2 on the weights, the same update as
  torch's weight_decay=2c there); T1T2 adamw: ``T1T2(model, optimizer="adamw", weight_decay=1e-2)``.
  Timed as a user calls it after their own backward, ``opt.step(loss=loss)`` (the default guard
  checks that loss on the device), at hyper_every=10 (the mean over a cycle of 10 steps, one of them
  stashing θ); and ``opt.step()`` with no loss to check (the guard then scans the gradients),
  ``skip_nonfinite=False``, ``skip_nonfinite="grads"`` and hyper_every=1 (a stash every step).
- ``step + hyper/10``: a cycle of 10 steps and one ``hyper_step(val)`` per step; its validation
  closure (forward and backward of a batch of 8) is timed alone as ``val fwd+bwd``, so that the hyper
  step's own cost is ``(step + hyper/10 − step) · 10 − val fwd+bwd``. The same with
  ``tune_lr="layer"`` (a learning-rate scale per tensor: one more segment per tensor in the T2
  reduction, the scales read by the fused step), and both with a hyper step after every step
  (``hyper/1``), where the difference is the cost of the lr scales per step + hyper step.

Each row is the best (minimum) of ``--rounds`` rounds, the configurations interleaved in each round
so that load from other processes reaches them alike; ratios are against the fastest torch mode of
the same optimizer (fused on this machine, usually). ``reads/step`` and ``reads/hyper`` count the
host reads of tensor values in one call (``aten._local_scalar_dense`` under a TorchDispatchMode,
plus ``t1t2_fast.guard.host_list``), on the CPU, where they cost nothing; on a GPU each is a stall.
"""
from __future__ import annotations

import argparse
import math
import platform
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import t1t2_fast as t1t2
from t1t2_fast import guard

DEPTH = 16
L2_COEF = 5e-4       # per-layer c of Ω = c‖θ‖²; torch's equivalent weight_decay is 2c
ADAMW_DECAY = 1e-2
HYPER_EVERY = 10


class HostReads(TorchDispatchMode):
    def __enter__(self):
        self.count, self._listed = 0, guard.HOST_READS[0]
        return super().__enter__()

    def __exit__(self, *exc):
        self.count += guard.HOST_READS[0] - self._listed
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def make_model(size: float, device) -> nn.Module:
    width = max(8, int(math.sqrt(size / DEPTH)))
    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).to(device)


def set_grads(model: nn.Module) -> None:
    g = torch.Generator(device="cpu").manual_seed(1)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(p.device)


class Case:
    """One configuration: ``run()`` does one timed unit (a cycle of HYPER_EVERY steps for T1T2 at
    hyper_every=10, else one step) and returns how many steps it took."""

    def __init__(self, name, family, make, run, steps_per_run=1):
        self.name, self.family, self.make, self._run, self.steps = name, family, make, run, steps_per_run
        self.best = math.inf
        self.opt = None
        self.reads = None

    def setup(self):
        self.opt = self.make()

    def time(self, device) -> None:
        sync(device)
        t0 = time.perf_counter()
        self._run(self.opt)
        sync(device)
        self.best = min(self.best, (time.perf_counter() - t0) / self.steps)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cases_for(model: nn.Module, family: str, device, val, loss) -> list[Case]:
    out = []
    torch_cls = torch.optim.SGD if family == "sgd" else torch.optim.AdamW
    torch_kw = dict(lr=1e-3, momentum=0.9, weight_decay=2 * L2_COEF) if family == "sgd" else dict(
        lr=1e-3, weight_decay=ADAMW_DECAY)
    modes = [("for-loop", dict(foreach=False)), ("foreach", dict(foreach=True))]
    if device.type == "cuda" or hasattr(torch, "_fused_sgd_"):
        modes.append(("fused", dict(fused=True)))
    for mode, kw in modes:
        out.append(Case(f"torch {mode}", "torch", lambda kw=kw: torch_cls(model.parameters(), **torch_kw, **kw),
                        lambda o: o.step()))

    def t1t2_opt(**kw):
        def make():
            if family == "sgd":
                return t1t2.T1T2(model, [t1t2.L2(L2_COEF, per="layer")], optimizer="sgd", lr=1e-3, momentum=0.9,
                                 hyper_every=kw.pop("hyper_every", HYPER_EVERY), **kw)
            return t1t2.T1T2(model, optimizer="adamw", lr=1e-3, weight_decay=ADAMW_DECAY,
                             hyper_every=kw.pop("hyper_every", HYPER_EVERY), **kw)
        return make

    def cycle(call):
        def run(o):
            for _ in range(HYPER_EVERY):
                call(o)
                if o.hyper_due:
                    o._stash = None  # no hyper step in this row: drop the stash as hyper_step would
        return run

    def cycle_hyper(o):
        for _ in range(HYPER_EVERY):
            o.step(loss=loss)
            if o.hyper_due:
                o.hyper_step(val)  # autograd.grad: the parameters' .grad stay the step's

    out += [
        Case("T1T2 step(loss=)", "t1t2", t1t2_opt(), cycle(lambda o: o.step(loss=loss)), HYPER_EVERY),
        Case("T1T2 step() (scan)", "t1t2", t1t2_opt(), cycle(lambda o: o.step()), HYPER_EVERY),
        Case("T1T2 guard off", "t1t2", t1t2_opt(skip_nonfinite=False), cycle(lambda o: o.step()), HYPER_EVERY),
        Case('T1T2 guard "grads"', "t1t2", t1t2_opt(skip_nonfinite="grads"), cycle(lambda o: o.step()),
             HYPER_EVERY),
        Case("T1T2 step(loss=), stash every step", "t1t2", t1t2_opt(hyper_every=1),
             lambda o: (o.step(loss=loss), setattr(o, "_stash", None))),
        Case("T1T2 step + hyper/10", "t1t2", t1t2_opt(), cycle_hyper, HYPER_EVERY),
        Case('T1T2 step + hyper/10, tune_lr="layer"', "t1t2", t1t2_opt(tune_lr="layer"), cycle_hyper, HYPER_EVERY),
        # a hyper step after every step: the hyper step's cost, with and without lr scales, stands out
        Case("T1T2 step + hyper/1", "t1t2", t1t2_opt(hyper_every=1), cycle_hyper, HYPER_EVERY),
        Case('T1T2 step + hyper/1, tune_lr="layer"', "t1t2", t1t2_opt(hyper_every=1, tune_lr="layer"), cycle_hyper,
             HYPER_EVERY),
    ]
    return out


def val_closure(model: nn.Module, device):
    g = torch.Generator(device="cpu").manual_seed(2)
    width = model[0].in_features
    xv = torch.randn(8, width, generator=g).to(device)

    def val():
        return model(xv).square().mean()
    return val


def count_reads(case: Case, loss, val) -> tuple[int, int | None]:
    """Host reads in one step() and (for the hyper row) one hyper_step(), after a warm-up cycle."""
    o = case.opt
    if case.family == "torch":
        with HostReads() as r:
            o.step()
        return r.count, None
    with HostReads() as r:
        o.step(loss=loss) if "loss" in case.name or "hyper" in case.name else o.step()
    o._stash = None
    hyper = None
    if "hyper" in case.name:
        while not (o.steps + 1) % o.hyper_every == 0:
            o.step(loss=loss)
        o.step(loss=loss)
        with HostReads() as r2:
            o.hyper_step(val)
        hyper = r2.count
    return r.count, hyper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[3e5, 2e6, 2.5e7])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="also write the tables to DIR/api.md")
    args = ap.parse_args()
    lines = []

    def emit(text=""):
        print(text, flush=True)
        lines.append(text)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    emit(f"# bench/api.py: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {device}, best of {args.rounds} rounds")
    for size in args.sizes:
        model = make_model(size, device)
        n = sum(p.numel() for p in model.parameters())
        loss = torch.tensor(1.0, device=device)
        val = val_closure(model, device)
        set_grads(model)
        saved = [p.detach().clone() for p in model.parameters()]
        # the validation forward+backward alone (what a hyper step runs besides its own work)
        val_best = math.inf
        for family in ("sgd", "adamw"):
            cases = cases_for(model, family, device, val, loss)
            for c in cases:
                c.setup()
                for _ in range(2):  # warm-up: state allocated, pages faulted in
                    c._run(c.opt)
                c.reads = count_reads(c, loss, val)
            for _ in range(args.rounds):
                for c in cases:
                    with torch.no_grad():  # every case steps the same model: start each from the same θ,
                        for p, s in zip(model.parameters(), saved):  # or θ (and the validation loss) drifts
                            p.copy_(s)                                # to Inf over the rounds
                    c.time(device)
                sync(device)
                t0 = time.perf_counter()
                grads = [p.grad for p in model.parameters()]
                for p in model.parameters():
                    p.grad = None
                val().backward()
                for p, g in zip(model.parameters(), grads):
                    p.grad = g
                sync(device)
                val_best = min(val_best, time.perf_counter() - t0)
            with torch.no_grad():  # the same θ for the next family
                for p, s in zip(model.parameters(), saved):
                    p.copy_(s)
            base = min(c.best for c in cases if c.family == "torch")
            emit()
            emit(f"## {family}, {n / 1e6:.2f}M parameters in {len(saved)} tensors "
                  f"(val fwd+bwd {val_best * 1e3:.2f} ms)")
            emit()
            emit("| step | ms | vs fastest torch | reads/step | reads/hyper |")
            emit("|---|---:|---:|---:|---:|")
            for c in cases:
                step_reads, hyper_reads = c.reads
                emit(f"| {c.name} | {c.best * 1e3:.2f} | {c.best / base:.2f} | {step_reads} | "
                      f"{'' if hyper_reads is None else hyper_reads} |")
            del cases
    if args.out:
        from pathlib import Path
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "api.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
