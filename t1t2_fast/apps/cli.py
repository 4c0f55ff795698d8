"""Command-line interface: ``t1t2 train`` (or ``python -m t1t2_fast train``).

``train`` fits an MLP on a built-in dataset while T1-T2 tunes its regularization hyperparameters
on a validation split, then reports test accuracy on a split neither step has seen. It writes
``log.csv``, ``metrics.json`` and ``trajectories.png`` into the output folder.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import random
import sys
import time
from collections import OrderedDict

import numpy as np

from .backend import BACKENDS as BACKEND_CHOICES
from .hyper import PER_CHOICES


class UsageError(Exception):
    """A bad combination of flags found after parsing; reported like an argparse error."""


# ---------------------------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------------------------
def _number(kind, what, lo=None, lo_open=False, hi=None, hi_open=False):
    """An argparse ``type`` that converts with ``kind`` and checks lo </<= value </<= hi."""

    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        if hi is not None and (value >= hi if hi_open else value > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    convert.__name__ = what  # argparse names the type in some messages
    return convert


positive_int = _number(int, "a positive integer", lo=0, lo_open=True)
nonneg_int = _number(int, "an integer >= 0", lo=0)
positive_float = _number(float, "a positive number", lo=0, lo_open=True)
nonneg_float = _number(float, "a number >= 0", lo=0)
unit_interval = _number(float, "a number in [0, 1)", lo=0, hi=1, hi_open=True)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where X says something and the help text does not already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or any(action.default is x for x in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t1t2", description="Tune regularization hyperparameters during one training run (T1-T2).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    tr = sub.add_parser(
        "train", help="train an MLP on a built-in dataset with T1-T2 hyperparameter tuning",
        description="Train an MLP on a built-in dataset. Every T1 step trains the weights on a training "
                    "batch; every --hyper-every steps a T2 step updates the regularization "
                    "hyperparameters on a validation batch. Test accuracy is measured at the end on a "
                    "split neither step saw.",
        formatter_class=_HelpFormatter)

    g = tr.add_argument_group("data")
    g.add_argument("--dataset", choices=("digits", "mnist1d"), default="digits",
                   help="digits: scikit-learn's 8x8 digits (1797 examples); mnist1d: MNIST-1D generated "
                        "offline (needs `pip install mnist1d`)")
    g.add_argument("--samples", type=_number(int, "an integer >= 30", lo=30), default=None,
                   help="number of examples (mnist1d: generated, default 5000; digits: a stratified "
                        "subsample of the 1797, default all)")

    g = tr.add_argument_group("model")
    g.add_argument("--width", type=positive_int, default=128, help="units per hidden layer")
    g.add_argument("--depth", type=nonneg_int, default=2, help="number of hidden layers (ReLU)")

    g = tr.add_argument_group("hyperparameters (tuned by T2; initial values in natural scale)")
    g.add_argument("--l2", type=nonneg_float, default=1e-3, metavar="INIT",
                   help="initial L2 coefficient c in c*sum(w^2) on the weight matrices (0: no L2)")
    g.add_argument("--l1", type=nonneg_float, default=None, metavar="INIT",
                   help="initial L1 coefficient c in c*sum(|w|) on the weight matrices (default: no L1)")
    g.add_argument("--per", choices=PER_CHOICES, default="layer",
                   help="granularity: one coefficient for the network, per weight matrix, per output "
                        "unit (row) or per weight")
    g.add_argument("--decoupled", action="store_true",
                   help="apply L2 outside the optimizer's preconditioner (AdamW-style weight decay)")

    g.add_argument("--noise", type=_noise_sites, default=(), metavar="SITES",
                   help="Gaussian noise hyperparameters (T2-tuned): 'input', 'hidden' or 'input,hidden' "
                        "(noise on the input and/or after every hidden ReLU)")
    g.add_argument("--noise-init", type=nonneg_float, default=0.1, metavar="STD",
                   help="initial noise standard deviation")
    g.add_argument("--noise-per", choices=("layer", "unit"), default="layer",
                   help="one noise level per site, or one per feature")
    g.add_argument("--noise-mode", choices=("additive", "multiplicative"), default="additive",
                   help="y = x + σε or y = x(1 + σε)")
    g.add_argument("--noise-hypergrad", choices=("fd", "fd-central", "exact"), default="fd",
                   help="how T2 differentiates through the noise: forward or central finite differences "
                        "of ∇σL along J⊙v, or exact double backward")
    g.add_argument("--fd-eps", type=positive_float, default=1e-3,
                   help="finite-difference step length in parameter space (fd, fd-central)")

    g = tr.add_argument_group("training (T1)")
    g.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="optimizer of the weights")
    g.add_argument("--lr", type=positive_float, default=None,
                   help=f"learning rate (default: {DEFAULT_LR['sgd']} for sgd, {DEFAULT_LR['adam']} for adam)")
    g.add_argument("--momentum", type=unit_interval, default=0.9, help="sgd momentum (ignored by adam)")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum (sgd)")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int, default=None,
                        help="passes over the training split (default 100 unless --steps is given)")
    length.add_argument("--steps", type=positive_int, default=None, help="number of T1 steps")
    g.add_argument("--batch-size", type=positive_int, default=64, help="training batch size")

    g = tr.add_argument_group("hyperparameter tuning (T2)")
    g.add_argument("--hyper-optimizer", choices=("adam", "sgd"), default="adam",
                   help="optimizer of the hyperparameters")
    g.add_argument("--hyper-lr", type=nonneg_float, default=1e-2,
                   help="learning rate of the hyper-optimizer on the raw (log-scale) hyperparameters; "
                        "0 keeps them fixed (an untuned baseline). With adam each T2 step moves log(c) by "
                        "about this much at most; with sgd the step is proportional to the hypergradient, "
                        "which is tiny here (digits needs roughly 100-1000)")
    g.add_argument("--hyper-every", type=positive_int, default=1, help="a T2 step every this many T1 steps")
    g.add_argument("--val-batch-size", type=positive_int, default=None,
                   help="validation batch size for T2 (default: --batch-size)")
    g.add_argument("--hypergrad", choices=("exact", "sgd"), default="exact",
                   help="exact: differentiate through the optimizer's update; sgd: the paper's "
                        "approximation (Jacobian -lr for every optimizer)")
    g.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="implementation of the fused ops")
    g.add_argument("--max-skips", type=positive_int, default=25,
                   help="stop with an error after this many consecutive T1 (or T2) steps skipped for Inf/NaN "
                        "values; each skip is logged")

    g = tr.add_argument_group("run")
    g.add_argument("--seed", type=nonneg_int, default=0,
                   help="seeds the data split, initialization and batch order")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    g.add_argument("--threads", type=positive_int, default=1,
                   help="torch intra-op threads for this run; the default 1 suits these small MLPs and "
                        "stays fast when other processes share the cores (2 threads were up to 7x slower "
                        "on a busy 2-core machine)")
    g.add_argument("--log-every", type=positive_int, default=None,
                   help="evaluate and log every this many steps (default: about 200 rows per run)")
    g.add_argument("--out", default=None,
                   help="output folder (default: runs/<name>, or runs/<dataset>-<timestamp>)")
    g.add_argument("--name", default=None, help="run name for the default output folder")
    g.add_argument("--quiet", action="store_true", help="no progress bar; print only the final summary")
    g.add_argument("--dist-timeout", type=positive_float, default=600.0, metavar="SECONDS",
                   help="under torchrun: how long a rank waits in a collective for the others before it "
                        "fails (a rank that died or hangs does not block the rest forever)")
    g = tr.add_argument_group("checkpoints")
    g.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="write a checkpoint to PATH every --checkpoint-every steps and at the end (atomically: "
                        "a temporary file renamed over PATH; under torchrun rank 0 writes it)")
    g.add_argument("--checkpoint-every", type=positive_int, default=500, metavar="N",
                   help="steps between checkpoints")
    g.add_argument("--resume", default=None, metavar="PATH",
                   help="continue the run saved in this checkpoint: run the same command with --resume added; "
                        "it goes on with the same data order, step count and random states and ends with "
                        "the same outputs as a run that was never interrupted. A checkpoint of a run with "
                        "other settings is refused")
    tr.set_defaults(func=cmd_train)
    _add_experiment_commands(sub)
    _add_overhead_command(sub)
    return parser


# Paper-scale settings of `grid`, `compare` and `search` (--full); explicit flags still win.
FULL = {"grid": {"size": 9, "seeds": 3, "runs": 12, "steps": 3000},
        "compare": {"runs": 20, "seeds": 3, "steps": 3000},
        "search": {"repeats": 5, "steps": 3000}}
SMALL = {"grid": {"size": 5, "seeds": 2, "runs": 8, "steps": 1000},
         "compare": {"runs": 10, "seeds": 2, "steps": 1000},
         "search": {"repeats": 2, "steps": 1000}}


def _subset(choices, what_else: str = "", also=lambda item: False):
    """A parser of 'a,b' into a tuple of distinct items of ``choices`` (a tuple, or a function that
    returns it: a lazy import), in the order given; ``also(item)`` admits items outside them."""
    def parse(text: str) -> tuple[str, ...]:
        allowed = choices() if callable(choices) else choices
        items = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
        if not items or any(t not in allowed and not also(t) for t in items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(allowed)}"
                                             f"{what_else}, got {text!r}")
        return items
    return parse


def _sorted_int_list(text: str) -> tuple[int, ...]:
    """'4,1,2' -> (1, 2, 4): positive integers, sorted, without repeats."""
    try:
        values = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return tuple(values)


def _search_method_names() -> tuple[str, ...]:
    from .search import METHODS
    return METHODS


_search_methods = _subset(_search_method_names)


def _add_experiment_commands(sub) -> None:
    """`grid` (issue 6 experiment 1), `compare` (experiment 2) and `search` (experiment 3); their
    code is in experiments.py and search.py."""
    from .experiments import AXES

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("problem")
    g.add_argument("--dataset", choices=("digits", "mnist1d"), default="digits",
                   help="digits: scikit-learn's 8x8 digits; mnist1d: MNIST-1D generated offline")
    g.add_argument("--samples", type=_number(int, "an integer >= 30", lo=30), default=None,
                   help="number of examples (mnist1d default 5000; digits default all 1797)")
    g.add_argument("--axes", choices=AXES, default="noise-l2",
                   help="noise-l2: input noise n0 in [0, 1] x log10 L2 in [-5, -2] (no hidden noise); "
                        "noise-noise: n0 x hidden noise n1 in [0, 1] (no penalty)")
    g.add_argument("--l2-per", choices=("network", "layer"), default="network",
                   help="noise-l2: one L2 coefficient for all weight matrices, or one per matrix (T1-T2 "
                        "then tunes each; the map's y is the mean of their log10)")
    g.add_argument("--width", type=positive_int, default=128, help="units per hidden layer")
    g.add_argument("--depth", type=positive_int, default=2, help="number of hidden layers (ReLU)")
    g = common.add_argument_group("training")
    g.add_argument("--steps", type=positive_int, default=None, help="T1 steps per run (default 1000, --full 3000)")
    g.add_argument("--batch-size", type=positive_int, default=64, help="training and validation batch size")
    g.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="optimizer of the weights")
    g.add_argument("--lr", type=positive_float, default=None,
                   help=f"learning rate (default: {DEFAULT_LR['sgd']} for sgd, {DEFAULT_LR['adam']} for adam)")
    g.add_argument("--momentum", type=unit_interval, default=0.9, help="sgd momentum")
    g.add_argument("--hyper-optimizer", choices=("adam", "sgd"), default="adam", help="optimizer of the hyperparameters")
    g.add_argument("--hyper-lr", type=positive_float, default=1e-2,
                   help="hyper-optimizer learning rate on the raw hyperparameters (log L2, noise std)")
    g.add_argument("--hyper-every", type=positive_int, default=1, help="a T2 step every this many T1 steps")
    g.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="implementation of the fused ops")
    g = common.add_argument_group("run")
    g.add_argument("--seed", type=nonneg_int, default=0, help="base seed: data split, initializations, random starts")
    g.add_argument("--full", action="store_true", help="the paper-scale setting (see the defaults of each flag)")
    g.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads")
    g.add_argument("--out", default=None, help="output folder (default: runs/<command>-<dataset>-<axes>-<time>)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    # grid and compare average fixed runs over initializations; search trains every trial once
    seeds = argparse.ArgumentParser(add_help=False)
    seeds.add_argument_group("run").add_argument(  # argparse merges it into common's "run" group
        "--seeds", type=positive_int, default=None,
        help="initializations averaged per fixed-hyperparameter point (default 2, --full 3)")

    gr = sub.add_parser(
        "grid", parents=[common, seeds], formatter_class=_HelpFormatter,
        help="hyperparameter map by grid search, with T1-T2 trajectories over it (the paper's Fig. 1)",
        description="Train a G x G grid of fixed hyperparameters (mean test error over --seeds "
                    "initializations), then --runs T1-T2 runs from random starts tuning both axes, and "
                    "draw their trajectories over the map. Writes grid.csv, trajectories.csv, map.png, "
                    "summary.json; prints where the runs ended relative to the grid's best cells.")
    gr.add_argument("--size", type=_number(int, "an integer >= 2", lo=2), default=None,
                    help="grid points per axis (default 5, --full 9)")
    gr.add_argument("--runs", type=positive_int, default=None, help="T1-T2 runs from random starts (default 8, --full 12)")
    gr.set_defaults(func=cmd_grid)

    cp = sub.add_parser(
        "compare", parents=[common, seeds], formatter_class=_HelpFormatter,
        help="before/after: random fixed hyperparameters vs retraining with those T1-T2 found",
        description="For --runs random hyperparameter points: train with them fixed (before), run T1-T2 "
                    "from there, and retrain from scratch with the hyperparameters that run ended at "
                    "(after). Writes compare.csv, compare.png, summary.json and prints the table.")
    cp.add_argument("--runs", type=positive_int, default=None, help="random starts (default 10, --full 20)")
    cp.set_defaults(func=cmd_compare)

    se = sub.add_parser(
        "search", parents=[common], formatter_class=_HelpFormatter,
        help="T1-T2 against random search and TPE (Optuna) at equal wall-clock compute",
        description="Per repeat: max(--budgets) T1-T2 runs from random starts, timed; then random search "
                    "and TPE (fixed-hyperparameter runs, selected by validation error) each get the time "
                    "those runs took. At a budget of k T1-T2 runs, T1-T2's answer is the best of its first "
                    "k runs by validation error, and a baseline's the best by validation error among its "
                    "trials that finished within the same seconds; test error is reported. Writes "
                    "search.csv, search_budget.csv, search.png, summary.json. TPE needs Optuna "
                    "(`pip install t1t2_fast[experiments]`).")
    se.add_argument("--budgets", type=_sorted_int_list, default=(1, 2, 4), metavar="K,...",
                    help="budgets in T1-T2 runs; max(K) T1-T2 runs are trained per repeat (default 1,2,4)")
    se.add_argument("--methods", type=_search_methods, default=("random", "tpe"), metavar="M,...",
                    help="baselines: random, tpe (default both)")
    se.add_argument("--repeats", type=positive_int, default=None,
                    help="repeats of the whole comparison with other search seeds (default 2, --full 5)")
    se.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="what a budget measures: wall-clock seconds (time.perf_counter) or this process's "
                         "CPU seconds (time.process_time, less sensitive to other jobs on the machine)")
    se.set_defaults(func=cmd_search)
    _add_peers_command(sub)


def _int_list(text: str) -> tuple[int, ...]:
    """'256,1024' -> (256, 1024): positive integers, duplicates dropped, order kept."""
    try:
        values = tuple(dict.fromkeys(int(t) for t in text.split(",") if t.strip()))
    except ValueError:
        values = ()
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _peer_names() -> tuple[str, ...]:
    from .peers import PEERS
    return PEERS


_peer_list = _subset(_peer_names)


# `t1t2 peers` defaults, and --full's; explicit flags still win.
PEERS_SMALL = {"widths": (256, 1024, 2048, 4096), "repeats": 7}
PEERS_FULL = {"widths": (256, 512, 1024, 2048, 4096, 8192), "repeats": 20}


def _add_peers_command(sub) -> None:
    """`peers` (issue 6 experiment 5); its code is in peers.py."""
    pe = sub.add_parser(
        "peers", formatter_class=_HelpFormatter,
        help="our one-step hypergradient vs higher and torchopt: agreement, time and peak memory",
        description="Compute the same one-step hypergradient of per-layer L2 penalties (MLP 784-w-w-10, "
                    "synthetic data, train and validation batches of --batch-size) with T1T2 (compiled and "
                    "reference backends), higher's differentiable optimizers and torchopt's MetaSGD/MetaAdam "
                    "(pure-Python path). Checks that they agree in float64, times one hyper iteration (T1 "
                    "step + hypergradient) per method and width, and measures its peak memory. Writes "
                    "peers.csv, peers.md, peers.png, summary.json. Needs the peers: "
                    "`pip install t1t2_fast[experiments]`; a missing one is skipped with a warning.")
    pe.add_argument("--widths", type=_int_list, default=None,
                    help="hidden widths, comma-separated (default 256,1024,2048,4096; --full 256..8192)")
    pe.add_argument("--optimizer", choices=("sgd", "adam", "both"), default="both",
                    help="T1 optimizer: sgd (momentum 0.9, lr 0.05) or adam (lr 1e-3)")
    pe.add_argument("--repeats", type=positive_int, default=None,
                    help="timed hyper iterations per method and width; the median is reported (default 7, --full 20)")
    pe.add_argument("--warmup", type=nonneg_int, default=2, help="untimed hyper iterations first")
    pe.add_argument("--batch-size", type=positive_int, default=128, help="training and validation batch size")
    pe.add_argument("--per", choices=("layer", "network"), default="layer",
                    help="one L2 coefficient per weight matrix, or one for the network")
    pe.add_argument("--peers", type=_peer_list, default=("higher", "torchopt"),
                    help="which peers to run (comma-separated subset of higher,torchopt)")
    pe.add_argument("--agree-width", type=positive_int, default=256,
                    help="width of the float64 agreement check (and the float32 accuracy check)")
    pe.add_argument("--agree-steps", type=positive_int, default=4, help="hyper iterations compared there")
    pe.add_argument("--seed", type=nonneg_int, default=0, help="seeds the weights and the synthetic data")
    pe.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads")
    pe.add_argument("--full", action="store_true", help="more widths and repeats (see their defaults)")
    pe.add_argument("--out", default=None, help="output folder (default: runs/peers-<time>)")
    pe.add_argument("--quiet", action="store_true", help="no per-width progress lines")
    pe.set_defaults(func=cmd_peers)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``t1t2`` command. Returns the exit status (0 ok, 1 run failed, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the message (or the help)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"t1t2 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------
# grid, compare, search
# ---------------------------------------------------------------------------------------------
def _experiment_setup(args):
    """Resolve --full / defaults, load the data and build the experiments.Config."""
    from .data import load_data
    from .experiments import Config

    for key, value in (FULL if args.full else SMALL)[args.command].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.l2_per != "network" and args.axes != "noise-l2":
        raise UsageError("--l2-per applies to --axes noise-l2 only (noise-noise has no penalty)")
    if args.hyper_every > args.steps:
        raise UsageError(f"--hyper-every {args.hyper_every} exceeds --steps {args.steps}: T1-T2 would never tune")
    try:
        data = load_data(args.dataset, seed=args.seed, samples=args.samples)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    cfg = Config(dataset=args.dataset, axes=args.axes, samples=args.samples, split_seed=args.seed,
                 width=args.width, depth=args.depth, steps=args.steps, batch_size=args.batch_size,
                 optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, l2_per=args.l2_per,
                 hyper_optimizer=args.hyper_optimizer, hyper_lr=args.hyper_lr, hyper_every=args.hyper_every,
                 backend=args.backend)
    out = args.out or _timestamped(os.path.join("runs", f"{args.command}-{args.dataset}-{args.axes}"))
    os.makedirs(out, exist_ok=True)
    return data, cfg, out


def _timestamped(base: str) -> str:
    base = f"{base}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out, k = base, 1
    while os.path.exists(out):
        out, k = f"{base}-{k}", k + 1
    return out


def _run_experiment(args, body) -> int:
    """Common frame of grid, compare and search: threads (restored afterwards), data errors, timing, and the
    list of files ``body`` wrote (it returns {what: path})."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        try:
            data, cfg, out = _experiment_setup(args)
        except RuntimeError as exc:  # e.g. mnist1d not installed
            print(f"t1t2 {args.command}: error: {exc}", file=sys.stderr)
            return 1
        if not args.quiet:
            print(f"{data.describe()}; MLP width {cfg.width} depth {cfg.depth}; {cfg.steps} steps per run; "
                  f"axes {cfg.axes}")
        paths = body(args, data, cfg, out, t0)
        print(f"run time {time.perf_counter() - t0:.1f} s")
        print("wrote " + "\n      ".join(paths.values()))
        return 0
    finally:
        torch.set_num_threads(threads)


