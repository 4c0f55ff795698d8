"""Regularization hyperparameters: penalties, transforms, bounds and the tensors that hold them.

A *penalty* (``L2``/``L1``) is the user's declaration; when bound to a model it becomes one or
more *hyperparameters*, each a raw tensor λ with a transform φ so that the model uses c = φ(λ).
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

PER_CHOICES = ("network", "layer", "unit", "element")


# ---------------------------------------------------------------------------------------------
# Transforms φ: raw λ -> natural value c
# ---------------------------------------------------------------------------------------------
class Transform:
    """c = φ(λ) with its derivative and inverse. Subclasses are stateless."""

    name = "?"

    def value(self, raw: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def derivative(self, raw: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def inverse(self, c: float) -> float:
        raise NotImplementedError

    def check_init(self, init: float, what: str) -> None:
        if not (init > 0 and math.isfinite(init)):
            raise ValueError(f"{what}: transform {self.name!r} needs a positive finite initial value, got {init!r}")


class LogTransform(Transform):
    name = "log"

    def value(self, raw):
        return torch.exp(raw)

    def derivative(self, raw):
        return torch.exp(raw)

    def inverse(self, c):
        return math.log(c) if c > 0 else -math.inf


class LinearTransform(Transform):
    name = "linear"

    def value(self, raw):
        return raw

    def derivative(self, raw):
        return torch.ones_like(raw)

    def inverse(self, c):
        return c

    def check_init(self, init, what):
        if not math.isfinite(init):
            raise ValueError(f"{what}: initial value must be finite, got {init!r}")


class ScaledLinearTransform(LinearTransform):
    """c = s·λ for a fixed s > 0 (name "linear*<s>", e.g. "linear*0.001"): linear scale, with the raw
    value's unit chosen so that a hyper-optimizer step of size η in λ moves c by s·η. Adam's step in λ
    is about its learning rate whatever the gradient's size, so this sets how far c moves per T2 step
    (the paper's code: lr 1e-3 moving L2 about 1e-6 per step, i.e. s = 1e-3)."""

    def __init__(self, scale: float):
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"transform 'linear*<scale>' needs a positive finite scale, got {scale!r}")
        self.scale = float(scale)
        self.name = f"linear*{self.scale:g}"

    def value(self, raw):
        return raw * self.scale

    def derivative(self, raw):
        return torch.full_like(raw, self.scale)

    def inverse(self, c):
        return c / self.scale


class SoftplusTransform(Transform):
    name = "softplus"

    def value(self, raw):
        return torch.nn.functional.softplus(raw)

    def derivative(self, raw):
        return torch.sigmoid(raw)

    def inverse(self, c):
        if c <= 0:
            return -math.inf
        # log(expm1(c)) loses precision for large c; use c + log1p(-exp(-c)) there.
        return c + math.log1p(-math.exp(-c)) if c > 20 else math.log(math.expm1(c))


class SigmoidTransform(Transform):
    """c = 1 / (1 + exp(−λ)) in (0, 1): a rate or a probability (a dropout rate, a mixing weight).
    The bounds 0 and 1 are never reached (λ = ∓inf), so a hyper step cannot leave the open interval."""

    name = "sigmoid"

    def value(self, raw):
        return torch.sigmoid(raw)

    def derivative(self, raw):
        c = torch.sigmoid(raw)
        return c * (1 - c)

    def inverse(self, c):
        if c <= 0:
            return -math.inf
        if c >= 1:
            return math.inf
        return math.log(c) - math.log1p(-c)

    def check_init(self, init, what):
        if not (0 < init < 1):
            raise ValueError(f"{what}: transform 'sigmoid' needs an initial value in (0, 1), got {init!r}")


TRANSFORMS = {t.name: t for t in (LogTransform(), LinearTransform(), SoftplusTransform(), SigmoidTransform())}


def get_transform(name: str) -> Transform:
    if isinstance(name, str) and name.startswith("linear*"):
        try:
            return ScaledLinearTransform(float(name[len("linear*"):]))
        except ValueError:
            raise ValueError(f"unknown transform {name!r}; 'linear*<scale>' needs a positive number") from None
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise ValueError(f"unknown transform {name!r}; expected one of {sorted(TRANSFORMS)}") from None


