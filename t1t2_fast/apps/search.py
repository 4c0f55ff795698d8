"""``t1t2 search``: T1-T2 against random search and TPE at equal compute.

One *repeat* of the comparison, on the hyperparameter box of ``experiments.AXIS_PAIRS``:

1. **T1-T2**: ``K`` runs (``K = max(budgets)``) from random starts, each tuning both axes
   (``experiments.train_run(tune=True)``), each timed. The budget of ``k`` T1-T2 runs is the time
   the first ``k`` of them took, and T1-T2's answer at that budget is the run with the lowest
   *validation* error among those ``k``; we report its test error.
2. **Random search**: fixed-hyperparameter runs (``tune=False``) at random points, one after the
   other, until the budget of ``K`` T1-T2 runs is spent.
3. **TPE** (Optuna's ``TPESampler``, an optional dependency): the same, with the points proposed
   by TPE from the validation errors seen so far (its objective).

Budget rule: a search trial counts at budget ``B`` only if it *finished* within ``B`` seconds of
the method's start (its sampler's time included); the trial that crosses ``B`` does not count, and
the search stops after the trial that crosses the largest budget. So at every budget the baselines
have used at most the time T1-T2 used. The answer of a baseline at budget ``B`` is, among the trials
that count, the one with the lowest validation error (ties: the earlier trial); its test error is
reported. Test errors never select anything.

Pairing: in a repeat, trial ``i`` of every method initializes its weights from the same seed, and
random search's points begin with T1-T2's starts (the same stream), so "train at the start point
with fixed hyperparameters" and "tune from there" are compared on equal terms.

Repeats use different search seeds (starts, random points, TPE's seed, initializations) and share
the data split. Everything but the clock is seeded: given the same durations, a repeat makes the
same choices. Wall-clock durations vary from run to run, so the *number* of baseline trials that fit
a budget does too; ``clock`` and ``train`` can be injected (tests use a manual clock).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from . import experiments as ex
from .common import progress, write_csv

METHODS = ("random", "tpe")            # the baselines; "t1t2" is always run (it defines the budgets)
ALL_METHODS = ("t1t2",) + METHODS
METHOD_LABELS = {"t1t2": "T1-T2", "random": "random search", "tpe": "TPE (Optuna)"}
DEFAULT_BUDGETS = (1, 2, 4)
POINT_STREAM = 4                       # experiments.point_stream stream of starts / random points
MISSING_OPTUNA = ("the TPE baseline needs Optuna, an optional dependency: "
                  "`pip install t1t2_fast[experiments]` (or `pip install optuna`); "
                  "or leave it out with `--methods random`")


def require_optuna():
    """Import Optuna, or raise RuntimeError saying how to install it."""
    try:
        import optuna  # optional dependency (the experiments extra)
    except ImportError as exc:
        raise RuntimeError(MISSING_OPTUNA) from exc
    return optuna


@dataclass
class Trial:
    """One training run of a method: where it started (and, for T1-T2, ended) and how it did."""

    method: str
    repeat: int
    trial: int
    seed: int                   # weight initialization / batch order / noise seed
    start: tuple[float, float]
    end: tuple[float, float]
    val_error: float
    test_error: float
    diverged: bool
    started_s: float            # seconds since the method's start, when this run began
    elapsed_s: float            # ... when it finished (the compute it has used up to here)
    cpu_s: float                # process CPU seconds since the method's start, when it finished
    counted: bool               # finished within the largest budget (T1-T2 runs always count)


def trial_seed(seed: int, repeat: int, trial: int) -> int:
    return seed + 1000 * (repeat + 1) + trial


def select(trials: list[Trial]) -> Trial | None:
    """The trial with the lowest validation error (the earliest among equals); None if empty."""
    best = None
    for t in trials:
        if best is None or t.val_error < best.val_error:
            best = t
    return best


def within(trials: list[Trial], budget_s: float) -> list[Trial]:
    """The trials that count at ``budget_s``: finished within it."""
    return [t for t in trials if t.counted and t.elapsed_s <= budget_s]


def best_so_far(trials: list[Trial]) -> list[Trial | None]:
    """After each trial, the selected one among the counted trials so far (``select``)."""
    out, best = [], None
    for t in trials:
        if t.counted and (best is None or t.val_error < best.val_error):
            best = t
        out.append(best)
    return out


# ---------------------------------------------------------------------------------------------
# the three methods
# ---------------------------------------------------------------------------------------------
def run_t1t2(data, cfg: ex.Config, runs: int, repeat: int, seed: int, *, clock=time.perf_counter,
             train=ex.train_run, on_trial: Callable[[Trial], None] | None = None) -> list[Trial]:
    """``runs`` T1-T2 runs from the first points of the repeat's stream, timed back to back."""
    starts = ex.point_stream(cfg.axes, seed + repeat, POINT_STREAM, cfg.depth)
    trials = []
    t0, c0 = clock(), time.process_time()
    for i in range(runs):
        start = next(starts)
        began = clock() - t0
        r = train(data, cfg, start, trial_seed(seed, repeat, i), tune=True)
        t = Trial("t1t2", repeat, i, trial_seed(seed, repeat, i), start, tuple(r.end), r.val_error, r.test_error,
                  r.diverged, began, clock() - t0, time.process_time() - c0, True)
        trials.append(t)
        if on_trial:
            on_trial(t)
    return trials


