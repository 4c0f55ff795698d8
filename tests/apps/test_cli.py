"""The `t1t2 train` job end to end, with tiny settings: outputs, tuning, reproducibility, errors."""
import csv
import json
import math
import runpy
import sys

import pytest
import torch

from t1t2_fast.apps.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--width", "16", "--batch-size", "32", "--quiet"]


def run(out, *args):
    return main(["train", "--out", str(out), *TINY, *args])


def read_log(out):
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def assert_valid_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 400 and height > 200
    import matplotlib.image

    assert matplotlib.image.imread(str(path)).shape[:2] == (height, width)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    threads = torch.get_num_threads()
    rc = run(out, "--steps", "30", "--log-every", "10", "--seed", "3")
    assert torch.get_num_threads() == threads  # --threads is undone for in-process callers
    return rc, out


def test_digits_run_writes_log_metrics_and_plot(digits_run):
    rc, out = digits_run
    assert rc == 0
    header, rows = read_log(out)
    names = ["l2.fc1.weight", "l2.fc2.weight", "l2.out.weight"]
    assert header == ["step", "train_loss", "val_loss"] + names
    assert [int(r[0]) for r in rows] == [0, 10, 20, 30]
    assert all(math.isfinite(float(x)) for r in rows for x in r)

    m = json.loads((out / "metrics.json").read_text())
    for key in ("test_accuracy", "test_loss", "hyperparameters", "wall_time_s", "config"):
        assert key in m
    assert 0.5 < m["test_accuracy"] <= 1  # 30 steps of a 16-wide MLP already learn digits
    assert m["test_loss"] > 0 and m["wall_time_s"] > 0
    assert sorted(m["hyperparameters"]) == sorted(names)
    assert m["config"]["seed"] == 3 and m["config"]["dataset"] == "digits" and m["config"]["steps"] == 30
    assert m["hyper_steps"] == 30 and m["steps_done"] == 30
    # the log's last row is the final state
    assert float(rows[-1][3]) == pytest.approx(m["hyperparameters"]["l2.fc1.weight"], rel=1e-6)
    assert_valid_png(out / "trajectories.png")


def test_hyperparameters_move_from_their_initial_value(digits_run):
    _, out = digits_run
    m = json.loads((out / "metrics.json").read_text())
    for name, value in m["hyperparameters"].items():
        assert m["initial_hyperparameters"][name] == pytest.approx(1e-3, rel=1e-6)
        assert abs(math.log(value / 1e-3)) > 0.01, name  # default --hyper-lr moves log(c) visibly
    _, rows = read_log(out)
    assert rows[0][3:] != rows[-1][3:]


def test_same_seed_same_log_other_seed_other_log(digits_run, tmp_path):
    _, first = digits_run
    assert run(tmp_path / "again", "--steps", "30", "--log-every", "10", "--seed", "3") == 0
    assert (tmp_path / "again" / "log.csv").read_bytes() == (first / "log.csv").read_bytes()
    assert run(tmp_path / "other", "--steps", "30", "--log-every", "10", "--seed", "4") == 0
    assert (tmp_path / "other" / "log.csv").read_bytes() != (first / "log.csv").read_bytes()


def test_per_unit_l1_and_l2_log_the_mean_and_summarize_tensors(tmp_path, capsys):
    rc = run(tmp_path, "--steps", "6", "--per", "unit", "--l1", "1e-5", "--depth", "1", "--optimizer", "adam")
    assert rc == 0
    header, rows = read_log(tmp_path)
    assert header == ["step", "train_loss", "val_loss", "l2.fc1.weight[mean]", "l2.out.weight[mean]",
                      "l1.fc1.weight[mean]", "l1.out.weight[mean]"]
    assert len(rows) == 7  # default --log-every: every step for a run this short, plus step 0
    hp = json.loads((tmp_path / "metrics.json").read_text())["hyperparameters"]
    assert hp["l2.fc1.weight"]["shape"] == [16] and len(hp["l2.fc1.weight"]["values"]) == 16
    assert hp["l1.out.weight"]["min"] <= hp["l1.out.weight"]["mean"] <= hp["l1.out.weight"]["max"]
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "l1.out.weight" in printed and "log.csv" in printed


