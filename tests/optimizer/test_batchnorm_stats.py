"""Batch norm's running statistics across a T2 step (t1t2_fast/batchnorm.py): hyper_step's
validation pass and noise replay must leave running_mean, running_var and num_batches_tracked as the
T1 step left them, while the hypergradients still see batch statistics."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t1t2_fast as t1t2
from t1t2_fast.batchnorm import batchnorm_buffers, running_stats_kept


def _net(noise: bool):
    torch.manual_seed(0)
    layers = [t1t2.GaussianNoise(0.2)] if noise else []
    layers += [nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU()]
    layers += [t1t2.GaussianNoise(0.1)] if noise else []
    layers += [nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def _opt(model, hypergrad="sgd"):
    return t1t2.T1T2(model, [t1t2.L2(1e-3, per="layer", transform="linear")], optimizer="adam", lr=1e-2,
                     hypergrad=hypergrad, hyper_lr=1e-3, hyper_every=1, backend="reference", seed=3)


def _batches():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    xv, yv = torch.randn(16, 6, generator=g) * 3 + 2, torch.randint(0, 3, (16,), generator=g)
    return x, y, xv, yv


@pytest.mark.parametrize("noise", [False, True], ids=["l2", "l2+noise-replay"])
@pytest.mark.parametrize("hypergrad", ["sgd", "exact"])
def test_hyper_step_leaves_running_stats_as_the_t1_step_left_them(noise, hypergrad):
    x, y, xv, yv = _batches()
    a, b = _net(noise), _net(noise)
    b.load_state_dict(a.state_dict())
    oa, ob = _opt(a, hypergrad), _opt(b, hypergrad)
    for k in range(3):
        ob.step(lambda: F.cross_entropy(b(x), y))
        if k == 0:  # same weights so far: b after step + hyper_step vs a after step alone
            oa.step(lambda: F.cross_entropy(a(x), y))
            t1_left = [t.clone() for t in batchnorm_buffers(a)]
        else:  # λ differs from a's now: compare with b's own buffers after its T1 step
            t1_left = [t.clone() for t in batchnorm_buffers(b)]
        ob.hyper_step(lambda: F.cross_entropy(b(xv), yv))
        for want, got in zip(t1_left, batchnorm_buffers(b)):
            assert torch.equal(want, got)
    bn = b[1] if not noise else b[2]
    assert int(bn.num_batches_tracked) == 3
    assert ob.hyper_steps == 3 and any(v != 1e-3 for v in ob.hyperparameters().values())


def test_the_validation_pass_would_move_the_stats_without_the_guard():
    """The check above can fail: a training-mode forward on the (shifted) validation batch does move them."""
    x, y, xv, yv = _batches()
    m = _net(False)
    before = [t.clone() for t in batchnorm_buffers(m)]
    m(xv)
    assert not torch.equal(before[0], batchnorm_buffers(m)[0])
    with running_stats_kept(m):
        m(xv)
        m(x)
    after = batchnorm_buffers(m)
    m2 = _net(False)
    m2(xv)
    assert all(torch.equal(p, q) for p, q in zip(after, batchnorm_buffers(m2)))


def test_hypergradient_is_the_one_of_the_undecorated_step():
    """The restore touches buffers only, after the passes: the hypergradient is bit-identical to the
    one hyper_step computes without it (batch statistics in the validation forward either way)."""
    x, y, xv, yv = _batches()
    a = _net(True)
    oa = _opt(a)
    oa.step(lambda: F.cross_entropy(a(x), y))
    b, ob = copy.deepcopy((a, oa))
    # the replay closure is passed explicitly: the stashed one of the copy would still call a
    oa.hyper_step(lambda: F.cross_entropy(a(xv), yv), train=lambda: F.cross_entropy(a(x), y))
    inspect.unwrap(type(ob).hyper_step)(ob, lambda: F.cross_entropy(b(xv), yv), train=lambda: F.cross_entropy(b(x), y))
    assert oa.last_hypergrad.keys() == ob.last_hypergrad.keys()
    for k in oa.last_hypergrad:
        assert torch.equal(oa.last_hypergrad[k], ob.last_hypergrad[k])
    assert any(bool(v.abs().sum() > 0) for v in oa.last_hypergrad.values())
    # and the undecorated step did move b's statistics (validation batch + replay counted)
    assert int(b[2].num_batches_tracked) > int(a[2].num_batches_tracked) == 1


def test_model_without_batchnorm_is_untouched():
    assert batchnorm_buffers(nn.Linear(3, 2)) == []
    with running_stats_kept(None):
        pass
