"""The constants every backend agrees on, defined once: the supported parameter dtypes, the
compute-dtype rule, and the integer codes the fused ops take for the optimizer and the penalty
segment kinds (the C++/CUDA side: ``csrc/include/t1t2/enums.h``)."""
from __future__ import annotations

import torch

#: Parameter dtypes every fused op accepts.
SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

#: T1 optimizers of the fused step (``optimizer=`` of ``t1_step_``).
OPTIMIZERS = ("sgd", "adam")

#: Penalty kinds: the mixed term m is 2θ for l2, sign(θ) for l1.
PENALTY_KINDS = ("l2", "l1")

#: ``segment_kind`` codes of ``penalty_hypergrad``: index = code.
#: "lr" (code 3) is a learning-rate scale's segment: Σ v·(θ⁺ − θ), θ⁺ from the ``params`` argument.
SEGMENT_KINDS = ("l2", "l1", "decoupled_l2", "lr")
SEGMENT_L2, SEGMENT_L1, SEGMENT_DECOUPLED_L2, SEGMENT_LR = range(len(SEGMENT_KINDS))

#: Noise modes: y = x + σε or y = x(1 + σε).
NOISE_MODES = ("additive", "multiplicative")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute and accumulate in: float64 stays float64; every other
    floating dtype (float32, bfloat16, float16) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_kind(kind: str, decoupled: bool) -> int:
    """The ``segment_kind`` code of a penalty of ``kind`` ("l2" | "l1"), decoupled or not."""
    return SEGMENT_DECOUPLED_L2 if decoupled else SEGMENT_KINDS.index(kind)
