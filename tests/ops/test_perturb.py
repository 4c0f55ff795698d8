"""The multi-tensor perturb / restore ops against their reference twins; restore is bit-exact."""
import pytest
import torch

from t1t2_fast import _extension, reference

if not _extension.AVAILABLE:
    pytest.skip(f"compiled extension not built ({_extension.LOAD_ERROR})", allow_module_level=True)

from t1t2_fast import ops  # noqa: E402

SHAPES = [(0,), (1,), (7,), (1023,), (1025,), (65537,), (33, 31)]


def make(dtype, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = reference.accumulate_dtype(dtype)
    randn = lambda s, dt: torch.randn(s, generator=g, dtype=torch.float64).to(dt)
    params = [randn(s, dtype) for s in shapes]
    return params, [torch.empty_like(p) for p in params], [randn(s, acc) for s in shapes], [randn(s, acc) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_perturb_matches_reference_and_restore_is_exact(dtype):
    params, save, base, direction = make(dtype)
    original = [p.clone() for p in params]
    ours = [p.clone() for p in params]
    ops.perturb_(ours, save, base, direction, 1e-3)
    reference.perturb_(params, [], base, direction, 1e-3)
    for a, b in zip(ours, params):
        # both compute base + r·d in the compute dtype and round once to the storage dtype
        torch.testing.assert_close(a, b, atol=0, rtol=torch.finfo(dtype).eps if dtype != torch.float64 else 1e-15)
    assert all(torch.equal(s, o) for s, o in zip(save, original))
    ops.restore_(ours, save)
    assert all(torch.equal(a, o) for a, o in zip(ours, original))


def test_hundreds_of_small_tensors_and_no_save():
    g = torch.Generator().manual_seed(1)
    shapes = [(int(n),) for n in torch.randint(1, 100, (500,), generator=g)]
    params, _, base, direction = make(torch.float32, shapes)
    ours = [p.clone() for p in params]
    ops.perturb_(ours, [], base, direction, -0.5)
    reference.perturb_(params, [], base, direction, -0.5)
    assert all(torch.equal(a, b) for a, b in zip(ours, params))


def test_opcheck():
    params, save, base, direction = make(torch.float32, [(7, 3), (5,)])
    torch.library.opcheck(torch.ops.t1t2.perturb_.default, (params, save, base, direction, 0.25))
    torch.library.opcheck(torch.ops.t1t2.restore_.default, (params, save))


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.__setitem__(2, a[2][:-1]), "base and"),
    (lambda a: a.__setitem__(2, [a[2][0].double(), a[2][1]]), r"base\[0\] has dtype Double, expected Float"),
    (lambda a: a.__setitem__(0, [a[0][0].t(), a[0][1]]), "must be contiguous"),
    (lambda a: a.__setitem__(1, [a[1][0][:2], a[1][1]]), r"save\[0\] has shape"),
])
def test_clear_errors(mutate, match):
    args = list(make(torch.float32, [(4, 3), (3,)])) + [0.1]
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        ops.perturb_(*args)