class _RandomProposer:
    def __init__(self, cfg: ex.Config, repeat: int, seed: int):
        self.points = ex.point_stream(cfg.axes, seed + repeat, POINT_STREAM, cfg.depth)

    def ask(self):
        return next(self.points)

    def tell(self, value: float) -> None:
        pass


class _TPEProposer:
    """Optuna's TPE over the same box (both axes uniform, i.e. L2 log-uniform), ask/tell style so
    the loop owns the clock; objective: validation error."""

    def __init__(self, cfg: ex.Config, repeat: int, seed: int):
        optuna = require_optuna()
        self.coords = ex.coordinates(cfg.axes, cfg.depth)
        self.study = optuna.create_study(direction="minimize",
                                         sampler=optuna.samplers.TPESampler(seed=seed + repeat))
        self.trial = None

    def ask(self):
        self.trial = self.study.ask()
        return tuple(self.trial.suggest_float(a.name, a.lo, a.hi) for a in self.coords)

    def tell(self, value: float) -> None:
        self.study.tell(self.trial, value)


PROPOSERS = {"random": _RandomProposer, "tpe": _TPEProposer}


def run_search(method: str, data, cfg: ex.Config, budget_s: float, repeat: int, seed: int, *,
               clock=time.perf_counter, train=ex.train_run, max_trials: int = 100_000,
               on_trial: Callable[[Trial], None] | None = None) -> list[Trial]:
    """Fixed-hyperparameter runs proposed by ``method`` until one finishes past ``budget_s``
    (that one is kept with ``counted=False``) or ``max_trials`` ran."""
    t0, c0 = clock(), time.process_time()
    proposer = PROPOSERS[method](cfg, repeat, seed)
    trials = []
    for i in range(max_trials):
        began = clock() - t0
        if began >= budget_s:  # no time left: a trial started now cannot finish within the budget
            break
        point = proposer.ask()
        r = train(data, cfg, point, trial_seed(seed, repeat, i), tune=False)
        elapsed = clock() - t0
        t = Trial(method, repeat, i, trial_seed(seed, repeat, i), tuple(point), tuple(r.end), r.val_error,
                  r.test_error, r.diverged, began, elapsed, time.process_time() - c0, elapsed <= budget_s)
        trials.append(t)
        if on_trial:
            on_trial(t)
        if not t.counted:
            break
        proposer.tell(t.val_error)
    return trials


