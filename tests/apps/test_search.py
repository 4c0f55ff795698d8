"""`t1t2 search` at tiny size: budgets, selection by validation error,
determinism, outputs, and Optuna as an optional dependency.

Wall-clock budgets make the number of trials timing-dependent, so the exact checks use a manual
clock that moves only when a (fake or wrapped) training run says so; the runs with the real clock
check only what holds whatever the timing.
"""
import csv
import importlib.util
import json
import sys

import pytest
import torch

from t1t2_fast.apps import experiments as ex
from t1t2_fast.apps import search as se
from t1t2_fast.apps.cli import main
from t1t2_fast.apps.data import load_data

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# the test extra installs Optuna; without it only the TPE-free tests run
needs_optuna = pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="optuna not installed")
TINY = ["--dataset", "digits", "--samples", "200", "--width", "8", "--steps", "20", "--repeats", "1",
        "--budgets", "1,2", "--quiet"]


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def fake_train(clock, tuned_s=3.0, fixed_s=1.25):
    """A stand-in for experiments.train_run that trains nothing: a T1-T2 run takes ``tuned_s`` and
    ends at half its start's n0; a fixed run takes ``fixed_s``. Validation error is the final n0 and
    test error 1 - n0, so the run with the best validation error has the *worst* test error."""

    def train(data, cfg, point, seed, tune):
        clock.now += tuned_s if tune else fixed_s
        end = (point[0] / 2, point[1]) if tune else tuple(point)
        return ex.RunResult(start=tuple(point), end=end, test_error=1 - end[0], val_error=end[0], diverged=False)

    return train


def fake_experiment(methods=("random", "tpe"), budgets=(1, 2, 4), repeats=2, **costs):
    clock = ManualClock()
    return se.search_experiment(None, ex.Config(), repeats=repeats, budgets=budgets, methods=methods, seed=3,
                                clock=clock, train=fake_train(clock, **costs))


@pytest.fixture(scope="module")
def fake():
    return fake_experiment()


@needs_optuna
def test_budgets_are_honoured_exactly_with_a_manual_clock(fake):
    # T1-T2 runs take 3 s: budgets of 1, 2, 4 runs are 3, 6, 12 s. Fixed runs take 1.25 s and end at
    # 1.25, 2.5, ...: 2 finish within 3 s, 4 within 6 s, 9 within 12 s; the 10th (12.5 s) crosses
    # the largest budget: it is kept, not counted, and the search stops there.
    assert fake["budget_s"] == [{1: 3.0, 2: 6.0, 4: 12.0}] * 2
    for method in ("random", "tpe"):
        for rep in range(2):
            ts = [t for t in fake["trials"] if t.method == method and t.repeat == rep]
            assert [t.elapsed_s for t in ts] == [1.25 * (i + 1) for i in range(10)]
            assert [t.counted for t in ts] == [True] * 9 + [False]
    trials = {(r["method"], r["budget_runs"]): r["trials"] for r in fake["per_repeat"] if r["repeat"] == 0}
    assert trials == {("t1t2", 1): 1, ("t1t2", 2): 2, ("t1t2", 4): 4, ("random", 1): 2, ("random", 2): 4,
                      ("random", 4): 9, ("tpe", 1): 2, ("tpe", 2): 4, ("tpe", 4): 9}
    for row in fake["summary"]["table"]:
        assert row["trials"]["min"] == row["trials"]["max"] == trials[(row["method"], row["budget_runs"])]
        if row["method"] != "t1t2":  # paired by repeat
            mine = {r["repeat"]: r["test_error"] for r in fake["per_repeat"]
                    if (r["method"], r["budget_runs"]) == (row["method"], row["budget_runs"])}
            t1t2 = {r["repeat"]: r["test_error"] for r in fake["per_repeat"]
                    if (r["method"], r["budget_runs"]) == ("t1t2", row["budget_runs"])}
            assert row["t1t2_vs"] == {"better": sum(t1t2[i] < mine[i] for i in range(2)),
                                      "tied": sum(t1t2[i] == mine[i] for i in range(2)),
                                      "worse": sum(t1t2[i] > mine[i] for i in range(2))}


