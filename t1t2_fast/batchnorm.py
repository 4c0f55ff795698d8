"""Batch normalization's running statistics during T2 steps.

``T1T2.hyper_step`` runs the model forward on a validation batch (and, for noise hyperparameters,
reruns the T1 step's training closure) in training mode: batch normalization normalizes with the
batch's own statistics there, which is what the hypergradient differentiates, but torch's
``_BatchNorm`` would also fold those batches into ``running_mean`` / ``running_var`` and count them
in ``num_batches_tracked``. The validation batch would then leak into the statistics used at test
time, and every replayed training batch would be counted twice.

The rule: a T2 step leaves every batch-norm buffer exactly as the T1 step left it. ``keeps_running_stats``
decorates ``hyper_step``: it copies the buffers of every ``_BatchNorm`` module (BatchNorm1d/2d/3d,
SyncBatchNorm, the lazy variants) that tracks running statistics before the step and copies them back
afterwards, also when the step raises. The forward passes inside are unchanged (batch statistics in
training mode), so hypergradients are as before; only the buffers are restored. The cost is one copy of
the buffers (2 x features + 1 numbers per layer) per T2 step.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

__all__ = ["running_stats_kept", "keeps_running_stats", "batchnorm_buffers"]

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def batchnorm_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The running-statistics buffers of the batch-norm modules of ``model`` that track them."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            out += [b for b in (getattr(m, n, None) for n in _BUFFERS) if isinstance(b, torch.Tensor)]
    return out


@contextlib.contextmanager
def running_stats_kept(model: nn.Module | None):
    """Inside, batch norm may update its running statistics; on leaving, they are what they were."""
    buffers = [] if model is None else batchnorm_buffers(model)
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def keeps_running_stats(method):
    """Decorator of ``T1T2.hyper_step``: the call runs inside ``running_stats_kept(self._model)``."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with running_stats_kept(getattr(self, "_model", None)):
            return method(self, *args, **kwargs)

    return wrapper
