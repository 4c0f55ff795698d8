"""No host synchronization in ``step()`` with default settings, at most one in ``hyper_step()``.

Counted on the CPU: every ``aten._local_scalar_dense`` (the op behind ``.item()``, ``float()``,
``int()``, ``bool()`` of a tensor) under a ``TorchDispatchMode``, plus the reads made through
``t1t2_fast.guard.host_list`` (``Tensor.tolist`` does not dispatch). On a GPU each would be a
stall of the host until the device has caught up. The compiled backend (C++/CUDA; the Triton
kernels read the flag on the device too) is counted: the plain-torch reference twin of the fused
op reads found_inf with ``float()``, as a reference may."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t1t2_fast as t1t2
from t1t2_fast import guard

from conftest import backends, needs_ext
from host_reads import HostReads


def _run(backend, optimizer, noise, scaler, hyper_every, steps, **kw):
    torch.manual_seed(0)
    layers = [t1t2.GaussianNoise(0.1)] if noise else []
    layers += [nn.Linear(12, 32), nn.ReLU()] + ([t1t2.GaussianNoise(0.2)] if noise else []) + [nn.Linear(32, 3)]
    model = nn.Sequential(*layers)
    opts = {"noise_hypergrad": noise} if noise else {}
    if optimizer == "sgd":
        opts.update(momentum=0.9)
    penalties = [t1t2.L1(1e-4, per="unit")] + ([] if optimizer == "adamw" else [t1t2.L2(1e-3)])
    opt = t1t2.T1T2(model, penalties, optimizer=optimizer, lr=0.01,
                    hyper_every=hyper_every, backend=backend, bounds={"l2.*": (1e-6, 1.0)}, **opts, **kw)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) if scaler else None
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 12, generator=g), torch.randint(0, 3, (64,), generator=g)
    xv, yv = torch.randn(32, 12, generator=g), torch.randint(0, 3, (32,), generator=g)
    step_reads, hyper_reads = [], []
    for i in range(steps):
        xb, yb = x[16 * (i % 4):16 * (i % 4) + 16], y[16 * (i % 4):16 * (i % 4) + 16]
        closure = lambda: F.cross_entropy(model(xb), yb)
        with HostReads() as reads:
            opt.step(closure, scaler=sc) if sc else opt.step(closure)
        step_reads.append(dict(reads.where, listed=reads.listed) if reads.count else None)
        if sc:
            sc.update()
        if opt.hyper_due:
            with HostReads() as reads:
                opt.hyper_step(lambda: F.cross_entropy(model(xv), yv), scaler=sc)
            hyper_reads.append(reads.count)
    return opt, step_reads, hyper_reads


@pytest.mark.parametrize("backend", backends("cpp"))
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("noise", [None, "fd", "exact"])
@pytest.mark.parametrize("scaler", [False, True])
def test_step_reads_nothing_back_and_hyper_step_once(backend, optimizer, noise, scaler):
    """Penalties (L2 per layer, L1 per unit, bounds), noise (fd, exact), sgd/adam/adamw, with and
    without a GradScaler: 0 host reads in every step(), at most 1 in every hyper_step()."""
    kw = {"weight_decay": 1e-2} if optimizer == "adamw" else {}
    opt, step_reads, hyper_reads = _run(backend, optimizer, noise, scaler, hyper_every=3, steps=9, **kw)
    assert step_reads == [None] * 9, step_reads
    assert len(hyper_reads) == 3 and all(n <= 1 for n in hyper_reads), hyper_reads
    # the values read lazily are still right
    assert opt.skipped == {"t1": 0, "t2": 0} and opt.steps == 9 and opt.hyper_steps == 3


@pytest.mark.parametrize("backend", backends("cpp"))
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("noise", [None, "fd"])
@pytest.mark.parametrize("tune_lr", ["network", "layer", "group"])
def test_lr_scales_read_nothing_back(backend, optimizer, noise, tune_lr):
    """tune_lr: the scales are read by the fused op on the device (lr_scale) and their hypergradient is
    a segment of the one T2 reduction: still 0 host reads per step(), at most 1 per hyper_step()."""
    kw = {"weight_decay": 1e-2} if optimizer == "adamw" else {}
    opt, step_reads, hyper_reads = _run(backend, optimizer, noise, False, hyper_every=2, steps=6, tune_lr=tune_lr,
                                        **kw)
    assert step_reads == [None] * 6, step_reads
    assert len(hyper_reads) == 3 and all(n <= 1 for n in hyper_reads), hyper_reads
    assert any(n.startswith("lr_scale") for n in opt.last_hypergrad)
    assert any(float(opt.raw_hyperparameters()[n]) != 0 for n in opt.last_hypergrad if n.startswith("lr_scale"))


@needs_ext
def test_default_hyper_every_10_run_reads_nothing_in_its_steps():
    opt, step_reads, hyper_reads = _run("cpp", "sgd", "fd", False, hyper_every=10, steps=20)
    assert step_reads == [None] * 20 and hyper_reads == [1, 1]


@needs_ext
def test_skipped_steps_are_counted_without_reading_them_back():
    """A NaN loss under the lazy guard: step() still reads nothing back; the counters say it when asked."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = t1t2.T1T2(model, [t1t2.L2(1e-3)], momentum=0.9, hyper_every=10, backend="cpp")
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with HostReads() as reads:
        opt.step(lambda: F.cross_entropy(model(x), y) * float("nan"))
        opt.step(lambda: F.cross_entropy(model(x), y))
    assert reads.count == 0
    with HostReads() as reads:
        assert opt.skipped == {"t1": 1, "t2": 0} and opt.last_skip is None
    assert reads.count == 1  # the counters, read once when asked


@needs_ext
def test_the_grads_guard_reads_its_flag_back_every_step():
    """The positive control: skip_nonfinite="grads" reads the op's flag back (one host read per step)."""
    _, step_reads, _ = _run("cpp", "sgd", None, False, hyper_every=10, steps=3, skip_nonfinite="grads")
    assert all(r is not None and sum(r.values()) >= 1 for r in step_reads)


@needs_ext
@pytest.mark.parametrize("log_steps", [3, 1024])
def test_the_device_log_folds_without_losing_a_count(monkeypatch, log_steps):
    """The lazy guard logs each step on the device and folds LOG_STEPS of them into a summary there:
    the counts, the run of consecutive skips (across folds and reads) and the latest reason come out
    the same either way."""
    monkeypatch.setattr(guard.SkipGuard, "LOG_STEPS", log_steps)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = t1t2.T1T2(model, [t1t2.L2(1e-3)], momentum=0.9, hyper_every=1000, backend="cpp", max_consecutive_skips=None)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    pattern = "..xx.xxxx.x" + "x" * 9
    with HostReads() as reads:
        for c in pattern:
            opt.step(lambda: F.cross_entropy(model(x), y) * (float("nan") if c == "x" else 1.0))
    assert reads.count == 0
    assert opt.skipped["t1"] == pattern.count("x") and opt.consecutive_skips["t1"] == 10
    assert opt.last_skip == f"T1 step {len(pattern)}: non-finite training loss"
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert opt.consecutive_skips["t1"] == 0 and opt.last_skip is None
    opt.max_consecutive_skips = 10  # the run of 10 ended already: nothing to raise; a new one of 10 does
    for _ in range(10):
        opt.step(lambda: F.cross_entropy(model(x), y) * float("nan"))
    opt.step(lambda: F.cross_entropy(model(x), y))
    with pytest.raises(t1t2.NonFiniteError, match="10 consecutive T1"):
        opt.check_nonfinite()
