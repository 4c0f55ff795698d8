"""Microbenchmark of the fused T1 and T2 kernels against torch.optim and the reference path, and of
their achieved bandwidth against this machine's copy bandwidth (the roofline), side by side in one
process (docs/design.md).

    python bench/kernels.py [--sizes 1e6 2e7] [--large] [--models resnet50 transformer] [--runs 3]
                            [--repeats 20] [--max-seconds 8] [--device cpu|cuda] [--quick] [--out bench/results]

For each total parameter count (default 1M and 20M; ``--large`` adds 100M) and each layer list (a
ResNet-50-like list of conv/bn/fc tensors and a transformer-like list of embedding/attention/MLP/
layernorm tensors, widths scaled to the count):

- T1 sgd: ``ops.t1_step_`` (momentum 0.9, per-layer L2 on weight tensors, with and without the
  stash) vs ``torch.optim.SGD(momentum=0.9, weight_decay=...)`` in each mode (for-loop, foreach,
  fused), without stash, and vs ``reference.t1_step_``.
- T1 adam: ``ops.t1_step_`` with the adam-exact stash (θ and ∂θ⁺/∂ĝ) and without, vs
  ``torch.optim.Adam(weight_decay=...)`` in each mode and the reference.
- The non-finite guard, for both: ``ops.t1_step_`` with ``check_finite`` (what ``T1T2``
  runs by default: a read-only scan of the grads, then the update), and under a GradScaler (torch's
  ``_amp_foreach_non_finite_check_and_unscale_``, then the op with grad_scale/found_inf) next to
  torch's fused optimizer after the same check (what ``GradScaler.step`` does for it).
- T2: the per-layer L2 hypergradient over the weight tensors, for sgd (J = −η, a scalar) and
  adam-exact (J a stashed tensor): the fused multi-tensor ``ops.penalty_hypergrad`` (what
  ``T1T2.hyper_step`` runs) when the extension has it, the per-tensor path (u = J ⊙ v in torch,
  then ``ops.penalty_segment_dot(u, θ, 1, "l2")``) and the reference (the same with
  ``reference.penalty_segment_dot``).

Bytes are what the computation must move at least (each array it reads or writes, once): sgd
θ,g,b → θ,b = 5 arrays (+1 with the stash); adam θ,g,m,s → θ,m,s = 7 (+2 with the adam-exact
stash); T2 reads v and θ (+J for adam-exact) of the weight tensors. Every implementation of one
computation is charged the same bytes, so GB/s ranks them as time does. The roofline for B bytes is
``copy_`` between the two halves of a B-byte buffer (the same working set, hence the same cache
level) and ``torch.sum`` over all of it (read-only; copy_ also pays write-allocate traffic).

All implementations of one section (and its rooflines) are sampled in interleaved rounds, so that
load from other processes reaches them alike; the whole sweep runs ``--runs`` times with fresh
buffers and the samples are pooled. Times are medians with 20th/80th percentiles. Prints
a markdown table and the targets at 20M (``targets``), and writes ``kernels.csv`` and ``kernels.md``
under ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from t1t2_fast import _extension, reference

LR, MOMENTUM, BETAS, EPS = 1e-3, 0.9, (0.9, 0.999), 1e-8
L2_COEF = 5e-4  # per-layer c of Ω = Σ c θ²; torch's equivalent weight_decay is 2c
ADAM_STEP = 10  # bias corrections of the 10th step
QUICK_SIZES = [2e4, 2e5]
TARGET_SIZE = 2e7  # the targets are stated at 20M parameters
LARGE_SIZE = 5e7


# ---- layer lists -------------------------------------------------------------------------------

def resnet50_shapes(width: float) -> list[tuple[int, ...]]:
    """ResNet-50's conv / batch-norm / fc tensors with every channel count scaled by ``width``."""
    ch = lambda c: max(1, round(c * width))
    stem = ch(64)
    shapes = [(stem, 3, 7, 7), (stem,), (stem,)]
    in_ch = stem
    for mid, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        m = ch(mid)
        out = 4 * m
        for b in range(blocks):
            shapes += [(m, in_ch, 1, 1), (m,), (m,), (m, m, 3, 3), (m,), (m,), (out, m, 1, 1), (out,), (out,)]
            if b == 0:  # projection shortcut
                shapes += [(out, in_ch, 1, 1), (out,), (out,)]
            in_ch = out
    return shapes + [(1000, in_ch), (1000,)]


