"""The "linear*<s>" transform (c = s·λ): same model as "linear", hypergradient in λ scaled by s,
and Adam's step in c scaled by s (how the paper preset sets how far L2 moves per T2 step)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t1t2_fast as t1t2
from t1t2_fast.penalties import ScaledLinearTransform, get_transform


def _run(transform, hyper_optimizer="sgd"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    opt = t1t2.T1T2(model, [t1t2.L2(2e-3, per="layer", transform=transform)], optimizer="adam", lr=1e-2,
                    hypergrad="sgd", hyper_optimizer=hyper_optimizer, hyper_lr=1e-3, backend="reference")
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    xv, yv = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    opt.step(lambda: F.cross_entropy(model(x), y))
    opt.hyper_step(lambda: F.cross_entropy(model(xv), yv))
    return opt


def test_value_and_hypergradient_scale():
    lin, sc = _run("linear"), _run("linear*0.001")
    assert lin.last_hypergrad.keys() == sc.last_hypergrad.keys()
    for n in lin.last_hypergrad:
        torch.testing.assert_close(sc.last_hypergrad[n], 1e-3 * lin.last_hypergrad[n], rtol=1e-10, atol=0)
        assert float(lin.last_hypergrad[n]) != 0


def test_adam_moves_c_by_about_scale_times_lr():
    sc = _run("linear*0.001", "adam")
    for n, c in sc.hyperparameters().items():
        # first Adam step: |Δλ| = lr·|h|/(|h| + eps) <= lr, so Δc <= s·lr, and close to it unless |h| ~ eps
        assert 0.9e-6 < abs(c - 2e-3) <= 1e-6 * (1 + 1e-9)


def test_parse_and_bounds():
    t = get_transform("linear*1e-3")
    assert isinstance(t, ScaledLinearTransform) and t.scale == 1e-3 and t.inverse(2e-3) == pytest.approx(2.0)
    assert t1t2.L2(1e-3, transform="linear*1e-3").bounds == (0.0, float("inf"))
    for bad in ("linear*", "linear*-1", "linear*nan"):
        with pytest.raises(ValueError):
            get_transform(bad)
