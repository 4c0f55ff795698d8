"""Parity of the fused T1 step (torch.ops.t1t2.t1_step_) with its reference twin."""
import pytest
import torch

from t1t2_fast import _extension, reference

if not _extension.AVAILABLE:
    pytest.skip(f"compiled extension not built ({_extension.LOAD_ERROR})", allow_module_level=True)

from t1t2_fast import ops  # noqa: E402
from problems import MUTATED, OPTIMIZERS, make_problem  # noqa: E402

# float64: the fused and reference results agree to rounding. Lower precision, as in STYLE.md: the
# fused error against a float64 run of the reference may be at most twice the error of the
# reference itself run in that precision (plus a few ulps of the result's scale), since both
# compute in float32 and differ only in operation order.
FLOAT64_TOL = dict(atol=1e-13, rtol=1e-12)
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
def clone_args(args):
    return [[t.clone() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) else a
            for a in args]


def upcast(args):
    return [[t.double() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) else a
            for a in args]


def assert_parity(args, dtype):
    ours, theirs = clone_args(args), clone_args(args)
    ops.t1_step_(*ours)
    reference.t1_step_(*theirs)
    if dtype == torch.float64:
        for k in MUTATED:
            for a, b in zip(ours[k], theirs[k]):
                torch.testing.assert_close(a, b, **FLOAT64_TOL)
        return
    gold = upcast(args)
    reference.t1_step_(*gold)
    for k in MUTATED:
        for i, (a, b, want) in enumerate(zip(ours[k], theirs[k], gold[k])):
            if want.numel() == 0:
                continue
            err_ours = (a.double() - want).abs().max().item()
            err_ref = (b.double() - want).abs().max().item()
            ulps = 4 * torch.finfo(a.dtype).eps * want.abs().max().item()
            assert err_ours <= 2 * err_ref + ulps, (k, i, err_ours, err_ref)


SHAPES = [(), (1,), (7,), (1023,), (1025,), (65537,), (33, 31)]


@pytest.mark.parametrize("stash", [False, True])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype, opt_name, stash):
    shapes = [s for s in SHAPES if s != ()] + [(0,), (4, 0)]
    assert_parity(make_problem(shapes, dtype, OPTIMIZERS[opt_name], stash), dtype)


@pytest.mark.parametrize("l2, l1, decay", [(None, None, None), ("layer", None, None), (None, "element", None),
                                           (None, None, "unit"), ("unit", "layer", "layer")])
def test_penalty_granularities(l2, l1, decay):
    for opt in OPTIMIZERS.values():
        assert_parity(make_problem([(16, 9), (9,), (3, 4, 5)], torch.float64, opt, True, l2=l2, l1=l1,
                                   decay=decay), torch.float64)


def test_hundreds_of_small_tensors_in_one_call():
    g = torch.Generator().manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(1, 300, (500,), generator=g)]
    for opt in ("momentum", "adam"):
        assert_parity(make_problem(shapes, torch.float32, OPTIMIZERS[opt], True, seed=4), torch.float32)


def test_deterministic_for_any_thread_count():
    args = make_problem([(300_001,), (1000, 70)], torch.float32, OPTIMIZERS["adam"], True)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            a = clone_args(args)
            ops.t1_step_(*a)
            results.append(a)
    finally:
        torch.set_num_threads(before)
    for k in (0, 2, 3, 7, 8):
        assert all(torch.equal(x, y) for x, y in zip(results[0][k], results[1][k]))


def test_opcheck():
    for opt in OPTIMIZERS.values():
        args = make_problem([(7, 3), (5,)], torch.float32, opt, True)
        torch.library.opcheck(torch.ops.t1t2.t1_step_.default, tuple(args),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.__setitem__(0, [a[0][0].t(), *a[0][1:]]), "must be contiguous"),
    (lambda a: a.__setitem__(1, a[1][:-1]), "but 1 grads"),
    (lambda a: a.__setitem__(2, [a[2][0].double(), *a[2][1:]]), r"state1\[0\] has dtype Double, expected Float"),
    (lambda a: a.__setitem__(4, [torch.ones(5), torch.ones(2)]), r"l2\[0\] has 5 coefficients"),
    (lambda a: a.__setitem__(9, "rmsprop"), "unknown optimizer 'rmsprop'"),
])
def test_clear_errors(mutate, match):
    args = make_problem([(4, 3), (3,)], torch.float32, OPTIMIZERS["momentum"], False)
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        ops.t1_step_(*args)