def _warm_up(data, cfg: ex.Config, train, methods) -> None:
    """A few steps of each kind of run and a few TPE proposals, untimed, so one-time costs (lazy
    imports, first calls into the kernels) do not land in the first timed run of a method."""
    tiny = ex.Config(**{**asdict(cfg), "steps": 2 * cfg.hyper_every, "record_points": 1})
    for tune in (True, False):
        train(data, tiny, ex.random_points(cfg.axes, 1, 0, 0, cfg.depth)[0], 0, tune=tune)
    if "tpe" in methods:
        proposer = _TPEProposer(cfg, 0, 0)
        for _ in range(12):  # past TPE's random start-up trials, so its model is built once
            proposer.tell(sum(proposer.ask()))


class PlainRunClock:
    """Compute counted in plain-run equivalents instead of seconds: a fixed-hyperparameter run costs
    1, a T1-T2 run ``ratio`` (measured by ``measure_ratio``). ``wrap(train)`` advances the clock after
    each run; calling the clock reads it (the ``clock`` of search_experiment)."""

    def __init__(self, ratio: float):
        self.ratio, self.now = float(ratio), 0.0

    def __call__(self) -> float:
        return self.now

    def wrap(self, train):
        def run(data, cfg, point, seed, tune, **kwargs):
            result = train(data, cfg, point, seed, tune=tune, **kwargs)
            self.now += self.ratio if tune else 1.0
            return result
        return run


def measure_ratio(data, cfg: ex.Config, train=ex.train_run, repeats: int = 2, timer=time.process_time) -> dict:
    """The process CPU time of a T1-T2 run over that of a fixed run at the same point and seed (the
    median of ``repeats`` pairs, each pair run back to back, untimed by any budget)."""
    point = ex.random_points(cfg.axes, 1, 0, 99, cfg.depth)[0]
    pairs = []
    for r in range(repeats):
        t0 = timer()
        train(data, cfg, point, r, tune=False)
        fixed = timer() - t0
        t0 = timer()
        train(data, cfg, point, r, tune=True)
        pairs.append(((timer() - t0) / max(fixed, 1e-12), fixed))
    ratios = sorted(p[0] for p in pairs)
    return {"ratio": float(np.median(ratios)), "ratios": ratios, "fixed_run_s": [p[1] for p in pairs]}


def search_experiment(data, cfg: ex.Config, repeats: int, budgets=DEFAULT_BUDGETS, methods=METHODS,
                      seed: int = 0, quiet: bool = True, *, clock=time.perf_counter, train=ex.train_run,
                      warm_up: bool = True, max_trials: int = 100_000) -> dict:
    """The whole comparison, ``repeats`` times. Returns {"trials": [Trial...], "budgets": [k...],
    "methods": [...], "budget_s": [{k: seconds} per repeat], "per_repeat": [...], "summary": {...}}."""
    budgets = sorted(set(int(b) for b in budgets))
    if not budgets or budgets[0] < 1:
        raise ValueError(f"budgets must be positive numbers of T1-T2 runs, got {budgets}")
    methods = [m for m in METHODS if m in methods]
    if "tpe" in methods:
        optuna = require_optuna()
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs = budgets[-1]
    if warm_up:
        _warm_up(data, cfg, train, methods)
    # progress in T1-T2-run equivalents of compute: each method gets `runs` of them per repeat
    bar = progress(repeats * runs * (1 + len(methods)), f"search {cfg.dataset} {cfg.axes}", quiet)
    trials, budget_s = [], []
    try:
        for rep in range(repeats):
            base = rep * runs * (1 + len(methods))

            def t1t2_done(t):
                bar.update(1)
                bar.set_postfix_str(f"repeat {rep} T1-T2 run {t.trial}: val {t.val_error:.3f}", refresh=False)

            t1 = run_t1t2(data, cfg, runs, rep, seed, clock=clock, train=train, on_trial=t1t2_done)
            trials += t1
            spent = {k: t1[k - 1].elapsed_s for k in budgets}
            budget_s.append(spent)
            for j, method in enumerate(methods):
                offset = base + runs * (1 + j)

                def trial_done(t, offset=offset, method=method):
                    bar.n = round(offset + runs * min(1.0, t.elapsed_s / max(spent[runs], 1e-12)), 2)
                    bar.set_postfix_str(f"repeat {rep} {method} trial {t.trial}: val {t.val_error:.3f}",
                                        refresh=False)
                    bar.refresh()

                trials += run_search(method, data, cfg, spent[runs], rep, seed, clock=clock, train=train,
                                     max_trials=max_trials, on_trial=trial_done)
                bar.n = offset + runs
                bar.refresh()
    finally:
        bar.close()
        if "tpe" in methods:
            optuna.logging.set_verbosity(verbosity)
    result = {"trials": trials, "budgets": budgets, "methods": ["t1t2", *methods], "budget_s": budget_s}
    result["per_repeat"] = per_repeat(result)
    result["summary"] = summarize(result)
    return result