def transformer_shapes(target: float) -> list[tuple[int, ...]]:
    """A GPT-like stack: token and position embeddings, per block layernorm / qkv / proj /
    layernorm / MLP (4x) with biases, final layernorm. Width grows with the cube root of the target
    (d=128 at 1M, 384 at 20M, 640 at 100M), the depth makes up the count."""
    d = 32 * max(1, round(2 * (target / 1e5) ** (1 / 3)))
    vocab = max(100, round(0.1 * target / d))
    context = min(512, 4 * d)
    per_block = 12 * d * d + 13 * d
    blocks = max(1, round((target - (vocab + context + 2) * d) / per_block))
    shapes = [(vocab, d), (context, d)]
    for _ in range(blocks):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def numel_of(shapes) -> int:
    return sum(int(torch.Size(s).numel()) for s in shapes)


def layer_shapes(model: str, target: float) -> list[tuple[int, ...]]:
    if model == "transformer":
        return transformer_shapes(target)
    lo, hi = 1e-3, 16.0  # bisect the width multiplier: the count grows monotonically with it
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if numel_of(resnet50_shapes(mid)) < target else (lo, mid)
    return min((resnet50_shapes(lo), resnet50_shapes(hi)), key=lambda s: abs(numel_of(s) - target))


# ---- timing ------------------------------------------------------------------------------------

def make_timer(device: torch.device, max_seconds: float):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def interleaved(fns, repeats: int, min_rounds: int = 5) -> list:
        """Seconds per call of each callable, sampled in rounds: every callable once per round, the
        first one rotating, so that a change in the machine's load or memory bandwidth during a
        section reaches every implementation alike (this machine is shared). One warm-up call each
        first (first-touch pages, optimizer state, lazy init); a callable that raises there gets
        the reason (a string) instead of samples. Rounds go on up to ``repeats``, and stop after
        ``max_seconds`` once there are ``min_rounds``."""
        samples: list = []
        for fn in fns:
            try:
                fn()
                sync()
                samples.append([])
            except Exception as e:  # noqa: BLE001 - e.g. an op without a kernel for this device
                samples.append(f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        live = [j for j, s in enumerate(samples) if isinstance(s, list)]
        start = time.perf_counter()
        rounds = 0
        while live and rounds < repeats and (rounds < min(min_rounds, repeats)
                                             or time.perf_counter() - start < max_seconds):
            for k in range(len(live)):
                j = live[(k + rounds) % len(live)]
                t0 = time.perf_counter()
                fns[j]()
                sync()
                samples[j].append(time.perf_counter() - t0)
            rounds += 1
        return samples

    return interleaved


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile)."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=5, method="inclusive")
    return statistics.median(samples), q[0], q[3]


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}")
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"


def cpu_seconds() -> tuple[float, float, float, float]:
    """(busy CPU seconds of the whole machine, steal seconds, this process's CPU seconds, wall
    time) from /proc/stat and os.times(); on other systems the first two are NaN."""
    own = os.times()
    busy = steal = float("nan")
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        busy = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / tick  # user nice system irq softirq
        steal = (fields[7] if len(fields) > 7 else 0) / tick
    except (OSError, ValueError, IndexError):
        pass
    return busy, steal, own.user + own.system, time.perf_counter()


def others_share(before, after) -> tuple[float, float]:
    """Share of the machine's CPUs that other processes (and the hypervisor, as steal) used between
    two ``cpu_seconds()`` snapshots: what makes a measurement on a shared machine noisy."""
    capacity = (after[3] - before[3]) * (os.cpu_count() or 1)
    other = (after[0] - before[0]) - (after[2] - before[2])
    return max(0.0, other / capacity), (after[1] - before[1]) / capacity


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ---- the problem -------------------------------------------------------------------------------

