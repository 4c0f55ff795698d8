"""torch.compile around T1T2: a compiled training step that calls ``opt.step()`` (and ``hyper_step``)
compiles once and does not recompile when an LR scheduler changes the learning rate every step, and
gives the same θ and λ as eager mode. ``T1T2.step``/``hyper_step`` are graph breaks by design
(``torch.compiler.disable``): their work is one fused op per pass already, and tracing them would guard
on each float they read (the lr, adam's bias corrections) and recompile at every step."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t1t2_fast as t1t2

from conftest import backends

STEPS = 8


def _setup(optimizer, backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    opt = t1t2.T1T2(model, [t1t2.L2(1e-2, per="layer")], optimizer=optimizer, lr=0.1, momentum=0.5,
                    hyper_every=2, hyper_lr=0.05, backend=backend)
    # a new lr at every step: the case that recompiles when the optimizer step is traced
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.9 ** k)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
            for _ in range(2)]
    return model, opt, sched, data


class _Counter:
    """A torch.compile backend that counts the graphs it is handed and runs them as traced."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def _train(optimizer, backend, compiled: bool, whole_step: bool):
    torch._dynamo.reset()
    model, opt, sched, ((x, y), (xv, yv)) = _setup(optimizer, backend)
    counter = _Counter()

    def train_step(x, y):  # the loop people write, compiled as one function
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    def backward(x, y):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()

    if compiled and whole_step:
        train_step = torch.compile(train_step, backend=counter)
    opt_step = torch.compile(opt.step, backend=counter) if compiled and not whole_step else opt.step
    counts, lrs = [], []
    for _ in range(STEPS):
        if whole_step:
            train_step(x, y)
        else:
            backward(x, y)
            opt_step()
        if opt.hyper_due:
            opt.hyper_step(lambda: F.cross_entropy(model(xv), yv))
        sched.step()
        counts.append(counter.graphs)
        lrs.append(opt.param_groups[0]["lr"])
    return model, opt, counts, lrs


@pytest.mark.parametrize("whole_step", [True, False], ids=["train_step", "opt.step"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("backend", backends("reference", "cpp"))
def test_scheduler_does_not_recompile_and_matches_eager(backend, optimizer, whole_step):
    eager_model, eager_opt, _, eager_lrs = _train(optimizer, backend, compiled=False, whole_step=whole_step)
    model, opt, counts, lrs = _train(optimizer, backend, compiled=True, whole_step=whole_step)
    assert len(set(lrs)) == STEPS  # the scheduler did change the lr at every step
    assert lrs == eager_lrs
    # everything compiles in the first step; no new graph in the 7 steps with a new lr each
    assert counts[0] == counts[-1], counts
    if whole_step:
        assert counts[0] >= 1  # the forward/backward was compiled (the optimizer step is the graph break)
    assert opt.steps == STEPS and opt.hyper_steps == STEPS // 2
    for a, b in zip(eager_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    for name, raw in eager_opt.raw_hyperparameters().items():
        assert torch.equal(raw, opt.raw_hyperparameters()[name]), name
