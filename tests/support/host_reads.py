"""Counting host reads of tensor values (each one a stall of the host on a GPU): every
``aten._local_scalar_dense`` (the op behind ``.item()``, ``float()``, ``int()``, ``bool()`` of a tensor)
under a ``TorchDispatchMode``, plus the reads made through ``t1t2_fast.guard.host_list``
(``Tensor.tolist`` does not dispatch)."""
import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from t1t2_fast import guard


class HostReads(TorchDispatchMode):
    """Counts host reads of tensor values and where in t1t2_fast they come from."""

    def __enter__(self):
        self.where = collections.Counter()
        self._listed = guard.HOST_READS[0]
        return super().__enter__()

    def __exit__(self, *exc):
        self.listed = guard.HOST_READS[0] - self._listed
        return super().__exit__(*exc)

    @property
    def count(self) -> int:
        return sum(self.where.values()) + self.listed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = [f for f in traceback.extract_stack() if "t1t2_fast" in f.filename]
            self.where[f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "outside t1t2_fast"] += 1
        return func(*args, **(kwargs or {}))
