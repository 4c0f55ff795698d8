"""Overhead of T1-T2 against plain training, as a function of model size (``t1t2 overhead``).

The paper's claim: "only 30% overhead regardless of model size" with one hyper step every 10
training steps. For each model (MLPs 784-w-w-10 and a small CNN on 1x28x28 inputs), each setting
and each backend, this times whole epochs of

- **plain training**: the same network (the same GaussianNoise modules at fixed levels in the
  "noise" setting), the same loss, torch's own SGD (or Adam) with the same per-layer L2 as
  ``weight_decay``, in its faster implementation on this machine (foreach or fused, both timed);
- **T1-T2**: ``T1T2(model, [L2(per="layer")], ...)`` taking ``opt.step`` every step and
  ``opt.hyper_step`` (with an equal-size validation batch) every ``hyper_every`` steps.

Settings: ``penalties`` (per-layer L2 only, no noise modules) and ``noise`` (per-layer L2 plus
additive per-layer noise on the input and after every hidden ReLU, tuned with ``noise_hypergrad``
"fd"). The reported overhead is T1-T2's epoch time over plain training's, minus one.

The floor beside each figure: a hyper iteration cannot cost less than the validation forward/
backward it differentiates (plus, for "fd", one more training forward/backward at the perturbed
weights), so the floor is those times (measured on their own in the same run) divided by
``hyper_every`` plain steps.

Timing: every variant of a (model, setting) is run for one epoch of ``steps`` steps per round,
variants interleaved within a round so that drift of a shared machine affects all alike; each
figure is the median over rounds of that round's ratio (T1-T2 epoch / plain epoch). The data are fixed random batches (MNIST-shaped), generated
before timing: input pipelines are not what is measured.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import t1t2_fast as t1t2
from t1t2_fast import GaussianNoise, no_noise

from .common import plain_step, progress, t1t2_iteration, write_csv as _write_csv
from .models import MODELS, make_model

SETTINGS = ("penalties", "noise")
BACKENDS = ("cpp", "reference")
TARGETS = {"penalties": 12.0, "noise": 25.0}   # % at hyper_every=10 on the fused backend
SPREAD_TARGET = 5.0                            # max - min across models, percentage points


@dataclass
class Config:
    models: tuple = MODELS
    settings: tuple = SETTINGS
    backends: tuple = BACKENDS
    hyper_every: tuple = (10, 1)
    steps: int = 10           # steps per timed epoch
    rounds: int = 3           # epochs timed per variant (median of per-round ratios)
    batch_size: int = 128     # training and validation batch
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    l2: float = 1e-4
    noise: float = 0.1
    seed: int = 0
    hypergrad: str = "exact"    # T1T2(hypergrad=): the paper's scheme is "sgd"
    dataset: str = "synthetic"  # or "fashion-mnist": batches of real images (shapes and timing as synthetic)
    data_dir: str | None = None


@dataclass
class Row:
    model: str
    params: int
    setting: str
    backend: str
    hyper_every: int
    plain_ms: float            # plain training, ms per step (median epoch / steps)
    t1t2_ms: float             # T1-T2, ms per step
    overhead_pct: float
    floor_pct: float           # validation fwd/bwd (+ fd's extra training fwd/bwd) per plain step
    t1_only_pct: float         # T1T2 without hyper steps vs plain: the fused T1 update alone
    plain_impl: str = ""
    extra: dict = field(default_factory=dict)


def batches(name: str, batch: int, count: int, gen: torch.Generator, images=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` fixed batches (inputs, labels) shaped for ``make_model(name)``: random, or drawn from
    ``images`` (a data.Split of 784-pixel images, e.g. fashion-mnist's training split)."""
    shape = (batch, 1, 28, 28) if name == "cnn" else (batch, 784)
    if images is None:
        return [(torch.randn(shape, generator=gen), torch.randint(0, 10, (batch,), generator=gen)) for _ in range(count)]
    out = []
    for _ in range(count):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        out.append((images.x[idx].reshape(shape).contiguous(), images.y[idx].clone()))
    return out


