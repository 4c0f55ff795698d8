"""Reliability: the non-finite guard (in the fused T1 op and in T1T2), GradScaler / autocast,
low-precision runs and hyperparameter bounds. Resume, long runs and fuzzing have their own files."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import t1t2_fast as t1t2
from t1t2_fast import NonFiniteError, ops, reference

from conftest import backends, needs_ext, needs_triton_on_cpu
from problems import OPTIMIZERS, make_problem, moved


def _triton_t1(*args, **kw):
    from t1t2_fast.triton_kernels import t1_step  # noqa: F401  (registers the op)
    torch.ops.t1t2_triton.t1_step_(*args, **kw)


OP_BACKENDS = [pytest.param(reference.t1_step_, id="reference"),
               pytest.param(ops.t1_step_, id="cpp", marks=needs_ext),
               pytest.param(_triton_t1, id="triton", marks=needs_triton_on_cpu)]
WRITTEN = (0, 2, 3, 7, 8)  # params, state1, state2, stash_theta, stash_jac
SHAPES = [(7,), (1025,), (33, 31)]


def _flag(value=0.0):
    return torch.full((), value, dtype=torch.float32)


def _snapshot(args):
    return [[t.clone() for t in args[k]] for k in WRITTEN]


def _assert_unchanged(before, args):
    for old, k in zip(before, WRITTEN):
        for a, b in zip(old, args[k]):
            assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())


# ---- the op ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", OP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_grad_scale_unscales_in_the_same_pass(op, dtype, opt):
    """A power-of-2 scale is exact: op(g·S, grad_scale=S) writes the bits op(g) writes. The gradients
    are scaled in the compute dtype and stored in a wider one where the storage dtype would overflow."""
    args = make_problem(SHAPES, dtype, OPTIMIZERS[opt], stash=True)
    scale = 2.0 ** 8
    plain, scaled = moved(args), moved(args)
    scaled[1] = [(g.to(torch.float64) * scale).to(dtype) for g in args[1]]
    op(*plain)
    op(*scaled, grad_scale=torch.tensor(scale), found_inf=_flag(), check_finite=True)
    for k in WRITTEN:
        for a, b in zip(plain[k], scaled[k]):
            assert torch.equal(a, b), (k, dtype, opt)


@pytest.mark.parametrize("op", OP_BACKENDS[1:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_scale_matches_the_reference_for_any_scale(op, dtype):
    """1/scale is taken in double and cast to the compute dtype by every backend (scale 3: inexact)."""
    args = make_problem(SHAPES, dtype, OPTIMIZERS["momentum"], stash=True)
    ref, fused = moved(args), moved(args)
    reference.t1_step_(*ref, grad_scale=torch.tensor(3.0))
    op(*fused, grad_scale=torch.tensor(3.0))
    for k in WRITTEN:
        for a, b in zip(ref[k], fused[k]):
            assert torch.equal(a, b), k


@pytest.mark.parametrize("op", OP_BACKENDS)
@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
def test_found_inf_set_on_entry_writes_nothing(op, opt):
    args = make_problem(SHAPES, torch.float32, OPTIMIZERS[opt], stash=True)
    for k in (7, 8):  # the stash buffers start as empty(): give them known contents
        for t in args[k]:
            t.fill_(7.0)
    before = _snapshot(args)
    found = _flag(1.0)
    op(*args, grad_scale=torch.tensor(4.0), found_inf=found)
    _assert_unchanged(before, args)
    assert float(found) == 1.0


@pytest.mark.parametrize("op", OP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("where", [(0, 0), (1, 1024), (2, -1)])  # first element, a chunk's tail, the last
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_finite_finds_any_nonfinite_gradient_and_writes_nothing(op, dtype, where, bad):
    args = make_problem(SHAPES, dtype, OPTIMIZERS["adam"], stash=True)
    for k in (7, 8):
        for t in args[k]:
            t.fill_(7.0)
    tensor, index = where
    args[1][tensor].view(-1)[index] = bad
    before = _snapshot(args)
    found = _flag()
    op(*args, found_inf=found, check_finite=True)
    assert float(found) == 1.0
    _assert_unchanged(before, args)


@pytest.mark.parametrize("op", OP_BACKENDS)
def test_check_finite_sees_overflow_after_unscaling(op):
    """The scan checks g·(1/scale): finite float32 gradients that overflow when unscaled count."""
    args = make_problem(SHAPES, torch.float32, OPTIMIZERS["sgd"], stash=False)
    args[1][1].view(-1)[5] = 1e37
    found = _flag()
    op(*moved(args), grad_scale=torch.tensor(2.0 ** -10), found_inf=found, check_finite=True)
    assert float(found) == 1.0
    found = _flag()
    op(*moved(args), grad_scale=torch.tensor(1.0), found_inf=found, check_finite=True)
    assert float(found) == 0.0


@pytest.mark.parametrize("op", OP_BACKENDS)
def test_check_finite_on_finite_gradients_is_the_plain_step(op):
    args = make_problem(SHAPES, torch.bfloat16, OPTIMIZERS["nesterov"], stash=True)
    plain, guarded = moved(args), moved(args)
    op(*plain)
    found = _flag()
    op(*guarded, found_inf=found, check_finite=True)
    assert float(found) == 0.0
    for k in WRITTEN:
        for a, b in zip(plain[k], guarded[k]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("op", OP_BACKENDS)
def test_guard_arguments_are_checked(op):
    args = make_problem(SHAPES, torch.float32, OPTIMIZERS["sgd"], stash=False)
    with pytest.raises(RuntimeError, match="check_finite=True needs a found_inf"):
        op(*moved(args), check_finite=True)
    with pytest.raises(RuntimeError, match="grad_scale must be a one-element float32"):
        op(*moved(args), grad_scale=torch.tensor([2.0, 2.0]))
    with pytest.raises(RuntimeError, match="found_inf must be a one-element float32"):
        op(*moved(args), found_inf=torch.zeros((), dtype=torch.float64))


# ---- T1T2 ----------------------------------------------------------------------------------------------

def _data(n=96, d=12, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :classes].argmax(1) + (torch.rand(n, generator=g) < 0.1).long()) % classes
    return x, y


def _model(noise=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layers = [t1t2.GaussianNoise(0.1)] if noise else []
    layers += [nn.Linear(12, 32), nn.ReLU()]
    layers += [t1t2.GaussianNoise(0.2)] if noise else []
    layers += [nn.Linear(32, 3)]
    return nn.Sequential(*layers).to(dtype)


def _opt(model, backend="cpp", **kw):
    kw = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "hyper_lr": 0.05, "hyper_every": 2, **kw}
    return t1t2.T1T2(model, [t1t2.L2(1e-3), t1t2.L1(1e-4, per="unit")], backend=backend, **kw)


BACKENDS = backends("reference", "cpp")


def _batches(steps, seed=1):
    x, y = _data(seed=seed)
    return [(x[(16 * i) % 96:(16 * i) % 96 + 16], y[(16 * i) % 96:(16 * i) % 96 + 16]) for i in range(steps)]


def _train(model, opt, batches, val, poison=(), scaler=None, autocast=None, hyper=True):
    """Steps through ``batches``; the batches whose index is in ``poison`` get a NaN input."""
    xv, yv = val
    for i, (x, y) in enumerate(batches):
        if i in poison:
            x = x.clone()
            x[0, 0] = math.nan

        def closure(x=x, y=y):
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                return F.cross_entropy(model(x).float(), y)

        opt.step(closure) if scaler is None else opt.step(closure, scaler=scaler)
        if scaler is not None:
            scaler.update()
        if hyper and opt.hyper_due:
            def val_closure():
                with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                    return F.cross_entropy(model(xv).float(), yv)
            opt.hyper_step(val_closure, scaler=scaler)


def _state(model, opt):
    return [p.detach().clone() for p in model.parameters()], {n: r.detach().clone() for n, r in
                                                             opt.raw_hyperparameters().items()}


def _assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[1].keys() == b[1].keys()
    for n in a[1]:
        assert torch.equal(a[1][n], b[1][n]), n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_a_nan_batch_is_skipped_as_if_it_were_not_there(backend, opt_name):
    """skip_nonfinite="grads": a NaN input makes the loss and gradients NaN; that T1 step is skipped,
    and the run then matches, bit for bit, one that never saw the batch (noise keys and hyper
    schedule included)."""
    batches, val = _batches(9), _data(32, seed=5)
    kw = {"skip_nonfinite": "grads"} if opt_name == "sgd" else {
        "optimizer": "adam", "lr": 0.01, "momentum": 0.0, "skip_nonfinite": "grads"}
    m1 = _model()
    o1 = _opt(m1, backend, **kw)
    _train(m1, o1, batches, val, poison={3})
    m2 = _model()
    o2 = _opt(m2, backend, **kw)
    _train(m2, o2, batches[:3] + batches[4:], val)
    assert o1.skipped == {"t1": 1, "t2": 0} and o2.skipped == {"t1": 0, "t2": 0}
    assert o1.steps == o2.steps == 8 and o1.last_skip is None
    _assert_same(_state(m1, o1), _state(m2, o2))
    assert all(torch.isfinite(p).all() for p in m1.parameters())


def _buffers(opt):
    """Every tensor of the T1 optimizer state and of the hyper-optimizer state, cloned."""
    t1 = {(i, k): v.clone() for i, p in enumerate(opt.params) for k, v in opt.state.get(p, {}).items()
          if isinstance(v, torch.Tensor) and k != "step"}
    t2 = {(n, k): v.clone() for n, st in opt._hyper_state.items() for k, v in st.items()}
    return t1, t2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("noise_hypergrad", ["fd", "exact"])
@pytest.mark.parametrize("scaler", [False, True])
def test_lazy_guard_a_nan_batch_leaves_theta_state_and_lambda_untouched(backend, opt_name, noise_hypergrad, scaler):
    """The default (lazy) guard: the poisoned batch is a stash step (hyper_every=2); its T1 step writes
    nothing (θ, momentum / Adam's moments), the hyper step after it is skipped (λ and the Adam state
    of the hyper-optimizer untouched), no host read tells step() so, the step still counts, and the
    counters say it when read. With a GradScaler (float32, power-of-2 scale) the same."""
    batches, val = _batches(8), _data(32, seed=5)
    kw = {"noise_hypergrad": noise_hypergrad}
    if opt_name == "adam":
        kw.update(optimizer="adam", lr=0.01, momentum=0.0)
    model = _model()
    opt = _opt(model, backend, **kw)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=10 ** 6) if scaler else None
    _train(model, opt, batches[:3], val, scaler=sc)
    before, bufs = _state(model, opt), _buffers(opt)
    _train(model, opt, batches[3:4], val, poison={0}, scaler=sc)
    _assert_same(before, _state(model, opt))
    after = _buffers(opt)
    for part in (0, 1):
        assert bufs[part].keys() == after[part].keys()
        for k in bufs[part]:
            assert torch.equal(bufs[part][k], after[part][k]), k
    assert opt.steps == 4 and opt.hyper_steps == 1 and not opt.hyper_due
    assert opt.skipped == {"t1": 1, "t2": 0} and opt.consecutive_skips["t1"] == 1
    assert opt.last_skip == "T1 step 4: non-finite training loss"  # the loss first, as "grads" does
    _train(model, opt, batches[4:], val, scaler=sc)
    assert opt.steps == 8 and opt.hyper_steps == 3 and opt.last_skip is None
    assert opt.skipped == {"t1": 1, "t2": 0} and opt.consecutive_skips["t1"] == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


@needs_ext
def test_lazy_guard_scans_the_gradients_of_a_step_without_a_loss():
    """step() after the user's own backward has no loss to check: the op scans the gradients (on the
    device, no host read), and a non-finite one skips the step."""
    model = _model(noise=False)
    opt = _opt(model)
    x, y = _data()
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    model[2].weight.grad[1, 0] = math.inf
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.skipped["t1"] == 1 and opt.steps == 1 and "non-finite training gradient" in opt.last_skip


@needs_ext
def test_without_the_guard_a_nan_batch_destroys_the_run():
    """The negative control: the same poisoned run with skip_nonfinite=False ends with NaN weights."""
    batches, val = _batches(6), _data(32, seed=5)
    model = _model()
    opt = _opt(model, skip_nonfinite=False)
    _train(model, opt, batches, val, poison={3}, hyper=False)
    assert not all(torch.isfinite(p).all() for p in model.parameters())


@needs_ext
def test_step_with_the_loss_of_an_earlier_backward_checks_that_loss():
    """``loss.backward(); opt.step(loss=loss)``: the lazy guard checks the loss on the device (no scan),
    so a NaN loss skips the step; the gradients themselves are not scanned then (skip_nonfinite="grads"
    does); through ``scaler.step(opt, loss=loss)`` too."""
    model = _model(noise=False)
    opt = _opt(model)
    x, y = _data()
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(x), y) * math.nan
    loss.backward()
    assert torch.isnan(opt.step(loss=loss))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.skipped["t1"] == 1 and opt.last_skip == "T1 step 1: non-finite training loss"
    opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt, loss=loss)
    assert opt.skipped["t1"] == 1 and opt.last_skip is None
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="step\\(loss=\\) is for a backward run before step"):
        opt.step(lambda: F.cross_entropy(model(x), y), loss=loss)


@needs_ext
def test_nonfinite_gradient_with_a_finite_loss_is_skipped():
    """skip_nonfinite="grads" scans the gradients of every step (the lazy default checks the loss)."""
    model = _model(noise=False)
    opt = _opt(model, skip_nonfinite="grads")
    x, y = _data()
    before = [p.detach().clone() for p in model.parameters()]
    hook = model[2].weight.register_hook(lambda g: g.index_fill(0, torch.tensor([1]), math.inf))
    loss = opt.step(lambda: F.cross_entropy(model(x), y))
    hook.remove()
    assert torch.isfinite(loss) and opt.skipped["t1"] == 1 and opt.steps == 0
    assert "non-finite training gradient" in opt.last_skip
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state or all(not torch.count_nonzero(v) for st in opt.state.values() for v in st.values()
                                if isinstance(v, torch.Tensor) and v.dim())
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert opt.steps == 1 and opt.consecutive_skips["t1"] == 0 and opt.last_skip is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_nonfinite_validation_pass_skips_the_hyper_step(backend, where):
    model = _model()
    opt = _opt(model, backend, hyper_optimizer="adam", hyper_every=1)
    x, y = _data()
    xv, yv = _data(32, seed=5)
    opt.step(lambda: F.cross_entropy(model(x), y))
    opt.hyper_step(lambda: F.cross_entropy(model(xv), yv))  # a good one: the Adam state exists
    raw = {n: r.clone() for n, r in opt.raw_hyperparameters().items()}
    hyper_state = {n: {k: v.clone() for k, v in st.items()} for n, st in opt._hyper_state.items()}
    last = {n: g.clone() for n, g in opt.last_hypergrad.items()}
    opt.step(lambda: F.cross_entropy(model(x), y))
    if where == "loss":
        val = lambda: F.cross_entropy(model(xv), yv) + math.inf
    else:  # finite loss, one NaN entry in v = ∇θC2
        def val():
            out = model(xv)
            out.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), math.nan))
            return F.cross_entropy(out, yv)
    loss = opt.hyper_step(val)
    assert opt.skipped == {"t1": 0, "t2": 1} and opt.hyper_steps == 1
    assert ("validation loss" if where == "loss" else "validation gradient") in opt.last_skip
    assert torch.isfinite(loss) == (where == "gradient")
    for n in raw:
        assert torch.equal(raw[n], opt.raw_hyperparameters()[n])
        assert torch.equal(last[n], opt.last_hypergrad[n])
        for k in hyper_state[n]:
            assert torch.equal(hyper_state[n][k], opt._hyper_state[n][k])


@needs_ext
def test_lazy_consecutive_skips_stop_the_run_at_the_hyper_step():
    """The lazy guard counts on the device; the hyper step's one host read raises NonFiniteError once
    a run of skips reached the limit (a read of the counters in between does not raise, nor lose it)."""
    model = _model()
    opt = _opt(model, max_consecutive_skips=3)
    x, y = _data()
    bad = x.clone()
    bad[0, 0] = math.nan
    val = lambda: F.cross_entropy(model(x), y)
    opt.step(lambda: F.cross_entropy(model(bad), y))
    opt.step(lambda: F.cross_entropy(model(bad), y))
    opt.hyper_step(val)  # its T1 step was skipped: nothing to do; 2 in a row so far
    opt.step(lambda: F.cross_entropy(model(bad), y))
    opt.step(lambda: F.cross_entropy(model(bad), y))
    assert opt.skipped == {"t1": 4, "t2": 0} and opt.consecutive_skips["t1"] == 4
    with pytest.raises(NonFiniteError, match=r"4 consecutive T1 \(training\) steps were skipped.*T1 step 4: "
                                             r"non-finite training loss.*lower the learning rate"):
        opt.hyper_step(val)
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert opt.consecutive_skips["t1"] == 0 and opt.last_skip is None


@needs_ext
def test_consecutive_skips_stop_the_run_with_a_clear_error():
    model = _model()
    opt = _opt(model, max_consecutive_skips=3, skip_nonfinite="grads")
    x, y = _data()
    x = x.clone()
    x[0, 0] = math.nan
    opt.step(lambda: F.cross_entropy(model(x), y))
    opt.step(lambda: F.cross_entropy(model(x), y))
    with pytest.raises(NonFiniteError, match=r"3 consecutive T1 \(training\) steps were skipped.*non-finite training "
                                             r"loss.*lower the learning rate"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    other = _model()
    unlimited = _opt(other, max_consecutive_skips=None, skip_nonfinite="grads")
    for _ in range(30):
        unlimited.step(lambda: F.cross_entropy(other(x), y))
    assert unlimited.skipped["t1"] == 30
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        _opt(_model(), max_consecutive_skips=0)
    with pytest.raises(ValueError, match="skip_nonfinite must be"):
        _opt(_model(), skip_nonfinite="loss")


# ---- GradScaler and autocast ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise_hypergrad", ["fd", "exact"])
def test_a_power_of_two_grad_scaler_changes_no_bit(backend, noise_hypergrad):
    """float32 without autocast: scaling by 2^k and unscaling is exact, so a run through GradScaler
    (T1 unscaled in the fused op, v unscaled in hyper_step, the noise fd's recorded ∇σL and replay
    unscaled) is bit-identical to a plain one. Both ways of using the scaler are exercised."""
    batches, val = _batches(8), _data(32, seed=5)
    plain_model = _model()
    plain = _opt(plain_model, backend, noise_hypergrad=noise_hypergrad)
    _train(plain_model, plain, batches, val)
    for way in ("closure", "scaler.step"):
        model = _model()
        opt = _opt(model, backend, noise_hypergrad=noise_hypergrad)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
        if way == "closure":
            _train(model, opt, batches, val, scaler=scaler)
        else:
            xv, yv = val
            for x, y in batches:
                opt.zero_grad()
                scaler.scale(F.cross_entropy(model(x), y)).backward()
                scaler.step(opt)
                scaler.update()
                if opt.hyper_due:
                    opt.hyper_step(lambda: F.cross_entropy(model(xv), yv),
                                   train=lambda x=x, y=y: F.cross_entropy(model(x), y), scaler=scaler)
        assert opt.skipped == {"t1": 0, "t2": 0}
        _assert_same(_state(plain_model, plain), _state(model, opt))


@needs_ext
@pytest.mark.parametrize("mode", [True, "grads"])
def test_grad_scaler_overflow_skips_steps_and_backs_off(mode):
    """fp16 autocast with an absurd initial scale: the first steps overflow, the scaler's found_inf
    skips them (θ untouched, counted) and halves its scale until the steps go through. The lazy
    guard counts them in ``steps``, "grads" does not."""
    batches, val = _batches(30), _data(32, seed=5)
    model = _model()
    opt = _opt(model, hyper_every=1, skip_nonfinite=mode)
    lazy = mode is True
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    first = [p.detach().clone() for p in model.parameters()]
    x, y = batches[0]

    def closure():
        with torch.autocast("cpu", dtype=torch.float16):
            return F.cross_entropy(model(x).float(), y)

    opt.step(closure, scaler=scaler)
    scaler.update()
    assert opt.skipped["t1"] == 1 and opt.steps == int(lazy) and "GradScaler found Inf/NaN" in opt.last_skip
    assert all(torch.equal(a, b) for a, b in zip(first, model.parameters()))
    assert scaler.get_scale() == 2.0 ** 39
    _train(model, opt, batches, val, scaler=scaler, autocast=torch.float16)
    assert 1 < opt.skipped["t1"] < 31 and opt.steps == (31 if lazy else 31 - opt.skipped["t1"])  # 1 + 30 attempts
    assert scaler.get_scale() < 2.0 ** 30
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(float(torch.as_tensor(v).sum())) for v in opt.hyperparameters().values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("autocast", [torch.float16, torch.bfloat16])
def test_autocast_run_tracks_the_float32_run(backend, autocast):
    """A full run (penalties, noise with the exact hypergradient, T2 every 2 steps) under autocast,
    fp16 with a GradScaler and bf16 without, ends near the float32 run: the validation loss within
    2 %, the noise levels within 5 %, and the penalty hyperparameters' path (log c) off the float32
    one by at most 25 % of how far it moved (measured: < 0.2 % for per-layer L2, 13 % for per-unit
    L1, whose hypergradient follows the sign of small weights that low-precision rounding flips)."""
    batches, val = _batches(20), _data(32, seed=5)
    ref_model = _model()
    ref = _opt(ref_model, backend, noise_hypergrad="exact")
    _train(ref_model, ref, batches, val)
    model = _model()
    opt = _opt(model, backend, noise_hypergrad="exact")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if autocast == torch.float16 else None
    _train(model, opt, batches, val, scaler=scaler, autocast=autocast)
    assert opt.skipped == {"t1": 0, "t2": 0} and opt.hyper_steps == ref.hyper_steps == 10
    xv, yv = val
    with torch.no_grad():
        ref_loss, amp_loss = (float(F.cross_entropy(m(xv), yv)) for m in (ref_model, model))
    assert abs(amp_loss - ref_loss) <= 0.02 * ref_loss
    start = _opt(_model(), backend).hyperparameters()
    for name, value in ref.hyperparameters().items():
        got = torch.as_tensor(opt.hyperparameters()[name])
        if name.startswith("noise"):
            assert abs(float(got) - value) <= 0.05 * max(value, 0.05), name
            continue
        path_ref = torch.as_tensor(value).log() - torch.as_tensor(start[name]).log()
        assert (got.log() - torch.as_tensor(value).log()).norm() <= 0.25 * path_ref.norm(), name
    for g in opt.last_hypergrad.values():
        assert g.dtype == torch.float32  # hypergradients in float32 whatever autocast computed in


@needs_ext
def test_fd_noise_hypergradient_under_bf16_autocast_warns():
    """The default fd differences two bf16 passes: rounding dominates (measured: the noise level
    doubles where the float32 run keeps it), so the user is told to use 'exact' or a larger fd_eps."""
    model = _model()
    opt = _opt(model)
    with pytest.warns(RuntimeWarning, match="noise_hypergrad='fd' differences two forward/backward passes that run "
                                            "in torch.bfloat16"):
        _train(model, opt, _batches(2), _data(32, seed=5), autocast=torch.bfloat16)
    quiet = _opt(_model())
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(quiet._model, quiet, _batches(2), _data(32, seed=5))  # float32: no warning


def test_grad_scaler_misuse_is_refused():
    model = _model()
    opt = _opt(model, "reference")
    x, y = _data()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))  # a scaler in use (its scale exists)
    with pytest.raises(ValueError, match="needs the training closure"):
        opt.step(scaler=scaler)
    with pytest.raises(RuntimeError, match="Closure use is not currently supported|cannot scale the closure"):
        scaler.step(opt, lambda: F.cross_entropy(model(x), y))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_full_run_in_low_precision_parameters(backend, dtype):
    """bf16/fp16 parameters (float32 math in the kernels, state and hypergradients in float32):
    a run with penalties and noise trains, stays finite and moves the hyperparameters. "Trains" is
    the model's fit, measured without noise before and after: with hyper_every=1 the noise levels
    climb (to 0.3-0.9 here, in every noise_hypergrad mode), so a loss drawn with noise measures them."""
    x, y = _data(seed=1)
    xv, yv = _data(32, seed=5)
    model = _model(dtype=dtype)
    opt = _opt(model, backend, hyper_every=1)
    start = opt.hyperparameters()

    def clean_loss():
        with torch.no_grad(), t1t2.no_noise():
            return float(F.cross_entropy(model(x.to(dtype)).float(), y))

    first = clean_loss()
    for i in range(60):
        b = slice((16 * i) % 96, (16 * i) % 96 + 16)
        opt.step(lambda: F.cross_entropy(model(x[b].to(dtype)).float(), y[b]))
        opt.hyper_step(lambda: F.cross_entropy(model(xv.to(dtype)).float(), yv))
    last = clean_loss()
    assert opt.skipped == {"t1": 0, "t2": 0}
    assert last < 0.8 * first
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
    assert all(st["momentum_buffer"].dtype == torch.float32 for st in opt.state.values())
    changed = [n for n, v in opt.hyperparameters().items() if not torch.equal(torch.as_tensor(v),
                                                                              torch.as_tensor(start[n]))]
    assert len(changed) == len(start)


# ---- bounds ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_bounds_are_never_left_and_clipping_is_counted(backend):
    """A huge hyper_lr pushes every hyperparameter against its bounds: the values stay inside (natural
    scale, every transform), and each hyper step that had to clip is counted."""
    batches, val = _batches(12), _data(32, seed=5)
    model = _model()
    opt = t1t2.T1T2(model, [t1t2.L2(1e-3), t1t2.L1(1e-4, per="unit", transform="softplus")], backend=backend,
                    lr=0.1, hyper_optimizer="sgd", hyper_lr=1e4, hyper_every=1,
                    bounds={"l2.*": (9e-4, 1.1e-3), "noise.*": (0.05, 0.3)})
    opt.set_bounds("l1.*", 9.9e-5, 1.01e-4)  # tight around the start: any move clips
    bounds = opt.bounds()
    assert bounds["l2.1.weight"] == (9e-4, 1.1e-3) and bounds["noise.0"] == (0.05, 0.3)
    assert model[0].bounds == (0.05, 0.3)  # the module's own projection uses the same bounds
    _train(model, opt, batches, val)
    for name, value in opt.hyperparameters().items():
        lo, hi = bounds[name]
        v = torch.as_tensor(value, dtype=torch.float64)
        assert (v >= lo * (1 - 1e-6)).all() and (v <= hi * (1 + 1e-6)).all(), (name, value)
        assert ((v - lo).abs() <= 1e-6 * lo).any() or ((v - hi).abs() <= 1e-6 * hi).any(), (name, value)
        assert 1 <= opt.clipped[name] <= opt.hyper_steps == 12, name


def test_clipping_is_not_counted_inside_the_bounds():
    model = _model()
    opt = _opt(model, "reference", hyper_lr=1e-6, hyper_every=1, bounds={"*": (0.0, 10.0)})
    _train(model, opt, _batches(4), _data(32, seed=5))
    assert opt.hyper_steps == 4 and sum(opt.clipped.values()) == 0


def test_bad_bounds_are_refused():
    opt = _opt(_model(), "reference")
    with pytest.raises(ValueError, match="matches no hyperparameter"):
        opt.set_bounds("dropout.*", 0, 1)
    with pytest.raises(ValueError, match="lo <= hi"):
        opt.set_bounds("l2.*", 1.0, 0.5)


def test_state_dict_carries_the_counters():
    model = _model()
    opt = _opt(model, "reference", hyper_every=1, hyper_lr=1e4, hyper_optimizer="sgd",
               bounds={"noise.*": (0.05, 0.3)})
    x, y = _data()
    bad = x.clone()
    bad[0, 0] = math.nan
    opt.step(lambda: F.cross_entropy(model(bad), y))
    _train(model, opt, _batches(3), _data(32, seed=5))
    sd = opt.state_dict()
    other = _opt(_model(), "reference", hyper_every=1, hyper_optimizer="sgd")
    other.load_state_dict(sd)
    assert other.skipped == opt.skipped == {"t1": 1, "t2": 0}
    assert other.clipped == opt.clipped and sum(opt.clipped.values()) > 0
    assert other.consecutive_skips == opt.consecutive_skips