def _write_summary(path: str, summary: dict, args, cfg, t0: float) -> None:
    import dataclasses

    config = dict(vars(args))
    config.pop("func", None)
    summary = {**summary, "config": {**config, **dataclasses.asdict(cfg)}, "wall_time_s": time.perf_counter() - t0}
    with open(path, "w") as f:
        json.dump(_strict_json(summary), f, indent=2, allow_nan=False)
        f.write("\n")


def cmd_grid(args) -> int:
    return _run_experiment(args, _grid)


def _grid(args, data, cfg, out, t0) -> dict[str, str]:
    from . import experiments as ex

    result = ex.grid_experiment(data, cfg, size=args.size, seeds=args.seeds, runs=args.runs, seed=args.seed,
                                quiet=args.quiet)
    s = result["summary"]
    ax, ay = ex.AXIS_PAIRS[cfg.axes]
    paths = ex.write_grid_csvs(out, result, cfg)
    paths["map"] = os.path.join(out, "map.png")
    paths["summary"] = os.path.join(out, "summary.json")
    ex.plot_map(paths["map"], result, cfg, args.size, title=(
        f"{cfg.dataset}, MLP {cfg.width}x{cfg.depth}, {cfg.steps} steps: test error % per cell; "
        f"{args.runs} T1-T2 runs\n{s['fraction_runs_in_best_quarter']:.0%} end nearest a best-quarter cell"
        if args.runs else f"{cfg.dataset}, MLP {cfg.width}x{cfg.depth}, {cfg.steps} steps: test error % per cell"))
    _write_summary(paths["summary"], s, args, cfg, t0)

    best = s["best_cell"]
    print(f"grid {args.size}x{args.size}, {args.seeds} seed(s) per cell: test error {s['cell_test_error']['min']:.4f} "
          f"(best, at {ax.name}={best[ax.name]:.3g}, {ay.name}={best[ay.name]:.3g}) .. median "
          f"{s['cell_test_error']['median']:.4f} .. {s['cell_test_error']['max']:.4f}")
    if s["runs"]:
        print(f"T1-T2 runs (end point's nearest cell: its test error and rank of {s['cells']}; "
              f"best quarter = rank <= {s['best_quarter_size']}):")
        print(f"  run  start ({ax.name}, {ay.name})   end ({ax.name}, {ay.name})     run test err  "
              f"cell err  rank")
        for r in s["runs"]:
            st, en = r["start"], r["end"]
            print(f"  {r['run']:>3}  ({st[ax.name]:6.3f}, {st[ay.name]:6.3f})  ({en[ax.name]:6.3f}, {en[ay.name]:6.3f})"
                  f"{'*' if r['end_outside_grid'] else ' '}  {r['test_error']:12.4f}  {r['nearest_cell_test_error']:8.4f}"
                  f"  {r['nearest_cell_rank']:>4}")
        print(f"{s['fraction_runs_in_best_quarter']:.0%} of runs end nearest a best-quarter cell; median rank "
              f"{s['median_end_rank']:g}; T1-T2 runs' own test error mean {s['t1t2_test_error']['mean']:.4f} "
              f"(* = ended outside the grid)")
    return paths


