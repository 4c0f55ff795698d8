"""`t1t2 overhead` at tiny size: the arithmetic of the figures, the outputs,
and that the timed variants are the work they claim to be. No timing is asserted."""
import csv
import json

import pytest
import torch

from t1t2_fast import GaussianNoise
from t1t2_fast._extension import AVAILABLE
from t1t2_fast.apps import overhead as ov
from t1t2_fast.apps.cli import main
from t1t2_fast.apps.models import make_model


def test_models_have_the_documented_shapes_and_noise_sites():
    for name, x in (("mlp16", torch.randn(3, 784)), ("cnn", torch.randn(3, 1, 28, 28))):
        plain, noisy = make_model(name, None), make_model(name, 0.1)
        assert plain(x).shape == noisy(x).shape == (3, 10)
        assert sum(isinstance(m, GaussianNoise) for m in plain.modules()) == 0
        assert sum(isinstance(m, GaussianNoise) for m in noisy.modules()) == 3
        # same parameters: the settings differ by the noise modules only
        assert [p.shape for p in plain.parameters()] == [p.shape for p in noisy.parameters()]
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        make_model("resnet", None)


def test_figures_follow_from_the_timed_epochs():
    """With a fake timer every figure is a known function of the variant times."""
    cfg = ov.Config(models=("mlp8",), settings=("noise",), backends=("reference",), hyper_every=(10, 1), steps=4,
                    rounds=3)
    fake = {("plain", "reference", "foreach"): 0.5, ("plain", "reference", "fused"): 0.4,
            ("t1", "reference", 0): 0.42, ("t1t2", "reference", 10): 0.5, ("t1t2", "reference", 1): 1.2,
            ("val_fb", "reference", 0): 0.05, ("train_fb", "reference", 0): 0.07}
    seen = []

    def timer(key, fn):
        seen.append(key)
        return fake[key]

    rows = ov.measure(cfg, "mlp8", "noise", timer=timer)
    assert sorted(set(seen)) == sorted(fake) and len(seen) == len(fake) * (cfg.rounds + 1)
    by_h = {r.hyper_every: r for r in rows}
    plain = 0.4 / 4  # the faster of foreach and fused, per step
    assert by_h[10].plain_impl == "fused" and by_h[10].plain_ms == pytest.approx(1e3 * plain)
    assert by_h[10].overhead_pct == pytest.approx(100 * (0.5 / 0.4 - 1))
    assert by_h[1].overhead_pct == pytest.approx(100 * (1.2 / 0.4 - 1))
    # the floor passes are timed as epochs of `steps` passes too: floor = their time / (h plain epochs)
    assert by_h[10].floor_pct == pytest.approx(100 * (0.05 + 0.07) / (10 * 0.4))
    assert by_h[1].floor_pct == pytest.approx(100 * (0.05 + 0.07) / 0.4)
    assert by_h[1].t1_only_pct == pytest.approx(100 * (0.42 / 0.4 - 1))


def test_variants_do_the_work_they_are_named_for():
    """One epoch of each variant: plain training moves the weights with torch's optimizer; T1-T2
    takes steps/hyper_every hyper steps (its hyperparameters move); the t1 variant takes none."""
    cfg = ov.Config(models=("mlp8",), settings=("noise",), backends=("reference",), hyper_every=(2,), steps=4,
                    rounds=1)
    gen = torch.Generator().manual_seed(0)
    train, val = ov.batches("mlp8", 16, 2, gen), ov.batches("mlp8", 16, 2, gen)
    m = make_model("mlp8", 0.1)
    w = m[1].weight.detach().clone()
    ov.plain_epoch(m, ov._torch_optimizer(cfg, m, "foreach"), train, cfg.steps)()
    assert not torch.equal(w, m[1].weight)
    for every, moved in ((2, True), (10**9, False)):
        m = make_model("mlp8", 0.1)
        opt = ov._t1t2(cfg, m, "reference", every)
        before = {k: v.clone() for k, v in opt.raw_hyperparameters().items()}
        ov.t1t2_epoch(m, opt, train, val, cfg.steps)()
        after = opt.raw_hyperparameters()
        assert set(before) == {"l2.1.weight", "l2.4.weight", "l2.7.weight", "noise.0", "noise.3", "noise.6"}
        assert any(not torch.equal(before[k], after[k]) for k in before) == moved


def test_cli_writes_table_plot_and_summary(tmp_path, capsys):
    backends = "cpp,reference" if AVAILABLE else "reference"
    rc = main(["overhead", "--models", "mlp8,cnn", "--backends", backends, "--hyper-every", "2,1", "--steps", "2",
               "--rounds", "1", "--batch-size", "8", "--clock", "process", "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    with open(tmp_path / "overhead.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    nb = len(backends.split(","))
    assert len(rows) == 2 * 2 * nb * 2  # models x settings x backends x hyper_every
    for r in rows:
        assert float(r["plain_ms_per_step"]) > 0 and float(r["t1t2_ms_per_step"]) > 0 and float(r["floor_pct"]) > 0
        assert r["plain_impl"] in ("foreach", "fused")
        assert (r["train_fb_ms"] != "") == (r["setting"] == "noise")
    assert (tmp_path / "overhead.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["rows"]) == len(rows) and summary["config"]["steps"] == 2
    assert "mlp8" in out and "floor" in out


@pytest.mark.parametrize("argv, message", [
    (["--models", "resnet"], "--models: expected a comma-separated subset of mlp256, mlp1024, mlp4096, cnn or "
                             "mlp<width> or paper, got 'resnet'"),
    (["--models", "mlp0"], "got 'mlp0'"),
    (["--hyper-every", "0"], "--hyper-every: expected comma-separated positive integers"),
    (["--backends", "cuda"], "--backends: expected a comma-separated subset of cpp, reference"),
    (["--clock", "process", "--threads", "2"], "use it with --threads 1"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    assert main(["overhead", *argv]) == 2
    assert message in capsys.readouterr().err


def test_overhead_is_the_median_of_per_round_ratios():
    """A round where the whole machine was slow (both variants 3x) does not move the ratio."""
    cfg = ov.Config(models=("mlp8",), settings=("penalties",), backends=("reference",), hyper_every=(10,), steps=2,
                    rounds=3)
    base = {"plain": 1.0, "t1": 1.0, "t1t2": 1.1, "val_fb": 0.1}
    calls = {}

    def timer(key, fn):
        calls[key] = calls.get(key, 0) + 1
        slow = 3.0 if calls[key] == 3 else 1.0  # the second timed round
        return slow * base[key[0]]

    (row,) = ov.measure(cfg, "mlp8", "penalties", timer=timer)
    assert row.overhead_pct == pytest.approx(10.0) and row.floor_pct == pytest.approx(1.0)