def test_without_penalties_it_trains_plainly(tmp_path):
    assert run(tmp_path, "--steps", "4", "--l2", "0") == 0
    header, rows = read_log(tmp_path)
    assert header == ["step", "train_loss", "val_loss"] and len(rows) == 5
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["hyper_steps"] == 0 and m["hyperparameters"] == {}
    assert_valid_png(tmp_path / "trajectories.png")


@pytest.mark.parametrize("mode", ["fd", "exact"])
def test_noise_levels_are_tuned_logged_and_plotted(tmp_path, mode):
    rc = run(tmp_path, "--steps", "12", "--depth", "1", "--noise", "input,hidden", "--noise-per", "unit",
             "--noise-init", "0.2", "--noise-hypergrad", mode)
    assert rc == 0
    header, rows = read_log(tmp_path)
    assert header == ["step", "train_loss", "val_loss", "l2.fc1.weight", "l2.out.weight", "noise.input[mean]",
                      "noise.hidden1[mean]"]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["hyperparameters"]["noise.hidden1"]["shape"] == [16]
    assert m["hyperparameters"]["noise.input"]["mean"] != pytest.approx(0.2, rel=1e-6)  # T2 moved it
    assert m["config"]["noise_hypergrad"] == mode
    assert_valid_png(tmp_path / "trajectories.png")


def test_triton_backend_on_cpu_outside_the_interpreter_is_a_usage_error(tmp_path, capsys, monkeypatch):
    from t1t2_fast import triton_kernels
    monkeypatch.setattr(triton_kernels, "interpreting", lambda: False)
    assert run(tmp_path, "--backend", "triton") == 2
    assert "backend='triton'" in capsys.readouterr().err


def test_mnist1d(tmp_path):
    pytest.importorskip("mnist1d")
    assert run(tmp_path, "--dataset", "mnist1d", "--samples", "300", "--steps", "8", "--per", "network") == 0
    header, rows = read_log(tmp_path)
    assert header == ["step", "train_loss", "val_loss", "l2"] and len(rows) == 9
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["dataset"] == {"name": "mnist1d", "train": 180, "val": 60, "test": 60, "features": 40, "classes": 10}
    assert m["hyperparameters"]["l2"] != pytest.approx(1e-3, rel=1e-4)


def test_missing_mnist1d_names_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mnist1d", None)  # makes `import mnist1d...` raise ImportError
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    assert run(tmp_path, "--dataset", "mnist1d", "--steps", "2") == 1
    assert "pip install mnist1d" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--lr", "-1"], "--lr: expected a positive number"),
    (["--lr", "nan"], "--lr: expected a positive number"),
    (["--steps", "0"], "--steps: expected a positive integer"),
    (["--momentum", "1"], "--momentum: expected a number in [0, 1)"),
    (["--per", "row"], "invalid choice: 'row'"),
    (["--dataset", "cifar"], "invalid choice: 'cifar'"),
    (["--epochs", "1", "--steps", "1"], "not allowed with argument"),
    (["--samples", "5"], "--samples: expected an integer >= 30"),
    (["--nesterov", "--momentum", "0"], "--nesterov needs --momentum > 0"),
    (["--l2", "0", "--decoupled"], "--decoupled needs L2"),
    (["--noise", "output"], "--noise: expected a comma-separated subset of input, hidden"),
    (["--noise", "hidden", "--depth", "0"], "--noise hidden needs hidden layers"),
])
def test_bad_flags_give_a_message_and_exit_status_2(tmp_path, capsys, args, message):
    assert run(tmp_path, *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "log.csv").exists()