def cmd_compare(args) -> int:
    return _run_experiment(args, _compare)


def _compare(args, data, cfg, out, t0) -> dict[str, str]:
    from . import experiments as ex

    rows = ex.compare_experiment(data, cfg, runs=args.runs, seeds=args.seeds, seed=args.seed, quiet=args.quiet)
    s = ex.compare_summary(rows)
    paths = {"table": os.path.join(out, "compare.csv"), "plot": os.path.join(out, "compare.png"),
             "summary": os.path.join(out, "summary.json")}
    header = list(rows[0])
    ex.write_csv(paths["table"], header, [[r[k] for k in header] for r in rows])
    ex.plot_compare(paths["plot"], rows, title=(
        f"{cfg.dataset} {cfg.axes}, MLP {cfg.width}x{cfg.depth}, {cfg.steps} steps, {args.seeds} seed(s)\n"
        f"mean test error {100 * s['mean_test_error_before']:.2f}% -> {100 * s['mean_test_error_after']:.2f}%; "
        f"improved {s['improved']}/{s['runs']}"))
    _write_summary(paths["summary"], {**s, "rows": rows}, args, cfg, t0)

    ax, ay = ex.AXIS_PAIRS[cfg.axes]
    print(f"  run  start ({ax.name}, {ay.name})   T1-T2 end ({ax.name}, {ay.name})  before   after  T1-T2 run")
    for r in rows:
        print(f"  {r['run']:>3}  ({r['start_' + ax.name]:6.3f}, {r['start_' + ay.name]:6.3f})  "
              f"({r['end_' + ax.name]:6.3f}, {r['end_' + ay.name]:6.3f})        {r['test_error_before']:.4f}  "
              f"{r['test_error_after']:.4f}  {r['test_error_t1t2_run']:.4f}")
    print(f"mean test error before {s['mean_test_error_before']:.4f}, after {s['mean_test_error_after']:.4f} "
          f"(T1-T2 runs themselves {s['mean_test_error_t1t2_run']:.4f}); improved {s['improved']}, tied {s['tied']}, "
          f"worse {s['worse']} of {s['runs']}")
    return paths


