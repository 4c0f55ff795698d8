"""`t1t2 grid` and `t1t2 compare` at tiny size: outputs, content, determinism."""
import csv
import json
import math

import pytest
import torch

from t1t2_fast.apps import experiments as ex
from t1t2_fast.apps.cli import main
from t1t2_fast.apps.data import load_data

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--dataset", "digits", "--width", "16", "--steps", "30", "--seeds", "1", "--runs", "2", "--quiet"]


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    import matplotlib.image

    assert matplotlib.image.imread(str(path)).ndim == 3


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    threads = torch.get_num_threads()
    rc = main(["grid", *TINY, "--size", "2", "--out", str(out)])
    assert torch.get_num_threads() == threads
    return rc, out


def test_grid_writes_csvs_map_and_summary(grid_run):
    rc, out = grid_run
    assert rc == 0
    header, rows = read_csv(out / "grid.csv")
    assert header == ["i", "j", "n0", "log10_l2", "test_error", "val_error", "rank", "in_band", "test_error_seed0"]
    assert len(rows) == 4
    assert sorted(int(r[6]) for r in rows) == [1, 2, 3, 4]
    assert {(float(r[2]), float(r[3])) for r in rows} == {(0, -5), (0, -2), (1, -5), (1, -2)}
    assert all(0 <= float(r[4]) <= 1 for r in rows)

    header, rows = read_csv(out / "trajectories.csv")
    assert header == ["run", "step", "n0", "log10_l2", "l2", "noise.input"]
    assert {r[0] for r in rows} == {"0", "1"}
    assert [int(r[1]) for r in rows if r[0] == "0"][0] == 0 and [int(r[1]) for r in rows if r[0] == "0"][-1] == 30
    for r in rows:  # the map coordinates are the hyperparameters themselves
        assert float(r[3]) == pytest.approx(math.log10(float(r[4])), abs=1e-4)
        assert float(r[2]) == pytest.approx(float(r[5]), abs=1e-5)
    assert_png(out / "map.png")

    s = json.loads((out / "summary.json").read_text())
    for key in ("best_cell", "cell_test_error", "fraction_runs_in_best_quarter", "median_end_rank",
                "t1t2_test_error", "runs", "config", "wall_time_s"):
        assert key in s
    assert len(s["runs"]) == 2
    for r in s["runs"]:
        assert 1 <= r["nearest_cell_rank"] <= 4
        assert r["in_best_quarter"] == (r["nearest_cell_rank"] == 1)
        assert set(r["end"]) == {"n0", "log10_l2"}
    assert s["config"]["steps"] == 30 and s["config"]["size"] == 2


def test_grid_is_deterministic(grid_run, tmp_path):
    _, first = grid_run
    assert main(["grid", *TINY, "--size", "2", "--out", str(tmp_path)]) == 0
    for name in ("grid.csv", "trajectories.csv"):
        assert (tmp_path / name).read_text() == (first / name).read_text()


def test_compare_writes_table_plot_and_summary(tmp_path):
    assert main(["compare", *TINY, "--axes", "noise-noise", "--out", str(tmp_path)]) == 0
    header, rows = read_csv(tmp_path / "compare.csv")
    assert header[:5] == ["run", "start_n0", "start_n1", "end_n0", "end_n1"]
    for col in ("test_error_before", "test_error_after", "test_error_t1t2_run"):
        assert col in header
    assert len(rows) == 2
    assert_png(tmp_path / "compare.png")
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["runs"] == 2 and len(s["rows"]) == 2
    # the summary counts the CSV's rows: each run is improved, tied or worse by its own two errors
    col = {name: header.index(name) for name in ("test_error_before", "test_error_after")}
    before = [float(r[col["test_error_before"]]) for r in rows]
    after = [float(r[col["test_error_after"]]) for r in rows]
    assert [r["test_error_before"] for r in s["rows"]] == pytest.approx(before, rel=1e-6)
    assert [r["test_error_after"] for r in s["rows"]] == pytest.approx(after, rel=1e-6)
    pairs = list(zip(before, after))
    assert (s["improved"], s["tied"], s["worse"]) == (sum(a < b for b, a in pairs), sum(a == b for b, a in pairs),
                                                     sum(a > b for b, a in pairs)), (s, pairs)
    assert s["mean_test_error_after"] == pytest.approx(sum(after) / 2, rel=1e-6)


def test_compare_summary_counts_each_run_by_its_own_errors():
    """improved / tied / worse: test error after tuning below / equal to / above the same run's
    error before; means and medians over the runs."""
    rows = [dict(test_error_before=b, test_error_after=a, test_error_t1t2_run=t)
            for b, a, t in [(0.30, 0.20, 0.25), (0.10, 0.10, 0.12), (0.20, 0.25, 0.22), (0.40, 0.35, 0.30)]]
    s = ex.compare_summary(rows)
    assert (s["runs"], s["improved"], s["tied"], s["worse"]) == (4, 2, 1, 1)
    assert s["mean_test_error_before"] == pytest.approx(0.25) and s["mean_test_error_after"] == pytest.approx(0.225)
    assert s["median_test_error_after"] == pytest.approx(0.225) and s["mean_change"] == pytest.approx(-0.025)
    assert s["mean_test_error_t1t2_run"] == pytest.approx(0.2225)


def test_retraining_uses_the_tuned_raw_values_exactly():
    data = load_data("digits", seed=0, samples=300)
    cfg = ex.Config(axes="noise-l2", l2_per="layer", width=8, steps=10)
    tuned = ex.train_run(data, cfg, (0.2, -3.0), seed=1, tune=True)
    assert len(tuned.raw) == 4  # three per-layer L2 values and the input noise
    again = ex.train_run(data, cfg, (0.5, -4.0), seed=1, tune=False, raw=tuned.raw)
    assert again.hyperparameters == tuned.hyperparameters  # fixed run: the values never move
    assert again.start == pytest.approx(tuned.end)


def test_fixed_runs_do_not_move_the_hyperparameters():
    data = load_data("digits", seed=0, samples=300)
    cfg = ex.Config(axes="noise-noise", width=8, steps=10)
    r = ex.train_run(data, cfg, (0.3, 0.6), seed=0, tune=False)
    assert r.start == pytest.approx((0.3, 0.6)) and r.end == pytest.approx((0.3, 0.6))
    assert r.hyperparameters == pytest.approx({"noise.input": 0.3, "noise.hidden1": 0.6, "noise.hidden2": 0.6})


def test_nearest_cell_and_outside():
    assert ex.nearest_cell((0.1, -4.9), "noise-l2", 5) == (0, 0, False)
    assert ex.nearest_cell((1.3, -2.1), "noise-l2", 5) == (4, 4, True)
    assert ex.nearest_cell((0.5, 0.5), "noise-noise", 3) == (1, 1, False)


@pytest.mark.parametrize("argv, message", [
    (["grid", "--size", "1"], "--size: expected an integer >= 2"),
    (["grid", "--axes", "l2-l2"], "invalid choice"),
    (["compare", "--runs", "0"], "--runs: expected a positive integer"),
    (["compare", "--axes", "noise-noise", "--l2-per", "layer", "--steps", "5", "--quiet"],
     "--l2-per applies to --axes noise-l2 only"),
    (["grid", "--steps", "5", "--hyper-every", "10", "--quiet"], "exceeds --steps"),
])
def test_bad_flags_give_usage_errors(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
