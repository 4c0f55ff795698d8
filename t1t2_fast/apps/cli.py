"""The ``t1t2`` command (or ``python -m t1t2_fast.apps``): argument parsing and command dispatch.

``train`` fits an MLP on a built-in dataset while T1-T2 tunes its regularization hyperparameters
(train.py); ``grid``, ``compare`` (experiments.py), ``search`` (search.py), ``peers`` (peers.py) and
``overhead`` (overhead.py) reproduce the paper's experiments. Here: the flags, their defaults, and
what each command prints and writes from its results.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as md
import math
import os
import platform
import sys
import time

import numpy as np
import torch

from t1t2_fast import BACKENDS as BACKEND_CHOICES
from t1t2_fast import PER_CHOICES
from t1t2_fast import _extension

from . import experiments as ex
from . import overhead as ov
from . import peers as pe
from . import search as se
from . import train
from .common import DEFAULT_LR, UsageError, args_config, timestamped, torch_threads, write_csv, write_json
from .data import DATASETS, load_data
from .models import MODELS, NOISE_SITES, PAPER_MODEL, is_mlp_name


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


# The apps extra of pyproject.toml, imported where a command needs them (scikit-learn by data.py, with
# its own message).
APPS_EXTRA = ("tqdm", "matplotlib")


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
    g.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits: scikit-learn's 8x8 digits (1797 examples); mnist1d: MNIST-1D generated "
                        "offline (needs `pip install mnist1d`); fashion-mnist: the real Fashion-MNIST images "
                        "(IDX files from --data-dir or Debian's dataset-fashion-mnist)")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="fashion-mnist: folder with the four IDX files (or DIR/FashionMNIST/raw); default: "
                        "/usr/share/datasets/fashion-mnist")
    g.add_argument("--samples", type=_number(int, "an integer >= 30", lo=30), default=None,
                   help="number of examples (mnist1d: generated, default 5000; digits: a stratified "
                        "subsample of the 1797, default all; fashion-mnist: training images split 3:1 into "
                        "T1 and validation, default all 60000, the test set is the official 10000)")

    g = tr.add_argument_group("model")
    g.add_argument("--width", type=positive_int, default=128, help="units per hidden layer")
    g.add_argument("--depth", type=nonneg_int, default=2, help="number of hidden layers (ReLU)")
    g.add_argument("--batchnorm", action="store_true",
                   help="BatchNorm1d before every hidden ReLU (its running statistics are left as T1 left them "
                        "by the T2 steps)")

    g = tr.add_argument_group("hyperparameters (tuned by T2; initial values in natural scale)")
    g.add_argument("--l2", type=nonneg_float, default=1e-3, metavar="INIT",
                   help="initial L2 coefficient c in c*sum(w^2) on the weight matrices (0: no L2)")
    g.add_argument("--l1", type=nonneg_float, default=None, metavar="INIT",
                   help="initial L1 coefficient c in c*sum(|w|) on the weight matrices (default: no L1)")
    g.add_argument("--per", choices=PER_CHOICES, default="layer",
                   help="granularity: one coefficient for the network, per weight matrix, per output "
                        "unit (row) or per weight")
    g.add_argument("--l2-transform", default="log", metavar="T",
                   help="parameterization of the L2/L1 coefficients: log, linear, or linear*<s> for c = s*λ")
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
    g.add_argument("--label-smoothing", type=unit_interval, default=None, metavar="C",
                   help="label smoothing of the training loss, (1-c)*CE + c*mean_k(-log p_k); fixed unless "
                        "--label-smoothing-tune (default: none, or 0.1 as the initial value of a tuned one). "
                        "Validation and test losses are plain cross-entropy")
    g.add_argument("--label-smoothing-tune", action="store_true",
                   help="tune the label-smoothing coefficient with T2, as a Tunable (linear in [0, 1], "
                        "hyperparameter tunable.label_smoothing), together with the other hyperparameters")
    g.add_argument("--noise-hypergrad", choices=("fd", "fd-central", "exact"), default="fd",
                   help="how T2 differentiates through the noise and the label smoothing (their mixed term): "
                        "forward or central finite differences of ∇σL along J⊙v, or exact double backward")
    g.add_argument("--tune-lr", choices=("network", "layer"), default=None, metavar="PER",
                   help="tune a learning-rate scale s (log scale, init 1, bounds [1e-3, 1e3]) on top of --lr: "
                        "'network' (one) or 'layer' (one per parameter tensor); T2's one-step horizon tends to "
                        "shrink it early (docs/guide.md, 'Learning-rate scales')")
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
    g.add_argument("--logger", choices=("csv", "tensorboard"), default="csv",
                   help="csv (default): log.csv in the output folder; tensorboard: also TensorBoard event files "
                        "there (losses and T1T2.log_dict(): λ, hypergradients, skip and clip counts, at every "
                        "logged step; needs pip install tensorboard)")
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
    tr.set_defaults(func=train.run)
    _add_experiment_commands(sub)
    _add_overhead_command(sub)
    return parser


# Paper-scale settings of `grid`, `compare` and `search` (--full); explicit flags still win.
FULL = {"grid": {"size": 9, "seeds": 3, "runs": 12, "steps": 3000},
        "compare": {"runs": 20, "seeds": 3, "steps": 3000},
        "search": {"repeats": 5, "steps": 3000}}
SMALL = {"grid": {"size": 5, "seeds": 2, "runs": 10, "steps": 1000},
         "compare": {"runs": 10, "seeds": 2, "steps": 1000},
         "search": {"repeats": 2, "steps": 1000}}
# grid/compare/search flags that a --preset may set; what they are without one
EXPERIMENT_DEFAULTS = {"width": 128, "depth": 2, "batch_size": 64, "optimizer": "sgd", "hyper_optimizer": "adam",
                       "hyper_lr": 1e-2, "hyper_every": 1, "hypergrad": "exact", "l2_per": "network",
                       "l2_transform": "log", "batchnorm": False}
PRESET_SMALL = {"width": 256, "depth": 2}
PRESET_FULL = {"width": 1000, "depth": 3}
FASHION_SAMPLES = 4000  # fashion-mnist training images used without --full (3000 T1 / 1000 validation)


def _subset(choices, what_else: str = "", also=lambda item: False):
    """A parser of 'a,b' into a tuple of distinct items of ``choices``, in the order given;
    ``also(item)`` admits items outside them."""
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
        if not items or any(t not in choices and not also(t) for t in items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(choices)}"
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


_noise_sites = _subset(NOISE_SITES)
_search_methods = _subset(se.METHODS)
_peer_list = _subset(pe.PEERS)


def _add_experiment_commands(sub) -> None:
    """`grid` (the paper's hyperparameter map), `compare` (before/after) and `search` (against random
    search and TPE); their code is in experiments.py and search.py."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("problem")
    g.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits: scikit-learn's 8x8 digits; mnist1d: MNIST-1D generated offline; fashion-mnist: "
                        "the real Fashion-MNIST images from IDX files (--data-dir, or Debian's dataset-fashion-mnist)")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="fashion-mnist: folder with the four IDX files (or DIR/FashionMNIST/raw); default: "
                        "/usr/share/datasets/fashion-mnist")
    g.add_argument("--samples", type=_number(int, "an integer >= 30", lo=30), default=None,
                   help="number of examples (mnist1d default 5000; digits default all 1797; fashion-mnist: "
                        "training images split 3:1 into T1 and validation, default 4000, --full all 60000; "
                        "its test set is always the official 10,000)")
    g.add_argument("--preset", choices=tuple(ex.PRESETS), default=None,
                   help="paper: the paper's setting (BN MLP 784-256-256-10, --full 784-1000-1000-1000-10; Adam "
                        "lr 1e-3 for T1 with hypergrad sgd; T2 every 10 steps with hyper Adam lr 1e-3; per-layer L2 "
                        "in linear scale c = 1e-3*λ, clipped at >= 0; batch 100). Explicit flags still win")
    g.add_argument("--axes", choices=ex.AXES, default="noise-l2",
                   help="noise-l2: input noise n0 in [0, 1] x log10 L2 in [-5, -2] (no hidden noise); "
                        "noise-noise: n0 x hidden noise n1 in [0, 1] (no penalty); many (search only): per-layer "
                        "log10 L2 and per-site noise, one coordinate each (2 x (depth + 1) hyperparameters); all "
                        "(search only): many, plus log10 of a learning-rate scale per parameter tensor in "
                        "[-0.5, 0.5] and the training loss's label smoothing in [0, 0.3] (a Tunable)")
    g.add_argument("--l2-per", choices=("network", "layer"), default=None,
                   help="noise-l2: one L2 coefficient for all weight matrices, or one per matrix (T1-T2 "
                        "then tunes each; the map's y is the mean of their log10) (default network; paper: layer)")
    g.add_argument("--l2-transform", default=None, metavar="T",
                   help="parameterization of L2 tuned by T2: log, linear, or linear*<s> for c = s*λ (default log; "
                        "paper: linear*0.001)")
    g.add_argument("--batchnorm", action=argparse.BooleanOptionalAction, default=None,
                   help="BatchNorm1d after every hidden Linear (default off; paper: on)")
    g.add_argument("--width", type=positive_int, default=None,
                   help="units per hidden layer (default 128; paper 256, --full 1000)")
    g.add_argument("--depth", type=positive_int, default=None,
                   help="number of hidden layers (ReLU) (default 2; paper 2, --full 3)")
    g = common.add_argument_group("training")
    g.add_argument("--steps", type=positive_int, default=None, help="T1 steps per run (default 1000, --full 3000)")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help="training and validation batch size (default 64; paper 100)")
    g.add_argument("--optimizer", choices=("sgd", "adam"), default=None,
                   help="optimizer of the weights (default sgd; paper adam)")
    g.add_argument("--lr", type=positive_float, default=None,
                   help=f"learning rate (default: {DEFAULT_LR['sgd']} for sgd, {DEFAULT_LR['adam']} for adam)")
    g.add_argument("--momentum", type=unit_interval, default=0.9, help="sgd momentum")
    g.add_argument("--hyper-optimizer", choices=("adam", "sgd"), default=None,
                   help="optimizer of the hyperparameters (default adam)")
    g.add_argument("--hyper-lr", type=positive_float, default=None,
                   help="hyper-optimizer learning rate on the raw hyperparameters (log L2, noise std) "
                        "(default 1e-2; paper 1e-3)")
    g.add_argument("--hyper-every", type=positive_int, default=None,
                   help="a T2 step every this many T1 steps (default 1; paper 10)")
    g.add_argument("--hypergrad", choices=("exact", "sgd"), default=None,
                   help="exact: through the optimizer's update; sgd: the paper's approximation (default exact; "
                        "paper sgd)")
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
    gr.add_argument("--runs", type=positive_int, default=None, help="T1-T2 runs from random starts (default 10, --full 12)")
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
    se.add_argument("--clock", choices=("wall", "process", "plain-runs"), default="wall",
                    help="what a budget measures: wall-clock seconds (time.perf_counter), this process's "
                         "CPU seconds (time.process_time, less sensitive to other jobs on the machine), or "
                         "plain-run equivalents (a fixed run counts 1, a T1-T2 run the ratio of their CPU "
                         "times, measured before the search on two pairs of runs)")
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