# ---------------------------------------------------------------------------------------------
# reading the results
# ---------------------------------------------------------------------------------------------
def _of(trials, method, repeat):
    return [t for t in trials if t.method == method and t.repeat == repeat]


def per_repeat(result: dict) -> list[dict]:
    """A row per (method, budget, repeat): the budget in seconds, the trials that count, and the
    selected trial's validation and test error (None if no trial finished within the budget)."""
    rows = []
    for method in result["methods"]:
        for k in result["budgets"]:
            for rep, spent in enumerate(result["budget_s"]):
                ts = _of(result["trials"], method, rep)
                pool = ts[:k] if method == "t1t2" else within(ts, spent[k])
                best = select(pool)
                rows.append({"method": method, "budget_runs": k, "repeat": rep, "budget_s": spent[k],
                             "trials": len(pool), "selected_trial": best.trial if best else None,
                             "val_error": best.val_error if best else None,
                             "test_error": best.test_error if best else None,
                             "start": list(best.start) if best else None, "end": list(best.end) if best else None})
    return rows


def _stats(values) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "min": None, "max": None}
    return {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}


def time_to_match(trials: list[Trial], target: float) -> float | None:
    """The first elapsed second at which the selected (by validation) trial of a search has a test
    error at most ``target``; None if that never happens within its counted trials."""
    for t, best in zip(trials, best_so_far(trials)):
        if best is not None and t.counted and best.test_error <= target:
            return t.elapsed_s
    return None


def summarize(result: dict) -> dict:
    """Per (method, budget): mean/min/max over repeats of the budget seconds, the trials used and the
    selected trial's validation and test error; for a baseline, in how many repeats T1-T2's answer
    had a lower, equal or higher test error than its answer at the same budget (paired: the same
    repeat); and when (if ever) its selected trial first reached T1-T2's test error at each budget."""
    rows = result["per_repeat"]
    t1t2_test = {(r["budget_runs"], r["repeat"]): r["test_error"] for r in rows if r["method"] == "t1t2"}
    table = []
    for method in result["methods"]:
        for k in result["budgets"]:
            rs = [r for r in rows if r["method"] == method and r["budget_runs"] == k]
            row = {"method": method, "budget_runs": k, "repeats": len(rs),
                   "repeats_with_a_result": sum(r["test_error"] is not None for r in rs),
                   "budget_s": _stats([r["budget_s"] for r in rs]),
                   "trials": _stats([r["trials"] for r in rs]),
                   "val_error": _stats([r["val_error"] for r in rs]),
                   "test_error": _stats([r["test_error"] for r in rs])}
            if method != "t1t2":
                pairs = [(t1t2_test[(k, r["repeat"])], r["test_error"]) for r in rs if r["test_error"] is not None]
                row["t1t2_vs"] = {"better": sum(a < b for a, b in pairs), "tied": sum(a == b for a, b in pairs),
                                  "worse": sum(a > b for a, b in pairs)}
            table.append(row)
    match = {}
    for method in result["methods"][1:]:
        match[method] = {}
        for k in result["budgets"]:
            per = []
            for rep in range(len(result["budget_s"])):
                target = next(r["test_error"] for r in rows
                              if r["method"] == "t1t2" and r["budget_runs"] == k and r["repeat"] == rep)
                per.append(time_to_match(_of(result["trials"], method, rep), target))
            match[method][f"t1t2_{k}"] = per
    t1 = [t for t in result["trials"] if t.method == "t1t2"]
    fixed = [t for t in result["trials"] if t.method != "t1t2"]
    return {"budgets_runs": result["budgets"], "methods": result["methods"], "repeats": len(result["budget_s"]),
            "table": table, "seconds_to_reach_t1t2_test_error": match,
            "t1t2_run_s": _stats([t.elapsed_s - t.started_s for t in t1]),
            "fixed_run_s": _stats([t.elapsed_s - t.started_s for t in fixed]),
            "cpu_over_wall": (sum(t.cpu_s for t in _last_per_run(result)) /
                              max(1e-12, sum(t.elapsed_s for t in _last_per_run(result)))),
            "diverged_runs": {m: sum(t.diverged for t in result["trials"] if t.method == m)
                              for m in result["methods"]}}


