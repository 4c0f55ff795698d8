"""The baseline and AVX2 copies of the CPU inner loops (csrc/cpu/cpu_features.h) give the same bits.

Each copy runs in its own process (T1T2_CPU_CAPABILITY is read by the kernels on every call, but a
fresh process also proves the choice comes from the environment), on the same inputs, and every
output tensor must be bit-identical: vectorization may not reorder floating-point operations.
"""
import os
import subprocess
import sys

import pytest
import torch

from t1t2_fast import _extension

from conftest import SUPPORT, needs_ext

pytestmark = needs_ext

PROBE = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
import t1t2_fast._extension as ext
assert ext.load(), ext.LOAD_ERROR
from problems import OPTIMIZERS, make_problem
ops = torch.ops.t1t2
out = {"capability": ops.cpu_capability()}
shapes = [(7,), (33, 31), (1025,), (3, 65537), (0,), (1,)]
for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
    for name, opt in OPTIMIZERS.items():
        for l2, l1, decay in (("layer", None, None), ("unit", "layer", "element"), ("element", "unit", "layer")):
            args = make_problem(shapes, dtype, opt, stash=True, seed=1, l2=l2, l1=l1, decay=decay)
            ops.t1_step_(*args)
            key = f"t1/{dtype}/{name}/{l2}-{l1}-{decay}"
            for k in (0, 2, 3, 7, 8):
                for i, t in enumerate(args[k]):
                    out[f"{key}/{k}/{i}"] = t
g = torch.Generator().manual_seed(2)
for dtype in (torch.float64, torch.float32):
    theta = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    v = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    jac = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) if i % 2 else torch.empty(0, dtype=dtype)
           for i, s in enumerate(shapes)]
    seg_t, seg_k, seg_g = [], [], []
    for i, t in enumerate(theta):
        rows = t.shape[0] if t.dim() else 1
        for kind in (0, 1, 2):
            for groups in ({1, rows, t.numel()} if t.numel() else {0}):
                seg_t.append(i); seg_k.append(kind); seg_g.append(groups)
    out[f"t2/{dtype}"] = ops.penalty_hypergrad(v, theta, jac, [-0.05] * len(theta), seg_t, seg_k, seg_g, 0.05, [])
for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
    u = torch.randn(6, 70007, generator=g, dtype=torch.float64).to(dtype)
    th = torch.randn(6, 70007, generator=g, dtype=torch.float64).to(dtype)
    for kind in ("l2", "l1"):
        for groups in (1, 6, 6 * 70007, 2 * 3 * 7):
            out[f"dot/{dtype}/{kind}/{groups}"] = ops.penalty_segment_dot(u, th, groups, kind)
# noise: the generator (an intrinsics copy under AVX2) and the fixed-order σ reduction; sizes that
# are not multiples of the 16-draw block, rows of 1 element (per layer) up to rows past a tile
for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
    for shape, channels, inner in (((1000003,), 1, 1), ((37, 5, 9, 7), 5, 63), ((9, 3000), 3000, 1), ((64, 4), 1, 1)):
        x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        gy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        sigma = torch.rand(channels, generator=g, dtype=torch.float64).to(torch.float64 if dtype == torch.float64
                                                                          else torch.float32)
        for mode in ("additive", "multiplicative"):
            key = f"noise/{dtype}/{shape}/{mode}"
            out[key + "/y"] = ops.gaussian_noise(x, sigma, 2**61 + 17, channels, inner, mode)
            gx, gs = ops.gaussian_noise_backward(gy, x, sigma, 2**61 + 17, channels, inner, mode, True, True)
            out[key + "/gx"], out[key + "/gs"] = gx, gs
torch.save(out, sys.argv[1])
"""


def run_probe(tmp_path, capability):
    path = tmp_path / f"{capability}.pt"
    env = dict(os.environ, T1T2_CPU_CAPABILITY=capability)
    proc = subprocess.run([sys.executable, "-c", PROBE, str(path), str(SUPPORT)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(path)


def test_default_and_avx2_copies_give_identical_bits(tmp_path):
    _extension.load()
    if torch.ops.t1t2.cpu_capability() != "avx2":
        pytest.skip("this CPU (or build) has no AVX2 copy of the kernels; only the baseline runs here")
    base, avx2 = run_probe(tmp_path, "default"), run_probe(tmp_path, "avx2")
    assert base.pop("capability") == "default" and avx2.pop("capability") == "avx2"
    assert base.keys() == avx2.keys() and len(base) > 500
    differing = [k for k in base if not torch.equal(base[k], avx2[k]) and
                 not (base[k].isnan().any() and torch.equal(base[k].nan_to_num(), avx2[k].nan_to_num()))]
    assert not differing, f"{len(differing)} outputs differ between the copies, e.g. {differing[:5]}"


def test_capability_env_is_validated(tmp_path):
    env = dict(os.environ, T1T2_CPU_CAPABILITY="avx512")
    code = ("import torch, t1t2_fast._extension as e; e.load(); "
            "torch.ops.t1t2.t1_step_([torch.ones(3)], [torch.ones(3)], [], [], [], [], [], [], [], 'sgd', "
            "0.1, 0.0, False, 0.9, 0.999, 1e-8, [], [])")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "T1T2_CPU_CAPABILITY must be 'default' or 'avx2', got 'avx512'" in proc.stderr
