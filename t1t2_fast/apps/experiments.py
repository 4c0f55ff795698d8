"""Reproductions of the paper's experiments on built-in data: the hyperparameter map and before/after.

- ``grid_experiment``: a G x G map of test error over two hyperparameters, each cell trained with
  those hyperparameters held fixed, then T1-T2 runs from random starts whose trajectories are read
  in the same coordinates (the paper's Fig. 1).
- ``compare_experiment``: "before/after": random fixed hyperparameters versus retraining from
  scratch with the hyperparameters T1-T2 ended at when started from that point.

A point in hyperparameter space is a pair (x, y) on one of two axis pairs (``AXES``):

- ``noise-l2``: x = input noise std n0, y = log10 of the L2 coefficient (applied to every weight
  matrix; one coefficient for the network by default, or one per layer, whose log10 values are
  averaged to read a trajectory's y). No hidden noise.
- ``noise-noise``: x = n0, y = hidden noise std n1 (after every hidden ReLU; with several hidden
  layers T1-T2 tunes each and y is their mean). No penalty.

"Fixed" training runs the same T1T2 optimizer (same T1 update, same noise generator) and never
takes a T2 step, so fixed and tuned runs differ only in the hyperparameter updates. Every run is
seeded: the same arguments give the same numbers.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

import t1t2_fast as t1t2

from . import stats
from .common import progress, t1t2_iteration, write_csv
from .data import BatchStream
from .models import make_mlp

# "many" and "all": search only (one coordinate per hyperparameter); "all" adds per-tensor learning-rate
# scales (T1T2(tune_lr="layer")) and the training loss's label smoothing (a Tunable) to "many"
AXES = ("noise-l2", "noise-noise", "many", "all")
MANY_AXES = ("many", "all")
LR_SCALE_BOX = (-0.5, 0.5)          # log10 of a learning-rate scale: s in [0.32, 3.2]
LABEL_SMOOTHING_BOX = (0.0, 0.3)


@dataclass(frozen=True)
class Axis:
    name: str     # column name in the CSV files
    label: str    # plot label
    lo: float
    hi: float


AXIS_PAIRS = {
    "noise-l2": (Axis("n0", "input noise std n0", 0.0, 1.0), Axis("log10_l2", "log10 L2 coefficient", -5.0, -2.0)),
    "noise-noise": (Axis("n0", "input noise std n0", 0.0, 1.0), Axis("n1", "hidden noise std n1", 0.0, 1.0)),
}


def lr_tensors(depth: int) -> list[str]:
    """The MLP's parameter tensors in model order (fc1.weight, fc1.bias, ..., out.bias): the ones
    T1T2(tune_lr="layer") gives a learning-rate scale each (no batch norm with axes "all")."""
    return [f"{n}.{k}" for n in [f"fc{i}" for i in range(1, depth + 1)] + ["out"] for k in ("weight", "bias")]


def coordinates(axes: str, depth: int = 2) -> tuple[Axis, ...]:
    """The coordinates of a point on ``axes``: the two of AXIS_PAIRS, or for "many" one per
    hyperparameter: log10 of the L2 coefficient of each weight matrix (fc1..fc<depth>, out) in
    [-5, -2], then the noise std of the input (n0) and after each hidden layer (n1..n<depth>) in [0, 1];
    "all" then adds log10 of the learning-rate scale of each parameter tensor in LR_SCALE_BOX and the
    label smoothing of the training loss in LABEL_SMOOTHING_BOX."""
    if axes not in MANY_AXES:
        return AXIS_PAIRS[axes]
    layers = [f"fc{i}" for i in range(1, depth + 1)] + ["out"]
    many = ([Axis(f"log10_l2_{n}", f"log10 L2 of {n}", -5.0, -2.0) for n in layers]
            + [Axis(f"n{i}", "input noise std" if i == 0 else f"hidden noise std {i}", 0.0, 1.0)
               for i in range(depth + 1)])
    if axes == "many":
        return tuple(many)
    return tuple(many + [Axis(f"log10_lr_{n}", f"log10 lr scale of {n}", *LR_SCALE_BOX) for n in lr_tensors(depth)]
                 + [Axis("label_smoothing", "label smoothing", *LABEL_SMOOTHING_BOX)])


@dataclass
class Config:
    """Everything a run depends on besides its hyperparameter point and seed."""

    dataset: str = "digits"
    axes: str = "noise-l2"
    samples: int | None = None
    split_seed: int = 0        # the train / T2 / test split, the same for every run
    width: int = 128
    depth: int = 2
    steps: int = 1000
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    l2_per: str = "network"
    hyper_optimizer: str = "adam"
    hyper_lr: float = 1e-2
    hyper_every: int = 1
    backend: str = "auto"
    record_points: int = 50    # trajectory points recorded per T1-T2 run (plus the start)
    batchnorm: bool = False    # BatchNorm1d after every hidden Linear (the paper's MLPs)
    hypergrad: str = "exact"   # T1T2(hypergrad=): "exact" or the paper's "sgd" approximation
    l2_transform: str = "log"  # L2's parameterization (penalties.get_transform): "log", "linear", "linear*<s>"
    data_dir: str | None = None  # where fashion-mnist's files are looked for first


# `--preset paper` (the paper's setting, Luketina et al. 2016 and its code): BN MLP, Adam for T1 with
# the SGD-form hypergradient, a T2 step every 10 T1 steps, hyper Adam lr 1e-3, per-layer L2 in linear
# scale (c = 1e-3·λ: about 1e-6 per T2 step) clipped at >= 0. Explicit flags still win.
PRESETS = {
    "paper": {"batchnorm": True, "optimizer": "adam", "lr": 1e-3, "hypergrad": "sgd", "hyper_every": 10,
              "hyper_optimizer": "adam", "hyper_lr": 1e-3, "l2_transform": "linear*0.001", "l2_per": "layer",
              "batch_size": 100},
}


@dataclass
class RunResult:
    start: tuple[float, float]
    end: tuple[float, float]
    test_error: float
    val_error: float
    diverged: bool
    hyperparameters: dict = field(default_factory=dict)   # final values (mean for tensors)
    raw: dict = field(default_factory=dict)               # final raw λ tensors (to retrain with them exactly)
    trajectory: list = field(default_factory=list)        # [(step, x, y, {name: value}), ...]


def _mean(value) -> float:
    return float(value) if isinstance(value, float) else float(value.double().mean())


def point_of(hypers: dict, axes: str) -> tuple[float, ...]:
    """The (x, y) coordinates of T1T2.hyperparameters() on ``axes`` (for "many", ``coordinates``'s)."""
    if axes in MANY_AXES:
        l2 = [math.log10(max(_mean(v), 1e-300)) for n, v in hypers.items() if n.split(".")[0] == "l2"]
        hidden = sorted((int(n[len("noise.hidden"):]), _mean(v)) for n, v in hypers.items()
                        if n.startswith("noise.hidden"))
        many = l2 + [_mean(hypers["noise.input"])] + [v for _, v in hidden]
        if axes == "many":
            return tuple(many)
        lr = [math.log10(max(_mean(v), 1e-300)) for n, v in hypers.items() if n.startswith("lr_scale.")]
        return tuple(many + lr + [_mean(hypers["tunable.label_smoothing"])])
    x = _mean(hypers["noise.input"])
    if axes == "noise-l2":
        logs = [math.log10(max(_mean(v), 1e-300)) for n, v in hypers.items() if n.split(".")[0] == "l2"]
        return x, float(np.mean(logs))
    hidden = [_mean(v) for n, v in hypers.items() if n.startswith("noise.hidden")]
    return x, float(np.mean(hidden))


def build(data, cfg: Config, point: tuple[float, float], seed: int):
    """The MLP (GaussianNoise sites ``input`` and, for noise-noise, ``hidden<i>``) and its T1T2
    optimizer with the hyperparameters at ``point``; the weights are initialized from ``seed``."""
    if cfg.axes in MANY_AXES:
        return _build_many(data, cfg, point, seed)
    x, y = point
    torch.manual_seed(seed)
    if cfg.axes == "noise-l2":
        model = make_mlp(data.num_features, data.num_classes, cfg.width, cfg.depth, noise=("input",), noise_init=x,
                         batchnorm=cfg.batchnorm)
        penalties = [t1t2.L2(10.0 ** y, per=cfg.l2_per, transform=cfg.l2_transform)]
    else:
        model = make_mlp(data.num_features, data.num_classes, cfg.width, cfg.depth, noise=("input", "hidden"),
                         noise_init=y, batchnorm=cfg.batchnorm)
        model.input.raw.fill_(x)  # make_mlp gives every site one level; the input's is n0
        penalties = []
    opt = t1t2.T1T2(model, penalties, optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                    hyper_optimizer=cfg.hyper_optimizer, hyper_lr=cfg.hyper_lr, hypergrad=cfg.hypergrad,
                    # fixed runs never stash: a hyper_every beyond the run makes step() pure T1
                    hyper_every=cfg.hyper_every, backend=cfg.backend, seed=seed)
    return model, opt


def _build_many(data, cfg: Config, point, seed: int):
    """``build`` for axes "many": per-layer L2 and per-site noise, each set from its coordinate; "all"
    adds a learning-rate scale per tensor (``tune_lr="layer"``) and a label-smoothing ``Tunable`` of the
    training loss (linear in [0, 1], evaluation value 0: the validation loss is plain cross-entropy),
    kept as ``opt.label_smoothing`` for ``train_run``'s training loss."""
    everything = cfg.axes == "all"
    if everything and cfg.batchnorm:
        raise ValueError("axes 'all' has one learning-rate scale per Linear tensor; it does not take batchnorm")
    torch.manual_seed(seed)
    model = make_mlp(data.num_features, data.num_classes, cfg.width, cfg.depth, noise=("input", "hidden"),
                     noise_init=0.1, batchnorm=cfg.batchnorm)
    smoothing = t1t2.Tunable(0.1, transform="linear", bounds=(0.0, 1.0), eval_value=0.0,
                             name="label_smoothing") if everything else None
    opt = t1t2.T1T2(model, [t1t2.L2(1e-4, per="layer", transform=cfg.l2_transform)], optimizer=cfg.optimizer,
                    lr=cfg.lr, momentum=cfg.momentum, hyper_optimizer=cfg.hyper_optimizer, hyper_lr=cfg.hyper_lr,
                    hypergrad=cfg.hypergrad, hyper_every=cfg.hyper_every, backend=cfg.backend, seed=seed,
                    tune_lr="layer" if everything else None, tunables=[smoothing] if everything else ())
    l2 = [h for h in opt.all_hypers if h.kind == "l2"]
    noise = [model.input] + [getattr(model, f"hidden{i}") for i in range(1, cfg.depth + 1)]
    scales = [h for h in opt.all_hypers if h.kind == "lr"]
    want = len(l2) + len(noise) + (len(scales) + 1 if everything else 0)
    if len(point) != want:
        raise ValueError(f"axes {cfg.axes!r} needs {want} coordinates, got {len(point)}")
    with torch.no_grad():
        for h, v in zip(l2, point[:len(l2)]):
            h.raw.fill_(h.transform.inverse(10.0 ** v))
        for m, v in zip(noise, point[len(l2):len(l2) + len(noise)]):
            m.raw.fill_(m.transform.inverse(v))
        if everything:
            at = len(l2) + len(noise)
            for h, v in zip(scales, point[at:at + len(scales)]):
                h.raw.fill_(h.transform.inverse(10.0 ** v))
            smoothing.raw.fill_(smoothing.transform.inverse(point[-1]))
    opt.label_smoothing = smoothing
    return model, opt


@torch.no_grad()
def _error(model, split) -> float:
    was = model.training
    model.eval()
    err = float((model(split.x).argmax(1) != split.y).double().mean())
    model.train(was)
    return err


def train_run(data, cfg: Config, point: tuple[float, float], seed: int, tune: bool,
              raw: dict | None = None) -> RunResult:
    """Train from scratch at ``point``: hyperparameters fixed (``tune=False``) or tuned by T1-T2.
    ``raw`` ({name: raw λ}, e.g. a T1-T2 run's ``RunResult.raw``) overrides the point's values
    exactly, per layer or per unit where the point only holds their mean."""
    run_cfg = cfg if tune else Config(**{**asdict(cfg), "hyper_every": cfg.steps + 1})
    model, opt = build(data, run_cfg, point, seed)
    if raw:
        with torch.no_grad():
            for name, value in opt.raw_hyperparameters().items():
                value.copy_(raw[name])
    train_b = BatchStream(len(data.train), min(cfg.batch_size, len(data.train)), seed)
    val_b = BatchStream(len(data.val), min(cfg.batch_size, len(data.val)), seed + 1)
    every = max(1, cfg.steps // max(1, cfg.record_points))

    def snapshot(step):
        hp = opt.hyperparameters()
        return (step, *point_of(hp, cfg.axes), {n: _mean(v) for n, v in hp.items()})

    trajectory = [snapshot(0)] if tune else []
    smoothing = getattr(opt, "label_smoothing", None)  # axes "all": the training loss is label-smoothed
    criterion = None if smoothing is None else (
        lambda logits, y: t1t2.smoothed_cross_entropy(logits, y, smoothing))
    start = point_of(opt.hyperparameters(), cfg.axes)
    diverged = False
    model.train()
    def val_batch():
        idx = next(val_b)
        return data.val.x[idx], data.val.y[idx]

    for step in range(1, cfg.steps + 1):
        idx = next(train_b)
        loss = t1t2_iteration(opt, model, (data.train.x[idx], data.train.y[idx]), val_batch if tune else None,
                              stop_on_nonfinite=True, criterion=criterion)
        if not math.isfinite(float(loss)):
            diverged = True
            break
        if tune and (step % every == 0 or step == cfg.steps):
            trajectory.append(snapshot(step))
    hp = opt.hyperparameters()
    return RunResult(start=start, end=point_of(hp, cfg.axes), test_error=_error(model, data.test),
                     val_error=_error(model, data.val), diverged=diverged,
                     hyperparameters={n: _mean(v) for n, v in hp.items()}, trajectory=trajectory,
                     raw={n: v.detach().clone() for n, v in opt.raw_hyperparameters().items()})


def fixed_error(data, cfg: Config, point, seeds, raw=None) -> tuple[float, float, list[float]]:
    """Mean test error, mean validation error and the per-seed test errors of fixed runs at ``point``."""
    runs = [train_run(data, cfg, point, s, tune=False, raw=raw) for s in seeds]
    return (float(np.mean([r.test_error for r in runs])), float(np.mean([r.val_error for r in runs])),
            [r.test_error for r in runs])


def point_stream(axes: str, seed: int, stream: int, depth: int = 2):
    """An endless sequence of points uniform over the axis box (log-uniform in L2), reproducible
    from (seed, stream); for searches that do not know in advance how many points they will use."""
    coords = coordinates(axes, depth)
    rng = np.random.default_rng([seed, stream])
    while True:
        yield tuple(float(rng.uniform(a.lo, a.hi)) for a in coords)


def random_points(axes: str, n: int, seed: int, stream: int, depth: int = 2) -> list[tuple[float, ...]]:
    """The first ``n`` points of ``point_stream(axes, seed, stream, depth)``."""
    return list(itertools.islice(point_stream(axes, seed, stream, depth), n))


def grid_values(axis: Axis, size: int) -> list[float]:
    return [float(v) for v in np.linspace(axis.lo, axis.hi, size)]


def nearest_cell(point, axes: str, size: int) -> tuple[int, int, bool]:
    """Grid indices (i along x, j along y) of the cell nearest ``point`` in coordinates scaled to
    the box, and whether the point lies outside the box (then the nearest cell is on its edge)."""
    idx, outside = [], False
    for v, axis in zip(point, AXIS_PAIRS[axes]):
        t = (v - axis.lo) / (axis.hi - axis.lo)
        outside |= not (-1e-9 <= t <= 1 + 1e-9)
        idx.append(int(np.clip(round(t * (size - 1)), 0, size - 1)))
    return idx[0], idx[1], outside


def grid_experiment(data, cfg: Config, size: int, seeds: int, runs: int, seed: int = 0, quiet: bool = True) -> dict:
    """The hyperparameter map with T1-T2 trajectories over it. Returns {"cells": [...],
    "runs": [RunResult...], "summary": {...}}."""
    ax, ay = AXIS_PAIRS[cfg.axes]
    xs, ys = grid_values(ax, size), grid_values(ay, size)
    cell_seeds = [seed + s for s in range(seeds)]
    cells = []
    bar = progress(size * size * seeds + runs, f"grid {cfg.dataset} {cfg.axes}", quiet)
    try:
        for i, x in enumerate(xs):
            for j, y in enumerate(ys):
                errs, vals = [], []
                for s in cell_seeds:
                    r = train_run(data, cfg, (x, y), s, tune=False)
                    errs.append(r.test_error)
                    vals.append(r.val_error)
                    bar.update(1)
                cells.append({"i": i, "j": j, ax.name: x, ay.name: y, "test_error": float(np.mean(errs)),
                              "val_error": float(np.mean(vals)), "test_errors": errs})
                bar.set_postfix_str(f"cell ({x:.2f}, {y:.2f}) err {np.mean(errs):.3f}", refresh=False)
        order = sorted(range(len(cells)), key=lambda k: (cells[k]["test_error"], k))
        for rank, k in enumerate(order, 1):
            cells[k]["rank"] = rank
        results = []
        for r, start in enumerate(random_points(cfg.axes, runs, seed, stream=2)):
            res = train_run(data, cfg, start, seed + 1000 + r, tune=True)
            results.append(res)
            bar.update(1)
            bar.set_postfix_str(f"T1-T2 run {r}: end ({res.end[0]:.2f}, {res.end[1]:.2f}) err {res.test_error:.3f}",
                                refresh=False)
    finally:
        bar.close()
    return {"cells": cells, "runs": results, "summary": _grid_summary(cells, results, cfg, size)}


def _grid_summary(cells, results, cfg: Config, size: int) -> dict:
    ax, ay = AXIS_PAIRS[cfg.axes]
    by_index = {(c["i"], c["j"]): c for c in cells}
    best = min(cells, key=lambda c: c["rank"])
    quarter = math.ceil(0.25 * len(cells))
    band = stats.optimal_band(cells) if len(cells[0]["test_errors"]) >= 2 else None
    runs = []
    for k, res in enumerate(results):
        i, j, outside = nearest_cell(res.end, cfg.axes, size)
        c = by_index[(i, j)]
        runs.append({"run": k, "start": {ax.name: res.start[0], ay.name: res.start[1]},
                     "end": {ax.name: res.end[0], ay.name: res.end[1]},
                     "end_outside_grid": outside, "test_error": res.test_error, "val_error": res.val_error,
                     "diverged": res.diverged, "nearest_cell": [i, j], "nearest_cell_test_error": c["test_error"],
                     "nearest_cell_rank": c["rank"], "in_best_quarter": c["rank"] <= quarter,
                     "end_in_band": bool(c["in_band"]) if band else None,
                     "error_in_band": bool(res.test_error <= band["run_threshold"]) if band else None,
                     "final_hyperparameters": res.hyperparameters})
    errs = [c["test_error"] for c in cells]
    return {
        "cells": len(cells), "best_cell": {ax.name: best[ax.name], ay.name: best[ay.name],
                                           "test_error": best["test_error"]},
        "cell_test_error": {"min": min(errs), "median": float(np.median(errs)), "max": max(errs)},
        "best_quarter_size": quarter,
        "fraction_runs_in_best_quarter": float(np.mean([r["in_best_quarter"] for r in runs])) if runs else None,
        "median_end_rank": float(np.median([r["nearest_cell_rank"] for r in runs])) if runs else None,
        "band": band,
        "fraction_runs_error_in_band": (float(np.mean([r["error_in_band"] for r in runs]))
                                        if runs and band else None),
        "fraction_runs_end_in_band": float(np.mean([r["end_in_band"] for r in runs])) if runs and band else None,
        "t1t2_test_error": {"mean": float(np.mean([r.test_error for r in results])),
                            "min": min(r.test_error for r in results),
                            "max": max(r.test_error for r in results)} if results else None,
        "runs": runs,
    }


def compare_experiment(data, cfg: Config, runs: int, seeds: int, seed: int = 0, quiet: bool = True) -> list[dict]:
    """Before/after: for each of ``runs`` random points, fixed training there (before), a T1-T2 run
    from there, and fixed training at the hyperparameters that run ended at (after). Before and
    after are mean test errors over ``seeds`` initializations (the same ones for both)."""
    ax, ay = AXIS_PAIRS[cfg.axes]
    rows = []
    bar = progress(runs * (2 * seeds + 1), f"compare {cfg.dataset} {cfg.axes}", quiet)
    try:
        for r, start in enumerate(random_points(cfg.axes, runs, seed, stream=3)):
            run_seeds = [seed + 100 * r + s for s in range(seeds)]
            before, before_val, _ = fixed_error(data, cfg, start, run_seeds)
            bar.update(seeds)
            tuned = train_run(data, cfg, start, run_seeds[0], tune=True)
            bar.update(1)
            after, after_val, _ = fixed_error(data, cfg, tuned.end, run_seeds, raw=tuned.raw)
            bar.update(seeds)
            rows.append({"run": r, f"start_{ax.name}": start[0], f"start_{ay.name}": start[1],
                         f"end_{ax.name}": tuned.end[0], f"end_{ay.name}": tuned.end[1],
                         "test_error_before": before, "test_error_t1t2_run": tuned.test_error,
                         "test_error_after": after, "val_error_before": before_val, "val_error_after": after_val,
                         "diverged": tuned.diverged})
            bar.set_postfix_str(f"run {r}: {before:.3f} -> {after:.3f}", refresh=False)
    finally:
        bar.close()
    return rows


# ---------------------------------------------------------------------------------------------
# outputs: CSV, PNG (a bare matplotlib Figure, as in plotting.py), summaries
# ---------------------------------------------------------------------------------------------
def write_grid_csvs(out: str, result: dict, cfg: Config) -> dict[str, str]:
    """grid.csv (a row per cell) and trajectories.csv (a row per recorded point of each T1-T2 run)."""
    ax, ay = AXIS_PAIRS[cfg.axes]
    cells, runs = result["cells"], result["runs"]
    seeds = len(cells[0]["test_errors"])
    paths = {"grid": os.path.join(out, "grid.csv"), "trajectories": os.path.join(out, "trajectories.csv")}
    write_csv(paths["grid"], ["i", "j", ax.name, ay.name, "test_error", "val_error", "rank", "in_band"]
               + [f"test_error_seed{s}" for s in range(seeds)],
               [[c["i"], c["j"], c[ax.name], c[ay.name], c["test_error"], c["val_error"], c["rank"],
                 int(c["in_band"]) if "in_band" in c else "", *c["test_errors"]] for c in cells])
    names = list(runs[0].trajectory[0][3]) if runs else []
    write_csv(paths["trajectories"], ["run", "step", ax.name, ay.name] + names,
               [[k, step, x, y, *[hp[n] for n in names]] for k, r in enumerate(runs)
                for step, x, y, hp in r.trajectory])
    return paths


def plot_map(path: str, result: dict, cfg: Config, size: int, title: str) -> None:
    """Heat map of the cells' mean test error with the T1-T2 trajectories over it: start square,
    end star (the paper's Fig. 1). The view widens to show trajectories that leave the grid."""
    # optional dependency (the apps extra), needed only when a command draws its figure
    import matplotlib
    from matplotlib.figure import Figure

    ax_x, ax_y = AXIS_PAIRS[cfg.axes]
    xs, ys = grid_values(ax_x, size), grid_values(ax_y, size)
    err = np.full((size, size), np.nan)
    for c in result["cells"]:
        err[c["j"], c["i"]] = c["test_error"]
    dx, dy = (xs[1] - xs[0]) / 2, (ys[1] - ys[0]) / 2
    fig = Figure(figsize=(7.2, 5.6))
    ax = fig.subplots()
    mesh = ax.imshow(err, origin="lower", extent=(xs[0] - dx, xs[-1] + dx, ys[0] - dy, ys[-1] + dy),
                     aspect="auto", cmap="viridis_r", interpolation="nearest")
    fig.colorbar(mesh, ax=ax, label=f"test error (fixed hyperparameters, mean of {len(result['cells'][0]['test_errors'])} seeds)")
    for c in result["cells"]:
        ax.text(c[ax_x.name], c[ax_y.name], f"{100 * c['test_error']:.1f}", ha="center", va="center",
                fontsize=7 if size <= 6 else 5, color="white" if c["rank"] > len(result["cells"]) / 2 else "black")
    best = min(result["cells"], key=lambda c: c["rank"])
    band = [c for c in result["cells"] if c.get("in_band")]
    if band:
        from matplotlib.patches import Rectangle
        for k, c in enumerate(band):
            ax.add_patch(Rectangle((c[ax_x.name] - dx, c[ax_y.name] - dy), 2 * dx, 2 * dy, fill=False, ec="red",
                                   lw=1.2, ls="--", label="optimal band (2 SE of the difference)" if k == 0 else None))
    ax.plot(best[ax_x.name], best[ax_y.name], "o", mfc="none", mec="red", ms=16, mew=2, label="best cell")
    palette = matplotlib.colormaps["tab10"]
    for k, r in enumerate(result["runs"]):
        tx = [p[1] for p in r.trajectory]
        ty = [p[2] for p in r.trajectory]
        color = palette(k % 10)
        ax.plot(tx, ty, "-", color=color, lw=1.5, alpha=0.9)
        ax.plot(tx[0], ty[0], "s", color=color, mec="black", ms=7)
        ax.plot(tx[-1], ty[-1], "*", color=color, mec="black", ms=13)
    ax.plot([], [], "s", color="gray", mec="black", label="T1-T2 start")
    ax.plot([], [], "*", color="gray", mec="black", ms=11, label="T1-T2 end")
    ax.set_xlabel(ax_x.label)
    ax.set_ylabel(ax_y.label)
    ax.legend(fontsize=8, loc="best", framealpha=0.8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def compare_summary(rows: list[dict]) -> dict:
    before = np.array([r["test_error_before"] for r in rows])
    after = np.array([r["test_error_after"] for r in rows])
    return {"runs": len(rows), "mean_test_error_before": float(before.mean()),
            "mean_test_error_after": float(after.mean()),
            "median_test_error_before": float(np.median(before)), "median_test_error_after": float(np.median(after)),
            "mean_test_error_t1t2_run": float(np.mean([r["test_error_t1t2_run"] for r in rows])),
            "improved": int((after < before).sum()), "tied": int((after == before).sum()),
            "worse": int((after > before).sum()), "mean_change": float((after - before).mean()),
            "sign_test": stats.sign_test(before, after)}


def plot_compare(path: str, rows: list[dict], title: str) -> None:
    """Scatter of test error before (random fixed hyperparameters) vs after (retrained from scratch
    with the hyperparameters T1-T2 found from there); points below the diagonal improved."""
    from matplotlib.figure import Figure  # optional dependency (the apps extra)

    before = [100 * r["test_error_before"] for r in rows]
    after = [100 * r["test_error_after"] for r in rows]
    lo, hi = min(before + after), max(before + after)
    pad = 0.05 * (hi - lo) + 0.1
    fig = Figure(figsize=(5.6, 5.4))
    ax = fig.subplots()
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "--", color="gray", lw=1, label="no change")
    ax.scatter(before, after, s=36, color="tab:blue", edgecolor="black", zorder=3, label="one random start")
    for r, b, a in zip(rows, before, after):
        ax.annotate(str(r["run"]), (b, a), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")
    ax.set_xlabel("test error % before (random fixed hyperparameters)")
    ax.set_ylabel("test error % after (retrained with T1-T2's final ones)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