def _last_per_run(result: dict) -> list[Trial]:
    """The last trial of each (method, repeat): its cpu_s / elapsed_s cover the whole method."""
    last = {}
    for t in result["trials"]:
        last[(t.method, t.repeat)] = t
    return list(last.values())


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
def write_search_csvs(out: str, result: dict, cfg: ex.Config) -> dict[str, str]:
    """search.csv (a row per trial, with the best-so-far selection) and search_budget.csv (a row
    per method and budget, mean/min/max over repeats)."""
    coords = [a.name for a in ex.coordinates(cfg.axes, cfg.depth)]
    paths = {"trials": os.path.join(out, "search.csv"), "budget": os.path.join(out, "search_budget.csv")}
    rows = []
    for method in result["methods"]:
        for rep in range(len(result["budget_s"])):
            ts = _of(result["trials"], method, rep)
            for t, best in zip(ts, best_so_far(ts)):
                rows.append([t.method, t.repeat, t.trial, t.seed, *t.start, *t.end, t.started_s, t.elapsed_s, t.cpu_s, t.val_error, t.test_error, int(t.diverged),
                             int(t.counted), best.trial if best else "", best.val_error if best else "",
                             best.test_error if best else ""])
    write_csv(paths["trials"], ["method", "repeat", "trial", "seed", *[f"start_{c}" for c in coords],
                                   *[f"end_{c}" for c in coords], "started_s", "elapsed_s", "cpu_s",
                                   "val_error", "test_error", "diverged", "counted", "best_trial",
                                   "best_val_error", "best_test_error"], rows)
    header = ["method", "budget_runs", "repeats", "repeats_with_a_result"]
    for what in ("budget_s", "trials", "val_error", "test_error"):
        header += [f"{what}_{s}" for s in ("mean", "min", "max")]
    header += ["t1t2_better", "t1t2_tied", "t1t2_worse"]
    write_csv(paths["budget"], header,
                 [[r["method"], r["budget_runs"], r["repeats"], r["repeats_with_a_result"]]
                  + [_blank(r[w][s]) for w in ("budget_s", "trials", "val_error", "test_error")
                     for s in ("mean", "min", "max")]
                  + [r["t1t2_vs"][s] if "t1t2_vs" in r else "" for s in ("better", "tied", "worse")]
                  for r in result["summary"]["table"]])
    return paths


def _blank(v):
    return "" if v is None else v


