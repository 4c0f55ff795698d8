"""Arguments of one t1_step_ call (the schema in csrc/ops.cpp), shared by the CPU, CUDA and
CPU-capability tests. No skips here, so any test module can import it."""
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
