"""Counter-based Gaussian noise in pure PyTorch: the twin of csrc/include/t1t2/philox.h.

``philox_randn(seed, offsets)`` is ε_i = randn(seed, offset_i) as Triton's
``triton.language.random.randn`` defines it: Philox4x32-10 on the counter (offset lo, offset hi,
0, 0) with the key (seed lo, seed hi), its first two words mapped to uniforms in [0, 1), then
Box–Muller in float32. The integer words and the uniforms are Triton's bit for bit; float32 log and
cos are evaluated as in philox.h (double polynomials of correctly rounded operations, one rounding
to float32), so this function, the CPU kernel and the CUDA kernel give identical bits, and agree
with Triton's tl.randn (whose log/cos are its backend's) to a few ulps. philox.h explains why.

uint32 arithmetic is emulated in int64 tensors: every word stays in [0, 2³²), and 32×32-bit
products are split into 16-bit halves so that no intermediate leaves int64.

``noise_key(seed, *words)`` derives the 64-bit Philox key of one noise draw from the user's seed
and integers such as (module index, step, call index, rank).
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85      # Weyl increments of the key
ROUNDS = 10

# float32 constants of Triton's uint_to_uniform_float and pair_uniform_to_normal (doubles there,
# rounded to float32 when they meet a float32 tensor).
UNIFORM_SCALE = 4.6566127342e-10
MIN_UNIFORM = 1.0e-7
TWO_PI = 6.283185307179586

# Double constants of philox.h's log_float and cos_float (fdlibm's two-part ln 2 and π/2).
LN2_HI = float.fromhex("0x1.62e42feep-1")
LN2_LO = float.fromhex("0x1.a39ef35793c76p-33")
SQRT2 = float.fromhex("0x1.6a09e667f3bcdp+0")
TWO_OVER_PI = float.fromhex("0x1.45f306dc9c883p-1")
PIO2_HI = float.fromhex("0x1.921fb544p+0")
PIO2_LO = float.fromhex("0x1.0b4611a626331p-34")
LOG_SERIES = [1.0 / n for n in (23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3)]          # Horner order
SIN_SERIES = [1.0 / 355687428096000.0, -1.0 / 1307674368000.0, 1.0 / 6227020800.0, -1.0 / 39916800.0,
              1.0 / 362880.0, -1.0 / 5040.0, 1.0 / 120.0, -1.0 / 6.0]
COS_SERIES = [-1.0 / 6402373705728000.0, 1.0 / 20922789888000.0, -1.0 / 87178291200.0, 1.0 / 479001600.0,
              -1.0 / 3628800.0, 1.0 / 40320.0, -1.0 / 720.0, 1.0 / 24.0, -1.0 / 2.0]


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of the constant a and the words b."""
    t_lo = b * (a & 0xFFFF)                  # < 2^48
    t_hi = b * (a >> 16)                     # < 2^48
    mid = t_lo + ((t_hi & 0xFFFF) << 16)     # a·b = (t_hi >> 16)·2^32 + mid
    return (t_hi >> 16) + (mid >> 32), mid & MASK32


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = ROUNDS):
    """Philox4x32-R on counter words c0..c3 (int64 tensors, or ints, in [0, 2³²)) with the key
    (k0, k1); returns the four output words as int64 tensors."""
    words = [torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3)]
    c0, c1, c2, c3 = torch.broadcast_tensors(*words)
    k0, k1 = k0 & MASK32, k1 & MASK32
    for _ in range(rounds):
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def philox_randint4x(seed: int, offsets: torch.Tensor):
    """Triton's randint4x(seed, offsets) for int64 offsets: four int64 tensors of uint32 words."""
    offsets = torch.as_tensor(offsets, dtype=torch.int64)
    seed &= MASK64
    zero = torch.zeros_like(offsets)
    return philox4x32(offsets & MASK32, (offsets >> 32) & MASK32, zero, zero, seed & MASK32, seed >> 32)


