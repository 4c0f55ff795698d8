"""What only the Triton noise ops (t1t2_fast/triton_kernels/noise.py) have: the generator as a Triton
device function against its PyTorch twin, autograd and double backward through the triton_op,
torch.compile, tracing and PTX compilation without the interpreter, the σ-reduction plan. Their
parity with the twins and the C++ ops, need flags, determinism, opcheck and errors are in
test_noise_ops.py, parametrized over the backends. Without a GPU the kernels run
on CPU tensors under TRITON_INTERPRET=1 (sizes kept small: the interpreter is slow)."""
import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install t1t2_fast[triton])")

import triton.language as tl  # noqa: E402

from t1t2_fast import reference, rng  # noqa: E402
from t1t2_fast.triton_kernels import noise  # noqa: E402
from t1t2_fast.triton_kernels.noise import _randn  # noqa: E402
from conftest import TRITON_DEVICE as DEVICE, needs_triton  # noqa: E402
from runner import run_without_interpreter  # noqa: E402

pytestmark = needs_triton
T = torch.ops.t1t2_triton
MODES = ["additive", "multiplicative"]
SEEDS = [0, 1, 12345, 2**32 - 1, 2**32 + 7, 2**63 - 1, -1, -(2**63), rng.noise_key(3, 1, 4)]


def layout(shape, per):
    if per == "layer":
        return 1, 1
    return shape[1], torch.Size(shape[2:]).numel()