# ---------------------------------------------------------------------------------------------
# Penalties (user declarations)
# ---------------------------------------------------------------------------------------------
ParamFilter = Callable[[str, torch.Tensor], bool] | str | Sequence[str] | None


class Penalty:
    """Base class of ``L2`` and ``L1``: Ω = Σ c·f(θ) on the selected tensors.

    Args:
        init: initial value c₀ in natural scale.
        per: "network" (one c for every targeted tensor), "layer" (one per tensor, the paper's
            default), "unit" (one per row, i.e. per slice along dim 0) or "element".
        transform: "log" (c = exp λ), "linear" (c = λ, projected into ``bounds``), "linear*<s>"
            (c = s·λ, e.g. "linear*0.001": a hyper step of η moves c by s·η) or "softplus".
        params: which parameters it applies to. ``None``: every parameter with dim ≥ 2 (weights,
            not biases or norm scales). A callable ``(name, param) -> bool``, a regular expression
            searched in the parameter name, or a list of exact parameter names.
        bounds: (lo, hi) in natural scale; λ is projected so that c stays inside after every hyper
            step. Default (0, inf) for "linear" and "linear*<s>", no projection for "log"/"softplus".
    """

    kind = "?"

    def __init__(self, init: float, per: str = "layer", transform: str = "log", params: ParamFilter = None,
                 bounds: tuple[float, float] | None = None, decoupled: bool = False):
        name = type(self).__name__
        if per not in PER_CHOICES:
            raise ValueError(f"{name}: unknown per={per!r}; expected one of {PER_CHOICES}")
        self.transform = get_transform(transform)
        init = float(init)
        self.transform.check_init(init, name)
        if bounds is None:
            bounds = (0.0, math.inf) if isinstance(self.transform, LinearTransform) else (-math.inf, math.inf)
        lo, hi = (float(b) for b in bounds)
        if not lo <= init <= hi:
            raise ValueError(f"{name}: initial value {init} lies outside bounds ({lo}, {hi})")
        self.init, self.per, self.params, self.bounds, self.decoupled = init, per, params, (lo, hi), bool(decoupled)

    def selects(self, name: str, param: torch.Tensor) -> bool:
        f = self.params
        if f is None:
            return param.dim() >= 2
        if callable(f):
            return bool(f(name, param))
        if isinstance(f, str):
            return re.search(f, name) is not None
        return name in set(f)

    def __repr__(self):
        extra = ", decoupled=True" if self.decoupled else ""
        return f"{type(self).__name__}({self.init:g}, per={self.per!r}, transform={self.transform.name!r}{extra})"


class L2(Penalty):
    """Ω = Σ c θ² (no ½, as in the paper). ``decoupled=True`` applies it outside the optimizer's
    preconditioner, AdamW style: θ⁺ = θ − η·2cθ − η·dir."""

    kind = "l2"

    def __init__(self, init: float, per: str = "layer", transform: str = "log", decoupled: bool = False,
                 params: ParamFilter = None, bounds: tuple[float, float] | None = None):
        super().__init__(init, per=per, transform=transform, params=params, bounds=bounds, decoupled=decoupled)


class L1(Penalty):
    """Ω = Σ c |θ|; its gradient is c·sign(θ) (0 at θ = 0)."""

    kind = "l1"

    def __init__(self, init: float, per: str = "layer", transform: str = "log", params: ParamFilter = None,
                 bounds: tuple[float, float] | None = None):
        super().__init__(init, per=per, transform=transform, params=params, bounds=bounds)


# ---------------------------------------------------------------------------------------------
# Bound hyperparameters
# ---------------------------------------------------------------------------------------------
@dataclass
class Target:
    """One tensor a hyperparameter acts on: its index in the optimizer's parameter list and how
    its elements map onto the entries of the raw tensor (``num_groups`` contiguous groups)."""

    index: int
    num_groups: int


