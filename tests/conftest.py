"""Test-session setup. Without a GPU, Triton kernels can only run in Triton's interpreter, which
must be switched on before any kernel is defined (``triton.jit`` reads TRITON_INTERPRET when it
decorates), so it is set here, before any test module imports t1t2_fast.triton_kernels."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