def cmd_search(args) -> int:
    if "tpe" in args.methods:
        from .search import require_optuna

        try:
            require_optuna()
        except RuntimeError as exc:
            print(f"t1t2 search: error: {exc}", file=sys.stderr)
            return 1
    return _run_experiment(args, _search)


def _search(args, data, cfg, out, t0) -> dict[str, str]:
    from . import search as se

    clock = time.perf_counter if args.clock == "wall" else time.process_time
    result = se.search_experiment(data, cfg, repeats=args.repeats, budgets=args.budgets, methods=args.methods,
                                  seed=args.seed, quiet=args.quiet, clock=clock)
    paths = se.write_search_csvs(out, result, cfg)
    paths["plot"] = os.path.join(out, "search.png")
    paths["summary"] = os.path.join(out, "summary.json")
    s = result["summary"]
    se.plot_search(paths["plot"], result, title=(
        f"{cfg.dataset} {cfg.axes}, MLP {cfg.width}x{cfg.depth}, {cfg.steps} steps per run, {args.repeats} "
        f"repeat(s); a T1-T2 run took {s['t1t2_run_s']['mean']:.1f} s, a fixed run {s['fixed_run_s']['mean']:.2f} s "
        f"({args.clock} clock)"), xlabel=f"{'wall-clock' if args.clock == 'wall' else 'process CPU'} seconds "
                                        f"({args.threads} thread{'s' if args.threads > 1 else ''})")
    _write_summary(paths["summary"], se.summary_json(result), args, cfg, t0)
    load = f"; CPU/wall {s['cpu_over_wall']:.2f}" if args.clock == "wall" else ""
    print(f"{args.repeats} repeat(s); one T1-T2 run {s['t1t2_run_s']['mean']:.2f} s, one fixed run "
          f"{s['fixed_run_s']['mean']:.2f} s on average ({args.clock} clock{load}); "
          f"selected by validation error, test error reported:")
    for line in se.format_table(result):
        print("  " + line)
    return paths


# ---------------------------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------------------------
def cmd_peers(args) -> int:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _peers(args)
    finally:
        torch.set_num_threads(threads)