@dataclass
class Hyperparameter:
    name: str
    kind: str                 # "l2" | "l1"
    decoupled: bool
    transform: Transform
    raw: torch.Tensor         # λ; scalar for network/layer, [rows] for unit, param-shaped for element
    bounds: tuple[float, float]
    targets: list[Target] = field(default_factory=list)

    def value(self) -> torch.Tensor:
        return self.transform.value(self.raw)

    def derivative(self) -> torch.Tensor:
        return self.transform.derivative(self.raw)

    def raw_bounds(self) -> tuple[float, float]:
        """``bounds`` in raw units (λ = φ⁻¹(c)), ±inf where there is none."""
        lo, hi = self.bounds
        raw_lo, raw_hi = self.transform.inverse(lo), self.transform.inverse(hi) if math.isfinite(hi) else math.inf
        return (raw_lo if math.isfinite(raw_lo) else -math.inf), (raw_hi if math.isfinite(raw_hi) else math.inf)

    @torch.no_grad()
    def project(self) -> torch.Tensor:
        """Clamp λ so that c stays inside ``bounds``; returns how many entries it moved, as a 0-d
        int64 tensor on λ's device (no host sync here: a caller reads many at once)."""
        raw_lo, raw_hi = self.raw_bounds()
        raw_lo, raw_hi = (raw_lo if math.isfinite(raw_lo) else None), (raw_hi if math.isfinite(raw_hi) else None)
        if raw_lo is None and raw_hi is None:
            return torch.zeros((), dtype=torch.int64, device=self.raw.device)
        clamped = self.raw.clamp(min=raw_lo, max=raw_hi)
        moved = torch.count_nonzero(self.raw != clamped)
        self.raw.copy_(clamped)
        return moved


def bind_penalties(penalties: Iterable[Penalty], named_params: list[tuple[str, torch.Tensor]],
                   dtype: torch.dtype) -> list[Hyperparameter]:
    """Turn penalty declarations into hyperparameters over ``named_params`` (the optimizer's list)."""
    hypers: list[Hyperparameter] = []
    seen: dict[str, Penalty] = {}
    for pen in penalties:
        if not isinstance(pen, Penalty):
            raise TypeError(f"penalties must be t1t2_fast.L2/L1 instances, got {type(pen).__name__}")
        chosen = [(i, n, p) for i, (n, p) in enumerate(named_params) if pen.selects(n, p)]
        if not chosen:
            available = ", ".join(f"{n}{tuple(p.shape)}" for n, p in named_params) or "none"
            raise ValueError(f"{pen!r} matches no trainable parameter (its params filter is {pen.params!r}; "
                             f"the default selects tensors with dim >= 2). Parameters: {available}")
        raw0 = pen.transform.inverse(pen.init)

        def make(name, shape, targets):
            if name in seen:
                raise ValueError(f"two penalties define the hyperparameter {name!r}: {seen[name]!r} and {pen!r}; "
                                 f"give them disjoint `params` filters")
            seen[name] = pen
            raw = torch.full(shape, raw0, dtype=dtype, device=named_params[targets[0].index][1].device)
            hypers.append(Hyperparameter(name, pen.kind, pen.decoupled, pen.transform, raw, pen.bounds, targets))

        if pen.per == "network":
            make(pen.kind, (), [Target(i, 1) for i, _, _ in chosen])
            continue
        for i, n, p in chosen:
            if pen.per == "layer":
                make(f"{pen.kind}.{n}", (), [Target(i, 1)])
            elif pen.per == "unit":
                rows = p.shape[0] if p.dim() > 0 else 1
                make(f"{pen.kind}.{n}", (rows,), [Target(i, rows)])
            else:  # element
                make(f"{pen.kind}.{n}", tuple(p.shape), [Target(i, p.numel())])
    return hypers


def set_bounds(hypers: list[Hyperparameter], pattern: str, lo: float | None = None,
               hi: float | None = None) -> list[Hyperparameter]:
    """Bound the hyperparameters whose name matches ``pattern`` (a name or a glob such as "l2.*")
    to [lo, hi] in natural scale (None: unbounded on that side) and project their values inside at
    once. Returns the hyperparameters it set."""
    lo = -math.inf if lo is None else float(lo)
    hi = math.inf if hi is None else float(hi)
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"bounds for {pattern!r} must satisfy lo <= hi, got ({lo}, {hi})")
    matched = [h for h in hypers if fnmatch.fnmatchcase(h.name, pattern)]
    if not matched:
        raise ValueError(f"bounds: {pattern!r} matches no hyperparameter; they are {[h.name for h in hypers]}")
    for h in matched:
        h.bounds = (lo, hi)
        h.project()
    return matched
