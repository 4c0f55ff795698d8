"""torch.compile of models with GaussianNoise under T1T2: one graph per mode (training, training while
recording ∂L/∂σ, the hyper step's validation pass under no_noise, eval), no recompile across steps,
fullgraph=True, and the same θ and λ as eager mode."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t1t2_fast as t1t2
from t1t2_fast.noise import module as noise_module

from conftest import backends

STEPS = 6


def _model():
    torch.manual_seed(0)
    return nn.Sequential(t1t2.GaussianNoise(0.1, per="unit", num_features=4), nn.Linear(4, 8), nn.Tanh(),
                         t1t2.GaussianNoise(0.2, mode="multiplicative"), nn.Linear(8, 3)).double()


def _run(model, forward, hyper_every, backend, graphs=None):
    opt = t1t2.T1T2(model, [t1t2.L2(1e-2), t1t2.L1(1e-3, per="unit")], hyper_every=hyper_every, seed=1,
                    lr=0.2, momentum=0.5, hyper_lr=0.05, backend=backend)
    g = torch.Generator().manual_seed(2)
    x, xv = (torch.randn(16, 4, generator=g, dtype=torch.float64) for _ in range(2))
    y, yv = (torch.randint(0, 3, (16,), generator=g) for _ in range(2))
    for _ in range(STEPS):
        opt.step(lambda: F.cross_entropy(forward(x), y))
        if opt.hyper_due:
            opt.hyper_step(lambda: F.cross_entropy(forward(xv), yv))
        forward.eval()
        with torch.no_grad():
            forward(xv)
        forward.train()
        if graphs is not None:
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return opt


@pytest.mark.parametrize("backend", backends("reference", "cpp"))
@pytest.mark.parametrize("hyper_every", [1, 2])
def test_compiles_once_with_fullgraph_and_matches_eager(hyper_every, backend):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = _model()
    ref = _run(eager, eager, hyper_every, backend)
    model = _model()
    graphs = []
    opt = _run(model, torch.compile(model, backend="aot_eager", fullgraph=True), hyper_every, backend, graphs)
    # training (+ recording σ-gradients on the hyper steps' T1 steps when hyper_every > 1), validation
    # under no_noise, eval under no_grad: each compiled once, in the first hyper_every iterations
    assert graphs[-1] == (3 if hyper_every == 1 else 4), graphs
    assert graphs[hyper_every - 1] == graphs[-1], graphs  # nothing recompiles across steps
    assert opt.hyper_steps == STEPS // hyper_every and opt.steps == STEPS
    for a, b in zip(eager.parameters(), model.parameters()):
        assert torch.equal(a, b)  # the same draws, bit for bit: the key comes from the same counters
    for name, raw in ref.raw_hyperparameters().items():
        assert torch.equal(raw, opt.raw_hyperparameters()[name]), name
    assert not torch.equal(ref.raw_hyperparameters()["noise.3"], _model()[3].raw)  # σ moved


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_forward_draws_the_eager_noise_and_sigma_gradient(compiler):
    """Two draws of one module in one graph, then a backward: inductor saves graph inputs for the
    backward by reference, so the ε of the backward must not come from the (advanced) counters."""
    torch._dynamo.reset()
    m = t1t2.GaussianNoise(0.3, per="unit", num_features=5).double()
    m.seed, m.step = 7, 3
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    outs = []
    for fn in (m, torch.compile(m, backend=compiler, fullgraph=True)):
        m.reset_calls()
        m.record_grad(True)
        y1, y2 = fn(x), fn(x)  # two draws: calls 0 and 1
        (y1 * y2).sum().backward()
        outs.append((y1.detach(), y2.detach(), m.sigma_grad.clone(), m._calls, x.grad.clone()))
        x.grad = None
    (a1, a2, ga, ca, xa), (b1, b2, gb, cb, xb) = outs
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and not torch.equal(a1, a2) and ca == cb == 2
    torch.testing.assert_close(xb, xa, rtol=1e-12, atol=0)
    torch.testing.assert_close(gb, ga, rtol=1e-12, atol=0)  # one leaf per step vs one per forward: same sum


def test_counters_are_the_step_and_call_attributes():
    m = t1t2.GaussianNoise(0.1)
    assert m.step is None and m._calls == 0
    m.step, m._calls = 5, 2
    assert m._counters.tolist() == [5, 2] and m.step == 5 and m._calls == 2
    m.step = None
    assert m.step is None
    assert "_counters" not in m.state_dict()  # not a buffer: checkpoints keep their keys
    assert noise_module.GaussianNoise(0.1).step is None
