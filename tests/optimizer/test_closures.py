"""The training-closure conventions of ``T1T2.step``: a forward-only closure, torch.optim's closure
(zero_grad + backward inside, returns the loss), a closure that runs its own backward and returns a
detached loss or None (PyTorch Lightning's automatic optimization), a closure returning None after
a backward done before ``step`` (Lightning's manual optimization), and no closure. The same run
through each gives bit-identical θ and λ."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t1t2_fast as t1t2
from conftest import backends
from oracle import OPTIMIZER_CONFIGS, Problem

CONVENTIONS = ("forward", "torch", "detached", "none_after_backward", "backward_before_step", "no_closure")
# conventions whose closure the noise hypergradient can rerun ("fd" reads ∇σL from the closure's backward)
REPLAYABLE = ("forward", "torch", "detached", "none_after_backward")


def train_step(opt, convention, loss_fn):
    """One T1 step through ``convention``; returns what step() returned. Closures that backward
    zero the grads first (each a different way), as a torch.optim closure must."""
    if convention == "forward":
        return opt.step(loss_fn)
    if convention == "torch":
        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss
        return opt.step(closure)
    if convention == "detached":
        def closure():
            for p in opt.params:
                p.grad = None
            loss = loss_fn()
            loss.backward()
            return loss.detach()
        return opt.step(closure)
    if convention == "none_after_backward":
        def closure():
            opt.zero_grad(set_to_none=False)  # in place: the backward then writes into the zeroed grads
            loss_fn().backward()
        return opt.step(closure)
    opt.zero_grad()
    loss_fn().backward()
    if convention == "backward_before_step":
        return opt.step(lambda: None)
    return opt.step()


def run(convention, model, opt, problem, steps=7, train_arg=False):
    traj, losses = [], []
    loss_fn = problem.train_closure(model)
    for _ in range(steps):
        losses.append(train_step(opt, convention, loss_fn))
        if opt.hyper_due:
            opt.hyper_step(problem.val_closure(model), **({"train": loss_fn} if train_arg else {}))
        traj.append(([p.detach().clone() for p in model.parameters()],
                     {k: v.detach().clone() for k, v in opt.raw_hyperparameters().items()}))
    return traj, losses


def assert_same(a, b):
    assert len(a) == len(b)
    for (pa, ra), (pb, rb) in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(pa, pb))
        assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)


def penalties():
    return [t1t2.L2(0.05, per="layer"), t1t2.L1(0.01, per="unit", transform="softplus"),
            t1t2.L2(0.01, per="network", decoupled=True, params="bias")]


def noise_model(problem):
    torch.manual_seed(1)
    return nn.Sequential(t1t2.GaussianNoise(0.3), nn.Linear(3, 5), nn.Tanh(),
                         t1t2.GaussianNoise(0.2, per="unit", num_features=5), nn.Linear(5, 2)).double()


@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
@pytest.mark.parametrize("backend", backends("reference", "cpp"))
def test_penalties_same_run_every_convention(backend, opt_name):
    problem = Problem()
    runs = {}
    for convention in CONVENTIONS:
        model = copy.deepcopy(problem.model)
        opt = t1t2.T1T2(model, penalties(), hyper_every=2, hyper_lr=0.05, backend=backend,
                        **OPTIMIZER_CONFIGS[opt_name])
        runs[convention] = run(convention, model, opt, problem)
        assert opt.hyper_steps == 3
    base, base_losses = runs["forward"]
    assert any(not torch.equal(base[0][1][k], base[-1][1][k]) for k in base[0][1])  # λ moved
    for convention, (traj, losses) in runs.items():
        assert_same(base, traj)
        if convention in ("forward", "torch", "detached"):
            assert all(torch.equal(a, b) and not b.requires_grad for a, b in zip(base_losses, losses))
        else:
            assert all(x is None for x in losses)


@pytest.mark.parametrize("mode", ["fd", "fd-central"])
@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
@pytest.mark.parametrize("backend", backends("reference", "cpp"))
def test_noise_same_run_every_convention(backend, opt_name, mode):
    """The noise replay reruns closures that run their own backward (∇σL from their backward);
    the conventions with nothing to rerun take hyper_step(train=forward_closure)."""
    problem = Problem()
    runs = {}
    for convention in CONVENTIONS:
        model = noise_model(problem)
        opt = t1t2.T1T2(model, penalties(), hyper_every=2, hyper_lr=0.05, backend=backend,
                        noise_hypergrad=mode, **OPTIMIZER_CONFIGS[opt_name])
        runs[convention] = run(convention, model, opt, problem, train_arg=convention not in REPLAYABLE)[0]
        assert opt.hyper_steps == 3
    base = runs["forward"]
    assert not torch.equal(base[0][1]["noise.0"], base[-1][1]["noise.0"])
    for traj in runs.values():
        assert_same(base, traj)


@pytest.mark.parametrize("convention", ["torch", "detached", "none_after_backward"])
def test_noise_exact_needs_a_forward_closure(convention):
    problem = Problem()
    model = noise_model(problem)
    opt = t1t2.T1T2(model, noise_hypergrad="exact", backend="reference")
    train_step(opt, convention, problem.train_closure(model))
    with pytest.raises(RuntimeError, match="noise_hypergrad='exact'.*runs its own backward.*"
                                           r"hyper_step\(val_closure, train=train_closure\)"):
        opt.hyper_step(problem.val_closure(model))
    # the same step's hyper step works with a forward-only closure passed as train=
    train_step(opt, convention, problem.train_closure(model))
    opt.hyper_step(problem.val_closure(model), train=problem.train_closure(model))
    assert opt.hyper_steps == 1


def test_noise_closure_with_nothing_to_rerun():
    problem = Problem()
    model = noise_model(problem)
    opt = t1t2.T1T2(model, backend="reference")
    train_step(opt, "backward_before_step", problem.train_closure(model))
    with pytest.raises(RuntimeError, match=r"hyper_step\(val_closure, train=train_closure\)"):
        opt.hyper_step(problem.val_closure(model))
    train_step(opt, "forward", problem.train_closure(model))
    with pytest.raises(RuntimeError, match="returns None"):
        opt.hyper_step(problem.val_closure(model), train=lambda: None)


def test_zero_grad_inside_the_closure():
    """torch.optim's closure calls opt.zero_grad() on T1T2 itself; a forward-only closure that
    zeroes the grads (set_to_none or not) is still forward-only."""
    problem = Problem()
    loss_fn = problem.train_closure(problem.model)
    for set_to_none in (True, False):
        model = copy.deepcopy(problem.model)
        opt = t1t2.T1T2(model, penalties(), backend="reference")
        ref_model = copy.deepcopy(problem.model)
        ref = t1t2.T1T2(ref_model, penalties(), backend="reference")
        loss_fn, ref_fn = problem.train_closure(model), problem.train_closure(ref_model)
        for _ in range(3):
            opt.step(lambda: (opt.zero_grad(set_to_none=set_to_none), loss_fn())[1])
            ref.step(ref_fn)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))


@pytest.mark.parametrize("zero", ["none", "in_place"])
def test_a_backward_closure_accumulates_like_torch_optim(zero):
    """A closure that backwards without zeroing adds to the grads it found (gradient accumulation,
    as Lightning's closure does on the last micro-batch): the same as two backwards and step()."""
    problem = Problem()
    a_model, b_model = copy.deepcopy(problem.model), copy.deepcopy(problem.model)
    a, b = (t1t2.T1T2(m, penalties(), backend="reference", hyper_every=2) for m in (a_model, b_model))
    fa, fb = problem.train_closure(a_model), problem.train_closure(b_model)
    for _ in range(4):
        if zero == "in_place":
            a.zero_grad(set_to_none=False)
        else:
            a.zero_grad()
        fa().backward()  # an earlier micro-batch

        def closure():
            loss = fa()
            loss.backward()
            return loss.detach()
        a.step(closure)
        b.zero_grad()
        fb().backward()
        fb().backward()
        b.step()
        assert a.hyper_due == b.hyper_due
        for opt, model in ((a, a_model), (b, b_model)):
            if opt.hyper_due:
                opt.hyper_step(problem.val_closure(model))
    assert all(torch.equal(x, y) for x, y in zip(a_model.parameters(), b_model.parameters()))
    ra, rb = a.raw_hyperparameters(), b.raw_hyperparameters()
    assert a.hyper_steps == 2 and all(torch.equal(ra[k], rb[k]) for k in ra)


def test_scaler_with_a_backward_closure_is_refused():
    problem = Problem(dtype=torch.float32)
    model = problem.model
    opt = t1t2.T1T2(model, backend="reference")
    scaler = torch.amp.GradScaler("cpu")
    loss_fn = problem.train_closure(model)
    before = [p.detach().clone() for p in model.parameters()]
    def torch_closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    for closure in (torch_closure, lambda: None):
        loss_fn().backward()  # grads of a backward before step(): the refused lambda: None leaves them
        grads = [p.grad for p in model.parameters()]
        with pytest.raises(RuntimeError, match=r"ran its own backward.*scaler.scale\(loss\).backward\(\)"):
            opt.step(closure, scaler=scaler)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert opt.steps == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_closure_errors():
    problem = Problem()
    model = problem.model
    opt = t1t2.T1T2(model, backend="reference")
    with pytest.raises(RuntimeError, match="returned None and no parameter has a gradient"):
        opt.step(lambda: None)
    with pytest.raises(ValueError, match="does not require grad"):
        opt.step(lambda: problem.train_closure(model)().detach())
    with pytest.raises(TypeError, match="scalar loss tensor or None"):
        opt.step(lambda: (problem.train_closure(model)().backward(), "loss")[1])
    assert opt.steps == 0