def _peers(args) -> int:
    import torch

    from . import peers as pe

    t0 = time.perf_counter()
    for key, value in (PEERS_FULL if args.full else PEERS_SMALL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    found, missing = pe.available_peers(args.peers)
    if not found:
        detail = "; ".join(f"{n}: {why}" for n, why in missing.items())
        print(f"t1t2 peers: error: the peers are not installed ({detail}); install them with "
              f"`{pe.INSTALL_HINT}` (or `pip install higher torchopt`)", file=sys.stderr)
        return 1
    for name, why in missing.items():  # one of two missing: still a useful comparison
        print(f"t1t2 peers: warning: skipping {name}, which does not import ({why}); "
              f"`{pe.INSTALL_HINT}` installs it", file=sys.stderr)
    compiled = pe.compiled_available()
    if not compiled:
        print("t1t2 peers: warning: the compiled extension is not built; 'ours' is the reference backend",
              file=sys.stderr)
    methods = ([] if not compiled else ["ours-cpp"]) + ["ours-reference"] + found + [pe.PLAIN]
    optimizers = list(pe.OPTIMIZERS) if args.optimizer == "both" else [args.optimizer]
    torchopt_path = None
    if "torchopt" in found:
        torchopt_path = ("pure-Python (use_accelerated_op=False); torchopt._C "
                         + ("loads" if pe.torchopt_c_loads() else "does not load against this torch"))
    out = args.out or _timestamped(os.path.join("runs", "peers"))
    os.makedirs(out, exist_ok=True)
    if not args.quiet:
        print(f"MLP 784-w-w-10, widths {','.join(map(str, args.widths))}, batch {args.batch_size}, per-{args.per} L2; "
              f"methods {', '.join(methods)}; {args.repeats} timed + {args.warmup} warm-up hyper iterations "
              f"each, {torch.get_num_threads()} thread(s)")
        if torchopt_path:
            print(f"torchopt path: {torchopt_path}")

    def progress(opt, width, rows):
        if not args.quiet:
            cells = "  ".join(f"{r['method']} {r['median_ms']:.1f} ms {r['peak_mb']:.1f} MB" for r in rows)
            print(f"  {opt} width {width}: {cells}", flush=True)

    result = pe.run_experiment(args.widths, optimizers, methods, repeats=args.repeats, warmup=args.warmup,
                               batch=args.batch_size, per=args.per, seed=args.seed, agree_width=args.agree_width,
                               agree_steps=args.agree_steps, progress=progress)
    rows, agree, verdict = result["rows"], result["agreement"], result["verdict"]
    paths = {k: os.path.join(out, f) for k, f in (("table", "peers.csv"), ("markdown", "peers.md"),
                                                   ("plot", "peers.png"), ("summary", "summary.json"))}
    pe.write_csv(paths["table"], rows)
    with open(paths["markdown"], "w") as f:
        f.write(pe.markdown_table(rows, methods))
    pe.plot(paths["plot"], rows, methods, title=(
        f"one hyper iteration (T1 step + one-step hypergradient of per-{args.per} L2), MLP 784-w-w-10, batch "
        f"{args.batch_size}, float32, {torch.get_num_threads()} thread(s); median of {args.repeats}"))
    config = dict(vars(args))
    config.pop("func", None)
    summary = {"verdict": verdict, "agreement": agree, "rows": rows, "methods": methods,
               "skipped_peers": missing, "torchopt_path": torchopt_path, "memory_method": pe.MEMORY_METHOD,
               "targets": {"speedup_at_least": pe.SPEED_TARGET, "memory_ratio_at_most": pe.MEMORY_TARGET},
               "config": config, "versions": _peer_versions(found), "wall_time_s": time.perf_counter() - t0}
    with open(paths["summary"], "w") as f:
        json.dump(_strict_json(summary), f, indent=2, allow_nan=False)
        f.write("\n")

    _print_peers(rows, methods, agree, verdict, args)
    print(f"run time {time.perf_counter() - t0:.1f} s")
    print("wrote " + "\n      ".join(paths.values()))
    return 0 if all(a["passed"] for a in agree.values()) else 1


def _peer_versions(found) -> dict:
    import importlib.metadata as md

    import torch

    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in found:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "?"
    return out


def _print_peers(rows, methods, agree, verdict, args) -> None:
    print(f"{'optimizer':<9} {'width':>5} {'params':>8}  {'method':<15} {'median ms':>10} {'peak MB':>9} "
          f"{'rel diff vs ours':>17}")
    for r in rows:
        diff = "" if r["rel_diff_vs_ours"] is None else f"{r['rel_diff_vs_ours']:.1e}"
        print(f"{r['optimizer']:<9} {r['width']:>5} {r['params'] / 1e6:>7.2f}M  {r['method']:<15} "
              f"{r['median_ms']:>10.2f} {r['peak_mb']:>9.1f} {diff:>17}")
    print("(rel diff vs ours: max over the first two hyper iterations of max|h - h_ours| / max|h_ours|, float32)")
    for opt, a in agree.items():
        worst = ", ".join(f"{m} {d:.1e}" for m, d in a["float64_max_rel_diff"].items() if m != a["reference"])
        f32 = ", ".join(f"{m} {max(d):.1e}" for m, d in a["float32_error_vs_float64"].items())
        print(f"agreement {opt}, float64, width {args.agree_width}, {args.agree_steps} hyper iterations, vs "
              f"{a['reference']}: {worst} -> {'PASS' if a['passed'] else 'FAIL'} (bound 1e-08); float32 error vs "
              f"the float64 answer: {f32}")
    for opt, v in verdict.items():
        print(f"{opt}, width {v['width']}: {v['ours']} {v['ours_ms']:.1f} ms, {v['ours_mb']:.1f} MB; fastest peer "
              f"{v['fastest_peer']} {v['peer_ms']:.1f} ms, {v['peer_mb']:.1f} MB -> {v['speedup']:.2f}x faster "
              f"(target >= 3x: {'met' if v['speed_target_met'] else 'missed'}), {v['memory_ratio']:.2f}x its memory "
              f"(target <= 0.5x: {'met' if v['memory_target_met'] else 'missed'})"
              + (f"; a plain training step takes {v['plain_step_ms']:.1f} ms" if "plain_step_ms" in v else ""))


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
NOISE_SITES = ("input", "hidden")


_noise_sites = _subset(NOISE_SITES)


def make_mlp(num_features: int, num_classes: int, width: int, depth: int, noise: tuple[str, ...] = (),
             noise_init: float = 0.1, noise_per: str = "layer", noise_mode: str = "additive"):
    """An MLP with named layers (fc1..fcN, out), so hyperparameters read ``l2.fc1.weight``; with
    ``noise``, GaussianNoise modules ``input`` (before fc1) and ``hidden<i>`` (after relu<i>), whose
    levels are the hyperparameters ``noise.input``, ``noise.hidden1``, ..."""
    from torch import nn

    from .noise import GaussianNoise

    def noise_layer(features):
        return GaussianNoise(noise_init, per=noise_per, num_features=features if noise_per == "unit" else None,
                             mode=noise_mode)

    layers: "OrderedDict[str, nn.Module]" = OrderedDict()
    if "input" in noise:
        layers["input"] = noise_layer(num_features)
    fan_in = num_features
    for i in range(1, depth + 1):
        layers[f"fc{i}"] = nn.Linear(fan_in, width)
        layers[f"relu{i}"] = nn.ReLU()
        if "hidden" in noise:
            layers[f"hidden{i}"] = noise_layer(width)
        fan_in = width
    layers["out"] = nn.Linear(fan_in, num_classes)
    return nn.Sequential(layers)


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _default_out(args) -> str:
    if args.name:
        return os.path.join("runs", args.name)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join("runs", f"{args.dataset}-{stamp}")
    out, k = base, 1
    while os.path.exists(out):
        out, k = f"{base}-{k}", k + 1
    return out


def _summary_value(value) -> float:
    """A hyperparameter as one number: itself, or the mean of a tensor-valued one."""
    return float(value) if isinstance(value, float) else float(value.mean())


def _short(value) -> str:
    """Compact text for the progress bar: '1.2e-03', or the geometric mean '~1.2e-03' of a tensor."""
    if isinstance(value, float):
        return f"{value:.1e}"
    v = value.double().clamp_min(1e-300)
    return f"~{float(v.log().mean().exp()):.1e}"


def _compact_hypers(hypers: dict) -> str:
    """'l2 1.0e-03|9.8e-04|1.1e-03 l1 ...': one group per penalty kind, one value per layer."""
    groups: "OrderedDict[str, list[str]]" = OrderedDict()
    for name, value in hypers.items():
        groups.setdefault(name.split(".", 1)[0], []).append(_short(value))
    return " ".join(f"{kind} {'|'.join(vals)}" for kind, vals in groups.items())


def _json_value(value):
    """A hyperparameter for metrics.json: a float, or summary statistics (and the values when small)."""
    if isinstance(value, float):
        return value
    v = value.detach().double().cpu()
    out = {"shape": list(v.shape), "mean": float(v.mean()), "geomean": float(v.clamp_min(1e-300).log().mean().exp()),
           "min": float(v.min()), "max": float(v.max())}
    if v.numel() <= 1024:
        out["values"] = v.flatten().tolist()
    return out


class _Dist:
    """The process group of a `torchrun ... train` run: rank, world size, local rank."""

    def __init__(self, rank: int, world_size: int, local_rank: int):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank


def _torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun (its RANK / WORLD_SIZE / LOCAL_RANK
    variables), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UsageError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them)") from None
    return rank, world, local


# ---------------------------------------------------------------------------------------------
# train: checkpoints
# ---------------------------------------------------------------------------------------------
CHECKPOINT_FORMAT = "t1t2-train-checkpoint"
# Flags that change where and how a run reports, not what it computes: they may differ on --resume.
# (--threads is not one of them: torch's kernels may sum in another order with another thread count.)
RUN_ONLY_FLAGS = ("out", "name", "quiet", "dist_timeout", "checkpoint", "checkpoint_every", "resume", "max_skips", "func")


