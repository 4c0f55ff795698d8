"""T1T2(free_grads=True): .grad is None after each T1 step, and the run is otherwise the same, bit for
bit (the hyper step takes its own validation gradient), with penalties and with noise."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t1t2_fast as t1t2

from conftest import backends


def _run(free, noise, backend, closure):
    torch.manual_seed(0)
    layers = [nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)]
    model = nn.Sequential(*([t1t2.GaussianNoise(0.2)] if noise else []), *layers).double()
    opt = t1t2.T1T2(model, [t1t2.L2(1e-2, per="layer")], momentum=0.5, hyper_every=2, hyper_lr=0.05,
                    backend=backend, free_grads=free)
    g = torch.Generator().manual_seed(1)
    x, xv = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(16, 5, generator=g, dtype=torch.float64)
    y, yv = torch.randint(0, 3, (16,), generator=g), torch.randint(0, 3, (16,), generator=g)
    grads_after = []
    for _ in range(6):
        if closure:
            opt.step(lambda: F.cross_entropy(model(x), y))
        else:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        grads_after.append([p.grad for p in model.parameters()])
        if opt.hyper_due:
            opt.hyper_step(lambda: F.cross_entropy(model(xv), yv), train=lambda: F.cross_entropy(model(x), y))
    return model, opt, grads_after


@pytest.mark.parametrize("closure", [True, False], ids=["closure", "bare-step"])
@pytest.mark.parametrize("noise", [False, True], ids=["penalties", "noise"])
@pytest.mark.parametrize("backend", backends("reference", "cpp"))
def test_free_grads_frees_and_changes_nothing_else(backend, noise, closure):
    kept_model, kept_opt, kept_grads = _run(False, noise, backend, closure)
    model, opt, grads = _run(True, noise, backend, closure)
    assert all(g is None for step in grads for g in step)
    assert all(g is not None for step in kept_grads for g in step)
    assert opt.hyper_steps == kept_opt.hyper_steps == 3
    for a, b in zip(kept_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    for name, raw in kept_opt.raw_hyperparameters().items():
        assert torch.equal(raw, opt.raw_hyperparameters()[name]), name