def make(shape, per, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    channels, inner = layout(shape, per)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    grad_y = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    sigma = (torch.rand(channels, generator=g, dtype=torch.float64) + 0.1).to(reference.accumulate_dtype(dtype))
    return x.to(DEVICE), grad_y.to(DEVICE), sigma.to(DEVICE), channels, inner


@triton.jit
def _draw(offsets_ptr, out_ptr, key, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    offsets = tl.load(offsets_ptr + i, mask=i < n, other=0)
    tl.store(out_ptr + i, _randn(key, offsets), mask=i < n)


def test_eps_is_the_generator_twin_bit_for_bit():
    """x = 0, σ = 1, additive: the op returns ε; philox.h's words, uniforms, log, cos and sqrt are
    reproduced exactly (max |difference| = 0 for every seed). Offsets past 32 bits (Philox's second
    counter word) through the device function itself."""
    n = 3000
    for seed in SEEDS:
        eps = T.gaussian_noise(torch.zeros(n, device=DEVICE), torch.ones(1, device=DEVICE), seed, 1, 1, "additive")
        assert torch.equal(eps.cpu(), rng.philox_randn(seed, torch.arange(n))), seed
    g = torch.Generator().manual_seed(0)
    offsets = torch.cat([torch.arange(2**32 - 100, 2**32 + 100), torch.tensor([2**63 - 1]),
                         torch.randint(0, 2**63 - 1, (300,), generator=g)])
    for seed in SEEDS[::2]:
        out = torch.empty(offsets.numel(), device=DEVICE)
        _draw[(1,)](offsets.to(DEVICE), out, seed, offsets.numel(), BLOCK=512)
        assert torch.equal(out.cpu(), rng.philox_randn(seed, offsets)), seed


def stored_eps(x, sigma, key, channels, inner, mode):
    """y with ε materialized: what plain autograd differentiates."""
    eps = rng.philox_randn(key, torch.arange(x.numel())).to(x.device, x.dtype).reshape(-1, channels, inner)
    s, xr = sigma.reshape(1, channels, 1), x.reshape(eps.shape)
    return (xr + s * eps if mode == "additive" else xr * (1 + s * eps)).reshape(x.shape)


@pytest.mark.parametrize("mode", MODES)
def test_autograd_and_double_backward_match_stored_eps(mode):
    x, _, sigma, channels, inner = make((6, 4, 5), "unit", torch.float64, seed=6)
    w = torch.randn(x.shape, dtype=torch.float64, device=DEVICE)
    v = torch.randn(channels, dtype=torch.float64, device=DEVICE)

    def grads(fn, create_graph):
        xl, sl = x.clone().requires_grad_(), sigma.clone().requires_grad_()
        gx, gs = torch.autograd.grad((torch.tanh(fn(xl * 1.5, sl)) * w).sum(), (xl, sl), create_graph=create_graph)
        if not create_graph:
            return gx, gs
        return torch.autograd.grad((gs * v).sum() + (gx * w).sum(), (xl, sl))

    ours = lambda xi, s: T.gaussian_noise(xi, s, 1234, channels, inner, mode)  # noqa: E731
    want = lambda xi, s: stored_eps(xi, s, 1234, channels, inner, mode)  # noqa: E731
    for create_graph in (False, True):
        for a, b in zip(grads(ours, create_graph), grads(want, create_graph)):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_compiled_call_gives_the_eager_values():
    """torch.compile decomposes the triton_ops (the Triton kernels on a GPU, the reference's torch
    ops under the interpreter): the same values."""
    x, grad_y, sigma, channels, inner = make((4, 3, 5), "unit", torch.float32)
    fwd = torch.compile(lambda *a: T.gaussian_noise(*a), backend="aot_eager", fullgraph=True)
    assert torch.equal(fwd(x, sigma, 5, channels, inner, "multiplicative"),
                       T.gaussian_noise(x, sigma, 5, channels, inner, "multiplicative"))
    bwd = torch.compile(lambda *a: T.gaussian_noise_backward(*a), backend="aot_eager", fullgraph=True)
    for a, b in zip(bwd(grad_y, x, sigma, 5, channels, inner, "multiplicative", True, True),
                    T.gaussian_noise_backward(grad_y, x, sigma, 5, channels, inner, "multiplicative", True, True)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


TRACE_PROBE = r"""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from torch.fx.experimental.proxy_tensor import make_fx
from t1t2_fast.triton_kernels import noise
assert not noise.INTERPRET
T = torch.ops.t1t2_triton

def f(x, s, g):
    y = T.gaussian_noise(x, s, 5, 3, 2, "multiplicative")
    return y, *T.gaussian_noise_backward(g, x, s, 5, 3, 2, "multiplicative", True, True)

with FakeTensorMode(allow_non_fake_inputs=True):
    args = [torch.empty(4, 3, 2, device="cuda"), torch.empty(3, device="cuda"), torch.empty(4, 3, 2, device="cuda")]
code = make_fx(dispatch_functionalize(f), tracing_mode="fake")(*args).code
print(code.count("triton_kernel_wrapper_functional("), code.count("'enable_fp_fusion': False"))
"""


def test_traced_call_records_the_triton_kernels():
    """Without the interpreter (fake CUDA tensors, no GPU needed) the functional decomposition that
    torch.compile runs records the kernels: the forward, and the two ∂L/∂σ stages, with the launch
    option that keeps the GPU from fusing multiply-adds."""
    assert run_without_interpreter(TRACE_PROBE).split()[-2:] == ["3", "3"]


COMPILE_PROBE = r"""
import re
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from t1t2_fast.triton_kernels import noise
assert not noise.INTERPRET

def ptx(fn, signature, constexprs):
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=noise.NO_FMA).asm["ptx"]

ints = lambda *names: {n: "i32" for n in names}
for ct, io, bf16 in (("fp32", "fp32", False), ("fp32", "i16", True), ("fp64", "fp64", False)):
    tct = getattr(tl, {"fp32": "float32", "fp64": "float64"}[ct])
    apply = ptx(noise._noise_apply, dict(src="*" + io, sigma="*" + ct, dst="*" + io, key="i64",
                                        **ints("numel", "channels", "inner", "size_key")),
                dict(MULTIPLICATIVE=True, CT=tct, BF16=bf16, BLOCK=1024))
    stage1 = ptx(noise._sigma_stage1, dict(g_ptr="*" + io, x_ptr="*" + io, sigma="*" + ct, gx_ptr="*" + io,
                                          part_ptr="*fp64", key="i64", **ints("rows", "channels", "inner",
                                          "rows_per_program", "channel_blocks", "size_key")),
                 dict(MULTIPLICATIVE=True, FUSED_X_GRAD=True, CT=tct, BF16=bf16, RR=4, CH=8, IC=32))
    for code in (apply, stage1):
        assert not re.search(r"\bfma\.", code) and "sqrt.approx" not in code, ct
        assert "div.rn.f64" in code and "sqrt.rn.f32" in code, ct
ptx(noise._sigma_stage2, dict(part_ptr="*fp64", out_ptr="*fp32", **ints("row_blocks", "channels")), dict(RB=1, CB=1024))
print("compiled")
"""


def test_kernels_compile_for_sm90_without_fma():
    """Triton's frontend and the NVIDIA backend (no GPU needed) accept every noise kernel, and the
    PTX does what bit-parity with philox.h needs: no fused multiply-add, IEEE float64 division and
    float32 sqrt (the interpreter cannot show any of this)."""
    assert run_without_interpreter(COMPILE_PROBE).strip().endswith("compiled")


def test_sigma_plan_shapes():
    """The stage-1 tile covers whole channel rows where inner ≤ TILE, and never exceeds TILE."""
    for numel, channels, inner in [(65537, 1, 1), (80000, 2000, 1), (120, 5, 4), (4 * 17 * 19 * 3, 4, 17 * 19),
                                   (20480, 5, 4096)]:
        p = noise.sigma_plan(numel, channels, inner)
        assert p["RR"] * p["CH"] * p["IC"] == noise.TILE
        assert p["IC"] >= min(inner, noise.TILE) and p["rows_per_program"] % p["RR"] == 0
        assert p["RB"] * p["CB"] == noise.FINISH and p["row_blocks"] * p["rows_per_program"] >= p["rows"]