class _BatchStream:
    """Batches of indices into a split of ``n`` examples: one random permutation of the split per
    pass, drawn from the stream's own generator, cut into batches of ``size`` (the last one of a
    pass may be shorter). ``state_dict()`` (the generator's state before the current permutation
    and the position in it) restarts the same sequence in another process."""

    def __init__(self, n: int, size: int, seed: int, device):
        import torch

        self.n, self.size, self.device = n, size, device
        self.gen = torch.Generator().manual_seed(seed)
        self._start = None  # generator state before the current permutation (None: no pass drawn yet)
        self._perm, self._pos = None, 0

    def _draw(self):
        import torch

        self._start = self.gen.get_state()
        self._perm, self._pos = torch.randperm(self.n, generator=self.gen).to(self.device), 0

    def __next__(self):
        if self._perm is None or self._pos >= self.n:
            self._draw()
        idx = self._perm[self._pos:self._pos + self.size]
        self._pos += self.size
        return idx

    def state_dict(self) -> dict:
        return {"n": self.n, "size": self.size, "start": None if self._start is None else self._start.clone(),
                "pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        if (state["n"], state["size"]) != (self.n, self.size):
            raise ValueError(f"batch stream of {state['n']} examples in batches of {state['size']}, not "
                             f"{self.n} / {self.size}")
        if state["start"] is None:
            self._start, self._perm, self._pos = None, None, 0
            return
        self.gen.set_state(state["start"])
        self._draw()
        self._pos = int(state["pos"])


def _train_settings(args, world: int) -> dict:
    """What a `train` run computes from: every flag but the run-only ones (after defaults are
    resolved), and the number of processes."""
    settings = {k: v for k, v in vars(args).items() if k not in RUN_ONLY_FLAGS}
    settings["noise"] = list(settings["noise"])
    settings["world_size"] = world
    return settings


def _rng_states(device) -> dict:
    """torch's (and CUDA's), numpy's and Python's global generator states, in types that
    torch.load(weights_only=True) reads back."""
    import torch

    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": random.getstate()}


def _set_rng_states(states: dict, device) -> None:
    import torch

    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
    name, key, *rest = states["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def _write_checkpoint(path: str, state: dict) -> None:
    """torch.save to a temporary file next to ``path``, flushed to disk, then renamed over it: a
    crash mid-write leaves the previous checkpoint whole."""
    import torch

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_checkpoint(path: str, settings: dict) -> dict:
    """The checkpoint at ``path``, refused (UsageError) unless a `train` run with ``settings`` wrote it."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"--resume {path}: no such file") from None
    except Exception as exc:  # not a torch file, truncated, or holding other objects
        raise UsageError(f"--resume {path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"--resume {path}: not a checkpoint written by `t1t2 train --checkpoint`")
    saved = state["settings"]
    differ = [k for k in sorted(set(saved) | set(settings)) if saved.get(k, "(unset)") != settings.get(k, "(unset)")]
    if differ:
        detail = "; ".join(f"{k.replace('_', '-')}: {saved.get(k, '(unset)')!r} there, "
                           f"{settings.get(k, '(unset)')!r} here" for k in differ)
        raise UsageError(f"--resume {path}: the checkpoint was written by a run with other settings ({detail}); "
                         f"resume with the command that wrote it")
    return state


def cmd_train(args) -> int:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    env = _torchrun_env()
    try:
        if env is None:
            return _train(args)
        # torchrun: one process per rank; gloo on CPU, nccl on CUDA (DESIGN-wise nothing else changes)
        import torch.distributed as dist

        rank, world, local = env
        backend = "nccl" if torch.device(args.device).type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=_dt.timedelta(seconds=args.dist_timeout))
        try:
            status = _train(args, _Dist(rank, world, local))
            dist.barrier()  # leave together: no rank tears its connections down while rank 0 still writes
            return status
        finally:
            dist.destroy_process_group()
    finally:  # main() may be called in-process (tests, notebooks): leave torch as we found it
        torch.set_num_threads(threads)


def _train(args, ddp: _Dist | None = None) -> int:
    """One `train` run; with ``ddp``, this process is one rank of a torchrun job: the model is
    wrapped in DistributedDataParallel, every global batch (the same one a single process would
    draw) is split into equal disjoint shards, one per rank, and only rank 0 evaluates, prints and
    writes."""
    main_rank = ddp is None or ddp.rank == 0
    if not main_rank:
        args.quiet = True
    t_start = time.perf_counter()
    if args.l1 == 0:  # --l1 0 means no L1, like --l2 0
        args.l1 = None
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.momentum == 0 and args.nesterov:
        raise UsageError("--nesterov needs --momentum > 0")
    if args.nesterov and args.optimizer != "sgd":
        raise UsageError("--nesterov applies to --optimizer sgd only")

    import torch
    import torch.nn.functional as F

    import t1t2_fast as t1t2
    from .data import load_data
    from .optimizer import NonFiniteError

    try:
        device = torch.device(args.device)
        if ddp is not None and device.type == "cuda":  # one GPU per rank
            device = torch.device("cuda", ddp.local_rank)
            torch.cuda.set_device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UsageError(f"--device {args.device!r} is not usable here: {exc}") from None

    try:
        data = load_data(args.dataset, seed=args.seed, samples=args.samples)
    except RuntimeError as exc:  # e.g. mnist1d not installed
        print(f"t1t2 train: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    train_x, train_y = data.train.x.to(device), data.train.y.to(device)
    val_x, val_y = data.val.x.to(device), data.val.y.to(device)
    test_x, test_y = data.test.x.to(device), data.test.y.to(device)
    n_train, n_val = len(data.train), len(data.val)

    batch = min(args.batch_size, n_train)
    val_batch = min(args.val_batch_size or args.batch_size, n_val)
    steps_per_epoch = math.ceil(n_train / batch)
    total_steps = args.steps if args.steps is not None else (args.epochs or 100) * steps_per_epoch
    log_every = args.log_every or max(1, total_steps // 200)
    world = 1 if ddp is None else ddp.world_size
    if world > 1 and min(batch, val_batch) < world:
        raise UsageError(f"--batch-size {batch} and the validation batch size {val_batch} must be at least the "
                         f"number of processes ({world}): every rank takes an equal share of each batch")

    if "hidden" in args.noise and args.depth == 0:
        raise UsageError("--noise hidden needs hidden layers (--depth >= 1)")
    settings = _train_settings(args, world)
    # every rank reads the file rank 0 wrote (one state for all: DDP keeps θ, the optimizer and λ
    # identical on every rank, and every rank draws the same global batches)
    ckpt = _read_checkpoint(args.resume, settings) if args.resume else None

    _seed_everything(args.seed)
    model = make_mlp(data.num_features, data.num_classes, args.width, args.depth, noise=args.noise,
                     noise_init=args.noise_init, noise_per=args.noise_per, noise_mode=args.noise_mode).to(device)
    net = model  # the module itself: evaluation and names; `model` is what the training closures call
    if ddp is not None:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    penalties = []
    if args.l2 > 0:
        penalties.append(t1t2.L2(args.l2, per=args.per, decoupled=args.decoupled))
    elif args.decoupled:
        raise UsageError("--decoupled needs L2 (--l2 > 0)")
    if args.l1 is not None:
        penalties.append(t1t2.L1(args.l1, per=args.per))
    try:
        opt = t1t2.T1T2(model, penalties, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
                        nesterov=args.nesterov, hyper_optimizer=args.hyper_optimizer, hyper_lr=args.hyper_lr,
                        hyper_every=args.hyper_every, hypergrad=args.hypergrad,
                        noise_hypergrad=args.noise_hypergrad, fd_eps=args.fd_eps, backend=args.backend,
                        seed=args.seed, max_consecutive_skips=args.max_skips)
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        raise UsageError(str(exc)) from None
    backend_name = getattr(getattr(opt, "backend", None), "name", args.backend)
    tuning = bool(opt.hyperparameters())

    out = args.out or _default_out(args)
    if main_rank:
        os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f) for k, f in
             (("log", "log.csv"), ("metrics", "metrics.json"), ("plot", "trajectories.png"))}

    if not args.quiet:
        if ddp is not None:
            print(f"distributed: {world} processes ({torch.distributed.get_backend()}), each takes 1/{world} "
                  f"of every batch")
        print(f"{data.describe()}; MLP {data.num_features}-{'-'.join([str(args.width)] * args.depth)}"
              f"{'-' if args.depth else ''}{data.num_classes}; {total_steps} steps "
              f"({total_steps / steps_per_epoch:.3g} epochs of {steps_per_epoch}), backend {backend_name}")
        if not tuning:
            print("no penalty or noise selected (--l2 0, no --l1, no --noise): plain training, nothing to tune")

    train_batches = _BatchStream(n_train, batch, args.seed, device)
    val_batches = _BatchStream(n_val, val_batch, args.seed + 1, device)

    @torch.no_grad()
    def evaluate(x, y):
        net.eval()
        logits = net(x)
        net.train()
        return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())

    hyper_names = list(opt.hyperparameters())
    columns = ["step", "train_loss", "val_loss"] + [
        n if isinstance(v, float) else f"{n}[mean]" for n, v in opt.hyperparameters().items()]
    rows: list[list] = []
    bands: dict[str, list[tuple[float, float]]] = {n: [] for n in hyper_names}
    initial = opt.hyperparameters()

    def record(step):
        tl, _ = evaluate(train_x, train_y)
        vl, _ = evaluate(val_x, val_y)
        hp = opt.hyperparameters()
        rows.append([step, tl, vl] + [_summary_value(hp[n]) for n in hyper_names])
        for n in hyper_names:
            v = hp[n]
            bands[n].append((v, v) if isinstance(v, float) else (float(v.min()), float(v.max())))
        return tl, vl, hp

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, disable=args.quiet, dynamic_ncols=True, file=sys.stderr, unit="step",
               desc=f"train {args.dataset}", leave=True)
    def shard_loss(x, y, idx):
        """The training or validation loss of the global batch ``idx`` as this process sees it: the
        mean cross-entropy, or under torchrun this rank's share of the sum scaled by world / batch,
        so that DDP's mean over the ranks (and T2's) is the whole batch's mean, shards equal or not."""
        if ddp is None:
            return lambda: F.cross_entropy(model(x[idx]), y[idx])
        part = idx.tensor_split(world)[ddp.rank]
        xs, ys, scale = x[part], y[part], world / len(idx)
        return lambda: F.cross_entropy(model(xs), ys, reduction="sum") * scale

    def global_loss(loss):
        """The whole batch's training loss on every rank (so all stop together on divergence)."""
        if ddp is None:
            return loss
        total = loss.detach().to(torch.float64).reshape(1)
        torch.distributed.all_reduce(total)
        return total[0] / world

    done, train_time_before = 0, 0.0
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        train_batches.load_state_dict(ckpt["train_batches"])
        val_batches.load_state_dict(ckpt["val_batches"])
        _set_rng_states(ckpt["rng"], device)
        done, train_time_before = int(ckpt["step"]), float(ckpt["train_time_s"])
        rows[:] = [list(r) for r in ckpt["log"]["rows"]]
        bands.update({n: [tuple(b) for b in v] for n, v in ckpt["log"]["bands"].items()})
        initial = ckpt["log"]["initial"]
        bar.update(done)
        if ckpt["backend_used"] != backend_name:  # --backend auto found another implementation here
            print(f"t1t2 train: warning: the checkpoint was written with backend {ckpt['backend_used']}, this run "
                  f"uses {backend_name}: the continuation is not bit-identical to the original run's",
                  file=sys.stderr)
        if not args.quiet:
            print(f"resumed from {args.resume} at step {done}")

    def checkpoint(step, train_time):
        if not (args.checkpoint and main_rank):
            return
        _write_checkpoint(args.checkpoint, {
            "format": CHECKPOINT_FORMAT, "version": 1, "settings": settings, "step": step,
            "train_time_s": train_time, "backend_used": backend_name,
            "model": net.state_dict(), "opt": opt.state_dict(),
            "train_batches": train_batches.state_dict(), "val_batches": val_batches.state_dict(),
            "rng": _rng_states(device), "log": {"rows": rows, "bands": bands, "initial": initial}})

    if main_rank and not args.resume:
        record(0)
    model.train()
    diverged, stop_reason = None, None
    logged_skips = 0

    def log_skip(step):
        """Each skipped step on its own line (the first 20, then every 100th), above the bar."""
        nonlocal logged_skips
        total = sum(opt.skipped.values())
        if main_rank and opt.last_skip and total > logged_skips:
            logged_skips = total
            if total <= 20 or total % 100 == 0:
                bar.write(f"t1t2 train: iteration {step}: skipped {opt.last_skip} ({opt.skipped['t1']} T1 and "
                          f"{opt.skipped['t2']} T2 steps skipped so far)")

    t_train = time.perf_counter()
    try:
        for step in range(done + 1, total_steps + 1):
            try:
                loss = global_loss(opt.step(shard_loss(train_x, train_y, next(train_batches))))
                log_skip(step)
                if tuning and opt.hyper_due:
                    opt.hyper_step(shard_loss(val_x, val_y, next(val_batches)))
                    log_skip(step)
            except NonFiniteError as exc:  # --max-skips consecutive skips: the run is not recovering
                log_skip(step)
                diverged, stop_reason = step, str(exc)
                loss = torch.tensor(math.nan)
            if not opt.skip_nonfinite and not math.isfinite(float(loss)):
                diverged = step
            if main_rank and (step % log_every == 0 or step == total_steps or diverged):
                tl, vl, hp = record(step)
                bar.set_postfix_str(f"loss {tl:.3f} val {vl:.3f} {_compact_hypers(hp)}", refresh=False)
            bar.update(1)
            if diverged:  # no checkpoint: the last one written stays the last good state
                break
            if step % args.checkpoint_every == 0 or step == total_steps:
                checkpoint(step, train_time_before + time.perf_counter() - t_train)
    finally:
        bar.close()
    train_time = train_time_before + time.perf_counter() - t_train
    if done == total_steps:  # resumed from the final checkpoint: nothing ran, the outputs are rewritten
        checkpoint(done, train_time)
    if not main_rank:  # rank 0 evaluates, writes and reports
        return 1 if diverged else 0

    test_loss, test_acc = evaluate(test_x, test_y)
    val_loss, val_acc = evaluate(val_x, val_y)
    train_loss, train_acc = evaluate(train_x, train_y)
    final = opt.hyperparameters()

    with open(paths["log"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([r[0]] + [f"{x:.8g}" for x in r[1:]])  # float32 values: 8 digits is plenty

    config = dict(vars(args))
    config.pop("func", None)
    config.update(out=out, steps=total_steps, steps_per_epoch=steps_per_epoch, batch_size_used=batch,
                  val_batch_size_used=val_batch, log_every=log_every, backend_used=backend_name)
    _plot(paths["plot"], columns, rows, hyper_names, bands, title=(
        f"{args.dataset}: MLP width {args.width} depth {args.depth}, {args.optimizer} lr {args.lr:g}, "
        f"hyper {args.hyper_optimizer} lr {args.hyper_lr:g} every {args.hyper_every}; "
        f"test acc {test_acc:.3f}"))

    wall = time.perf_counter() - t_start
    metrics = {
        "test_accuracy": test_acc, "test_loss": test_loss,
        "val_accuracy": val_acc, "val_loss": val_loss,
        "train_accuracy": train_acc, "train_loss": train_loss,
        "hyperparameters": {n: _json_value(v) for n, v in final.items()},
        "initial_hyperparameters": {n: _json_value(v) for n, v in initial.items()},
        "steps_done": rows[-1][0], "hyper_steps": int(getattr(opt, "hyper_steps", 0)),
        "world_size": world, "hyper_comm_bytes": int(getattr(opt, "comm_bytes", 0)),
        "diverged_at_step": diverged,
        "skipped_steps": dict(opt.skipped), "clipped_hyper_steps": dict(opt.clipped),
        "train_time_s": train_time, "wall_time_s": wall,
        "dataset": {"name": data.name, "train": n_train, "val": n_val, "test": len(data.test),
                    "features": data.num_features, "classes": data.num_classes},
        "config": config,
        "versions": {"t1t2_fast": getattr(t1t2, "__version__", "?"), "torch": torch.__version__,
                     "python": platform.python_version()},
    }
    with open(paths["metrics"], "w") as f:
        json.dump(_strict_json(metrics), f, indent=2, allow_nan=False)
        f.write("\n")

    print(f"test accuracy {test_acc:.4f}  test loss {test_loss:.4f}  (val accuracy {val_acc:.4f}, "
          f"train accuracy {train_acc:.4f})")
    if final:
        width = max(len(n) for n in final)
        print("final hyperparameters" + (" (mean over entries)" if any(not isinstance(v, float)
                                                                     for v in final.values()) else "") + ":")
        for n, v in final.items():
            init = _summary_value(initial[n])
            print(f"  {n:<{width}}  {_summary_value(v):.4g}  (initial {init:.4g})")
    print(f"run time {wall:.1f} s ({train_time:.1f} s training, {rows[-1][0]} steps, "
          f"{metrics['hyper_steps']} hyper steps, backend {backend_name})")
    written = list(paths.values()) + ([args.checkpoint] if args.checkpoint else [])
    print("wrote " + "\n      ".join(written))
    if any(opt.skipped.values()):
        print(f"skipped for Inf/NaN: {opt.skipped['t1']} T1 and {opt.skipped['t2']} T2 steps")
    if diverged:
        why = stop_reason or "the training loss became non-finite. Try a smaller --lr or --hyper-lr"
        print(f"t1t2 train: error: training stopped at iteration {diverged}: {why}", file=sys.stderr)
        return 1
    return 0


def _strict_json(obj):
    """NaN/inf become null: metrics.json stays valid JSON for every reader, even after divergence."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    return obj


def _plot(path, columns, rows, hyper_names, bands, title):
    # A bare Figure renders with Agg without touching pyplot's global backend or figure list, so
    # calling main() from a notebook or GUI session leaves the caller's matplotlib as it was.
    import matplotlib
    from matplotlib.figure import Figure

    steps = [r[0] for r in rows]
    penalty_names = [n for n in hyper_names if not n.startswith("noise")]
    noise_names = [n for n in hyper_names if n.startswith("noise")]
    fig = Figure(figsize=(17 if noise_names else 12, 4.6))
    axes = fig.subplots(1, 3 if noise_names else 2)
    ax_h, ax_l = axes[0], axes[-1]
    palette = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]

    def draw(ax, names, log, what, empty):
        layer_colors: dict[str, str] = {}
        for name in names:
            j = hyper_names.index(name)
            kind, _, target = name.partition(".")
            color = layer_colors.setdefault(target, palette[len(layer_colors) % len(palette)])
            ax.plot(steps, [r[3 + j] for r in rows], "--" if kind == "l1" else "-", color=color,
                    label=columns[3 + j], lw=1.6)
            lo, hi = zip(*bands[name])
            if any(a != b for a, b in zip(lo, hi)):
                ax.fill_between(steps, lo, hi, color=color, alpha=0.15, lw=0)
        banded = any(any(a != b for a, b in bands[n]) for n in names)
        if names:
            if log:
                ax.set_yscale("log")
            ax.legend(fontsize=8, loc="best")
            ax.set_title(f"{what} (natural scale; band: min-max over entries)" if banded else what)
        else:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
            ax.set_title(what)
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)

    draw(ax_h, penalty_names if noise_names else hyper_names, True, "penalty hyperparameters",
         "no penalty tuned" if noise_names else "no hyperparameters tuned")
    ax_h.set_ylabel("coefficient c (log scale)")
    if noise_names:
        draw(axes[1], noise_names, False, "noise levels", "")
        axes[1].set_ylabel("noise std σ")

    ax_l.plot(steps, [r[1] for r in rows], label="train (whole split)", lw=1.6)
    ax_l.plot(steps, [r[2] for r in rows], label="validation (whole split)", lw=1.6)
    positive = all(r[1] > 0 and r[2] > 0 for r in rows if math.isfinite(r[1]) and math.isfinite(r[2]))
    if positive:
        ax_l.set_yscale("log")
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("cross-entropy (data term, no penalty)")
    ax_l.set_title("loss")
    ax_l.legend(fontsize=8)
    ax_l.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------
# overhead (issue 6, experiment 4; the code is in overhead.py)
# ---------------------------------------------------------------------------------------------
_MODEL_NAMES = ("mlp256", "mlp1024", "mlp4096", "cnn")


def _is_mlp_name(name: str) -> bool:
    return name.startswith("mlp") and name[3:].isdigit() and int(name[3:]) > 0

OVERHEAD_FULL = {"steps": 20, "rounds": 7}
OVERHEAD_SMALL = {"steps": 10, "rounds": 3}


def _add_overhead_command(sub) -> None:
    from .overhead import BACKENDS, SETTINGS

    ov = sub.add_parser(
        "overhead", formatter_class=_HelpFormatter,
        help="wall time of T1-T2 over plain training vs model size (the paper's 30%% claim)",
        description="Time epochs of plain training (torch's SGD/Adam, foreach and fused, the faster counts) "
                    "and of T1-T2 (a hyper step every --hyper-every steps) for MLPs 784-w-w-10 and a small "
                    "CNN, with per-layer L2 only ('penalties') and with per-layer L2 plus input and hidden "
                    "noise tuned by 'fd' ('noise'), on each backend. Writes overhead.csv, overhead.png, "
                    "summary.json and prints the overhead beside its floor (the validation forward/backward, "
                    "plus fd's extra training forward/backward, per hyper_every plain steps).")
    ov.add_argument("--models", type=_subset(_MODEL_NAMES, " or mlp<width>", _is_mlp_name), default=_MODEL_NAMES,
                    help="comma-separated: mlp<width> (any width) and/or cnn")
    ov.add_argument("--settings", type=_subset(SETTINGS), default=SETTINGS, help="comma-separated")
    ov.add_argument("--backends", type=_subset(BACKENDS), default=BACKENDS, help="comma-separated")
    ov.add_argument("--hyper-every", type=_int_list, default=(10, 1), help="comma-separated")
    ov.add_argument("--steps", type=positive_int, default=None, help="steps per timed epoch (default 10, --full 20)")
    ov.add_argument("--rounds", type=positive_int, default=None,
                    help="timed epochs per variant, the median of per-round ratios reported (default 3, --full 7)")
    ov.add_argument("--batch-size", type=positive_int, default=128, help="training and validation batch size")
    ov.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                    help="the weights' optimizer (sgd: momentum 0.9, lr 0.01; adam: lr 1e-3)")
    ov.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads")
    ov.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="wall: elapsed time; process: this process's CPU time (with --threads 1, the wall time "
                         "on an idle machine; use it where other jobs share the cores)")
    ov.add_argument("--full", action="store_true", help="longer epochs and more rounds")
    ov.add_argument("--out", default=None, help="output folder (default: runs/overhead-<time>)")
    ov.add_argument("--quiet", action="store_true", help="no progress bar")
    ov.set_defaults(func=cmd_overhead)


def cmd_overhead(args) -> int:
    import dataclasses

    import torch

    from . import overhead as ov
    from ._extension import AVAILABLE, LOAD_ERROR

    for key, value in (OVERHEAD_FULL if args.full else OVERHEAD_SMALL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.clock == "process" and args.threads > 1:
        raise UsageError("--clock process sums the CPU time of all threads: use it with --threads 1")
    if "cpp" in args.backends and not AVAILABLE:
        print(f"t1t2 overhead: error: backend cpp needs the compiled extension ({LOAD_ERROR}); "
              f"pass --backends reference", file=sys.stderr)
        return 1
    cfg = ov.Config(models=args.models, settings=args.settings, backends=args.backends, hyper_every=args.hyper_every,
                    steps=args.steps, rounds=args.rounds, batch_size=args.batch_size, optimizer=args.optimizer,
                    lr=0.01 if args.optimizer == "sgd" else 1e-3)
    out = args.out or _timestamped(os.path.join("runs", "overhead"))
    os.makedirs(out, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        rows = ov.run(cfg, quiet=args.quiet, timer=ov.CLOCKS[args.clock])
    finally:
        torch.set_num_threads(threads)
    s = ov.summary(rows, cfg)
    paths = {"table": os.path.join(out, "overhead.csv"), "plot": os.path.join(out, "overhead.png"),
             "summary": os.path.join(out, "summary.json")}
    ov.write_csv(paths["table"], rows)
    ov.plot(paths["plot"], rows, cfg, title=f"T1-T2 overhead over plain {cfg.optimizer} training, batch "
                                             f"{cfg.batch_size}, {args.threads} thread(s), {args.clock} clock")
    config = {k: v for k, v in vars(args).items() if k != "func"}
    with open(paths["summary"], "w") as f:
        json.dump(_strict_json({**s, "config": {**config, **dataclasses.asdict(cfg)},
                                "rows": [dataclasses.asdict(r) for r in rows],
                                "wall_time_s": time.perf_counter() - t0}), f, indent=2, allow_nan=False)
        f.write("\n")

    print(f"{'model':>8} {'params':>9} {'setting':>9} {'backend':>9} {'every':>5} {'plain ms':>9} "
          f"{'T1-T2 ms':>9} {'overhead':>9} {'floor':>7} {'T1 only':>8}")
    for r in rows:
        print(f"{r.model:>8} {r.params:>9} {r.setting:>9} {r.backend:>9} {r.hyper_every:>5} {r.plain_ms:9.2f} "
              f"{r.t1t2_ms:9.2f} {r.overhead_pct:8.1f}% {r.floor_pct:6.1f}% {r.t1_only_pct:7.1f}%")
    for setting, t in s["targets"].items():
        print(f"target, {setting}, cpp, every 10: max {t['max_overhead_pct']:.1f}% (<= {t['target_pct']:.0f}%: "
              f"{'met' if t['met_level'] else 'MISSED'}), spread {t['spread_points']:.1f} points (<= "
              f"{ov.SPREAD_TARGET:.0f}: {'met' if t['met_flat'] else 'MISSED'})")
    print(f"run time {time.perf_counter() - t0:.1f} s")
    print("wrote " + "\n      ".join(paths.values()))
    return 0
