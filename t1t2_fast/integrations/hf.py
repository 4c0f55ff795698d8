"""T1-T2 in the Hugging Face ``transformers.Trainer``: ``T1T2Callback``.

``Trainer(..., optimizers=(opt, scheduler))`` with ``opt`` a ``T1T2`` takes the T1 steps itself:
after its backward (and gradient clipping) it calls ``opt.step()`` without a closure, which trains θ
with the penalty gradients added. The callback adds the T2 steps: at the end of every optimizer step
where ``opt.hyper_due``, it runs ``opt.hyper_step`` on the next batch of an evaluation dataloader
(cycled), and it adds ``opt.log_dict()`` (λ, hypergradients, skip and clip counts) to the Trainer's
logs::

    from t1t2_fast.integrations.hf import T1T2Callback
    opt = t1t2.T1T2(model, [t1t2.L2(1e-2)], optimizer="adam", lr=5e-5, hyper_every=10)
    trainer = Trainer(model=model, args=args, train_dataset=train, optimizers=(opt, None),
                      callbacks=[T1T2Callback(opt, val_loader)])

Limitation: a model with ``GaussianNoise`` or ``Tunable`` hyperparameters needs the T1 step's training
closure for their hypergradient (``hyper_step(val, train=closure)``), and the Trainer does not hand its
training batch to callbacks; so this callback supports penalties (L2/L1) only and says so if the model
has noise or tunables. Use your own loop (``opt.step(closure)``) for those.

transformers is imported when ``T1T2Callback`` is first used, not when this module is imported.
"""
from __future__ import annotations

__all__ = ["T1T2Callback"]

_CLASS = None


def _callback_class():
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise ImportError("t1t2_fast.integrations.hf needs transformers (pip install transformers, or "
                          "pip install 't1t2_fast[hf]')") from exc

    class T1T2Callback(TrainerCallback):
        """Runs ``optimizer.hyper_step`` in ``on_step_end`` when ``optimizer.hyper_due`` and adds
        ``optimizer.log_dict()`` to the Trainer's logs.

        Args:
            optimizer: the ``T1T2`` given to ``Trainer(optimizers=(optimizer, scheduler))``.
            eval_dataloader: batches for the validation loss of the hyper steps (dicts of tensors,
                as the Trainer's own); cycled, one batch per hyper step. Moved to the parameters' device.
            loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default ``model(**batch).loss``.
            eval_mode: compute the validation loss with the model in eval mode (dropout off;
                default True), then restore its mode.
            log_prefix: the prefix of the keys added to the logs (``T1T2.log_dict``).

        The keys are added to the ``logs`` dict in ``on_log`` and to the entry the Trainer just
        appended to ``state.log_history``. Reporting integrations (``report_to``) run before user
        callbacks; for them to see λ too, put this callback first:
        ``trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(T1T2Callback))``.
        """

        def __init__(self, optimizer, eval_dataloader, loss_fn=None, *, eval_mode: bool = True,
                     log_prefix: str = "t1t2/"):
            if not (hasattr(optimizer, "hyper_step") and hasattr(optimizer, "hyper_due")):
                raise TypeError(f"T1T2Callback needs the T1T2 optimizer, got {type(optimizer).__name__}")
            if getattr(optimizer, "_noise", None):
                raise ValueError("T1T2Callback: the model has GaussianNoise or Tunable hyperparameters, whose "
                                 "hypergradient reruns the T1 step's training closure, which the Trainer does not "
                                 "give to callbacks; use penalties only here, or your own loop with "
                                 "opt.step(closure)")
            self.optimizer, self.eval_dataloader, self.loss_fn = optimizer, eval_dataloader, loss_fn
            self.eval_mode, self.log_prefix = eval_mode, log_prefix
            self._batches = None
            self.hyper_steps = 0  # hyper steps this callback ran

        def _next_batch(self):
            if self._batches is not None:
                try:
                    return next(self._batches)
                except StopIteration:
                    pass
            self._batches = iter(self.eval_dataloader)
            try:
                return next(self._batches)
            except StopIteration:
                raise ValueError("T1T2Callback: eval_dataloader is empty") from None

        def _to_device(self, batch):
            dev = self.optimizer.params[0].device
            if isinstance(batch, dict):
                return type(batch)({k: self._to_device(v) for k, v in batch.items()})
            if isinstance(batch, (list, tuple)):
                return type(batch)(self._to_device(v) for v in batch)
            return batch.to(dev) if hasattr(batch, "to") else batch

        def _loss(self, model, batch):
            if self.loss_fn is not None:
                return self.loss_fn(model, batch)
            out = model(**batch)
            loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
            if loss is None:
                raise ValueError("T1T2Callback: the model returned no loss for an eval batch (give the batches "
                                 "labels, or pass loss_fn(model, batch))")
            return loss

        def on_step_end(self, args, state, control, model=None, **kwargs):
            opt = self.optimizer
            if not opt.hyper_due:
                return
            if model is None:
                raise ValueError("T1T2Callback.on_step_end: the Trainer passed no model")
            batch = self._to_device(self._next_batch())

            def closure():
                was = model.training
                if self.eval_mode:
                    model.eval()
                try:
                    return self._loss(model, batch)
                finally:
                    model.train(was)

            opt.hyper_step(closure)
            self.hyper_steps += 1

        def on_log(self, args, state, control, logs=None, **kwargs):
            extra = self.optimizer.log_dict(prefix=self.log_prefix)
            if logs is not None:
                logs.update(extra)
            # the Trainer appended its entry (a copy of logs) before calling the callbacks
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(extra)

    T1T2Callback.__qualname__ = "T1T2Callback"  # pickles by name (this module's __getattr__ finds it)
    _CLASS = T1T2Callback
    return _CLASS


def __getattr__(name):
    if name == "T1T2Callback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