def uint_to_uniform_float(words: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: uint32 words (int64 tensor) → float32 in [0, 1)."""
    # bitcast to int32, x < 0 → ~x: the words ≥ 2^31 map to 2^32 − 1 − w
    positive = torch.where(words >= 2**31, MASK32 - words, words).to(torch.int32)
    return positive.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=words.device)


def _horner(z: torch.Tensor, coefficients: list[float]) -> torch.Tensor:
    p = torch.full_like(z, coefficients[0])
    for c in coefficients[1:]:
        p = z * p + c
    return p


def log_float(x: torch.Tensor) -> torch.Tensor:
    """log of positive normal float32 values, as philox.h's log_float (correctly rounded but for
    ~1e-9 of the inputs)."""
    bits = x.view(torch.int32).to(torch.int64)
    e = (bits >> 23) - 127
    m = ((bits & 0x007FFFFF) | 0x3F800000).to(torch.int32).view(torch.float32).to(torch.float64)
    halve = m > SQRT2
    m = torch.where(halve, m * 0.5, m)
    e = e + halve.to(torch.int64)
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    p = _horner(z, LOG_SERIES)
    two_s = s + s
    log_m = two_s + (two_s * z) * p
    ed = e.to(torch.float64)
    return (ed * LN2_HI + (ed * LN2_LO + log_m)).to(torch.float32)


def cos_float(t: torch.Tensor) -> torch.Tensor:
    """cos of float32 values in [0, 8), as philox.h's cos_float."""
    x = t.to(torch.float64)
    k = (x * TWO_OVER_PI + 0.5).to(torch.int32)  # truncation = floor: the argument is ≥ 0.5
    kd = k.to(torch.float64)
    r = (x - kd * PIO2_HI) - kd * PIO2_LO
    z = r * r
    sin_r = r + (r * z) * _horner(z, SIN_SERIES)
    cos_r = 1.0 + z * _horner(z, COS_SERIES)
    quadrant = k & 3
    even = torch.where(quadrant == 0, cos_r, -cos_r)
    odd = torch.where(quadrant == 3, sin_r, -sin_r)
    return torch.where((quadrant & 1) == 1, odd, even).to(torch.float32)


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Triton's pair_uniform_to_normal, first output, in float32."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32, device=u1.device)  # noqa: E731
    u1 = torch.maximum(u1, f32(MIN_UNIFORM))
    # torch's float32 sqrt is not correctly rounded on every CPU (AVX-512 builds miss in ~15% of
    # inputs); the double sqrt of a float32 rounded to float32 is, as IEEE sqrtf is.
    radius = torch.sqrt((log_float(u1) * -2.0).to(torch.float64)).to(torch.float32)
    return radius * cos_float(f32(TWO_PI) * u2)


def philox_randn(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """ε = randn(seed, offsets): float32 standard normals, one per int64 offset, shaped like
    ``offsets`` and on its device. ``seed`` is any int; its low 64 bits are the key."""
    w0, w1, _, _ = philox_randint4x(seed, offsets)
    return box_muller(uint_to_uniform_float(w0), uint_to_uniform_float(w1))


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment: 2^64 / golden ratio


def _mix64(z: int) -> int:
    """splitmix64's output function (Stafford's Mix13): a bijection of 64-bit integers whose
    output bits each depend on every input bit."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def noise_key(seed: int, *words: int) -> int:
    """The 64-bit Philox key of one noise draw, from the user's ``seed`` and integers that name
    the draw (e.g. module index, step, call index, rank), by splitmix64 chaining:

        h₀ = mix(seed + γ),  hⱼ = mix(hⱼ₋₁ ⊕ (wordⱼ + γ·(j+1)))   (mod 2⁶⁴, γ = 2⁶⁴/φ)

    Every (seed, words) tuple gives an unrelated key (mix is a bijection with full avalanche; the
    position j enters so that (a, b) and (b, a) differ). Negative ints are taken mod 2⁶⁴. The key
    is returned as a signed int64 (two's complement), the form the ops' ``key`` argument takes."""
    h = _mix64((seed + _GOLDEN) & MASK64)
    for j, w in enumerate(words):
        h = _mix64(h ^ ((w + _GOLDEN * (j + 1)) & MASK64))
    return h - (1 << 64) if h >= 1 << 63 else h