class Problem:
    """Parameters, gradients and optimizer state for one layer list, shared by every implementation.
    Every step updates θ in place; with lr = 1e-3 and fixed gradients the values stay O(1) over the
    hundreds of steps a run takes, so no implementation meets denormals or overflow."""

    def __init__(self, shapes, device, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        randn = lambda s: torch.randn(s, generator=g).to(device)
        self.shapes = shapes
        self.device = device
        self.numel = numel_of(shapes)
        self.params = [randn(s).requires_grad_() for s in shapes]
        for p in self.params:
            p.grad = randn(p.shape)
        self.targeted = [i for i, s in enumerate(shapes) if len(s) >= 2]  # T1T2's default: weights
        self.target_numel = sum(self.params[i].numel() for i in self.targeted)
        self.empty = torch.empty(0, device=device)
        self.l2 = [torch.full((1,), L2_COEF, device=device) if len(s) >= 2 else self.empty for s in shapes]

    def data(self):
        return [p.detach() for p in self.params]

    def grads(self):
        return [p.grad for p in self.params]

    def zeros(self):
        return [torch.zeros_like(p, memory_format=torch.contiguous_format).detach() for p in self.params]

    def t1_args(self, optimizer, state1, state2, stash_theta, stash_jac):
        """Arguments of ``t1_step_`` in the order of its schema (csrc/ops.cpp)."""
        adam = optimizer == "adam"
        n = len(self.params)
        bc1 = [1 - BETAS[0] ** ADAM_STEP] * n if adam else []
        bc2 = [1 - BETAS[1] ** ADAM_STEP] * n if adam else []
        return [self.data(), self.grads(), state1, state2, self.l2, [], [], stash_theta, stash_jac, optimizer, LR,
                MOMENTUM if not adam else 0.0, False, BETAS[0], BETAS[1], EPS, bc1, bc2]


# ---- cases -------------------------------------------------------------------------------------

def torch_modes():
    return {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def t1_cases(prob: Problem, optimizer: str, ops, triton_ops=None) -> list[tuple]:
    """(implementation, stash, bytes, step) for one T1 step; step is a string (the reason) where an
    implementation is unavailable. The torch optimizers get their own state on the shared θ."""
    adam = optimizer == "adam"
    arrays = 7 if adam else 5
    stash_arrays = 2 if adam else 1
    nbytes = lambda k: k * prob.numel * 4
    stash_name = "θ + ∂θ⁺/∂ĝ" if adam else "θ"
    state1 = prob.zeros()
    state2 = prob.zeros() if adam else []
    if adam:  # a state like a 10th step's: m ~ N(0, 0.1²), s ~ 1e-2·|N(0,1)| (√ŝ > 0 everywhere)
        for m, s in zip(state1, state2):
            m.normal_(0, 0.1)
            s.normal_().abs_().mul_(1e-2)
    stash_theta = prob.zeros()
    stash_jac = prob.zeros() if adam else []
    args = lambda stash_t, stash_j: prob.t1_args(optimizer, state1, state2, stash_t, stash_j)
    with_stash, without = args(stash_theta, stash_jac), args([], [])

    def fresh_stash_step():
        # what T1T2._t1_update does on a hyper iteration: new stash buffers (empty_like) every time
        fresh = lambda: [torch.empty_like(p) for p in prob.data()]
        ops.t1_step_(*args(fresh(), fresh() if adam else []))

    cases = []
    if ops is not None:
        cases.append(("t1t2 fused", stash_name, nbytes(arrays + stash_arrays), lambda: ops.t1_step_(*with_stash)))
        cases.append(("t1t2 fused, stash in fresh buffers", stash_name, nbytes(arrays + stash_arrays),
                      fresh_stash_step))
        cases.append(("t1t2 fused", "-", nbytes(arrays), lambda: ops.t1_step_(*without)))
        # the non-finite guard T1T2 runs by default: a read-only scan of the grads, then the update
        found = torch.zeros((), dtype=torch.float32, device=prob.device)
        cases.append(("t1t2 fused, guarded (check_finite)", "-", nbytes(arrays + 1),
                      lambda: ops.t1_step_(*without, found_inf=found, check_finite=True)))
        # under a GradScaler: its own check (torch's op), then the fused step unscales in its pass
        scale = torch.full((), 1.0, dtype=torch.float32, device=prob.device)
        inv = torch.full((), 1.0, dtype=torch.float32, device=prob.device)

        def scaler_step():
            torch._amp_foreach_non_finite_check_and_unscale_(prob.grads(), found, inv)
            ops.t1_step_(*without, grad_scale=scale, found_inf=found)
        cases.append(("t1t2 fused + GradScaler's check", "-", nbytes(arrays + 2), scaler_step))
    else:
        cases.append(("t1t2 fused", stash_name, nbytes(arrays + stash_arrays), "extension not loaded"))
    if triton_ops is not None:
        cases.append(("t1t2 triton", stash_name, nbytes(arrays + stash_arrays),
                      lambda: triton_ops.t1_step_(*with_stash)))
        cases.append(("t1t2 triton", "-", nbytes(arrays), lambda: triton_ops.t1_step_(*without)))
    cases.append(("reference", stash_name, nbytes(arrays + stash_arrays), lambda: reference.t1_step_(*with_stash)))
    cases.append(("reference", "-", nbytes(arrays), lambda: reference.t1_step_(*without)))
    for mode, kw in torch_modes().items():
        name = f"torch.optim.{'Adam' if adam else 'SGD'} {mode}"
        try:
            if adam:
                opt = torch.optim.Adam(prob.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=2 * L2_COEF, **kw)
            else:
                opt = torch.optim.SGD(prob.params, lr=LR, momentum=MOMENTUM, weight_decay=2 * L2_COEF, **kw)
            opt.step()  # allocates the state; also shows now whether this mode runs on this device
        except (RuntimeError, ValueError) as e:
            cases.append((name, "-", nbytes(arrays), f"unsupported: {str(e).splitlines()[0]}"))
            continue
        cases.append((name, "-", nbytes(arrays), opt.step))
        if mode == "fused":  # what GradScaler.step does for a fused torch optimizer: its check, then the step
            found_t = torch.zeros((), dtype=torch.float32, device=prob.device)
            inv_t = torch.full((), 1.0, dtype=torch.float32, device=prob.device)

            def torch_scaler_step(opt=opt):
                torch._amp_foreach_non_finite_check_and_unscale_(prob.grads(), found_t, inv_t)
                opt.grad_scale, opt.found_inf = inv_t, found_t
                try:
                    opt.step()
                finally:
                    del opt.grad_scale, opt.found_inf
            cases.append((f"{name} + GradScaler's check", "-", nbytes(arrays + 2), torch_scaler_step))
    return cases


def t2_paths(prob: Problem, jac_kind: str, ops, triton_ops=None) -> list[tuple]:
    """(implementation, stash, bytes, step) for the per-layer L2 hypergradient over the
    targeted tensors, computed as T1T2.hyper_step does: per tensor u = J ⊙ v, then the segmented dot."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    theta = [prob.params[i].detach().clone() for i in prob.targeted]  # the stash: pre-step θ
    v = [torch.randn(t.shape, generator=gen).to(prob.device) for t in theta]  # ∇θ C2(θ⁺)
    if jac_kind == "sgd":
        jac = [-LR] * len(theta)  # J = −η: a Python float, as in the stash of an sgd step
        nbytes = 2 * prob.target_numel * 4  # v, θ
    else:
        jac = [(-LR * (0.5 + torch.rand(t.shape, generator=gen))).to(prob.device) for t in theta]
        nbytes = 3 * prob.target_numel * 4  # J, v, θ

    def per_tensor(dot):
        return lambda: [dot(j * vi, th, 1, "l2") for j, vi, th in zip(jac, v, theta)]

    expected = torch.cat(per_tensor(reference.penalty_segment_dot)())
    fused = fused_t2(ops, theta, v, jac, expected)
    cases = []
    if fused is not None:
        cases.append(("t1t2 penalty_hypergrad (fused)", "-", nbytes, fused))
    if triton_ops is not None:
        cases.append(("t1t2 triton penalty_hypergrad", "-", nbytes, fused_t2(triton_ops, theta, v, jac, expected)))
    if ops is not None:
        cases.append(("t1t2 penalty_segment_dot, u = J⊙v in torch", "-", nbytes, per_tensor(ops.penalty_segment_dot)))
    cases.append(("reference", "-", nbytes, per_tensor(reference.penalty_segment_dot)))
    return cases


def fused_t2(ops, theta, v, jac, expected):
    """A step for the fused multi-tensor T2 op ``ops.penalty_hypergrad`` (schema in csrc/ops.cpp):
    one l2 segment of one group per tensor, J a tensor per tensor or a scalar. None where the
    extension has no such op; the reason (a string) where it fails or disagrees with the
    per-tensor path, so that an op in the making does not stop the run."""
    fn = getattr(ops, "penalty_hypergrad", None) if ops is not None else None
    if fn is None:
        return None
    n = len(theta)
    scalar = n > 0 and not isinstance(jac[0], torch.Tensor)
    args = (v, theta, [] if scalar else jac, jac if scalar else [0.0] * n, list(range(n)), [0] * n, [1] * n, LR)
    try:
        got = fn(*args)
        ok = got.shape == expected.shape and torch.allclose(got.to(expected.dtype), expected, rtol=1e-3, atol=1e-6)
    except Exception as e:  # noqa: BLE001 - report whatever the op raises, keep timing the rest
        return f"not timed: penalty_hypergrad raised {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    if not ok:
        return "not timed: penalty_hypergrad disagrees with the per-tensor path"
    return lambda: fn(*args)


# ---- the run -----------------------------------------------------------------------------------

def run(args) -> list[dict]:
    device = torch.device(args.device)
    ops = None
    if _extension.AVAILABLE:
        from t1t2_fast import ops
    elif not args.allow_missing_extension:
        raise SystemExit(f"the compiled extension is not built ({_extension.LOAD_ERROR}); "
                         f"run `pip install --no-build-isolation -e .` first")
    triton_ops = None
    if device.type == "cuda":  # on a CPU Triton runs only in its (very slow) interpreter: not timed
        from t1t2_fast import triton_kernels
        if triton_kernels.available():
            from types import SimpleNamespace

            from t1t2_fast.triton_kernels import hypergrad, t1_step
            triton_ops = SimpleNamespace(t1_step_=t1_step.t1_step_, penalty_hypergrad=hypergrad.penalty_hypergrad)
        else:
            print(f"Triton not timed: {triton_kernels.unavailable_reason()}", flush=True)
    interleaved = make_timer(device, args.max_seconds)
    # Samples pooled over --runs sweeps, each with fresh buffers: on this machine the bandwidth a
    # buffer gets varies by some 10% with where it lands in memory, and the sweeps sample that too.
    pooled: dict[tuple, dict] = {}
    for run_index in range(args.runs):
        for size in args.sizes:
            large = size >= LARGE_SIZE  # fewer rounds: a reference Adam step alone takes seconds there
            repeats, min_rounds = (min(args.repeats, 5), 3) if large else (args.repeats, 5)
            for model in args.models:
                shapes = layer_shapes(model, size)
                prob = Problem(shapes, device)
                head = dict(device=device.type, model=model, target=int(size), numel=prob.numel, tensors=len(shapes))
                print(f"[{time.strftime('%H:%M:%S')}] run {run_index + 1}/{args.runs}, {model}: {prob.numel:,} params "
                      f"in {len(shapes)} tensors ({len(prob.targeted)} weight tensors with {prob.target_numel:,} "
                      f"elements take the L2 penalty); load {load_average()}", flush=True)
                sections = [(f"T1 {name}", lambda name=name: t1_cases(prob, name, ops, triton_ops))
                            for name in ("sgd", "adam")]
                sections += [(f"T2 {jac}", lambda jac=jac: t2_paths(prob, jac, ops, triton_ops))
                             for jac in ("sgd", "adam-exact")]
                for kernel, make_cases in sections:
                    before = cpu_seconds()
                    with torch.no_grad():
                        cases = make_cases()
                        timed = [c for c in cases if not isinstance(c[3], str)]
                        # The roofline of each working set in the same rounds: copy_ between the two
                        # halves of B bytes, torch.sum over all B.
                        buffers = {nb: torch.randn(max(2, nb // 4), device=device) for nb in {c[2] for c in timed}}
                        rooflines = []
                        for buf in buffers.values():
                            half = buf.numel() // 2
                            rooflines += [lambda b=buf, h=half: b[h:2 * h].copy_(b[:h]), lambda b=buf: b.sum()]
                        samples = interleaved([c[3] for c in timed] + rooflines, repeats, min_rounds)
                    other_cpu, steal = others_share(before, cpu_seconds())
                    roof = {nb: (samples[len(timed) + 2 * k], samples[len(timed) + 2 * k + 1])
                            for k, nb in enumerate(buffers)}
                    assert all(isinstance(x, list) for pair in roof.values() for x in pair), roof
                    timed_samples = iter(samples)
                    for impl, stash, nbytes, step in cases:
                        entry = pooled.setdefault((size, model, kernel, impl, stash), dict(
                            row=dict(head, kernel=kernel, impl=impl, stash=stash, bytes=nbytes),
                            samples=[], copy=[], sum=[], other_cpu=0.0, steal=0.0, note=""))
                        entry["other_cpu"] = max(entry["other_cpu"], other_cpu)  # the noisiest sweep
                        entry["steal"] = max(entry["steal"], steal)
                        got = step if isinstance(step, str) else next(timed_samples)
                        if isinstance(got, str):
                            entry["note"] = got
                            continue
                        entry["samples"] += got
                        entry["copy"] += roof[nbytes][0]
                        entry["sum"] += roof[nbytes][1]
                    del cases, timed, buffers, rooflines, samples
                prob = sections = None  # free before the next layer list is built
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    rows = []
    for entry in pooled.values():
        row = dict(entry["row"], other_cpu=entry["other_cpu"], steal=entry["steal"], note=entry["note"])
        if entry["samples"]:
            med, p20, p80 = quantiles(entry["samples"])
            nbytes = row["bytes"]
            bw = nbytes / med / 1e9
            copy_bw = nbytes / statistics.median(entry["copy"]) / 1e9
            sum_bw = nbytes / statistics.median(entry["sum"]) / 1e9
            row.update(ms=med * 1e3, p20_ms=p20 * 1e3, p80_ms=p80 * 1e3, samples=len(entry["samples"]), GBps=bw,
                       copy_GBps=copy_bw, sum_GBps=sum_bw, of_copy=bw / copy_bw, of_sum=bw / sum_bw)
        rows.append(row)
    add_ratios(rows)
    return rows


def plain_torch(row) -> bool:
    """A torch.optim step on its own (the GradScaler variants are compared among themselves)."""
    return row["impl"].startswith("torch.optim") and "GradScaler" not in row["impl"]


def add_ratios(rows):
    """speedup_vs_reference: the reference time of the same kernel and stash over this time;
    vs_fastest_torch: this time over torch's fastest mode of the same kernel (without stash)."""
    for r in rows:
        if "ms" not in r:
            continue
        same = [q for q in rows if "ms" in q and (q["model"], q["numel"], q["kernel"]) == (r["model"], r["numel"],
                                                                                       r["kernel"])]
        ref = [q["ms"] for q in same if q["impl"] == "reference" and q["stash"] == r["stash"]]
        torch_ms = [q["ms"] for q in same if plain_torch(q)]
        r["speedup_vs_reference"] = ref[0] / r["ms"] if ref else None
        r["vs_fastest_torch"] = r["ms"] / min(torch_ms) if torch_ms else None


def targets(rows, at=TARGET_SIZE) -> list[str]:
    """The three targets, checked where the run has the 20M size."""
    sizes = [s for s in {r["target"] for r in rows} if abs(s - at) <= 0.1 * at]
    if not sizes:
        return [f"(The targets are stated at {at / 1e6:g}M parameters; this run has no such size.)"]
    size = sizes[0]
    out = [f"Targets at {size / 1e6:g}M parameters:"]
    timed = [r for r in rows if r["target"] == size and "ms" in r]
    fmt = lambda ok: "met" if ok else "MISSED"
    for model in dict.fromkeys(r["model"] for r in timed):
        mine = [r for r in timed if r["model"] == model]
        t1 = [r for r in mine if r["kernel"] == "T1 sgd" and r["impl"] == "t1t2 fused" and r["stash"] != "-"]
        torch_sgd = [r for r in mine if r["kernel"] == "T1 sgd" and plain_torch(r)]
        if t1 and torch_sgd:
            best = min(torch_sgd, key=lambda r: r["ms"])
            ratio = t1[0]["ms"] / best["ms"]
            out.append(f"- {model}: fused T1 sgd with stash {t1[0]['ms']:.2f} ms vs fastest torch SGD without stash "
                       f"({best['impl'].split()[-1]}) {best['ms']:.2f} ms: {ratio:.2f}x the time, "
                       f"{fmt(ratio <= 1)}")
            sp = t1[0]["speedup_vs_reference"]
            out.append(f"- {model}: fused T1 sgd with stash vs reference: {sp:.1f}x faster, {fmt(sp >= 3)} (≥ 3x)")
        for kernel in ("T2 sgd", "T2 adam-exact"):
            # the first compiled path: the fused op where the extension has it (what T1T2.hyper_step runs)
            t2 = [r for r in mine if r["kernel"] == kernel and r["impl"] != "reference"]
            for r in t2[:1]:
                out.append(f"- {model}: {kernel} via {r['impl']}: {r['GBps']:.1f} GB/s = {r['of_copy']:.0%} of "
                           f"copy_ ({r['copy_GBps']:.1f} GB/s), {fmt(r['of_copy'] >= 0.7)} (≥ 70%); "
                           f"{r['speedup_vs_reference']:.1f}x the reference, {fmt(r['speedup_vs_reference'] >= 3)} "
                           f"(≥ 3x)")
    return out


def markdown(rows, description: str) -> str:
    lines = [f"T1 / T2 kernels, fp32, {description}", "",
             "| model | params | kernel | implementation | stash | ms (p20-p80) | vs reference | vs fastest torch "
             "| GB/s | copy_ GB/s | of copy_ | of sum | others' CPU |",
             "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lead = f"| {r['model']} | {r['numel'] / 1e6:.1f}M | {r['kernel']} | {r['impl']} | {r['stash']} |"
        if "ms" not in r:
            lines.append(f"{lead} {r['note']} | | | | | | | |")
            continue
        sp, vt = r["speedup_vs_reference"], r["vs_fastest_torch"]
        lines.append(f"{lead} {r['ms']:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f}) | "
                     f"{f'{sp:.1f}x' if sp else ''} | {f'{vt:.2f}x' if vt else ''} | {r['GBps']:.1f} | "
                     f"{r['copy_GBps']:.1f} | {r['of_copy']:.0%} | {r['of_sum']:.0%} | {r['other_cpu']:.0%} |")
    lines += ["", "others' CPU: the share of this machine's cores that other processes used while the section "
                  "ran; above a few percent the figures are noisy."]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=None,
                    help="total fp32 parameter counts (default 1e6 2e7; --large adds 1e8; --quick: 2e4 2e5)")
    ap.add_argument("--large", action="store_true",
                    help="add 100M parameters (about 2.5 min per sweep on a quiet 2-core machine, ~14 GB peak; "
                         "with --runs 1 for a single sweep)")
    ap.add_argument("--models", nargs="+", default=["resnet50", "transformer"], choices=["resnet50", "transformer"])
    ap.add_argument("--repeats", type=int, default=None,
                    help="rounds of samples per section (default 20, at most 5 from 50M params; --quick: 3)")
    ap.add_argument("--max-seconds", type=float, default=8.0,
                    help="stop sampling a section after this long once it has 5 rounds (3 from 50M params)")
    ap.add_argument("--runs", type=int, default=None,
                    help="sweeps over all sizes with fresh buffers, samples pooled (default 3; --quick: 1)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: a smoke run")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--allow-missing-extension", action="store_true",
                    help="time torch and the reference even if the compiled extension did not load")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    if args.sizes is None:
        args.sizes = QUICK_SIZES if args.quick else [1e6, 2e7]
    if args.large:
        args.sizes = [*args.sizes, 1e8]
    if args.repeats is None:
        args.repeats = 3 if args.quick else 20
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch has no usable CUDA device")
    load_before = load_average()
    started = time.perf_counter()
    rows = run(args)
    description = (f"{machine(device)}; {args.runs} sweep(s) pooled; load average {load_before} before, "
                   f"{load_average()} after; {time.perf_counter() - started:.0f} s")
    table = markdown(rows, description)
    goals = targets(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fields = ["device", "model", "target", "numel", "tensors", "kernel", "impl", "stash", "bytes", "other_cpu",
              "steal", "ms", "p20_ms", "p80_ms", "samples", "GBps", "copy_GBps", "sum_GBps", "of_copy", "of_sum",
              "speedup_vs_reference", "vs_fastest_torch", "note"]
    with open(out / "kernels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    (out / "kernels.md").write_text(table + "\n\n" + "\n".join(goals) + "\n")
    print(table)
    print()
    print("\n".join(goals))
    print(f"\nwrote {out / 'kernels.csv'} and {out / 'kernels.md'}")


if __name__ == "__main__":
    main()