_DATA_CACHE: dict = {}


def _real_data(name: str, seed: int, data_dir):
    """data.load_data, read once per process (every (model, setting) takes its batches from it)."""
    key = (name, seed, data_dir)
    if key not in _DATA_CACHE:
        from .data import load_data
        _DATA_CACHE[key] = load_data(name, seed=seed, data_dir=data_dir)
    return _DATA_CACHE[key]


def _set_noise_backend(model: nn.Module, backend: str) -> None:
    for m in model.modules():
        if isinstance(m, GaussianNoise):
            m.backend = backend


def _torch_optimizer(cfg: Config, model: nn.Module, impl: str):
    """torch's optimizer with the same per-layer L2 (weight_decay on the weight matrices)."""
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg.l2}, {"params": rest, "weight_decay": 0.0}]
    flags = {"foreach": True} if impl == "foreach" else {"fused": True}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **flags)
    return torch.optim.Adam(groups, lr=cfg.lr, **flags)


def _t1t2(cfg: Config, model: nn.Module, backend: str, hyper_every: int):
    # per="layer" on the weight matrices, like the torch baseline's weight_decay groups
    return t1t2.T1T2(model, [t1t2.L2(cfg.l2, per="layer")], optimizer=cfg.optimizer, lr=cfg.lr,
                     momentum=cfg.momentum, hyper_lr=1e-3, hyper_every=hyper_every, noise_hypergrad="fd",
                     hypergrad=cfg.hypergrad,
                     backend=backend, seed=cfg.seed)


def plain_epoch(model, opt, train, steps):
    def run():
        for k in range(steps):
            plain_step(opt, model, train[k % len(train)])
    return run


def t1t2_epoch(model, opt, train, val, steps):
    def run():
        for k in range(steps):
            t1t2_iteration(opt, model, train[k % len(train)], lambda: val[k % len(val)])
    return run


def fb_passes(model, batches, steps: int, noise: bool):
    """``steps`` forward/backward passes (noise on or off), gradients discarded: the floor, timed
    like an epoch."""
    def run():
        for k in range(steps):
            xb, yb = batches[k % len(batches)]
            model.zero_grad(set_to_none=True)
            if noise:
                F.cross_entropy(model(xb), yb).backward()
            else:
                with no_noise():
                    F.cross_entropy(model(xb), yb).backward()
    return run


def _time(key, fn) -> float:
    """Wall seconds of ``fn()`` (``key`` names the variant; a test's timer may use it)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _cpu_time(key, fn) -> float:
    """CPU seconds of this process during ``fn()``: with one torch thread this is the wall time the
    epoch would take on an idle machine, and it does not count time other processes took the core
    (it still feels their cache and memory-bandwidth pressure)."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


CLOCKS = {"wall": _time, "process": _cpu_time}


