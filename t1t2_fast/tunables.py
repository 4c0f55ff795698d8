"""User-defined hyperparameters of the training loss (docs/tunables.md).

``Tunable`` is a number the training loss uses (a label-smoothing coefficient, a dropout rate, the
weight of an auxiliary loss) whose value c = φ(λ) T1-T2 tunes. Its hypergradient is the mixed term

    h = dc/dλ · ∂/∂c [uᵀ ∇θ L_train(θ; c)],   u = J ⊙ v,

computed by the same replay of the training closure as a noise level's (t1t2_fast.noise.hypergrad,
``noise_hypergrad=`` "fd" | "fd-central" | "exact"). The validation loss must not depend on λ:
inside ``evaluating()`` (which ``T1T2.hyper_step`` enters around the validation closure) and in
eval mode, a ``Tunable`` returns its evaluation value, a constant.

Also here, the worked examples' reusable pieces: ``smoothed_cross_entropy`` (label smoothing with a
tensor coefficient) and ``ConcreteDropout`` (a relaxed-Bernoulli dropout whose rate is a Tunable).
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .noise.module import RecordingLeaves, no_noise
from .penalties import Hyperparameter, get_transform

# ---------------------------------------------------------------------------------------------
# evaluating
# ---------------------------------------------------------------------------------------------
_state = threading.local()


class evaluating(contextlib.ContextDecorator):  # noqa: N801  (named like torch.no_grad)
    """Evaluate the losses as at test time, in this thread: every ``Tunable`` returns its evaluation
    value (``eval_value``, a constant), ``ConcreteDropout`` is the identity, and noise is off (it
    enters ``no_noise()``). A context manager or a decorator; nests. ``T1T2.hyper_step`` runs the
    validation closure inside it, so that the validation loss does not depend on λ. It does not
    switch modules to eval mode: batch norm keeps using the batch's statistics (docs/design.md)."""

    def __new__(cls, func=None):
        self = super().__new__(cls)
        return self(func) if callable(func) else self  # bare @evaluating

    def __enter__(self):
        _state.depth = getattr(_state, "depth", 0) + 1
        no_noise().__enter__()  # a depth count, like this one: no state kept on the instance
        return self

    def __exit__(self, *exc):
        no_noise().__exit__(*exc)
        _state.depth -= 1
        return False


def is_evaluating() -> bool:
    """True inside ``evaluating()`` (in this thread)."""
    return getattr(_state, "depth", 0) > 0


