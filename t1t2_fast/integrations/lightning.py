"""PyTorch Lightning: ``T1T2Callback`` runs the T2 step of a ``T1T2`` optimizer after each
optimizer step that stashed one (docs/guide.md, "PyTorch Lightning"; the math in docs/design.md).

The LightningModule returns a ``T1T2`` from ``configure_optimizers``. In automatic optimization
Lightning calls ``optimizer.step(closure=...)`` with a closure that runs its own backward; in manual
optimization ``self.manual_backward(loss); opt.step()`` passes a closure returning None. ``T1T2``
recognises both (t1t2_fast.closures). Lightning is imported on first access to ``T1T2Callback``
(``from t1t2_fast.integrations.lightning import T1T2Callback``), so importing the module alone
works without it installed.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from ..optimizer import T1T2


def _callback_base():
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError as e:
            raise ImportError("T1T2Callback needs PyTorch Lightning: pip install lightning "
                              "(or the t1t2_fast[lightning] extra)") from e
    return Callback


def t1t2_optimizer(trainer) -> T1T2:
    """The trainer's ``T1T2`` itself (a LightningOptimizer wrapper unwrapped), or a clear error."""
    optimizers = list(trainer.optimizers)
    found = []
    for opt in optimizers:
        opt = getattr(opt, "_optimizer", opt)  # LightningOptimizer wraps the real optimizer
        if isinstance(opt, T1T2):
            found.append(opt)
    if len(found) != 1:
        kinds = ", ".join(type(getattr(o, "_optimizer", o)).__name__ for o in optimizers) or "none"
        raise RuntimeError(f"T1T2Callback needs configure_optimizers to return exactly one T1T2 optimizer; "
                           f"the trainer has: {kinds}")
    return found[0]


def validation_loss(out: Any) -> torch.Tensor:
    """The loss of a ``validation_step`` result: a tensor, or a dict with "loss"."""
    if isinstance(out, dict) and "loss" in out:
        out = out["loss"]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"T1T2Callback computes the validation loss of a hyper step with "
                        f"pl_module.validation_step(batch, batch_idx), which must return the loss tensor or a "
                        f"dict with a 'loss' tensor; it returned {type(out).__name__}. Return the loss from "
                        f"validation_step, or pass T1T2Callback(val_dataloader, loss_fn=lambda module, batch: ...)")
    return out


def hyper_metrics(opt: T1T2, prefix: str = "") -> dict[str, float]:
    """{prefix + name: value} of the hyperparameters in natural scale, the mean of tensor-valued ones."""
    return {prefix + name: (float(v.float().mean()) if isinstance(v, torch.Tensor) else float(v))
            for name, v in opt.hyperparameters().items()}


class _Cycle:
    """Batches of an iterable, restarted when exhausted."""

    def __init__(self, loader: Iterable):
        self.loader, self.it = loader, None

    def next(self):
        for _ in range(2):
            if self.it is None:
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                self.it = None
        raise ValueError("T1T2Callback's val_dataloader yields no batch")


_CLASS = None


def _callback_class():
    global _CLASS
    if _CLASS is not None:
        return _CLASS

    class T1T2Callback(_callback_base()):
        """A Lightning callback that runs ``opt.hyper_step`` whenever ``opt.hyper_due`` after a
        training batch, with the next batch of ``val_dataloader`` (cycled). The validation loss is
        ``pl_module.validation_step(batch, i)`` (a tensor or a dict with "loss"; ``i`` counts the
        validation batches used), or ``loss_fn(pl_module, batch)``. With ``log``, the
        hyperparameters go to ``pl_module.log_dict`` after each hyper step (tensor-valued ones as
        their mean, names prefixed with ``prefix``). ``train_loss_fn(pl_module, batch)``: the
        training loss of the batch just trained on, for the replay of the noise and tunable
        hyperparameters (GaussianNoise, Tunable) when the step's own closure cannot be rerun (manual
        optimization; noise_hypergrad="exact")."""

        def __init__(self, val_dataloader, loss_fn=None, *, train_loss_fn=None, log=True, prefix=""):
            super().__init__()
            self.val_dataloader, self.loss_fn, self.log, self.prefix = val_dataloader, loss_fn, log, prefix
            self.train_loss_fn = train_loss_fn
            self._val = _Cycle(val_dataloader)
            self.val_batches = 0  # validation batches used so far (the batch_idx given to validation_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            opt = t1t2_optimizer(trainer)
            if not opt.hyper_due:
                return
            vbatch = trainer.strategy.batch_to_device(self._val.next())
            index = self.val_batches
            self.val_batches += 1

            def val_closure():
                if self.loss_fn is not None:
                    return self.loss_fn(pl_module, vbatch)
                return validation_loss(pl_module.validation_step(vbatch, index))

            train = None if self.train_loss_fn is None else (lambda: self.train_loss_fn(pl_module, batch))
            opt.hyper_step(val_closure, train=train)
            if self.log:
                pl_module.log_dict(hyper_metrics(opt, self.prefix), on_step=True, on_epoch=False)

    T1T2Callback.__module__, T1T2Callback.__qualname__ = __name__, "T1T2Callback"
    _CLASS = T1T2Callback
    return _CLASS


def __getattr__(name: str):
    # T1T2Callback subclasses Lightning's Callback: built (and lightning imported) on first access
    if name == "T1T2Callback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["T1T2Callback", "hyper_metrics", "t1t2_optimizer", "validation_loss"]
