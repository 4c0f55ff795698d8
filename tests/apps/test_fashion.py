"""Fashion-MNIST (issue 17): the IDX loader on the real files (CI installs Debian's
dataset-fashion-mnist; elsewhere those tests skip and say why) and on small fake files in every
layout; the missing-data error; --preset paper; the optimal band and the sign test; the commands at
tiny size on fake images."""
import gzip
import json
import math
import struct

import numpy as np
import pytest
import torch

from t1t2_fast.apps import images, stats
from t1t2_fast.apps.cli import main
from t1t2_fast.apps.data import load_data

REAL = images.find_fashion_mnist()
needs_real = pytest.mark.skipif(
    REAL is None, reason=f"Fashion-MNIST is not installed here ({images.DEBIAN_DIR} is missing): "
                         "`apt-get install dataset-fashion-mnist` (CI does)")


def write_idx(path, arr: np.ndarray):
    code = {np.uint8: 0x08}[arr.dtype.type]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.tobytes())


def fake_fashion(folder, n_train=300, n_test=60, seed=0):
    """Four gzipped IDX files of random 28x28 images whose mean brightness depends on the class."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        rng.shuffle(y)
        x = np.clip(rng.normal(20 * y[:, None, None], 30, size=(n, 28, 28)), 0, 255).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y.astype(np.uint8))
    return folder


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    fake_fashion(root / "FashionMNIST" / "raw")  # the torchvision layout
    return root


# ------------------------------------------------------------------------------------------------
# loader
# ------------------------------------------------------------------------------------------------
@needs_real
def test_real_files_shapes_split_and_standardization():
    xtr, ytr, xte, yte = images.load_fashion_mnist()
    assert xtr.shape == (60000, 784) and xte.shape == (10000, 784) and xtr.dtype == np.uint8
    assert np.bincount(ytr).tolist() == [6000] * 10 and np.bincount(yte).tolist() == [1000] * 10
    d = load_data("fashion-mnist", seed=0, samples=4000)
    assert (len(d.train), len(d.val), len(d.test)) == (3000, 1000, 10000)
    assert np.bincount(d.train.y.numpy()).tolist() == [300] * 10  # stratified
    assert np.bincount(d.val.y.numpy()).tolist() == [100] * 10
    assert abs(float(d.train.x.mean())) < 1e-4 and abs(float(d.train.x.std()) - 1) < 1e-3
    # the test set is the official one, whatever the seed and sample size
    d2 = load_data("fashion-mnist", seed=1, samples=1000)
    assert torch.equal(d2.test.y, d.test.y) and torch.equal(d.test.y, torch.as_tensor(yte))
    full = load_data("fashion-mnist", seed=0)
    assert (len(full.train), len(full.val)) == (45000, 15000)


def test_layouts_and_uncompressed_files(tmp_path, fake_dir):
    d = load_data("fashion-mnist", seed=0, samples=200, data_dir=str(fake_dir))
    assert (len(d.train), len(d.val), len(d.test)) == (150, 50, 60)
    assert d.num_features == 784 and d.num_classes == 10
    # the files directly in --data-dir, uncompressed
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in (fake_dir / "FashionMNIST" / "raw").iterdir():
        (flat / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
    d2 = load_data("fashion-mnist", seed=0, samples=200, data_dir=str(flat))
    assert torch.equal(d.train.x, d2.train.x) and torch.equal(d.test.y, d2.test.y)


def test_idx_errors(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        images.read_idx(str(bad))
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="header"):
        images.read_idx(str(short))


def test_missing_data_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(images, "DEBIAN_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match="apt-get install -y dataset-fashion-mnist"):
        load_data("fashion-mnist", data_dir=str(tmp_path))
    for cmd in (["train", "--steps", "2"], ["grid", "--steps", "2", "--size", "2"],
                ["compare", "--steps", "2"], ["search", "--steps", "2", "--methods", "random"]):
        assert main([*cmd, "--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--quiet",
                     "--out", str(tmp_path / cmd[0])]) == 1
        assert "dataset-fashion-mnist" in capsys.readouterr().err
    assert main(["overhead", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--quiet",
                 "--out", str(tmp_path / "ov")]) == 1
    assert "dataset-fashion-mnist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------
def test_optimal_band():
    cells = [{"test_error": float(np.mean(e)), "test_errors": e, "rank": k + 1} for k, e in enumerate(
        [[0.10, 0.12], [0.12, 0.13], [0.20, 0.21], [0.11, 0.11]])]
    cells.sort(key=lambda c: c["test_error"])
    b = stats.optimal_band(cells)
    best = cells[0]
    assert best["test_error"] == pytest.approx(0.11) and best["in_band"]
    by_err = {round(c["test_error"], 4): c for c in cells}
    # the margin is 2 SE of the difference (Welch, over the 2 seeds); 0.205 lies far outside
    s_b, s_c = np.std([0.10, 0.12], ddof=1), np.std([0.12, 0.13], ddof=1)
    margin = 2 * math.sqrt(s_b ** 2 / 2 + s_c ** 2 / 2)
    assert by_err[0.125]["band_margin"] == pytest.approx(margin)
    assert by_err[0.125]["in_band"] == (0.125 - 0.11 <= margin)
    assert not by_err[0.205]["in_band"]
    assert b["cells_in_band"] == sum(c["in_band"] for c in cells) and b["seeds"] == 2
    with pytest.raises(ValueError):
        stats.optimal_band([{"test_error": 0.1, "test_errors": [0.1]}])


def test_sign_test():
    s = stats.sign_test([0.2] * 10, [0.1] * 9 + [0.3])
    assert (s["improved"], s["worse"], s["tied"]) == (9, 1, 0)
    assert s["p_one_sided"] == pytest.approx(11 / 1024) and s["p_two_sided"] == pytest.approx(22 / 1024)
    assert s["fraction_after_le_before"] == pytest.approx(0.9)
    t = stats.sign_test([0.2, 0.2, 0.2], [0.2, 0.3, 0.1])
    assert (t["improved"], t["worse"], t["tied"]) == (1, 1, 1) and t["p_two_sided"] == 1.0


# ------------------------------------------------------------------------------------------------
# commands at tiny size on fake images, with --preset paper
# ------------------------------------------------------------------------------------------------
TINY = ["--dataset", "fashion-mnist", "--preset", "paper", "--width", "16", "--steps", "20", "--quiet"]


def test_grid_paper_preset_band(tmp_path, fake_dir):
    out = tmp_path / "grid"
    assert main(["grid", *TINY, "--data-dir", str(fake_dir), "--samples", "200", "--size", "2", "--seeds", "2",
                 "--runs", "2", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    c = s["config"]
    assert (c["batchnorm"], c["hypergrad"], c["hyper_every"], c["hyper_lr"], c["optimizer"], c["l2_transform"],
            c["l2_per"], c["depth"]) == (True, "sgd", 10, 1e-3, "adam", "linear*0.001", "layer", 2)
    assert c["width"] == 16  # explicit flags win over the preset
    assert s["band"]["cells"] == 4 and 1 <= s["band"]["cells_in_band"] <= 4
    assert 0 <= s["fraction_runs_error_in_band"] <= 1 and 0 <= s["fraction_runs_end_in_band"] <= 1
    assert {"error_in_band", "end_in_band"} <= set(s["runs"][0])
    # trajectories of per-layer L2: three L2 columns and the input noise
    header = (out / "trajectories.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["run", "step", "n0", "log10_l2"] and sum(h.startswith("l2.") for h in header) == 3


def test_grid_paper_preset_noise_noise(tmp_path, fake_dir):
    """With --axes noise-noise the preset's per-layer L2 does not apply (there is no penalty)."""
    out = tmp_path / "grid-nn"
    assert main(["grid", *TINY, "--axes", "noise-noise", "--data-dir", str(fake_dir), "--samples", "200", "--size",
                 "2", "--seeds", "2", "--runs", "1", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["batchnorm"] and s["band"]["cells"] == 4
    assert set(s["runs"][0]["final_hyperparameters"]) == {"noise.input", "noise.hidden1", "noise.hidden2"}
    assert main(["grid", *TINY, "--axes", "noise-noise", "--l2-per", "layer", "--data-dir", str(fake_dir),
                 "--out", str(tmp_path / "bad")]) == 2


def test_compare_paper_preset_sign_test(tmp_path, fake_dir, capsys):
    out = tmp_path / "compare"
    assert main(["compare", *TINY, "--data-dir", str(fake_dir), "--samples", "200", "--runs", "3", "--seeds", "1",
                 "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    st = s["sign_test"]
    assert st["improved"] + st["worse"] + st["tied"] == 3 and 0 < st["p_one_sided"] <= 1
    assert "sign test" in capsys.readouterr().out


def test_search_and_train_and_overhead_on_fake_images(tmp_path, fake_dir):
    assert main(["search", *TINY, "--data-dir", str(fake_dir), "--samples", "200", "--repeats", "1",
                 "--budgets", "1", "--methods", "random", "--out", str(tmp_path / "search")]) == 0
    assert main(["train", "--dataset", "fashion-mnist", "--data-dir", str(fake_dir), "--samples", "200",
                 "--batchnorm", "--width", "16", "--steps", "20", "--optimizer", "adam", "--hypergrad", "sgd",
                 "--hyper-every", "10", "--l2-transform", "linear*0.001", "--noise", "input,hidden", "--quiet",
                 "--out", str(tmp_path / "train")]) == 0
    m = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert m["dataset"] == {"name": "fashion-mnist", "train": 150, "val": 50, "test": 60, "features": 784,
                            "classes": 10}
    assert m["hyper_steps"] == 2
    assert main(["overhead", "--dataset", "fashion-mnist", "--data-dir", str(fake_dir), "--models", "mlp32",
                 "--settings", "penalties", "--backends", "reference", "--hyper-every", "10", "--steps", "2",
                 "--rounds", "1", "--optimizer", "adam", "--hypergrad", "sgd", "--quiet", "--out", str(tmp_path / "ov")]) == 0
    ov = json.loads((tmp_path / "ov" / "summary.json").read_text())["config"]
    assert (ov["hypergrad"], ov["dataset"], ov["optimizer"]) == ("sgd", "fashion-mnist", "adam")


def test_bad_l2_transform_is_a_usage_error(tmp_path, fake_dir):
    assert main(["grid", *TINY, "--data-dir", str(fake_dir), "--l2-transform", "cubic", "--out",
                 str(tmp_path / "x")]) == 2


def test_paper_model_has_batchnorm_and_the_full_widths():
    from t1t2_fast.apps.models import make_model

    m = make_model("paper", 0.1)
    assert [mod.num_features for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm1d)] == [1000] * 3
    assert sum(p.numel() for p in m.parameters()) == 784 * 1000 + 2 * 1000 * 1000 + 10000 + 3000 + 10 + 6000


# ------------------------------------------------------------------------------------------------
# many hyperparameters, compute in plain-run equivalents (experiment 3 of issue 17)
# ------------------------------------------------------------------------------------------------
def test_plain_run_clock_counts_runs():
    from t1t2_fast.apps import search as se

    calls = []
    clock = se.PlainRunClock(1.5)
    train = clock.wrap(lambda data, cfg, point, seed, tune: calls.append(tune) or "r")
    assert clock() == 0.0
    assert train(None, None, None, 0, tune=True) == "r" and clock() == 1.5
    train(None, None, None, 1, tune=False)
    assert clock() == 2.5 and calls == [True, False]


def test_many_axes_build_sets_every_hyperparameter(fake_dir):
    from t1t2_fast.apps import experiments as ex

    d = load_data("fashion-mnist", seed=0, samples=200, data_dir=str(fake_dir))
    cfg = ex.Config(dataset="fashion-mnist", axes="many", width=8, depth=2, l2_transform="linear*0.001")
    coords = ex.coordinates("many", 2)
    assert [a.name for a in coords] == ["log10_l2_fc1", "log10_l2_fc2", "log10_l2_out", "n0", "n1", "n2"]
    point = (-4.0, -3.0, -2.5, 0.1, 0.2, 0.3)
    model, opt = ex.build(d, cfg, point, seed=0)
    assert ex.point_of(opt.hyperparameters(), "many") == pytest.approx(point, rel=1e-6)
    (p,) = ex.random_points("many", 1, 0, 0, depth=3)
    assert len(p) == 8 and all(-5 <= v <= -2 for v in p[:4]) and all(0 <= v <= 1 for v in p[4:])


def test_search_many_plain_runs(tmp_path, fake_dir, capsys):
    out = tmp_path / "search"
    assert main(["search", *TINY, "--data-dir", str(fake_dir), "--samples", "200", "--axes", "many", "--clock",
                 "plain-runs", "--repeats", "2", "--budgets", "1,2", "--methods", "random", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["plain_run_ratio"]["ratio"] > 0
    header = (out / "search.csv").read_text().splitlines()[0].split(",")
    assert sum(h.startswith("start_") for h in header) == 6 and sum(h.startswith("end_") for h in header) == 6
    assert "goal: T1-T2 at 1 run" in capsys.readouterr().out
    for cmd in ("grid", "compare"):
        assert main([cmd, *TINY, "--axes", "many", "--data-dir", str(fake_dir), "--out", str(tmp_path / cmd)]) == 2