# ---------------------------------------------------------------------------------------------
# Tunable
# ---------------------------------------------------------------------------------------------
class Tunable(RecordingLeaves, nn.Module):
    """A continuous hyperparameter of the training loss: ``forward()`` returns its value c = φ(λ).

    Args:
        init: the initial value c₀ in natural scale: a number (c is a 0-d tensor) or a sequence
            (one value per entry, e.g. per-class weights).
        transform: φ: "log" (default, c = exp λ > 0), "linear" (c = λ), "softplus", "sigmoid"
            (c in (0, 1)) or "linear*<s>" (t1t2_fast.penalties).
        bounds: (lo, hi) for c in natural scale, None for unbounded on that side; every hyper step
            projects λ so that c stays inside.
        name: the hyperparameter's name (``tunable.<name>``) for a Tunable used in the loss and
            passed as ``T1T2(..., tunables=[...])``, where it is required and unique. A Tunable that is
            a submodule of the model is found by ``T1T2`` like ``GaussianNoise`` and named after its
            module path, ``tunable.<module name>`` (``name`` is then not used).
        eval_value: what ``forward()`` returns inside ``evaluating()`` or in eval mode
            (``.eval()``): a number (e.g. 0.0 for a label-smoothing coefficient: the validation loss is
            then plain cross-entropy), or None (default) for the current value c, detached. Either way
            the validation loss sees a constant: the hypergradient is the path through θ⁺ only.

    λ lives in the buffer ``raw`` (not in ``parameters()``: T1-T2's hyper-optimizer updates it, not
    the training optimizer). In training (training mode, outside ``evaluating()``), ``forward()``
    returns φ(raw), differentiable in ``raw``; while ``T1T2`` records (``record_grad(True)``: the T1
    step that feeds an "fd" hypergradient, and the replays of a hyper step) it returns c as a fresh
    leaf per call whose gradient ∂L/∂c is added into ``recorded_grad``.
    A Tunable draws no randomness; a layer that does (``ConcreteDropout``) draws from torch's
    generator, which the hyper step's replay rewinds.
    """

    kind = "tunable"

    def __init__(self, init, transform: str = "log", bounds: tuple[float | None, float | None] = (None, None),
                 name: str | None = None, eval_value: float | None = None):
        super().__init__()
        self.transform = get_transform(transform)
        lo, hi = bounds if bounds is not None else (None, None)
        self.bounds = (-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi))
        if self.bounds[0] > self.bounds[1]:
            raise ValueError(f"Tunable: bounds must satisfy lo <= hi, got {bounds}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"Tunable: name must be a non-empty string, got {name!r}")
        self.name = name
        init_t = torch.as_tensor(init, dtype=torch.float64)
        raw = []
        for value in init_t.flatten().tolist():
            self.transform.check_init(value, f"Tunable{'' if name is None else ' ' + repr(name)}")
            if not self.bounds[0] <= value <= self.bounds[1]:
                raise ValueError(f"Tunable: initial value {value} lies outside bounds {self.bounds}")
            raw.append(self.transform.inverse(value))
        self.register_buffer("raw", torch.tensor(raw, dtype=torch.get_default_dtype()).reshape(init_t.shape))
        self.eval_value = None if eval_value is None else float(eval_value)
        self.step: int | None = None  # the T1 step of the forwards (the protocol's key; a Tunable draws nothing)
        self._recording = False
        self._leaves: list[torch.Tensor] = []
        self.recorded_grad: torch.Tensor | None = None
        self._compile_leaf: torch.Tensor | None = None  # the c leaf of compiled forwards while recording
        self._compile_leaf_used = False

    # ---- the hyperparameter ----
    def value(self) -> torch.Tensor:
        """c = φ(λ), shaped like ``raw`` (differentiable in ``raw``)."""
        return self.transform.value(self.raw)

    def derivative(self) -> torch.Tensor:
        """dc/dλ, shaped like ``raw``."""
        return self.transform.derivative(self.raw)

    def hyperparameter(self, name: str = "tunable") -> Hyperparameter:
        """The raw λ as a t1t2_fast.penalties.Hyperparameter (it shares ``raw``'s storage)."""
        return Hyperparameter(name, self.kind, False, self.transform, self.raw, self.bounds)

    def project(self) -> None:
        """Clamp λ so that c stays inside ``bounds``."""
        self.hyperparameter().project()

    # ---- forward ----
    def forward(self) -> torch.Tensor:
        # never ``raw`` itself (the "linear" transform's value), which the hyper-optimizer writes in place
        if not self.training or is_evaluating():
            c = self.value().detach()
            return c.clone() if self.eval_value is None else torch.full_like(c, self.eval_value)
        if not self._recording:
            c = self.value()
            return c.clone() if c is self.raw else c
        if torch.compiler.is_compiling():
            # under torch.compile: one leaf per step, made eagerly before the forwards (a graph input,
            # no graph break), as GaussianNoise does; its hook sums ∂L/∂c like the eager leaves'
            self._compile_leaf_used = True
            return self._recording_leaf()
        leaf = self._new_leaf()
        self._leaves.append(leaf)
        return leaf

    # ---- the replayed-hyperparameter protocol (t1t2_fast.noise.hypergrad.Replayed) ----
    def _accumulate(self, grad: torch.Tensor) -> None:
        if self.recorded_grad is not None:
            self.recorded_grad = self.recorded_grad + grad.reshape(self.raw.shape).to(self.raw.dtype)

    def reset_calls(self) -> None:
        """Start a new step's forwards: drop the recorded leaves and, while recording, zero
        ``recorded_grad``."""
        self._leaves = []
        self._compile_leaf = self._new_leaf() if self._recording else None
        self._compile_leaf_used = False
        self.recorded_grad = torch.zeros_like(self.raw) if self._recording else None

    def record_grad(self, enabled: bool = True) -> "Tunable":
        """Start (or stop) returning c as a leaf per forward and summing ∂L/∂c into ``recorded_grad``."""
        self._recording = bool(enabled)
        self.reset_calls()
        return self

    @property
    def recorded_leaves(self) -> list[torch.Tensor]:
        """The c leaves of the forwards since ``reset_calls()`` while recording (compiled forwards
        share one)."""
        if self._compile_leaf is not None and self._compile_leaf_used:
            return list(self._leaves) + [self._compile_leaf]
        return list(self._leaves)

    def keying_state(self) -> tuple:
        return (self.step, self._recording, self.recorded_grad, list(self._leaves), self._compile_leaf,
                self._compile_leaf_used)

    def set_keying_state(self, state: tuple) -> None:
        self.step, self._recording, self.recorded_grad, leaves, self._compile_leaf, self._compile_leaf_used = state
        self._leaves = list(leaves)

    def extra_repr(self) -> str:
        c = self.value().detach()
        c = f"{c.item():g}" if c.dim() == 0 else f"[{c.numel()} values]"
        extra = "" if self.name is None else f", name={self.name!r}"
        extra += "" if self.eval_value is None else f", eval_value={self.eval_value:g}"
        return f"{c}, transform={self.transform.name!r}{extra}"


def _value_of(c) -> torch.Tensor | float:
    """A coefficient given as a Tunable (called), a tensor or a number."""
    return c() if isinstance(c, Tunable) else c


# ---------------------------------------------------------------------------------------------
# Worked example 1: label smoothing
# ---------------------------------------------------------------------------------------------
def smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing=0.0,
                           reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy with label smoothing whose coefficient may be a tensor (or a ``Tunable``,
    which is called): (1 − c)·CE(logits, target) + c·mean_k(−log p_k), the loss of
    ``F.cross_entropy(logits, target, label_smoothing=c)`` (targets (1 − c)·onehot + c/K), written
    so that it is differentiable in c. ``logits``: (N, K) or (N, K, ...); ``target``: class indices."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"smoothed_cross_entropy: unknown reduction={reduction!r}")
    c = _value_of(smoothing)
    logp = F.log_softmax(logits, dim=1)
    nll = F.nll_loss(logp, target, reduction="none")
    uniform = -logp.mean(dim=1)
    if isinstance(c, torch.Tensor):
        c = c.to(logp.dtype)
    per = (1 - c) * nll + c * uniform
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()


# ---------------------------------------------------------------------------------------------
# Worked example 2: concrete dropout
# ---------------------------------------------------------------------------------------------
class ConcreteDropout(nn.Module):
    """Dropout with a continuous relaxation of the Bernoulli mask (Gal, Hron, Kendall, *Concrete
    Dropout*, NeurIPS 2017), whose drop rate p is a ``Tunable`` (``self.p``, transform "sigmoid":
    p in (0, 1)), so that T1-T2 tunes it on the validation loss.

    In training: z = sigmoid((log p − log(1 − p) + log u − log(1 − u)) / t) with u ~ U(0, 1) drawn
    from torch's generator (one per element of x, or per (sample, channel) with ``per_channel``), and
    y = x·(1 − z)/(1 − p). As t → 0, z becomes a Bernoulli(p) drop mask (inverted dropout). The
    temperature t is fixed. In eval mode and inside ``evaluating()``: the identity. Gal et al. add a
    regularizer on p to the training loss for their variational objective; here p is chosen by the
    validation loss, so none is added.

    Args:
        p: the initial drop rate, in (0, 1).
        temperature: t > 0 (0.1, as in the paper).
        per_channel: one mask value per (sample, channel) of an (N, C, ...) input (spatial dropout)
            instead of one per element.
        bounds: (lo, hi) for p (default (0, 1): the sigmoid never reaches them).
        eps: u is clamped into [eps, 1 − eps] so that log u stays finite.
    """

    def __init__(self, p: float = 0.1, temperature: float = 0.1, per_channel: bool = False,
                 bounds: tuple[float | None, float | None] = (None, None), eps: float = 1e-7):
        super().__init__()
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"ConcreteDropout: temperature must be a finite number > 0, got {temperature!r}")
        self.p = Tunable(p, transform="sigmoid", bounds=bounds)
        self.temperature, self.per_channel, self.eps = float(temperature), bool(per_channel), float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or is_evaluating():
            return x
        p = self.p().to(x.dtype)
        shape = tuple(x.shape[:2]) + (1,) * (x.dim() - 2) if self.per_channel else tuple(x.shape)
        u = torch.rand(shape, dtype=x.dtype, device=x.device).clamp(self.eps, 1 - self.eps)
        logits = (torch.log(p) - torch.log1p(-p) + torch.log(u) - torch.log1p(-u)) / self.temperature
        drop = torch.sigmoid(logits)
        return x * (1 - drop) / (1 - p)

    def extra_repr(self) -> str:
        return f"p={self.p.value().item():g}, temperature={self.temperature:g}, per_channel={self.per_channel}"


__all__ = ["ConcreteDropout", "Tunable", "evaluating", "is_evaluating", "smoothed_cross_entropy"]