@needs_optuna
def test_selection_is_by_validation_error_never_by_test_error(fake):
    # validation error = n0 and test error = 1 - n0: the selected run is the worst on test
    for r in fake["per_repeat"]:
        ts = [t for t in fake["trials"] if t.method == r["method"] and t.repeat == r["repeat"]]
        pool = ts[:r["budget_runs"]] if r["method"] == "t1t2" else [
            t for t in ts if t.counted and t.elapsed_s <= r["budget_s"]]
        assert r["val_error"] == min(t.val_error for t in pool)
        assert r["test_error"] == max(t.test_error for t in pool)
        if len(pool) > 1:
            assert r["test_error"] > min(t.test_error for t in pool)


def test_select_and_best_so_far():
    def trial(i, val, test, counted=True):
        return se.Trial("random", 0, i, i, (0, 0), (0, 0), val, test, False, i, i + 1, i + 1, counted)

    ts = [trial(0, 0.3, 0.1), trial(1, 0.2, 0.4), trial(2, 0.2, 0.0), trial(3, 0.1, 0.5, counted=False)]
    assert se.select(ts[:3]) is ts[1]  # lowest validation error, the earlier of two equal ones
    assert se.select([]) is None
    assert [b.trial for b in se.best_so_far(ts)] == [0, 1, 1, 1]  # the uncounted trial is never selected
    assert se.within(ts, 2.0) == ts[:2]
    assert se.time_to_match(ts, 0.1) == 1 and se.time_to_match(ts, 0.05) is None


def test_a_budget_no_trial_fits_gives_no_answer(tmp_path):
    result = fake_experiment(methods=("random",), budgets=(1, 2), repeats=1, tuned_s=1.0, fixed_s=1.5)
    rows = {(r["method"], r["budget_runs"]): r for r in result["per_repeat"]}
    assert rows[("random", 1)]["trials"] == 0 and rows[("random", 1)]["test_error"] is None
    assert rows[("random", 2)]["trials"] == 1
    paths = se.write_search_csvs(str(tmp_path), result, ex.Config())
    with open(paths["budget"], newline="") as f:
        budget = {(r["method"], r["budget_runs"]): r for r in csv.DictReader(f)}
    assert budget[("random", "1")]["test_error_mean"] == "" and budget[("random", "1")]["repeats_with_a_result"] == "0"
    assert any(line.split()[-2:] == ["-", "0/0/0"] for line in se.format_table(result))
    se.plot_search(str(tmp_path / "p.png"), result, "title")


@pytest.fixture(scope="module")
def tiny_data():
    return load_data("digits", seed=0, samples=200)


def real_training_on_a_manual_clock(data):
    clock = ManualClock()

    def train(*args, tune, **kw):
        r = ex.train_run(*args, tune=tune, **kw)
        clock.now += 3.0 if tune else 1.0
        return r

    cfg = ex.Config(width=8, steps=15)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI does: tiny runs are slower on more threads of a busy machine
    try:
        return se.search_experiment(data, cfg, repeats=1, budgets=(1, 2), seed=0, clock=clock, train=train,
                                    warm_up=False)
    finally:
        torch.set_num_threads(threads)


@needs_optuna
def test_same_durations_same_choices_and_paired_trials(tiny_data):
    a, b = (real_training_on_a_manual_clock(tiny_data) for _ in range(2))

    def key(t):  # all but the process CPU seconds, which are real
        return (t.method, t.trial, t.seed, t.start, t.end, t.val_error, t.test_error, t.elapsed_s, t.counted)

    assert [key(t) for t in a["trials"]] == [key(t) for t in b["trials"]]
    assert a["per_repeat"] == b["per_repeat"]
    t1 = [t for t in a["trials"] if t.method == "t1t2"]
    rs = [t for t in a["trials"] if t.method == "random"]
    tpe = [t for t in a["trials"] if t.method == "tpe"]
    # 6 s of budget at 1 s per fixed run: the 6th ends exactly at the budget (it counts), and with no
    # time left no 7th starts
    assert len(t1) == 2 and len(rs) == len(tpe) == 6 and all(t.counted for t in rs + tpe)
    # pairing: random search starts where T1-T2 started, with the same initialization seeds
    assert [t.start for t in rs[:2]] == [t.start for t in t1] and [t.seed for t in rs[:2]] == [t.seed for t in t1]
    assert [t.seed for t in tpe] == [t.seed for t in rs]
    assert all(t.end != t.start for t in t1)  # tuned
    assert all(t.end == pytest.approx(t.start, rel=1e-6, abs=1e-6) for t in rs + tpe)  # fixed (float32)
    lo_hi = ex.AXIS_PAIRS["noise-l2"]
    for t in tpe:  # TPE searches the same box
        assert all(ax.lo <= v <= ax.hi for v, ax in zip(t.start, lo_hi))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    return main(["search", *TINY, "--out", str(out)]), out


