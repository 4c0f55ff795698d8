"""The hyper-optimizer's direction and exact update, against a problem solved by hand.

The finite-difference oracle checks the hypergradient h, not what the hyper-optimizer does with it:
a hyper step that climbs (λ ← λ + η_h h) passes every hypergradient test. Here a one-weight model
has a hypergradient whose sign is known: the training data pull the weight w up, the validation
loss is w² and wants it small, so a larger L2 coefficient lowers C2(θ⁺) and h < 0 on every
iteration; λ must grow. Each iteration's w, h and λ are computed by hand in Python floats from
docs/design.md's formulas (sgd: λ ← λ − η_h h; adam: λ ← λ − η_h m̂/(√ŝ + ε)) and compared with
T1T2's in float64.
"""
import math

import pytest
import torch
from torch import nn

import t1t2_fast as t1t2
from conftest import backends

LR, C0, W0 = 0.1, 0.1, 1.0  # T1 learning rate, initial L2 coefficient, initial weight
X, Y = 1.0, 2.0             # training: (w·x − y)², gradient 2x(wx − y) < 0 while w < 2
XV = 1.0                    # validation: (w·xv)², wants w = 0


def scalar_problem():
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(W0)
    x, xv = torch.tensor([[X]], dtype=torch.float64), torch.tensor([[XV]], dtype=torch.float64)
    train = lambda: (model(x) - Y).pow(2).mean()  # noqa: E731
    val = lambda: model(xv).pow(2).mean()  # noqa: E731
    return model, train, val


def by_hand(hyper_optimizer, hyper_lr, iterations, betas=(0.9, 0.999), eps=1e-8):
    """[(w⁺, h, λ after the hyper step)] per iteration: sgd T1 step on (wx − y)² + c·w² (c = exp λ),
    h = v · ∂w⁺/∂λ with v = ∂C2/∂w⁺ = 2xv²w⁺ and ∂w⁺/∂λ = −η·2w·c, then the hyper step."""
    w, lam, m, s, out = W0, math.log(C0), 0.0, 0.0, []
    for t in range(1, iterations + 1):
        c = math.exp(lam)
        g = 2 * X * (w * X - Y) + 2 * c * w
        w_plus = w - LR * g
        h = 2 * XV * XV * w_plus * (-LR * 2 * w * c)
        if hyper_optimizer == "sgd":
            lam = lam - hyper_lr * h
        else:
            m = betas[0] * m + (1 - betas[0]) * h
            s = betas[1] * s + (1 - betas[1]) * h * h
            lam = lam - hyper_lr * (m / (1 - betas[0] ** t)) / (math.sqrt(s / (1 - betas[1] ** t)) + eps)
        w = w_plus
        out.append((w_plus, h, lam))
    return out


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("hyper_optimizer, hyper_lr", [("sgd", 0.5), ("adam", 0.01)])
def test_hyper_step_descends_and_matches_the_hand_computation(hyper_optimizer, hyper_lr, backend):
    model, train, val = scalar_problem()
    opt = t1t2.T1T2(model, [t1t2.L2(C0)], optimizer="sgd", lr=LR, hyper_optimizer=hyper_optimizer,
                    hyper_lr=hyper_lr, hyper_every=1, backend=backend)
    lam_before = math.log(C0)
    for it, (w_plus, h, lam) in enumerate(by_hand(hyper_optimizer, hyper_lr, 4)):
        opt.step(train)
        opt.hyper_step(val)
        got_h = float(opt.last_hypergrad["l2.weight"])
        got_lam = float(opt.raw_hyperparameters()["l2.weight"])
        assert h < 0 and got_h < 0, (it, h, got_h)  # the known sign: more L2 lowers C2(θ⁺)
        assert got_lam > lam_before, (it, got_lam, lam_before)  # so the hyper step must raise λ
        assert float(model.weight.detach()) == pytest.approx(w_plus, rel=1e-14, abs=0), it
        assert got_h == pytest.approx(h, rel=1e-12, abs=0), it
        assert got_lam == pytest.approx(lam, rel=1e-12, abs=0), it
        lam_before = got_lam


def test_one_hyper_step_lowers_the_one_step_objective():
    """Taking the hyper step's λ back to the same θ: J(λ) = C2(θ⁺(λ)) is lower than at the old λ."""
    model, train, val = scalar_problem()
    opt = t1t2.T1T2(model, [t1t2.L2(C0)], optimizer="sgd", lr=LR, hyper_optimizer="adam", hyper_lr=0.01,
                    hyper_every=1)
    opt.step(train)
    j_old = float(val())
    opt.hyper_step(val)
    c_new = float(opt.hyperparameters()["l2.weight"])
    w_plus_new = W0 - LR * (2 * X * (W0 * X - Y) + 2 * c_new * W0)  # the same T1 step at the new c
    assert (XV * w_plus_new) ** 2 < j_old