# `t1t2 peers` defaults, and --full's; explicit flags still win.
PEERS_SMALL = {"widths": (256, 1024, 2048, 4096), "repeats": 7}
PEERS_FULL = {"widths": (256, 512, 1024, 2048, 4096, 8192), "repeats": 20}


def _add_peers_command(sub) -> None:
    """`peers`: the one-step hypergradient against higher's and torchopt's; its code is in peers.py."""
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


def _fill_defaults(args, defaults: dict) -> None:
    """Flags left unset (None) take their value from ``defaults`` (the command's small or --full
    setting); explicit flags win."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _done(t0: float, paths) -> None:
    """The last lines of a command: its run time and the files it wrote."""
    print(f"run time {time.perf_counter() - t0:.1f} s")
    print("wrote " + "\n      ".join(paths))


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
    except ModuleNotFoundError as exc:  # tqdm or matplotlib: optional for the library, needed here
        missing = (exc.name or "").partition(".")[0]
        if missing not in APPS_EXTRA:
            raise
        print(f"t1t2 {args.command}: error: {missing} is not installed: `pip install {missing}`, or all the "
              f"commands' dependencies with `pip install -e \".[apps]\"`", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------
# grid, compare, search
# ---------------------------------------------------------------------------------------------
def _experiment_setup(args):
    """Resolve --full / defaults, load the data and build the experiments.Config."""
    _fill_defaults(args, (FULL if args.full else SMALL)[args.command])
    if args.axes in ex.MANY_AXES and args.command != "search":
        raise UsageError(f"--axes {args.axes} (one coordinate per hyperparameter) applies to search only: a map or "
                         f"a before/after table needs two axes")
    if args.l2_per not in (None, "network") and args.axes != "noise-l2":
        raise UsageError("--l2-per applies to --axes noise-l2 only (noise-noise has no penalty, many is per layer)")
    if args.axes != "noise-l2":  # no penalty: a preset's L2 settings do not apply
        args.l2_per = "network"
    if args.preset:
        _fill_defaults(args, {**ex.PRESETS[args.preset], **(PRESET_FULL if args.full else PRESET_SMALL)})
    _fill_defaults(args, EXPERIMENT_DEFAULTS)
    if args.dataset == "fashion-mnist" and args.samples is None and not args.full:
        args.samples = FASHION_SAMPLES
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    try:
        from t1t2_fast.penalties import get_transform
        get_transform(args.l2_transform)
    except ValueError as exc:
        raise UsageError(f"--l2-transform: {exc}") from None
    if args.hyper_every > args.steps:
        raise UsageError(f"--hyper-every {args.hyper_every} exceeds --steps {args.steps}: T1-T2 would never tune")
    try:
        data = load_data(args.dataset, seed=args.seed, samples=args.samples, data_dir=args.data_dir)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    cfg = ex.Config(batchnorm=args.batchnorm, hypergrad=args.hypergrad, l2_transform=args.l2_transform,
                    data_dir=args.data_dir, dataset=args.dataset, axes=args.axes, samples=args.samples, split_seed=args.seed,
                 width=args.width, depth=args.depth, steps=args.steps, batch_size=args.batch_size,
                 optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, l2_per=args.l2_per,
                 hyper_optimizer=args.hyper_optimizer, hyper_lr=args.hyper_lr, hyper_every=args.hyper_every,
                 backend=args.backend)
    out = args.out or timestamped(os.path.join("runs", f"{args.command}-{args.dataset}-{args.axes}"))
    os.makedirs(out, exist_ok=True)
    return data, cfg, out


def _run_experiment(args, body) -> int:
    """Common frame of grid, compare and search: threads (restored afterwards), data errors, timing, and the
    list of files ``body`` wrote (it returns {what: path})."""
    with torch_threads(args.threads):
        t0 = time.perf_counter()
        try:
            data, cfg, out = _experiment_setup(args)
        except RuntimeError as exc:  # e.g. mnist1d not installed
            print(f"t1t2 {args.command}: error: {exc}", file=sys.stderr)
            return 1
        if not args.quiet:
            print(f"{data.describe()}; MLP width {cfg.width} depth {cfg.depth}; {cfg.steps} steps per run; "
                  f"axes {cfg.axes}")
        _done(t0, body(args, data, cfg, out, t0).values())
        return 0


def _write_summary(path: str, summary: dict, args, cfg, t0: float) -> None:
    write_json(path, {**summary, "config": {**args_config(args), **dataclasses.asdict(cfg)},
                      "wall_time_s": time.perf_counter() - t0})


def cmd_grid(args) -> int:
    return _run_experiment(args, _grid)


def _grid(args, data, cfg, out, t0) -> dict[str, str]:
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
    if s.get("band"):
        b = s["band"]
        print(f"optimal band (test error within 2 SE of the difference from the best cell): {b['cells_in_band']} of "
              f"{b['cells']} cells; a single run is in it at test error <= {b['run_threshold']:.4f}")
        if s["runs"]:
            print(f"runs in the band: own test error {s['fraction_runs_error_in_band']:.0%}, end point "
                  f"{s['fraction_runs_end_in_band']:.0%} (goal: >= 80%)")
    return paths


def cmd_compare(args) -> int:
    return _run_experiment(args, _compare)


def _compare(args, data, cfg, out, t0) -> dict[str, str]:
    rows = ex.compare_experiment(data, cfg, runs=args.runs, seeds=args.seeds, seed=args.seed, quiet=args.quiet)
    s = ex.compare_summary(rows)
    paths = {"table": os.path.join(out, "compare.csv"), "plot": os.path.join(out, "compare.png"),
             "summary": os.path.join(out, "summary.json")}
    header = list(rows[0])
    write_csv(paths["table"], header, [[r[k] for k in header] for r in rows])
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
    st = s["sign_test"]
    print(f"after <= before in {st['fraction_after_le_before']:.0%} of starts (goal: >= 80%); sign test "
          f"{st['improved']} better / {st['worse']} worse ({st['tied']} tied): p = {st['p_one_sided']:.3g} one-sided, "
          f"{st['p_two_sided']:.3g} two-sided")
    return paths


def cmd_search(args) -> int:
    if "tpe" in args.methods:
        try:
            se.require_optuna()
        except RuntimeError as exc:
            print(f"t1t2 search: error: {exc}", file=sys.stderr)
            return 1
    return _run_experiment(args, _search)


def _search_xlabel(args) -> str:
    if args.clock == "plain-runs":
        return "compute in plain-run equivalents (a fixed-hyperparameter run = 1)"
    return (f"{'wall-clock' if args.clock == 'wall' else 'process CPU'} seconds "
            f"({args.threads} thread{'s' if args.threads > 1 else ''})")


def _goal_line(result) -> str | None:
    """Issue 17's goal: T1-T2 with one run's compute within one standard error of the best baseline
    given the largest budget (four runs' by default); mean test error and its SE over repeats."""
    rows, budgets = result["per_repeat"], result["budgets"]
    if len(budgets) < 2:
        return None

    def stat(method, k):
        v = [r["test_error"] for r in rows if r["method"] == method and r["budget_runs"] == k
             and r["test_error"] is not None]
        if not v:
            return None
        sd = float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
        return float(np.mean(v)), sd / math.sqrt(len(v)), len(v)

    t1 = stat("t1t2", budgets[0])
    base = [(m, stat(m, budgets[-1])) for m in result["methods"] if m != "t1t2"]
    base = [(m, b) for m, b in base if b is not None]
    if t1 is None or not base:
        return None
    m, b = min(base, key=lambda mb: mb[1][0])
    se = math.sqrt(t1[1] ** 2 + b[1] ** 2)
    met = t1[0] - b[0] <= se
    return (f"goal: T1-T2 at {budgets[0]} run {100 * t1[0]:.2f}% (SE {100 * t1[1]:.2f}) vs best baseline ({m}) at "
            f"{budgets[-1]} runs {100 * b[0]:.2f}% (SE {100 * b[1]:.2f}): difference {100 * (t1[0] - b[0]):+.2f} points, "
            f"SE of the difference {100 * se:.2f} -> {'met' if met else 'missed'}")


def _search(args, data, cfg, out, t0) -> dict[str, str]:
    train, ratio = ex.train_run, None
    if args.clock == "plain-runs":
        ratio = se.measure_ratio(data, cfg)
        clock = se.PlainRunClock(ratio["ratio"])
        train = clock.wrap(ex.train_run)
        if not args.quiet:
            print(f"a T1-T2 run costs {ratio['ratio']:.3f} plain runs (CPU time ratios {ratio['ratios']})")
    else:
        clock = time.perf_counter if args.clock == "wall" else time.process_time
    recorder = se.TrajectoryRecorder(train, cfg.steps) if cfg.axes in ex.MANY_AXES else None
    result = se.search_experiment(data, cfg, repeats=args.repeats, budgets=args.budgets, methods=args.methods,
                                  seed=args.seed, quiet=args.quiet, clock=clock, train=recorder or train)
    if ratio is not None:
        result["summary"]["plain_run_ratio"] = ratio
    paths = se.write_search_csvs(out, result, cfg)
    paths["plot"] = os.path.join(out, "search.png")
    paths["summary"] = os.path.join(out, "summary.json")
    s = result["summary"]
    se.plot_search(paths["plot"], result, title=(
        f"{cfg.dataset} {cfg.axes}, MLP {cfg.width}x{cfg.depth}, {cfg.steps} steps per run, {args.repeats} "
        f"repeat(s); a T1-T2 run took {s['t1t2_run_s']['mean']:.1f} s, a fixed run {s['fixed_run_s']['mean']:.2f} s "
        f"({args.clock} clock)"), xlabel=_search_xlabel(args))
    _write_summary(paths["summary"], se.summary_json(result), args, cfg, t0)
    if recorder is not None:  # one coordinate per hyperparameter: their trajectories in every T1-T2 run
        paths["trajectories"] = os.path.join(out, "search_trajectories.csv")
        paths["trajectories_plot"] = os.path.join(out, "search_trajectories.png")
        se.write_trajectories(paths["trajectories"], result, recorder.runs)
        se.plot_trajectories(paths["trajectories_plot"], result, recorder.runs, title=(
            f"{cfg.dataset} {cfg.axes}: the hyperparameters of the {len(recorder.runs)} T1-T2 run(s), "
            f"{cfg.steps} steps each"))
    load = f"; CPU/wall {s['cpu_over_wall']:.2f}" if args.clock == "wall" else ""
    print(f"{args.repeats} repeat(s); one T1-T2 run {s['t1t2_run_s']['mean']:.2f} s, one fixed run "
          f"{s['fixed_run_s']['mean']:.2f} s on average ({args.clock} clock{load}); "
          f"selected by validation error, test error reported:")
    for line in se.format_table(result):
        print("  " + line)
    goal = _goal_line(result)
    if goal:
        print(goal)
    return paths


# ---------------------------------------------------------------------------------------------
# peers
# ---------------------------------------------------------------------------------------------
def cmd_peers(args) -> int:
    with torch_threads(args.threads):
        return _peers(args)


def _peers(args) -> int:
    t0 = time.perf_counter()
    _fill_defaults(args, PEERS_FULL if args.full else PEERS_SMALL)
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
    out = args.out or timestamped(os.path.join("runs", "peers"))
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
    summary = {"verdict": verdict, "agreement": agree, "rows": rows, "methods": methods,
               "skipped_peers": missing, "torchopt_path": torchopt_path, "memory_method": pe.MEMORY_METHOD,
               "targets": {"speedup_at_least": pe.SPEED_TARGET, "memory_ratio_at_most": pe.MEMORY_TARGET},
               "config": args_config(args), "versions": _peer_versions(found), "wall_time_s": time.perf_counter() - t0}
    write_json(paths["summary"], summary)

    _print_peers(rows, methods, agree, verdict, args)
    _done(t0, paths.values())
    return 0 if all(a["passed"] for a in agree.values()) else 1


def _peer_versions(found) -> dict:
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
# overhead (the code is in overhead.py)
# ---------------------------------------------------------------------------------------------
OVERHEAD_FULL = {"steps": 20, "rounds": 7}
OVERHEAD_SMALL = {"steps": 10, "rounds": 3}


def _add_overhead_command(sub) -> None:
    op = sub.add_parser(
        "overhead", formatter_class=_HelpFormatter,
        help="wall time of T1-T2 over plain training vs model size (the paper's 30%% claim)",
        description="Time epochs of plain training (torch's SGD/Adam, foreach and fused, the faster counts) "
                    "and of T1-T2 (a hyper step every --hyper-every steps) for MLPs 784-w-w-10 and a small "
                    "CNN, with per-layer L2 only ('penalties') and with per-layer L2 plus input and hidden "
                    "noise tuned by 'fd' ('noise'), on each backend. Writes overhead.csv, overhead.png, "
                    "summary.json and prints the overhead beside its floor (the validation forward/backward, "
                    "plus fd's extra training forward/backward, per hyper_every plain steps).")
    op.add_argument("--models", type=_subset(MODELS, " or mlp<width> or paper",
                                             lambda m: is_mlp_name(m) or m == PAPER_MODEL), default=MODELS,
                    help="comma-separated: mlp<width> (784-w-w-10, any width), cnn, and/or paper (the paper's BN MLP "
                         "784-1000-1000-1000-10, the experiments' --full network)")
    op.add_argument("--dataset", choices=("synthetic", "fashion-mnist"), default="synthetic",
                    help="batches of random numbers, or of real fashion-mnist images (--data-dir)")
    op.add_argument("--data-dir", default=None, metavar="DIR", help="where fashion-mnist's IDX files are")
    op.add_argument("--hypergrad", choices=("exact", "sgd"), default="exact",
                    help="T1-T2's hypergradient: exact, or the paper's sgd approximation (its scheme with --optimizer adam)")
    op.add_argument("--settings", type=_subset(ov.SETTINGS), default=ov.SETTINGS, help="comma-separated")
    op.add_argument("--backends", type=_subset(ov.BACKENDS), default=ov.BACKENDS, help="comma-separated")
    op.add_argument("--hyper-every", type=_int_list, default=(10, 1), help="comma-separated")
    op.add_argument("--steps", type=positive_int, default=None, help="steps per timed epoch (default 10, --full 20)")
    op.add_argument("--rounds", type=positive_int, default=None,
                    help="timed epochs per variant, the median of per-round ratios reported (default 3, --full 7)")
    op.add_argument("--batch-size", type=positive_int, default=128, help="training and validation batch size")
    op.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                    help="the weights' optimizer (sgd: momentum 0.9, lr 0.01; adam: lr 1e-3)")
    op.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads")
    op.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="wall: elapsed time; process: this process's CPU time (with --threads 1, the wall time "
                         "on an idle machine; use it where other jobs share the cores)")
    op.add_argument("--full", action="store_true", help="longer epochs and more rounds")
    op.add_argument("--out", default=None, help="output folder (default: runs/overhead-<time>)")
    op.add_argument("--quiet", action="store_true", help="no progress bar")
    op.set_defaults(func=cmd_overhead)


