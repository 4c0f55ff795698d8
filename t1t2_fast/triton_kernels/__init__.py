"""Triton kernels of t1t2_fast (backend="triton"): the ``torch.ops.t1t2_triton`` ops, twins of the
reference functions and of the compiled ``torch.ops.t1t2`` ops, registered with
``torch.library.triton_op``. Triton is optional: without it this package imports, ``available()``
is False and ``unavailable_reason()`` says why. On CPU tensors the kernels run only in Triton's
interpreter (TRITON_INTERPRET=1 set before triton is imported), which is how the tests run them
without a GPU."""
from ._common import available, interpreting, require, unavailable_reason

__all__ = ["available", "interpreting", "require", "unavailable_reason"]

if available():
    from .hypergrad import penalty_hypergrad, penalty_segment_dot
    from .noise import gaussian_noise, gaussian_noise_backward
    from .perturb import perturb_, restore_
    from .t1_step import t1_step_

    __all__ += ["t1_step_", "perturb_", "restore_", "penalty_hypergrad", "penalty_segment_dot", "gaussian_noise",
                "gaussian_noise_backward"]
