"""Arguments of one t1_step_ call (the schema in csrc/ops.cpp) and the T1-step parity check, shared by
the op, reliability, fuzz and CPU-capability tests. No skips and no conftest import here, so any test
module, and a subprocess with tests/support on its path, can import it."""
import torch

from t1t2_fast import reference

MUTATED = (0, 2, 3, 7, 8)  # the in-place arguments: params, state1, state2, stash_theta, stash_jac
OPTIMIZERS = {
    "sgd": dict(optimizer="sgd", momentum=0.0, nesterov=False),
    "momentum": dict(optimizer="sgd", momentum=0.9, nesterov=False),
    "nesterov": dict(optimizer="sgd", momentum=0.9, nesterov=True),
    "adam": dict(optimizer="adam", momentum=0.0, nesterov=False),
}


def coefficient(numel, rows, granularity, acc, g):
    if granularity is None or numel == 0:
        return torch.empty(0, dtype=acc)
    groups = {"layer": 1, "unit": rows, "element": numel}[granularity]
    return (torch.rand(groups, generator=g, dtype=torch.float64) * 0.1).to(acc)


def make_problem(shapes, dtype, opt, stash, seed=0, l2="layer", l1="unit", decay="element"):
    """CPU arguments of one t1_step_ call."""
    g = torch.Generator().manual_seed(seed)
    acc = reference.accumulate_dtype(dtype)
    randn = lambda shape, dt: torch.randn(shape, generator=g, dtype=torch.float64).to(dt)
    params = [randn(s, dtype) for s in shapes]
    grads = [randn(s, dtype) for s in shapes]
    rows = [s[0] if len(s) else 1 for s in shapes]
    state1 = state2 = []
    if opt["optimizer"] == "adam":
        state1 = [randn(s, acc) * 0.1 for s in shapes]
        state2 = [randn(s, acc).abs() * 0.01 for s in shapes]
    elif opt["momentum"] > 0:
        state1 = [randn(s, acc) for s in shapes]
    coefs = [[coefficient(p.numel(), r, gran, acc, g) for p, r in zip(params, rows)] for gran in (l2, l1, decay)]
    stash_theta = [torch.empty(s, dtype=acc) for s in shapes] if stash else []
    stash_jac = [torch.empty(s, dtype=acc) for s in shapes] if stash and opt["optimizer"] == "adam" else []
    n = len(shapes)
    bc1 = [1 - 0.9 ** (3 + k % 5) for k in range(n)] if opt["optimizer"] == "adam" else []
    bc2 = [1 - 0.999 ** (3 + k % 5) for k in range(n)] if opt["optimizer"] == "adam" else []
    return [params, grads, state1, state2, *coefs, stash_theta, stash_jac, opt["optimizer"], 0.05,
            opt["momentum"], opt["nesterov"], 0.9, 0.999, 1e-8, bc1, bc2]


def is_tensor_list(a):
    return isinstance(a, list) and a and isinstance(a[0], torch.Tensor)


def moved(args, device=None, dtype=None):
    """Copies of the tensor arguments (on device, in dtype): t1_step_ updates its arguments in place."""
    return [[t.to(device=device or t.device, dtype=dtype or t.dtype, copy=True) for t in a] if is_tensor_list(a)
            else a for a in args]


def assert_t1_parity(fused, args, dtype, device="cpu", baseline=reference.t1_step_, compute_ulps=4, float64_tol=None,
                     lr_scale=None):
    """Run ``fused`` on copies of args (on device) and check every in-place result against ``baseline``
    (the reference, or another fused op) run on CPU in the same dtype. float64 with ``float64_tol``
    (the tolerance table's entry, conftest.TOL["t1_step"]): equal to rounding, assert_close. Lower
    precision, and float64 without ``float64_tol``, as in the project's error-bound rule: the error of
    ``fused`` against a float64 run of the reference may be at most twice the baseline's own error,
    plus a few ulps of the result's scale (compute_ulps for the float32/float64 state and stash, where
    a GPU kernel contracts into FMA; 4 for bfloat16/float16 storage, which only sees rounding flips).
    The stash must hold the pre-step θ exactly. ``lr_scale`` (in the compute dtype of ``dtype``) goes to
    every run, as float64 to the float64 one. Returns the fused results."""
    scale = lambda dev=None, dt=None: {} if lr_scale is None else {  # noqa: E731
        "lr_scale": lr_scale.to(device=dev or lr_scale.device, dtype=dt or lr_scale.dtype)}
    ours = moved(args, device)
    fused(*ours, **scale(device))
    for before, stashed in zip(args[0], ours[7]):
        assert torch.equal(stashed.cpu(), before.to(stashed.dtype))
    same = moved(args)
    baseline(*same, **scale())
    if dtype == torch.float64 and float64_tol is not None:
        for k in MUTATED:
            for a, b in zip(ours[k], same[k]):
                torch.testing.assert_close(a.cpu(), b, **float64_tol)
        return ours
    gold = moved(args, dtype=torch.float64)
    reference.t1_step_(*gold, **scale(dt=torch.float64))
    for k in MUTATED:
        for i, (a, b, want) in enumerate(zip(ours[k], same[k], gold[k])):
            if want.numel() == 0:
                continue
            err_ours = (a.cpu().double() - want).abs().max().item()
            err_base = (b.double() - want).abs().max().item()
            ulps = compute_ulps if a.dtype in (torch.float32, torch.float64) else 4
            bound = 2 * err_base + ulps * torch.finfo(a.dtype).eps * want.abs().max().item()
            assert err_ours <= bound, (k, i, err_ours, err_base, bound)
    return ours