def measure(cfg: Config, model_name: str, setting: str, progress=None, timer=_time) -> list[Row]:
    """All rows of one (model, setting): every backend x hyper_every against the same plain runs.
    Variant keys: ("plain", backend, "foreach"|"fused"), ("t1", backend, 0) (T1T2 without hyper
    steps), ("t1t2", backend, hyper_every), ("val_fb", backend, 0), ("train_fb", backend, 0)."""
    noisy = setting == "noise"
    gen = torch.Generator().manual_seed(cfg.seed)
    data = None if cfg.dataset == "synthetic" else _real_data(cfg.dataset, cfg.seed, cfg.data_dir)
    train = batches(model_name, cfg.batch_size, 4, gen, None if data is None else data.train)
    val = batches(model_name, cfg.batch_size, 4, gen, None if data is None else data.val)
    torch.manual_seed(cfg.seed)
    base = make_model(model_name, cfg.noise if noisy else None)
    params = sum(p.numel() for p in base.parameters())

    variants: dict[tuple, callable] = {}
    for backend in cfg.backends:
        noise_backend = "cpp" if backend == "cpp" else "reference"
        for impl in ("foreach", "fused"):
            m = copy.deepcopy(base)
            _set_noise_backend(m, noise_backend)
            variants[("plain", backend, impl)] = plain_epoch(m, _torch_optimizer(cfg, m, impl), train, cfg.steps)
        # T1T2 with no hyper step inside the epoch: the T1 update against torch's
        m = copy.deepcopy(base)
        variants[("t1", backend, 0)] = t1t2_epoch(m, _t1t2(cfg, m, backend, 10**9), train, val, cfg.steps)
        for h in cfg.hyper_every:
            m = copy.deepcopy(base)
            variants[("t1t2", backend, h)] = t1t2_epoch(m, _t1t2(cfg, m, backend, h), train, val, cfg.steps)
        m = copy.deepcopy(base)
        _set_noise_backend(m, noise_backend)
        variants[("val_fb", backend, 0)] = fb_passes(m, val, cfg.steps, noise=False)
        if noisy:
            variants[("train_fb", backend, 0)] = fb_passes(m, train, cfg.steps, noise=True)

    times: dict[tuple, list[float]] = {k: [] for k in variants}
    for r in range(cfg.rounds + 1):   # round 0 warms up (allocations, first-call dispatch)
        for key, fn in variants.items():
            t = timer(key, fn)
            if r:
                times[key].append(t)
            if progress is not None:
                progress()
    med = {k: statistics.median(v) for k, v in times.items()}

    def per_round(num, den, scale=1.0):
        """Median over rounds of num_r / den_r: variants timed next to each other in one round see
        the same machine, so their ratio is steadier than a ratio of medians."""
        return statistics.median(scale * a / b for a, b in zip(num, den))

    rows = []
    for backend in cfg.backends:
        plain_impl = min(("foreach", "fused"), key=lambda impl: med[("plain", backend, impl)])
        plain = times[("plain", backend, plain_impl)]
        floor_epochs = [v + (t if noisy else 0.0) for v, t in
                        zip(times[("val_fb", backend, 0)], times[("train_fb", backend, 0)] if noisy
                            else times[("val_fb", backend, 0)])]
        for h in cfg.hyper_every:
            ours = times[("t1t2", backend, h)]
            rows.append(Row(model=model_name, params=params, setting=setting, backend=backend, hyper_every=h,
                            plain_ms=1e3 * med[("plain", backend, plain_impl)] / cfg.steps,
                            t1t2_ms=1e3 * med[("t1t2", backend, h)] / cfg.steps,
                            overhead_pct=100 * (per_round(ours, plain) - 1),
                            floor_pct=100 * per_round(floor_epochs, plain, 1.0 / h),
                            t1_only_pct=100 * (per_round(times[("t1", backend, 0)], plain) - 1),
                            plain_impl=plain_impl,
                            extra={f"plain_{impl}_ms": 1e3 * med[("plain", backend, impl)] / cfg.steps
                                   for impl in ("foreach", "fused")} | {
                                "val_fb_ms": 1e3 * med[("val_fb", backend, 0)] / cfg.steps,
                                "train_fb_ms": 1e3 * med[("train_fb", backend, 0)] / cfg.steps if noisy else None}))
    return rows


def variants_per_measure(cfg: Config, setting: str) -> int:
    per_backend = 2 + 1 + len(cfg.hyper_every) + 1 + (setting == "noise")
    return len(cfg.backends) * per_backend * (cfg.rounds + 1)


def run(cfg: Config, quiet: bool = True, timer=_time) -> list[Row]:
    total = sum(variants_per_measure(cfg, s) for s in cfg.settings) * len(cfg.models)
    bar = progress(total, "overhead", quiet, unit="epoch")
    rows: list[Row] = []
    try:
        for model_name in cfg.models:
            for setting in cfg.settings:
                bar.set_postfix_str(f"{model_name} {setting}", refresh=True)
                rows += measure(cfg, model_name, setting, progress=lambda: bar.update(1), timer=timer)
    finally:
        bar.close()
    return rows


