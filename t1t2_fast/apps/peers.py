"""``t1t2 peers``: the one-step hypergradient computed by ``T1T2`` against the
same quantity computed with the differentiable optimizers of ``higher`` and ``torchopt``.

The problem: an MLP 784-w-w-10 (ReLU) on synthetic data, L2 penalties on its weight matrices
(one coefficient per matrix, or one for the network) as hyperparameters, SGD with momentum or Adam.
A *hyper iteration* is what every method must do to train one step and tune the penalties on it:

1. a T1 step θ⁺ = step(θ, ∇θ[L_train(θ) + Σ c_h Σ θ²]) on a training batch, and
2. the one-step hypergradient h_h = d C_val(θ⁺) / d λ_h of the validation loss on a validation
   batch of the same size, with c_h = exp(λ_h) (T1T2's default "log" transform: λ is the raw
   hyperparameter), θ and the optimizer state held fixed (docs/design.md),
3. then λ ← λ − η_h h (plain SGD on λ, the same for everyone) so that all methods stay on one
   trajectory and can be compared step by step.

Methods (``METHODS``):

- ``ours-cpp`` / ``ours-reference``: ``T1T2(..., hypergrad="exact")`` with the compiled or the
  pure-PyTorch backend: ``step(train)`` + ``hyper_step(val)``; h is ``opt.last_hypergrad``.
- ``higher``: a functional copy of the model (``higher.patch.monkeypatch``) and higher's
  differentiable SGD/Adam (``higher.optim.get_diff_optim``): ``diffopt.step(train + penalty)``, the
  validation loss on the new fast weights, ``torch.autograd.grad`` w.r.t. λ; then the fast weights
  and optimizer state are detached so the next iteration starts without the old graph (the
  cheapest way we found to run higher step after step; a fresh ``innerloop_ctx`` per iteration
  would add a model copy and write-back).
- ``torchopt``: ``torchopt.MetaSGD`` / ``MetaAdam`` on the module itself, then
  ``torchopt.stop_gradient`` on the module and the optimizer. Always its pure-Python path
  (``use_accelerated_op=False``): torchopt's C++ op (``torchopt._C``) is built for another torch.
- ``torch``: a plain training step (``torch.optim.SGD/Adam``, foreach, L2 as per-group
  ``weight_decay = 2c``), no hypergradient: the floor any hyper iteration costs more than.

Where the peers' update rules differ from PyTorch's (docs/design.md), the experiment sets them up so
the function θ⁺(θ, ĝ) is the same:

- momentum: torch, ours, higher and torchopt all start with b = ĝ on the first step (ours: b = 0
  then b ← μb + ĝ; torchopt: ``trace = 0 + ĝ`` on its first call). Later steps are μb + ĝ
  everywhere. Each method advances its own state from the same start, so step 2 and later compare
  states that each built for itself.
- Adam eps: higher computes θ − η·√(1−β2ᵗ)/(1−β1ᵗ) · m/(√s + eps), i.e. eps/√(1−β2ᵗ) in
  PyTorch's form; we pass it eps·√(1−β2ᵗ) for step t, which makes the update identical.
- Adam bias correction in torchopt: ``pow(β, count)`` with an int64 count gives torch's *default*
  dtype, so in float64 it is off by ~1e-8 relative unless the default dtype is float64; the float64
  agreement check sets it (``default_dtype``).

Agreement is the norm-wise relative difference max_h |h_peer − h_ours| / max_h |h_ours| per hyper
iteration. Peak memory is measured with torch's profiler allocation events (``peak_memory``).
"""
from __future__ import annotations

import contextlib
import csv
import gc
import importlib
import math
import statistics
import time
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function

import t1t2_fast as t1t2
from t1t2_fast import _extension

from .common import plain_step, t1t2_iteration
from .models import make_mlp