@needs_optuna
def test_cli_writes_tables_plot_and_summary(cli_run):
    rc, out = cli_run
    assert rc == 0
    trials = read_csv(out / "search.csv")
    assert list(trials[0])[:8] == ["method", "repeat", "trial", "seed", "start_n0", "start_log10_l2", "end_n0",
                                   "end_log10_l2"]
    for col in ("elapsed_s", "cpu_s", "val_error", "test_error", "counted", "best_val_error", "best_test_error"):
        assert col in trials[0]
    assert sum(r["method"] == "t1t2" for r in trials) == 2
    budget = read_csv(out / "search_budget.csv")
    assert [(r["method"], r["budget_runs"]) for r in budget] == [
        (m, k) for m in ("t1t2", "random", "tpe") for k in ("1", "2")]
    assert [r["trials_mean"] for r in budget[:2]] == ["1", "2"]
    assert budget[0]["t1t2_better"] == "" and int(budget[2]["t1t2_better"]) + int(budget[2]["t1t2_tied"]) + int(
        budget[2]["t1t2_worse"]) == int(budget[2]["repeats_with_a_result"])
    data = (out / "search.png").read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    s = json.loads((out / "summary.json").read_text())
    for key in ("table", "per_repeat", "budget_s", "seconds_to_reach_t1t2_test_error", "t1t2_run_s",
                "fixed_run_s", "rule", "config", "wall_time_s"):
        assert key in s
    assert s["config"]["repeats"] == 1 and s["config"]["budgets"] == [1, 2] and s["config"]["steps"] == 20


@needs_optuna
def test_cli_trials_end_within_the_budget_whatever_the_timing(cli_run):
    _, out = cli_run
    trials = read_csv(out / "search.csv")
    s = json.loads((out / "summary.json").read_text())
    largest = s["budget_s"][0]["2"]
    for method in ("random", "tpe"):
        ts = [r for r in trials if r["method"] == method]
        counted = [r["counted"] == "1" for r in ts]
        assert counted[0] and counted[:-1] == [True] * (len(ts) - 1)  # at most the last one crossed
        for r in ts:  # (search.csv holds 6 significant digits)
            if r["counted"] == "1":
                assert float(r["elapsed_s"]) <= largest * (1 + 1e-5)
            else:
                assert float(r["elapsed_s"]) >= largest * (1 - 1e-5)
        # best-so-far columns: the running minimum of validation error among counted trials
        best = None
        for r in ts:
            if r["counted"] == "1" and (best is None or float(r["val_error"]) < float(best["val_error"])):
                best = r
            assert r["best_trial"] == best["trial"] and r["best_test_error"] == best["test_error"]
    for row in s["per_repeat"]:
        assert row["budget_s"] == s["budget_s"][0][str(row["budget_runs"])]