def summary(rows: list[Row], cfg: Config) -> dict:
    """The targets (``TARGETS``, ``SPREAD_TARGET``), checked on the fused backend at hyper_every=10."""
    out = {"targets": {}, "rows": len(rows)}
    for setting in cfg.settings:
        sel = [r for r in rows if r.backend == "cpp" and r.hyper_every == 10 and r.setting == setting]
        if not sel:
            continue
        worst = max(r.overhead_pct for r in sel)
        spread = worst - min(r.overhead_pct for r in sel)
        out["targets"][setting] = {
            "max_overhead_pct": worst, "spread_points": spread, "target_pct": TARGETS[setting],
            "met_level": worst <= TARGETS[setting], "met_flat": spread <= SPREAD_TARGET,
            "floor_pct": {r.model: r.floor_pct for r in sel},
            "overhead_pct": {r.model: r.overhead_pct for r in sel},
        }
    return out


def write_csv(path: str, rows: list[Row]) -> None:
    header = ["model", "params", "setting", "backend", "hyper_every", "plain_ms_per_step", "plain_impl",
              "t1t2_ms_per_step", "overhead_pct", "floor_pct", "t1_only_pct", "plain_foreach_ms", "plain_fused_ms",
              "val_fb_ms", "train_fb_ms"]
    _write_csv(path, header, [[r.model, r.params, r.setting, r.backend, r.hyper_every, r.plain_ms, r.plain_impl,
                           r.t1t2_ms, r.overhead_pct, r.floor_pct, r.t1_only_pct, r.extra["plain_foreach_ms"],
                           r.extra["plain_fused_ms"], r.extra["val_fb_ms"],
                           "" if r.extra["train_fb_ms"] is None else r.extra["train_fb_ms"]] for r in rows])


def plot(path: str, rows: list[Row], cfg: Config, title: str) -> None:
    """One panel per (setting, hyper_every): overhead % per model, a bar per backend, the floor
    as a black tick on each bar and the target as a dashed line."""
    from matplotlib.figure import Figure  # optional dependency (the apps extra)

    panels = [(s, h) for s in cfg.settings for h in cfg.hyper_every]
    nrows, ncols = len(cfg.settings), len(cfg.hyper_every)
    fig = Figure(figsize=(5.2 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    width = 0.8 / max(1, len(cfg.backends))
    colors = {"cpp": "tab:blue", "reference": "tab:orange"}
    for ax, (setting, h) in zip(axes, panels):
        for b, backend in enumerate(cfg.backends):
            sel = {r.model: r for r in rows if r.setting == setting and r.hyper_every == h and r.backend == backend}
            xs = [i + (b - (len(cfg.backends) - 1) / 2) * width for i in range(len(cfg.models))]
            vals = [sel[m].overhead_pct if m in sel else float("nan") for m in cfg.models]
            ax.bar(xs, vals, width=width * 0.95, color=colors.get(backend, None), label=backend)
            floors = [sel[m].floor_pct if m in sel else float("nan") for m in cfg.models]
            ax.scatter(xs, floors, marker="_", s=300, color="black", zorder=3,
                       label="floor (validation fwd/bwd" + (" + fd fwd/bwd)" if setting == "noise" else ")")
                       if b == 0 else None)
        if h == 10:
            ax.axhline(TARGETS[setting], ls="--", color="gray", lw=1, label=f"target {TARGETS[setting]:.0f} %")
        ax.set_xticks(range(len(cfg.models)), cfg.models)
        ax.set_title(f"{setting}, hyper step every {h}")
        ax.set_ylabel("overhead vs plain training (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", framealpha=0.85)
        ax.set_ylim(0, 1.35 * max([r.overhead_pct for r in rows if r.setting == setting and r.hyper_every == h]
                                  + [r.floor_pct for r in rows if r.setting == setting and r.hyper_every == h] + [1.0]))
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