PEERS = ("higher", "torchopt")
OURS = ("ours-cpp", "ours-reference")
PLAIN = "torch"
METHODS = OURS + PEERS + (PLAIN,)
OPTIMIZERS = ("sgd", "adam")
INSTALL_HINT = "pip install t1t2_fast[experiments]"


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ---------------------------------------------------------------------------------------------
# the problem
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    width: int = 256
    optimizer: str = "sgd"
    per: str = "layer"            # "layer": one L2 coefficient per weight matrix; "network": one in all
    batch: int = 128              # training and validation batch size
    in_features: int = 784
    classes: int = 10
    depth: int = 2
    dtype: torch.dtype = torch.float32
    lr: float | None = None       # default: 0.05 for sgd, 1e-3 for adam
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    l2_init: float = 1e-3         # initial c, natural scale
    hyper_lr: float = 0.1         # plain SGD on raw λ = log c
    seed: int = 0
    batches: int = 4              # distinct (train, val) batch pairs, used in turn

    @property
    def step_lr(self) -> float:
        return self.lr if self.lr is not None else (0.05 if self.optimizer == "sgd" else 1e-3)


@dataclass
class Batches:
    train: list[tuple[torch.Tensor, torch.Tensor]]
    val: list[tuple[torch.Tensor, torch.Tensor]]

    def __call__(self, i: int):
        k = i % len(self.train)
        return self.train[k], self.val[k]


def make_model(p: Problem):
    """The MLP with named layers fc1, fc2, ..., out (hyperparameters read ``l2.fc1.weight`` ...)."""
    return make_mlp(p.in_features, p.classes, p.width, p.depth).to(p.dtype)