def test_without_optuna_tpe_says_how_to_install_it_and_random_search_still_runs(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install t1t2_fast\[experiments\]"):
        se.require_optuna()
    assert main(["search", *TINY, "--out", str(tmp_path / "a")]) == 1
    assert "pip install t1t2_fast[experiments]" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # failed before training anything
    assert main(["search", *TINY, "--budgets", "1", "--methods", "random", "--clock", "process",
                 "--out", str(tmp_path / "b")]) == 0
    assert {r["method"] for r in read_csv(tmp_path / "b" / "search_budget.csv")} == {"t1t2", "random"}


def test_optuna_logging_is_left_as_found():
    optuna = pytest.importorskip("optuna")
    before = optuna.logging.get_verbosity()
    fake_experiment(methods=("tpe",), budgets=(1,), repeats=1)
    assert optuna.logging.get_verbosity() == before


@pytest.mark.parametrize("argv, message", [
    (["search", "--seeds", "2"], "unrecognized arguments: --seeds"),  # one run per trial: --repeats
    (["search", "--budgets", "0,2"], "--budgets: expected comma-separated positive integers"),
    (["search", "--budgets", "x"], "--budgets: expected comma-separated positive integers"),
    (["search", "--methods", "grid"], "--methods: expected a comma-separated subset of random, tpe"),
    (["search", "--clock", "gpu"], "invalid choice"),
])
def test_bad_flags_give_usage_errors(argv, message, capsys, tmp_path):
    assert main([*argv, "--steps", "5", "--quiet", "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# axes "all": per-layer L2, noise, per-tensor learning-rate scales and label smoothing together
# ------------------------------------------------------------------------------------------------
def test_all_axes_build_sets_every_hyperparameter():
    data = load_data("digits", seed=0, samples=200)
    cfg = ex.Config(dataset="digits", axes="all", width=8, depth=2)
    coords = ex.coordinates("all", 2)
    assert [a.name for a in coords] == [
        "log10_l2_fc1", "log10_l2_fc2", "log10_l2_out", "n0", "n1", "n2",
        "log10_lr_fc1.weight", "log10_lr_fc1.bias", "log10_lr_fc2.weight", "log10_lr_fc2.bias",
        "log10_lr_out.weight", "log10_lr_out.bias", "label_smoothing"]
    point = (-4.0, -3.0, -2.5, 0.1, 0.2, 0.3, -0.4, -0.2, 0.0, 0.1, 0.3, 0.45, 0.15)
    model, opt = ex.build(data, cfg, point, seed=0)
    assert ex.point_of(opt.hyperparameters(), "all") == pytest.approx(point, rel=1e-6, abs=1e-7)
    assert opt.label_smoothing is not None and opt.tune_lr == "layer"
    (p,) = ex.random_points("all", 1, 0, 0, depth=2)
    assert all(-0.5 <= v <= 0.5 for v in p[6:12]) and 0.0 <= p[12] <= 0.3


def test_all_axes_training_loss_is_label_smoothed_and_every_kind_is_tuned():
    """A T1-T2 run on axes "all" moves every kind of hyperparameter (the label smoothing reaches the
    training loss: its hypergradient is not 0), and the fixed run of the same point keeps them."""
    data = load_data("digits", seed=0, samples=200)
    cfg = ex.Config(dataset="digits", axes="all", width=8, depth=1, steps=15, record_points=5)
    point = (-3.0, -3.0, 0.2, 0.2, 0.0, 0.0, 0.0, 0.0, 0.15)
    tuned = ex.train_run(data, cfg, point, seed=1, tune=True)
    fixed = ex.train_run(data, cfg, point, seed=1, tune=False)
    assert fixed.end == pytest.approx(point, rel=1e-6, abs=1e-7)
    moved = [abs(a - b) > 1e-6 for a, b in zip(tuned.end, point)]
    assert all(moved), list(zip(ex.coordinates("all", 1), tuned.end, point))
    assert len(tuned.trajectory) > 2 and "tunable.label_smoothing" in tuned.trajectory[-1][-1]


def test_cli_search_all_writes_trajectories(tmp_path, capsys):
    """The short version of the experiment: T1-T2 tuning all 13 hyperparameters against random search
    of equal counted compute (process CPU seconds), with the T1-T2 runs' trajectories."""
    out = tmp_path / "all"
    assert main(["search", *TINY, "--axes", "all", "--methods", "random", "--clock", "process",
                 "--out", str(out)]) == 0
    header = (out / "search.csv").read_text().splitlines()[0].split(",")
    assert sum(h.startswith("start_") for h in header) == 13 and "end_label_smoothing" in header
    with open(out / "search_trajectories.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    kinds = {r["hyperparameter"].split(".")[0] for r in rows}
    assert kinds == {"l2", "noise", "lr_scale", "tunable"}
    assert {int(r["trial"]) for r in rows} == {0, 1}  # both T1-T2 runs of --budgets 1,2
    assert (out / "search_trajectories.png").read_bytes()[:8] == PNG_SIGNATURE
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["axes"] == "all"
    for cmd in ("grid", "compare"):
        assert main([cmd, "--dataset", "digits", "--samples", "200", "--width", "8", "--steps", "20", "--axes", "all",
                     "--quiet", "--out", str(tmp_path / cmd)]) == 2
    assert "--axes all (one coordinate per hyperparameter) applies to search only" in capsys.readouterr().err
