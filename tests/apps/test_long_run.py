"""Long runs: nothing grows from one iteration to the next. The small-scale twin of
bench/long_run.py (2000 iterations, with the process's peak memory).

A run of a few hundred iterations with a T2 step after every T1 step, noise and penalties; after
iteration K1 and K2 the same measurements (t1t2_fast.apps.footprint) must agree exactly:
- the torch.Tensor objects Python can reach and the bytes of their storages,
- the entries and bytes of every container the optimizer keeps (state, stash and save buffers,
  hyper-optimizer state, last hypergradients, noise σ leaves and ∂L/∂σ),
- no autograd graph outlives its iteration: every tensor saved for backward during an iteration
  (forward passes, and the double backward of noise_hypergrad="exact") is freed by its end, and
  the losses step / hyper_step return carry no graph.
The negative controls leak on purpose (losses kept with their graphs, a detached copy of θ kept per
iteration, a stash cache that takes new buffers every time) and the same measurements must see it.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t1t2_fast as t1t2
from t1t2_fast import _extension, functional
from t1t2_fast.apps.footprint import GraphWatch, live_tensors, optimizer_footprint

K1, K2 = 50, 300
BACKENDS = [pytest.param("reference"),
            pytest.param("cpp", marks=pytest.mark.skipif(not _extension.AVAILABLE,
                                                         reason=f"C++ extension not built ({_extension.LOAD_ERROR})"))]
CONFIGS = {
    "momentum-fd": dict(optimizer="sgd", lr=0.05, momentum=0.9, noise_hypergrad="fd"),
    "adam-exact": dict(optimizer="adam", lr=1e-2, noise_hypergrad="exact"),
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared; the counts do not depend on it
    yield
    torch.set_num_threads(threads)


class LongRun:
    def __init__(self, backend, config):
        torch.manual_seed(0)
        self.model = nn.Sequential(
            t1t2.GaussianNoise(0.1), nn.Linear(20, 16), nn.ReLU(),
            t1t2.GaussianNoise(0.1, per="unit", num_features=16, mode="multiplicative"), nn.Linear(16, 16),
            nn.ReLU(), t1t2.GaussianNoise(0.1), nn.Linear(16, 4))
        penalties = [t1t2.L2(1e-3, per="layer"), t1t2.L1(1e-4, per="unit"),
                     t1t2.L2(1e-3, per="network", decoupled=True, params="bias")]
        self.opt = t1t2.T1T2(self.model, penalties, hyper_every=1, hyper_lr=1e-2, backend=backend,
                             **CONFIGS[config])
        g = torch.Generator().manual_seed(1)
        self.data = [(torch.randn(16, 20, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(8)]
        self.watch = GraphWatch()
        self.kept = []  # what the leaking variants keep
        self.done = 0

    def loss(self, x, y, leak):
        def closure():
            loss = F.cross_entropy(self.model(x), y)
            if leak == "losses":
                self.kept.append(loss)  # kept with its graph (whose saved tensors its backward frees)
            return loss
        return closure

    def iterate(self, n, leak=None):
        for _ in range(n):
            self.done += 1
            x, y = self.data[self.done % 8]
            xv, yv = self.data[(self.done + 3) % 8]
            with self.watch.watching():
                loss = self.opt.step(self.loss(x, y, leak))
                assert self.opt.hyper_due
                val_loss = self.opt.hyper_step(self.loss(xv, yv, leak))
                if leak == "logged graph":  # a loss computed for logging, outside no_grad, kept
                    self.kept.append(F.cross_entropy(self.model(x), y))
            for out in (loss, val_loss):
                assert out.grad_fn is None and not out.requires_grad
            if leak == "theta":
                self.kept.append(self.model[1].weight.detach().clone())

    def measure(self):
        return {"graph tensors alive": self.watch.alive(), "live tensors": live_tensors(),
                "optimizer": optimizer_footprint(self.opt)}


def grown(a, b):
    """The measurements that differ between two ``LongRun.measure()`` results."""
    out = [k for k in ("graph tensors alive", "live tensors") if a[k] != b[k]]
    return out + [f"optimizer: {k}" for k in a["optimizer"] if a["optimizer"][k] != b["optimizer"].get(k)]


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_grows_over_a_long_run(backend, config):
    run = LongRun(backend, config)
    run.iterate(K1)
    first = run.measure()
    run.iterate(K2 - K1)
    last = run.measure()
    assert grown(first, last) == [], (first, last)
    assert first["graph tensors alive"] == 0  # no graph outlives its iteration
    assert run.watch.packed > 1000  # ... and the watch did see the graphs (saved tensors) of every iteration
    assert first["optimizer"]["stash buffers"][0] > 0 and first["optimizer"]["save buffers"][0] > 0
    assert run.opt.hyper_steps == K2
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    # the noise levels were tuned all along (their hypergradient path ran every iteration)
    assert all(float(run.opt.last_hypergrad[n].abs().sum()) > 0 for n in run.opt.last_hypergrad
               if n.startswith("noise"))


LEAKS = {
    # a logging forward per iteration whose loss is kept: its graph never runs backward, so the
    # tensors saved for it stay alive
    "logged graph": ["graph tensors alive", "live tensors"],
    # the closures' losses kept (after their backward): more tensor objects
    "losses": ["live tensors"],
    # a detached copy of a weight per iteration: more tensor objects and bytes, no graph
    "theta": ["live tensors"],
    # a stash cache that takes a new buffer every step (the bug its reuse avoids)
    "buffers": ["live tensors", "optimizer: stash buffers"],
}


@pytest.mark.parametrize("leak", list(LEAKS))
def test_a_leaking_run_is_detected(leak, monkeypatch):
    backend = "cpp" if _extension.AVAILABLE else "reference"
    if leak == "buffers":
        fresh = iter(range(10 ** 9))
        reuse = functional.reused_buffer
        monkeypatch.setattr(functional, "reused_buffer", lambda cache, key, like, dtype: reuse(
            cache, (key, next(fresh)), like, dtype))
    run = LongRun(backend, "momentum-fd")
    run.iterate(20, leak=None if leak == "buffers" else leak)
    first = run.measure()
    run.iterate(40, leak=None if leak == "buffers" else leak)
    last = run.measure()
    assert grown(first, last) == LEAKS[leak]
    assert last["live tensors"][0] > first["live tensors"][0]
    if leak == "theta":
        assert last["live tensors"][1] - first["live tensors"][1] >= 40 * 16 * 20 * 4
