"""T1T2.log_dict(): the flat {key: float} that loggers take (TensorBoard, CSV, frameworks' log_dict)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t1t2_fast as t1t2


def _setup(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(t1t2.GaussianNoise(0.3, per="unit", num_features=4), nn.Linear(4, 6), nn.Tanh(),
                          t1t2.GaussianNoise(0.2), nn.Linear(6, 3)).double()
    pens = [t1t2.L2(0.05, per="layer"), t1t2.L1(0.01, per="unit", transform="softplus"),
            t1t2.L2(0.01, per="network", decoupled=True, params="bias")]
    opt = t1t2.T1T2(model, pens, hyper_lr=0.05, lr=0.1, seed=1, **kw)
    g = torch.Generator().manual_seed(3)
    x, xv = (torch.randn(8, 4, generator=g, dtype=torch.float64) for _ in range(2))
    y, yv = (torch.randint(0, 3, (8,), generator=g) for _ in range(2))
    return model, opt, (lambda: F.cross_entropy(model(x), y)), (lambda: F.cross_entropy(model(xv), yv))


def test_values_keys_and_counts():
    model, opt, train, val = _setup()
    before = opt.log_dict()
    assert not any(k.startswith("t1t2/hypergrad/") for k in before)  # no hyper step yet
    for _ in range(3):
        opt.step(train)
        opt.hyper_step(val)
    log = opt.log_dict()
    assert all(isinstance(v, float) for v in log.values()) and all(k.startswith("t1t2/") for k in log)
    for name, c in opt.hyperparameters().items():
        if isinstance(c, float):
            assert log["t1t2/" + name] == c
            assert f"t1t2/{name}/mean" not in log
        else:
            c = c.double()
            assert log[f"t1t2/{name}/mean"] == pytest.approx(c.mean().item(), rel=1e-12)
            assert log[f"t1t2/{name}/min"] == c.min().item() and log[f"t1t2/{name}/max"] == c.max().item()
            assert "t1t2/" + name not in log
    assert set(opt.last_hypergrad) == {n for n in opt.hyperparameters()}
    for name, g in opt.last_hypergrad.items():
        assert log["t1t2/hypergrad/" + name] == pytest.approx(g.double().mean().item(), rel=1e-12, abs=1e-300)
    assert log["t1t2/skipped/t1"] == 0.0 and log["t1t2/skipped/t2"] == 0.0
    assert {k for k in log if k.startswith("t1t2/clipped/")} == {"t1t2/clipped/" + n for n in opt.hyperparameters()}
    # unit hyperparameters (L1 per unit, the per-unit input noise) got mean/min/max; λ moved
    assert "t1t2/noise.0/mean" in log and "t1t2/noise.3" in log
    assert log["t1t2/noise.3"] != before["t1t2/noise.3"]
    assert set(opt.log_dict(prefix="hp.")) == {"hp." + k[len("t1t2/"):] for k in log}


def test_skips_and_clips_are_counted():
    model, opt, train, val = _setup(bounds={"l2.*": (0.0, 0.05)})
    opt.step(train)
    opt.hyper_step(lambda: val() * float("nan"))  # a skipped T2 step
    opt.step(train)
    opt.hyper_step(val)
    log = opt.log_dict()
    assert log["t1t2/skipped/t2"] == 1.0 and log["t1t2/skipped/t1"] == 0.0
    clipped = {k: v for k, v in log.items() if k.startswith("t1t2/clipped/l2.")}
    assert clipped["t1t2/clipped/l2.1.weight"] == 1.0  # the hyper step pushed it past 0.05
    assert clipped == {"t1t2/clipped/" + n: float(c) for n, c in opt.clipped.items()
                                   if n.startswith("l2.")}


def test_one_host_sync(monkeypatch):
    """The tensors are read with one .tolist() of one stacked tensor, never one .item() each."""
    model, opt, train, val = _setup()
    opt.step(train)
    opt.hyper_step(val)
    calls = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("log_dict called .item()"))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(self.shape) or real(self))
    opt.log_dict()
    assert len(calls) == 1