def format_table(result: dict) -> list[str]:
    """The printed summary: one line per budget and method."""
    lines = [f"{'budget':>10}  {'seconds (min-max)':>19}  {'method':<14}  {'trials':>13}  {'val err %':>9}  "
             f"{'test err % mean (min..max)':>26}  T1-T2 better/tied/worse"]
    for k in result["budgets"]:
        for r in result["summary"]["table"]:
            if r["budget_runs"] != k:
                continue
            b, n, v, e = r["budget_s"], r["trials"], r["val_error"], r["test_error"]
            trials = f"{n['mean']:.1f}" + (f" ({n['min']:.0f}-{n['max']:.0f})" if n["min"] != n["max"] else "")
            test = ("-" if e["mean"] is None else
                    f"{100 * e['mean']:6.2f} ({100 * e['min']:.2f}..{100 * e['max']:.2f})")
            val = "-" if v["mean"] is None else f"{100 * v['mean']:.2f}"
            vs = "/".join(str(r["t1t2_vs"][s]) for s in ("better", "tied", "worse")) if "t1t2_vs" in r else ""
            secs = f"{b['mean']:.1f} s ({b['min']:.1f}-{b['max']:.1f})"
            lines.append(f"{k:>4} run{'s' if k > 1 else ' '}  {secs:>19}  {METHOD_LABELS[r['method']]:<14}  "
                         f"{trials:>13}  {val:>9}  {test:>26}  {vs}".rstrip())
    return lines


COLORS = {"t1t2": "tab:red", "random": "tab:blue", "tpe": "tab:orange"}
STYLES = (("-", "solid"), ("--", "dashed"), (":", "dotted"), ("-.", "dash-dot"))  # by repeat, cycling


