"""The learning-rate-scale arguments of the fused ops against their reference twins, every backend
(torch.ops.t1t2 on CPU and CUDA, torch.ops.t1t2_triton) and dtype: t1_step_'s ``lr_scale`` (tensor
i steps with T(lr)·lr_scale[i], adam's stashed J with it) and penalty_hypergrad's segment kind 3
("lr": Σ v·(θ⁺ − θ), θ⁺ from ``params``)."""
import pytest
import torch

from t1t2_fast import ops, reference

from conftest import CAN_TRITON, DTYPES, HAS_EXT, HAS_GPU, T1_COMPUTE_ULPS, TOL, dtype_id, op_backends, op_namespace
from problems import MUTATED, OPTIMIZERS, assert_t1_parity, make_problem, moved

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

IMPLS = op_backends("cpp", "triton")
SHAPES = [(1,), (7,), (1025,), (33, 31), (0,)]
TRITON_SHAPES = SHAPES[:3]


def shapes_of(impl):
    return TRITON_SHAPES if impl[0] == "triton" else SHAPES


def scales(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    compute = reference.accumulate_dtype(dtype)
    return (0.3 + 1.5 * torch.rand(n, generator=g, dtype=torch.float64)).to(compute)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_t1_step_with_lr_scale_matches_reference(impl, dtype, opt_name):
    """θ, the optimizer state and the stash (adam's J with the scaled lr) within the bounds of the
    plain op's parity test, one scale per tensor."""
    shapes = shapes_of(impl)
    args = make_problem(shapes, dtype, OPTIMIZERS[opt_name], True, seed=3)
    cuda_op = impl == ("cpp", "cuda")
    assert_t1_parity(op_namespace(impl[0]).t1_step_, args, dtype, impl[1], compute_ulps=T1_COMPUTE_ULPS[impl[1]],
                     float64_tol=None if cuda_op else TOL["t1_step"][torch.float64],
                     lr_scale=scales(len(shapes), dtype))


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_lr_scale_is_the_product_rounded_once(backend):
    """The rounding rule: tensor i steps exactly as the same op with lr' = T(lr)·s_i (a float that T
    represents exactly) and no lr_scale; float32, plain SGD, so the product is the only difference."""
    impl = {"reference": None, "cpp": ("cpp", "cpu"), "triton": ("triton", "cuda" if HAS_GPU else "cpu")}[backend]
    if (backend == "cpp" and not HAS_EXT) or (backend == "triton" and not CAN_TRITON):
        pytest.skip(f"{backend} cannot run here")
    op = reference.t1_step_ if impl is None else op_namespace(impl[0]).t1_step_
    dtype = torch.float32
    args = moved(make_problem([(1025,), (7,)], dtype, OPTIMIZERS["sgd"], False, seed=4),
                 None if impl is None else impl[1])
    s = scales(2, dtype, seed=5).to(args[0][0].device)
    ours = moved(args)
    op(*ours, lr_scale=s)
    for i in range(2):
        lr_i = float(torch.tensor(args[10], dtype=dtype) * s[i])  # T(lr)·s rounded in float32
        one = moved([[args[0][i]], [args[1][i]], [], [], [args[4][i]], [args[5][i]], [args[6][i]], [], [],
                     *args[9:]])
        one[10] = lr_i
        op(*one)
        assert torch.equal(ours[0][i], one[0][0]), i


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_unit_lr_scale_is_bit_identical_to_none(impl, dtype, opt_name):
    """lr_scale of ones changes no bit: T(lr)·1 = T(lr)."""
    shapes = shapes_of(impl)
    args = moved(make_problem(shapes, dtype, OPTIMIZERS[opt_name], True, seed=6), impl[1])
    op = op_namespace(impl[0]).t1_step_
    a, b = moved(args), moved(args)
    op(*a)
    op(*b, lr_scale=torch.ones(len(shapes), dtype=reference.accumulate_dtype(dtype), device=impl[1]))
    for k in MUTATED:
        for x, y in zip(a[k], b[k]):
            assert torch.equal(x, y), k


# ---- penalty_hypergrad's lr kind ----------------------------------------------------------------

def lr_args(impl, shapes, compute, param_dtype, seed=0, with_others=True):
    """Segments of every kind (lr at groups 1 and rows), params = θ⁺ = θ + a small step in param_dtype."""
    g = torch.Generator().manual_seed(seed)
    device = impl[1]
    randn = lambda s: torch.randn(s, generator=g, dtype=torch.float64)  # noqa: E731
    theta = [randn(s).to(param_dtype).to(compute).to(device) for s in shapes]  # θ: a value params can hold
    v = [randn(s).to(compute).to(device) for s in shapes]
    params = [(th.double().cpu() - 0.05 * randn(s)).to(param_dtype).to(device) for th, s in zip(theta, shapes)]
    seg_tensor, seg_kind, seg_groups = [], [], []
    for t, s in enumerate(shapes):
        numel = torch.Size(s).numel()
        for groups in ([0] if numel == 0 else sorted({1, s[0]})):
            for kind in ((0, 2, 3) if with_others else (3,)):
                seg_tensor.append(t)
                seg_kind.append(kind)
                seg_groups.append(groups)
    jac_scalar = [-0.05] * len(shapes)
    return [v, theta, [], jac_scalar, seg_tensor, seg_kind, seg_groups, 0.05, params]


def exact_lr_sums(args):
    """float64 sums of the kernels' lr terms v·(T(θ⁺) − θ), the difference rounded in the compute dtype."""
    v, theta, _, _, seg_tensor, seg_kind, seg_groups, _, params = [
        [t.cpu() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) else a for a in args]
    out = []
    for t, kind, groups in zip(seg_tensor, seg_kind, seg_groups):
        if kind != 3:
            continue
        step = params[t].to(theta[t].dtype) - theta[t]
        terms = (v[t].double() * step.double()).reshape(groups, -1) if groups else torch.zeros(0, 1)
        out.append(terms.sum(dim=1))
    return torch.cat(out)


PARAM_DTYPES = [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                (torch.float32, torch.float16)]


@pytest.mark.parametrize("compute, param_dtype", PARAM_DTYPES, ids=lambda d: dtype_id(d))
@pytest.mark.parametrize("impl", IMPLS)
def test_penalty_hypergrad_lr_kind_matches_reference(impl, compute, param_dtype):
    shapes = [(7,), (5, 3)] if impl[0] == "triton" else [(7,), (5, 3), (3, 40000), (0,)]
    args = lr_args(impl, shapes, compute, param_dtype)
    got = op_namespace(impl[0]).penalty_hypergrad(*args)
    cpu = [[t.cpu() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) else a for a in args]
    want = reference.penalty_hypergrad(*cpu)
    assert got.dtype == compute and got.shape == want.shape
    torch.testing.assert_close(got.cpu(), want, **TOL["hypergrad"][compute])
    # the lr segments to one rounding of the float64 sum of the same terms
    lr_at = torch.tensor([k == 3 for k, gr in zip(args[5], args[6]) for _ in range(gr)], dtype=torch.bool)
    exact = exact_lr_sums(args)
    torch.testing.assert_close(got.cpu()[lr_at].double(), exact, rtol=TOL["exact_sum_rtol"][compute] or 1e-13,
                               atol=1e-12)
    assert bool((exact != 0).any())


@pytest.mark.parametrize("impl", IMPLS)
def test_lr_kind_needs_params(impl):
    args = lr_args(impl, [(7,)], torch.float32, torch.float32, with_others=False)
    args[8] = []
    with pytest.raises(RuntimeError, match="need params"):
        op_namespace(impl[0]).penalty_hypergrad(*args)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_lr_scale_is_refused(impl):
    args = moved(make_problem([(7,), (3,)], torch.float32, OPTIMIZERS["sgd"], False), impl[1])
    op = op_namespace(impl[0]).t1_step_
    before = [p.clone() for p in args[0]]
    for bad, match in ((torch.ones(3), "one value per parameter"), (torch.ones(2, dtype=torch.float64), "dtype")):
        with pytest.raises(RuntimeError, match=match):
            op(*args, lr_scale=bad.to(impl[1]))
    assert all(torch.equal(a, b) for a, b in zip(args[0], before))


def test_ops_wrapper_passes_lr_scale():
    """t1t2_fast.ops.t1_step_ forwards lr_scale to the compiled op (the path T1T2 takes)."""
    pytest.importorskip("t1t2_fast._C")
    args = make_problem([(7,)], torch.float64, OPTIMIZERS["sgd"], False)
    a, b = moved(args), moved(args)
    ops.t1_step_(*a, lr_scale=torch.tensor([0.5], dtype=torch.float64))
    reference.t1_step_(*b, lr_scale=torch.tensor([0.5], dtype=torch.float64))
    torch.testing.assert_close(a[0][0], b[0][0], rtol=1e-15, atol=0)
    assert not torch.equal(a[0][0], moved(args)[0][0])


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    """Schema, fake impl (shape and the lr_scale / params checks) and, for Triton, the autograd
    registration, with the new arguments given."""
    utils = ("test_schema", "test_faketensor") + (("test_autograd_registration",) if impl[0] == "triton" else ())
    for compute, param_dtype in ((torch.float64, torch.float64), (torch.float32, torch.bfloat16)):
        args = lr_args(impl, [(7, 3), (5,)], compute, param_dtype)
        torch.library.opcheck(op_namespace(impl[0]).penalty_hypergrad.default, tuple(args), test_utils=utils)
    for opt in OPTIMIZERS.values():
        args = moved(make_problem([(7, 3), (5,)], torch.float32, opt, True), impl[1])
        torch.library.opcheck(op_namespace(impl[0]).t1_step_.default, tuple(args),
                              {"lr_scale": scales(2, torch.float32).to(impl[1])}, test_utils=utils)