def make_inputs(p: Problem) -> tuple[dict[str, torch.Tensor], Batches]:
    """Initial weights (one state dict every method copies) and synthetic batches: x ~ N(0, 1),
    labels from a fixed random linear teacher, so the losses are those of a learnable task."""
    # The weights are drawn in float32 whatever the problem's dtype, so a float64 problem starts
    # from the same values as its float32 twin (and can serve as its exact answer).
    with default_dtype(torch.float32):
        torch.manual_seed(p.seed)
        model = make_model(replace(p, dtype=torch.float32))
    init = {k: v.detach().to(p.dtype) for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(p.seed + 1)
    teacher = torch.randn(p.in_features, p.classes, generator=g, dtype=torch.float64)

    def batch():
        x = torch.randn(p.batch, p.in_features, generator=g, dtype=torch.float64)
        return x.to(p.dtype), (x @ teacher).argmax(1)

    return init, Batches([batch() for _ in range(p.batches)], [batch() for _ in range(p.batches)])


def penalty_groups(model, per: str) -> dict[str, list[str]]:
    """{hyperparameter name: parameter names}, named as T1T2 names them (weights only: dim >= 2)."""
    weights = [n for n, t in model.named_parameters() if t.dim() >= 2]
    return {"l2": weights} if per == "network" else {f"l2.{n}": [n] for n in weights}


# ---------------------------------------------------------------------------------------------
# methods: each holds its own copy of the model and runs hyper iterations
# ---------------------------------------------------------------------------------------------
class Runner:
    name = "?"
    tunes = True  # False for the plain training step

    def __init__(self, p: Problem, init: dict, data: Batches):
        self.p, self.data, self.steps = p, data, 0
        self.model = make_model(p)
        self.model.load_state_dict(init)
        self.groups = penalty_groups(self.model, p.per)

    def iteration(self) -> dict[str, torch.Tensor] | None:
        """One hyper iteration; returns {name: hypergradient of raw λ} (None for plain training)."""
        (xt, yt), (xv, yv) = self.data(self.steps)
        self.steps += 1
        return self._iteration(xt, yt, xv, yv)

    def _iteration(self, xt, yt, xv, yv):
        raise NotImplementedError

    def weights(self) -> dict[str, torch.Tensor]:
        """The current θ by parameter name."""
        raise NotImplementedError


class Ours(Runner):
    def __init__(self, p, init, data, backend: str):
        super().__init__(p, init, data)
        self.name = f"ours-{backend}"
        self.opt = t1t2.T1T2(self.model, [t1t2.L2(p.l2_init, per=p.per)], optimizer=p.optimizer, lr=p.step_lr,
                             momentum=p.momentum if p.optimizer == "sgd" else 0.0, betas=p.betas, eps=p.eps,
                             hyper_optimizer="sgd", hyper_lr=p.hyper_lr, hypergrad="exact", backend=backend,
                             free_grads=True)  # like the peers, no .grad buffer beside the hyper step's v
        if self.opt.backend.name != backend:
            raise RuntimeError(f"backend {backend!r} is not available here (got {self.opt.backend.name!r})")
        assert set(self.opt.raw_hyperparameters()) == set(self.groups)

    def _iteration(self, xt, yt, xv, yv):
        t1t2_iteration(self.opt, self.model, (xt, yt), lambda: (xv, yv))  # hyper_every=1: a T2 step every time
        return self.opt.last_hypergrad

    def weights(self):
        return dict(self.model.named_parameters())


class _Differentiable(Runner):
    """Common part of the peers: raw λ leaves and the training loss with the penalty in it."""

    def __init__(self, p, init, data):
        super().__init__(p, init, data)
        self.raw = {h: torch.full((), math.log(p.l2_init), dtype=p.dtype, requires_grad=True) for h in self.groups}

    def penalty(self, named: dict[str, torch.Tensor]) -> torch.Tensor:
        total = 0
        for h, names in self.groups.items():
            total = total + self.raw[h].exp() * sum(named[n].pow(2).sum() for n in names)
        return total

    def hyper_update(self, grads: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for h, g in grads.items():
                self.raw[h].sub_(g, alpha=self.p.hyper_lr)


class Higher(_Differentiable):
    name = "higher"

    def __init__(self, p, init, data, correct_eps: bool = True):
        """``correct_eps=False`` runs higher's Adam as it comes (eps outside the bias correction):
        the tests use it to show that the agreement check sees that difference."""
        super().__init__(p, init, data)
        import higher  # optional dependency (the experiments extra)

        self.correct_eps = correct_eps

        params = list(self.model.parameters())
        if p.optimizer == "sgd":
            base = torch.optim.SGD(params, lr=p.step_lr, momentum=p.momentum)
        else:
            base = torch.optim.Adam(params, lr=p.step_lr, betas=p.betas, eps=p.eps)
        self.names = [n for n, _ in self.model.named_parameters()]
        # copy_initial_weights=False: the fast weights start as the module's own tensors, and once the
        # module and the torch optimizer are dropped here nothing keeps a second copy alive.
        self.fmodel = higher.patch.monkeypatch(self.model, copy_initial_weights=False, track_higher_grads=True)
        self.diffopt = higher.optim.get_diff_optim(base, params, fmodel=self.fmodel, track_higher_grads=True)
        self.model = None
        del base, params
        self.adam_steps = 0

    def _iteration(self, xt, yt, xv, yv):
        fm = self.fmodel
        named = dict(zip(self.names, fm.fast_params))
        loss = F.cross_entropy(fm(xt), yt) + self.penalty(named)
        override = None
        if self.p.optimizer == "adam" and self.correct_eps:  # higher: eps/√(1−β2ᵗ) in PyTorch's form; make it eps
            self.adam_steps += 1
            override = {"eps": [self.p.eps * math.sqrt(1 - self.p.betas[1] ** self.adam_steps)]}
        self.diffopt.step(loss, override=override)
        val = F.cross_entropy(fm(xv), yv)
        names = list(self.raw)
        grads = dict(zip(names, torch.autograd.grad(val, [self.raw[h] for h in names])))
        # Cut the graph: the next iteration differentiates through its own step only.
        fm.update_params([t.detach().requires_grad_() for t in fm.fast_params])
        for group_state in self.diffopt.state:
            for st in group_state.values():
                for k, v in st.items():
                    if isinstance(v, torch.Tensor):
                        st[k] = v.detach()
        self.hyper_update(grads)
        return grads

    def weights(self):
        return dict(zip(self.names, self.fmodel.fast_params))


def torchopt_c_loads() -> bool:
    """Whether torchopt's compiled op loads against this torch (we never use it either way)."""
    try:
        importlib.import_module("torchopt._C.adam_op")
        return True
    except Exception:  # an ImportError with an undefined symbol when built for another torch
        return False


class TorchOpt(_Differentiable):
    name = "torchopt"

    def __init__(self, p, init, data):
        super().__init__(p, init, data)
        import torchopt  # optional dependency (the experiments extra)

        self._torchopt = torchopt
        if p.optimizer == "sgd":
            self.opt = torchopt.MetaSGD(self.model, lr=p.step_lr, momentum=p.momentum, moment_requires_grad=False)
        else:
            self.opt = torchopt.MetaAdam(self.model, lr=p.step_lr, betas=p.betas, eps=p.eps,
                                         moment_requires_grad=False, use_accelerated_op=False)

    def _iteration(self, xt, yt, xv, yv):
        model = self.model
        loss = F.cross_entropy(model(xt), yt) + self.penalty(dict(model.named_parameters()))
        self.opt.step(loss)
        val = F.cross_entropy(model(xv), yv)
        names = list(self.raw)
        grads = dict(zip(names, torch.autograd.grad(val, [self.raw[h] for h in names])))
        self._torchopt.stop_gradient(model)
        self._torchopt.stop_gradient(self.opt)
        self.hyper_update(grads)
        return grads

    def weights(self):
        return dict(self.model.named_parameters())


class Plain(Runner):
    """A plain training step: the penalty as per-group weight decay 2c (Ω = c θ² ⇒ ∇Ω = 2cθ)."""

    name = PLAIN
    tunes = False

    def __init__(self, p, init, data):
        super().__init__(p, init, data)
        named = dict(self.model.named_parameters())
        decayed = {n for names in self.groups.values() for n in names}
        groups = [{"params": [named[n] for n in names], "weight_decay": 2 * p.l2_init} for names in self.groups.values()]
        groups.append({"params": [t for n, t in named.items() if n not in decayed], "weight_decay": 0.0})
        if p.optimizer == "sgd":
            self.opt = torch.optim.SGD(groups, lr=p.step_lr, momentum=p.momentum, foreach=True)
        else:
            self.opt = torch.optim.Adam(groups, lr=p.step_lr, betas=p.betas, eps=p.eps, foreach=True)

    def _iteration(self, xt, yt, xv, yv):
        plain_step(self.opt, self.model, (xt, yt))
        return None

    def weights(self):
        return dict(self.model.named_parameters())


def make_runner(method: str, p: Problem, init: dict, data: Batches) -> Runner:
    if method in OURS:
        return Ours(p, init, data, backend=method.split("-", 1)[1])
    return {"higher": Higher, "torchopt": TorchOpt, PLAIN: Plain}[method](p, init, data)


# ---------------------------------------------------------------------------------------------
# availability
# ---------------------------------------------------------------------------------------------
def available_peers(wanted=PEERS) -> tuple[list[str], dict[str, str]]:
    """(the peers that import, {missing peer: why})."""
    ok, missing = [], {}
    for name in wanted:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(name)
            ok.append(name)
        except Exception as exc:  # ImportError, or a broken install
            missing[name] = f"{type(exc).__name__}: {exc}"
    return ok, missing


def compiled_available() -> bool:
    return bool(_extension.AVAILABLE)


# ---------------------------------------------------------------------------------------------
# agreement
# ---------------------------------------------------------------------------------------------
def rel_diff(h: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """max_h |h − ref| / max_h |ref| over the hyperparameters (norm-wise, so a near-zero entry does
    not blow it up)."""
    a = torch.stack([h[k].detach().double().reshape(()) for k in ref])
    b = torch.stack([ref[k].detach().double().reshape(()) for k in ref])
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


def agreement(p: Problem, methods: list[str], steps: int = 3, reference: str | None = None) -> dict:
    """Run ``methods`` in lockstep for ``steps`` hyper iterations from the same weights and data;
    return {method: [rel diff vs the reference method per iteration]} plus the hypergradients.
    The reference is ours-cpp where compiled, else ours-reference."""
    reference = reference or ("ours-cpp" if "ours-cpp" in methods else "ours-reference")
    tuned = [m for m in methods if m != PLAIN]
    with default_dtype(p.dtype if p.dtype == torch.float64 else torch.get_default_dtype()):
        init, data = make_inputs(p)
        runners = {m: make_runner(m, p, init, data) for m in tuned}
        hyper = {m: [] for m in tuned}
        for _ in range(steps):
            for m, r in runners.items():
                hyper[m].append({k: v.detach().clone() for k, v in r.iteration().items()})
    diffs = {m: [rel_diff(hyper[m][i], hyper[reference][i]) for i in range(steps)] for m in tuned}
    return {"reference": reference, "rel_diff": diffs, "hypergrads": hyper}


# ---------------------------------------------------------------------------------------------
# time and memory
# ---------------------------------------------------------------------------------------------
def time_methods(p: Problem, methods: list[str], repeats: int, warmup: int = 2, compare_first: int = 2):
    """Median wall time of one hyper iteration per method, the methods taking turns (each repeat
    runs every method once, in a rotated order) so that load from other processes spreads over all
    of them. Also the agreement of the first ``compare_first`` hypergradients with ours (the
    methods are in lockstep: same start, same batches, same λ updates)."""
    init, data = make_inputs(p)
    runners = {m: make_runner(m, p, init, data) for m in methods}
    ours = next((m for m in OURS if m in runners), None)
    hyper: dict[str, list] = {m: [] for m in methods}
    samples: dict[str, list[float]] = {m: [] for m in methods}
    order = list(methods)
    for i in range(warmup + repeats):
        if i >= warmup:
            order = order[1:] + order[:1]
        for m in order:
            r = runners[m]
            t0 = time.perf_counter()
            h = r.iteration()
            dt = time.perf_counter() - t0
            if i >= warmup:
                samples[m].append(dt)
            if h is not None and len(hyper[m]) < compare_first:
                hyper[m].append({k: v.detach().clone() for k, v in h.items()})
    out = {}
    for m in methods:
        s = samples[m]
        diff = None
        if ours is not None and hyper[m] and m != ours:
            diff = max(rel_diff(a, b) for a, b in zip(hyper[m], hyper[ours]))
        elif m == ours:
            diff = 0.0
        out[m] = {"median_ms": 1e3 * statistics.median(s), "min_ms": 1e3 * min(s), "max_ms": 1e3 * max(s),
                  "samples_ms": [1e3 * x for x in s], "rel_diff": diff}
    del runners
    gc.collect()
    return out


def _allocations(prof) -> list[tuple[int, int]]:
    """(time ns, signed bytes) of every CPU allocation and free the profiler saw, in time order."""
    out, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            out.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    out.sort()
    return out


def _windows(prof, prefix: str) -> dict[str, tuple[int, int]]:
    """{name: (start ns, end ns)} of the record_function ranges whose name starts with ``prefix``."""
    out, stack = {}, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.name.startswith(prefix):
            out[node.name] = (node.start_time_ns, node.end_time_ns)
        stack.extend(node.children)
    return out


MEMORY_METHOD = (
    "torch.profiler(profile_memory=True) allocation events of torch's CPU allocator. Per method: the "
    "running total of bytes allocated and not yet freed, counted from just before the method builds its "
    "model copy and optimizer; peak MB = its largest value during the method's second hyper iteration "
    "(the first one creates the optimizer state). So it counts everything the method holds or creates "
    "(weights, optimizer state, stash, gradients, autograd graphs, temporaries), not the shared initial "
    "weights and data batches made before, nor memory outside torch's allocator (Python objects, the C "
    "allocator's caching and fragmentation).")


def peak_memories(p: Problem, methods: list[str], init: dict, data: Batches, warmup: int = 1) -> dict[str, float]:
    """{method: peak bytes} (see ``MEMORY_METHOD``), the methods one after another in one profile."""
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the profiler's notes about missing CUDA/kineto features
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for m in methods:
                with record_function(f"peers::method::{m}"):
                    runner = make_runner(m, p, init, data)
                    for _ in range(warmup):
                        runner.iteration()
                    with record_function(f"peers::measured::{m}"):
                        runner.iteration()
                    del runner
                    gc.collect()
    events = _allocations(prof)
    windows = _windows(prof, "peers::")
    out = {}
    for m in methods:
        (setup, _), (start, end) = windows[f"peers::method::{m}"], windows[f"peers::measured::{m}"]
        live, base, peak = 0, 0, 0
        for t, size in events:
            if t > end:
                break
            live += size
            if t < setup:
                base = live  # the total before this method allocated anything
            if t < start:
                peak = live  # the total when the measured iteration begins
            else:
                peak = max(peak, live)
        out[m] = float(peak - base)
    return out


def peak_memory(p: Problem, method: str, init: dict, data: Batches, warmup: int = 1) -> float:
    """Peak bytes of one steady-state hyper iteration of ``method`` (see ``MEMORY_METHOD``)."""
    return peak_memories(p, [method], init, data, warmup)[method]


# ---------------------------------------------------------------------------------------------
# the experiment: time, memory, agreement; outputs
# ---------------------------------------------------------------------------------------------
def ours_method(methods: list[str]) -> str:
    """The method the targets are judged on: the compiled backend where it is built."""
    return next(m for m in OURS if m in methods)


def check_agreement(optimizers, methods, width: int, steps: int, per: str, seed: int, batch: int) -> dict:
    """Per optimizer: float64 hypergradients of every method vs ours (the parity check, bound
    ``RTOL64``), and each method's float32 hypergradients against that float64 answer."""
    tuned = [m for m in methods if m != PLAIN]
    out = {}
    for opt in optimizers:
        p64 = Problem(width=width, optimizer=opt, per=per, seed=seed, batch=batch, dtype=torch.float64)
        r64 = agreement(p64, tuned, steps=steps)
        truth = r64["hypergrads"][r64["reference"]]
        r32 = agreement(replace(p64, dtype=torch.float32), tuned, steps=steps)
        out[opt] = {
            "reference": r64["reference"],
            "float64_rel_diff": r64["rel_diff"],
            "float64_max_rel_diff": {m: max(d) for m, d in r64["rel_diff"].items()},
            "float32_error_vs_float64": {m: [rel_diff(r32["hypergrads"][m][i], truth[i]) for i in range(steps)]
                                         for m in tuned},
        }
        out[opt]["passed"] = all(d <= RTOL64 for d in out[opt]["float64_max_rel_diff"].values())
    return out


RTOL64 = 1e-8  # float64 parity bound (norm-wise relative), as in tests/apps/test_peers.py


def run_experiment(widths, optimizers, methods, repeats: int, warmup: int = 2, batch: int = 128,
                   per: str = "layer", seed: int = 0, agree_width: int = 256, agree_steps: int = 4,
                   progress=None) -> dict:
    """Rows (one per optimizer x width x method) of median time, peak memory and agreement, the
    float64/float32 agreement study, and the verdict on the targets at the largest width."""
    rows = []
    for opt in optimizers:
        for w in widths:
            p = Problem(width=w, optimizer=opt, per=per, batch=batch, seed=seed)
            timing = time_methods(p, methods, repeats=repeats, warmup=warmup)
            init, data = make_inputs(p)
            params = sum(t.numel() for t in init.values())
            peaks = peak_memories(p, methods, init, data)
            for m in methods:
                t = timing[m]
                rows.append({"method": m, "optimizer": opt, "width": w, "params": params,
                             "median_ms": t["median_ms"], "min_ms": t["min_ms"], "max_ms": t["max_ms"],
                             "peak_mb": peaks[m] / 2 ** 20, "rel_diff_vs_ours": t["rel_diff"]})
            del init, data
            gc.collect()
            if progress:
                progress(opt, w, [r for r in rows if r["optimizer"] == opt and r["width"] == w])
    agree = check_agreement(optimizers, methods, agree_width, agree_steps, per, seed, batch)
    return {"rows": rows, "agreement": agree, "verdict": verdict(rows, methods)}


SPEED_TARGET, MEMORY_TARGET = 3.0, 0.5


def verdict(rows: list[dict], methods: list[str]) -> dict:
    """Per optimizer at the largest width: ours vs the fastest peer (speed = peer time / ours,
    memory = ours / peer), and whether the targets (>= 3x faster, <= 0.5x memory) are met."""
    ours = ours_method(methods)
    out = {}
    for opt in dict.fromkeys(r["optimizer"] for r in rows):
        width = max(r["width"] for r in rows if r["optimizer"] == opt)
        cell = {r["method"]: r for r in rows if r["optimizer"] == opt and r["width"] == width}
        peers = [m for m in PEERS if m in cell]
        if not peers:
            continue
        fastest = min(peers, key=lambda m: cell[m]["median_ms"])
        speed = cell[fastest]["median_ms"] / cell[ours]["median_ms"]
        memory = cell[ours]["peak_mb"] / cell[fastest]["peak_mb"]
        out[opt] = {"width": width, "ours": ours, "fastest_peer": fastest,
                    "ours_ms": cell[ours]["median_ms"], "peer_ms": cell[fastest]["median_ms"],
                    "ours_mb": cell[ours]["peak_mb"], "peer_mb": cell[fastest]["peak_mb"],
                    "speedup": speed, "memory_ratio": memory,
                    "speed_target_met": speed >= SPEED_TARGET, "memory_target_met": memory <= MEMORY_TARGET}
        if PLAIN in cell:
            out[opt]["plain_step_ms"] = cell[PLAIN]["median_ms"]
            out[opt]["ours_over_plain_step"] = cell[ours]["median_ms"] / cell[PLAIN]["median_ms"]
    return out


CSV_COLUMNS = ("method", "optimizer", "width", "params", "median_ms", "min_ms", "max_ms", "peak_mb",
               "rel_diff_vs_ours")


def write_csv(path: str, rows: list[dict]) -> None:
    def fmt(v):
        if v is None:
            return ""
        return f"{v:.6g}" if isinstance(v, float) else v

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([fmt(r[c]) for c in CSV_COLUMNS])


def markdown_table(rows: list[dict], methods: list[str]) -> str:
    """One line per optimizer x width; a cell is "median ms / peak MB" of one method."""
    lines = ["| optimizer | width | params | " + " | ".join(methods) + " |",
             "|---|---:|---:|" + "---:|" * len(methods)]
    cells = {}
    for r in rows:
        cells.setdefault((r["optimizer"], r["width"], r["params"]), {})[r["method"]] = r
    for (opt, w, n), cell in cells.items():
        text = " | ".join(f"{cell[m]['median_ms']:.1f} ms / {cell[m]['peak_mb']:.1f} MB" if m in cell else "—"
                          for m in methods)
        lines.append(f"| {opt} | {w} | {n / 1e6:.2f}M | {text} |")
    return "\n".join(lines) + "\n"


STYLE = {"ours-cpp": ("C0", "-", "o"), "ours-reference": ("C0", "--", "s"), "higher": ("C1", "-", "^"),
         "torchopt": ("C2", "-", "v"), PLAIN: ("gray", ":", ".")}


def plot(path: str, rows: list[dict], methods: list[str], title: str) -> None:
    """Time and peak memory of a hyper iteration vs width, log-log, one row per optimizer."""
    from matplotlib.figure import Figure  # optional dependency (the apps extra)

    opts = list(dict.fromkeys(r["optimizer"] for r in rows))
    fig = Figure(figsize=(11, 3.9 * len(opts) + 0.6))
    axes = fig.subplots(len(opts), 2, squeeze=False)
    for i, opt in enumerate(opts):
        for j, (key, label) in enumerate((("median_ms", "median time of a hyper iteration (ms)"),
                                          ("peak_mb", "peak memory (MB = 2^20 bytes, torch allocations)"))):
            ax = axes[i][j]
            for m in methods:
                pts = sorted((r["width"], r[key]) for r in rows if r["optimizer"] == opt and r["method"] == m)
                if not pts:
                    continue
                color, ls, marker = STYLE.get(m, ("k", "-", "x"))
                name = f"{m} (plain training step)" if m == PLAIN else m
                ax.plot(*zip(*pts), ls=ls, marker=marker, color=color, label=name, lw=1.6)
            ax.set_xscale("log", base=2)
            widths = sorted({r["width"] for r in rows})
            ax.set_xticks(widths, [str(w) for w in widths])
            ax.minorticks_off()
            ax.set_yscale("log")
            ax.set_xlabel("hidden width w (MLP 784-w-w-10)")
            ax.set_ylabel(label)
            ax.set_title(f"{opt}: {'time' if j == 0 else 'memory'}")
            ax.grid(True, which="both", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