def plot_search(path: str, result: dict, title: str, xlabel: str = "wall-clock seconds") -> None:
    """Best-so-far (selected by validation) error against wall-clock seconds: test error (left) and
    the validation error that selected it (right); one step line per baseline and repeat, T1-T2 as
    points at its budgets, and vertical lines at the budgets."""
    # optional dependency (the apps extra), needed only when a command draws its figure
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(11, 4.4))
    axes = fig.subplots(1, 2, sharex=True)
    trials = result["trials"]
    top = 0.0
    for which, ax in zip(("test_error", "val_error"), axes):
        for rep, spent in enumerate(result["budget_s"]):
            style = STYLES[rep % len(STYLES)][0]
            for k in result["budgets"]:
                ax.axvline(spent[k], color="gray", lw=0.8, ls=":", alpha=0.7)
                top = max(top, spent[k])
            for method in result["methods"][1:]:
                ts = _of(trials, method, rep)
                xs, ys = [], []
                for t, best in zip(ts, best_so_far(ts)):
                    if t.counted and best is not None:
                        xs.append(t.elapsed_s)
                        ys.append(100 * getattr(best, which))
                if xs:
                    xs.append(spent[result["budgets"][-1]])
                    ys.append(ys[-1])
                    ax.step(xs, ys, where="post", color=COLORS[method], ls=style, lw=1.4, alpha=0.85,
                            label=METHOD_LABELS[method] if rep == 0 else None)
                    ax.plot(xs[:-1], ys[:-1], ".", color=COLORS[method], ms=4, alpha=0.85)
            pts = [r for r in result["per_repeat"] if r["method"] == "t1t2" and r["repeat"] == rep]
            ax.plot([r["budget_s"] for r in pts], [100 * r[which] for r in pts], ls=style, color=COLORS["t1t2"],
                    marker="o", mec="black", ms=7, lw=1,
                    label=f"T1-T2, best of {'/'.join(map(str, result['budgets']))} runs" if rep == 0 else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{'test' if which == 'test_error' else 'validation'} error % of the selected run")
        ax.grid(True, alpha=0.3)
    for k in result["budgets"]:
        mean_k = float(np.mean([s[k] for s in result["budget_s"]]))
        axes[0].annotate(f"{k} T1-T2 run{'s' if k > 1 else ''}", (mean_k, 0.0), xycoords=("data", "axes fraction"),
                         xytext=(-2, 3), textcoords="offset points", fontsize=7, color="dimgray", ha="right")
    axes[0].set_xlim(0, 1.03 * top if top > 0 else 1)
    axes[0].set_title("test error of the run selected by validation error", fontsize=9)
    axes[1].set_title("its validation error (what selects it)", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(Line2D([], [], color="gray", lw=0.8, ls=":"))
    labels.append("budgets (each repeat's own)")
    if len(result["budget_s"]) > 1:
        styles = ", ".join(f"{STYLES[r % len(STYLES)][1]} {r}" for r in range(len(result["budget_s"])))
        handles.append(Line2D([], [], color="none"))
        labels.append(f"repeat: {styles}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(handles), frameon=False)
    fig.savefig(path, dpi=100)


def summary_json(result: dict) -> dict:
    """summary.json's body: the summary, the per-repeat rows and every repeat's budget seconds."""
    return {**result["summary"], "per_repeat": result["per_repeat"],
            "budget_s": [{str(k): v for k, v in s.items()} for s in result["budget_s"]],
            "rule": "a baseline trial counts at a budget only if it finished within it; selection by "
                    "validation error (earliest among ties); test error is only reported"}



# ---------------------------------------------------------------------------------------------
# trajectories of the T1-T2 runs (axes "many" and "all": one curve per hyperparameter)
# ---------------------------------------------------------------------------------------------
class TrajectoryRecorder:
    """Wraps a ``train`` function (``experiments.train_run`` or a clock's wrapper of it) and keeps
    the hyperparameter trajectory of every tuned run of ``steps`` steps (the untimed warm-up runs are
    shorter), keyed by the run's seed, as ``[(step, {name: value}), ...]``."""

    def __init__(self, train, steps: int):
        self.train, self.steps, self.runs = train, steps, {}

    def __call__(self, data, cfg, point, seed, tune, **kw):
        r = self.train(data, cfg, point, seed, tune=tune, **kw)
        if tune and cfg.steps == self.steps and getattr(r, "trajectory", None):
            self.runs[seed] = [(row[0], dict(row[-1])) for row in r.trajectory]
        return r


def write_trajectories(path: str, result: dict, runs: dict) -> None:
    """A long-format CSV of the T1-T2 runs' trajectories: repeat, trial, seed, step, hyperparameter, value."""
    rows = []
    for t in result["trials"]:
        if t.method == "t1t2" and t.seed in runs:
            for step, values in runs[t.seed]:
                rows += [[t.repeat, t.trial, t.seed, step, name, value] for name, value in values.items()]
    write_csv(path, ["repeat", "trial", "seed", "step", "hyperparameter", "value"], rows)


TRAJECTORY_PANELS = (("l2", "L2 coefficient", True), ("noise", "noise std", False),
                     ("lr_scale", "learning-rate scale", True), ("tunable", "label smoothing", False))


def plot_trajectories(path: str, result: dict, runs: dict, title: str) -> None:
    """The hyperparameters of every T1-T2 run against the step, one panel per kind (L2, noise,
    learning-rate scales, label smoothing; log scale for L2 and the scales), one colour per run."""
    from matplotlib.figure import Figure

    t1 = [t for t in result["trials"] if t.method == "t1t2" and t.seed in runs]
    kinds = [p for p in TRAJECTORY_PANELS
             if any(n.split(".")[0] == p[0] for t in t1 for n in runs[t.seed][0][1])] if t1 else []
    fig = Figure(figsize=(4.2 * max(1, len(kinds)), 3.8))
    axes = fig.subplots(1, max(1, len(kinds)), squeeze=False)[0]
    for ax, (kind, label, log) in zip(axes, kinds):
        for j, t in enumerate(t1):
            traj = runs[t.seed]
            steps = [s for s, _ in traj]
            for name in traj[0][1]:
                if name.split(".")[0] == kind:
                    ax.plot(steps, [v[name] for _, v in traj], color=f"C{j % 10}", lw=1.0, alpha=0.8)
        ax.set_xlabel("T1 step")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