def cmd_overhead(args) -> int:
    _fill_defaults(args, OVERHEAD_FULL if args.full else OVERHEAD_SMALL)
    if args.clock == "process" and args.threads > 1:
        raise UsageError("--clock process sums the CPU time of all threads: use it with --threads 1")
    if "cpp" in args.backends and not _extension.AVAILABLE:
        print(f"t1t2 overhead: error: backend cpp needs the compiled extension ({_extension.LOAD_ERROR}); "
              f"pass --backends reference", file=sys.stderr)
        return 1
    cfg = ov.Config(models=args.models, settings=args.settings, backends=args.backends, hyper_every=args.hyper_every,
                    steps=args.steps, rounds=args.rounds, batch_size=args.batch_size, optimizer=args.optimizer,
                    lr=0.01 if args.optimizer == "sgd" else 1e-3, dataset=args.dataset, data_dir=args.data_dir,
                    hypergrad=args.hypergrad)
    if args.dataset != "synthetic":
        from .images import find_fashion_mnist, INSTALL_HINT
        if find_fashion_mnist(args.data_dir) is None:
            print(f"t1t2 overhead: error: the Fashion-MNIST files were not found; {INSTALL_HINT}", file=sys.stderr)
            return 1
    out = args.out or timestamped(os.path.join("runs", "overhead"))
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    with torch_threads(args.threads):
        rows = ov.run(cfg, quiet=args.quiet, timer=ov.CLOCKS[args.clock])
    s = ov.summary(rows, cfg)
    paths = {"table": os.path.join(out, "overhead.csv"), "plot": os.path.join(out, "overhead.png"),
             "summary": os.path.join(out, "summary.json")}
    ov.write_csv(paths["table"], rows)
    ov.plot(paths["plot"], rows, cfg, title=f"T1-T2 overhead over plain {cfg.optimizer} training, batch "
                                             f"{cfg.batch_size}, {args.threads} thread(s), {args.clock} clock")
    write_json(paths["summary"], {**s, "config": {**args_config(args), **dataclasses.asdict(cfg)},
                                  "rows": [dataclasses.asdict(r) for r in rows],
                                  "wall_time_s": time.perf_counter() - t0})

    print(f"{'model':>8} {'params':>9} {'setting':>9} {'backend':>9} {'every':>5} {'plain ms':>9} "
          f"{'T1-T2 ms':>9} {'overhead':>9} {'floor':>7} {'T1 only':>8}")
    for r in rows:
        print(f"{r.model:>8} {r.params:>9} {r.setting:>9} {r.backend:>9} {r.hyper_every:>5} {r.plain_ms:9.2f} "
              f"{r.t1t2_ms:9.2f} {r.overhead_pct:8.1f}% {r.floor_pct:6.1f}% {r.t1_only_pct:7.1f}%")
    for setting, t in s["targets"].items():
        print(f"target, {setting}, cpp, every 10: max {t['max_overhead_pct']:.1f}% (<= {t['target_pct']:.0f}%: "
              f"{'met' if t['met_level'] else 'MISSED'}), spread {t['spread_points']:.1f} points (<= "
              f"{ov.SPREAD_TARGET:.0f}: {'met' if t['met_flat'] else 'MISSED'})")
    _done(t0, paths.values())
    return 0


if __name__ == "__main__":  # python -m t1t2_fast.apps.cli
    sys.exit(main())