def test_python_dash_m_entry_point(monkeypatch, capsys):
    # what `python -m t1t2_fast.apps train --help` runs, in-process (a subprocess would re-import torch)
    monkeypatch.setattr(sys, "argv", ["t1t2_fast.apps", "train", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("t1t2_fast.apps", run_name="__main__", alter_sys=True)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--hyper-lr" in out and "--dataset" in out


def test_divergence_stops_with_status_1_and_strict_json(tmp_path, capsys):
    assert run(tmp_path, "--lr", "50", "--steps", "40") == 1
    assert "non-finite" in capsys.readouterr().err
    def reject(token):
        raise AssertionError(f"metrics.json holds {token}, which is not JSON")

    m = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=reject)
    assert m["diverged_at_step"] is not None and m["steps_done"] == m["diverged_at_step"] < 40
    assert_valid_png(tmp_path / "trajectories.png")


def test_skipped_steps_are_logged_and_max_skips_stops_the_run(tmp_path, capsys):
    """lr 1e6 overflows θ within two steps (from finite inputs, which no guard can see coming); every
    later step has a NaN loss and is skipped and logged, and --max-skips consecutive skips stop the run."""
    import re
    assert run(tmp_path, "--lr", "1e6", "--steps", "40", "--max-skips", "3") == 1
    captured = capsys.readouterr()
    logged = re.findall(r"iteration (\d+): skipped T1 step \d+: non-finite training loss", captured.out)
    assert len(logged) == 3
    assert "3 consecutive T1 (training) steps were skipped" in captured.err
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["skipped_steps"]["t1"] == 3 and m["diverged_at_step"] == int(logged[-1]) < 40


def test_tune_lr_layer_tunes_logs_and_plots_the_scales(tmp_path):
    rc = run(tmp_path, "--steps", "12", "--depth", "1", "--tune-lr", "layer")
    assert rc == 0
    header, rows = read_log(tmp_path)
    scales = [h for h in header if h.startswith("lr_scale.")]
    assert scales == ["lr_scale.fc1.weight", "lr_scale.fc1.bias", "lr_scale.out.weight", "lr_scale.out.bias"]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["config"]["tune_lr"] == "layer"
    assert m["hyperparameters"]["lr_scale.fc1.weight"] != pytest.approx(1.0, rel=1e-9)  # T2 moved it
    assert_valid_png(tmp_path / "trajectories.png")


@pytest.mark.parametrize("mode", ["fd", "exact"])
def test_label_smoothing_is_tuned_with_the_other_hyperparameters(tmp_path, mode):
    """--label-smoothing-tune: the coefficient is a Tunable of the training loss (tunable.label_smoothing),
    tuned with the L2 coefficients; it moves from its initial value and stays in [0, 1]."""
    rc = run(tmp_path, "--steps", "12", "--depth", "1", "--label-smoothing-tune", "--label-smoothing", "0.2",
             "--noise", "input", "--noise-hypergrad", mode, "--hyper-lr", "0.05")
    assert rc == 0
    header, rows = read_log(tmp_path)
    assert header == ["step", "train_loss", "val_loss", "l2.fc1.weight", "l2.out.weight", "noise.input",
                      "tunable.label_smoothing"]
    m = json.loads((tmp_path / "metrics.json").read_text())
    c = m["hyperparameters"]["tunable.label_smoothing"]
    assert m["initial_hyperparameters"]["tunable.label_smoothing"] == pytest.approx(0.2)
    assert c != pytest.approx(0.2, abs=1e-3) and 0.0 <= c <= 1.0  # T2 moved it, inside its bounds
    assert float(rows[-1][-1]) == pytest.approx(c, rel=1e-6)
    assert m["config"]["label_smoothing_tune"] is True


def test_fixed_label_smoothing_changes_training_and_is_not_tuned(tmp_path):
    losses = []
    for c in ("0", "0.3"):
        assert run(tmp_path / c, "--steps", "3", "--label-smoothing", c) == 0
        header, _ = read_log(tmp_path / c)
        assert "tunable.label_smoothing" not in header
        losses.append(json.loads((tmp_path / c / "metrics.json").read_text())["test_loss"])
    assert losses[0] != losses[1]  # the smoothing reached the training loss
