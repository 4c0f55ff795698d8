"""Gaussian noise layers whose std is a T1-T2 hyperparameter (docs/design.md, "Noise modules").

``GaussianNoise`` adds y = x + σε (or multiplies, y = x(1 + σε)) in training mode. ε comes from a
counter-based generator (t1t2_fast.rng): ε_i = randn(key, i) for element i, so the backward
regenerates ε instead of storing it, and the optimizer can replay a training step's noise exactly
by giving the module the same ``seed``/``step`` and calling ``reset_calls()``.
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch
from torch import nn

from .._dtypes import NOISE_MODES, compute_dtype
from .._noise_autograd import backward_from_context, noise_backward, save_for_backward
from ..backend import BACKENDS, Backend, resolve_backend
from ..penalties import Hyperparameter, get_transform
from ..rng import noise_key

NOISE_PER = ("layer", "unit")


# ---------------------------------------------------------------------------------------------
# no_noise
# ---------------------------------------------------------------------------------------------
_state = threading.local()


class no_noise(contextlib.ContextDecorator):  # noqa: N801  (named like torch.no_grad)
    """Turn every ``GaussianNoise`` into the identity in this thread, as a context manager
    (``with t1t2_fast.no_noise(): ...``) or a decorator (``@no_noise`` or ``@no_noise()``).
    Nests; other threads keep their noise. ``T1T2.hyper_step`` runs the validation closure inside it."""

    def __new__(cls, func=None):
        self = super().__new__(cls)
        return self(func) if callable(func) else self  # bare @no_noise

    def __enter__(self):
        _state.depth = getattr(_state, "depth", 0) + 1
        return self

    def __exit__(self, *exc):
        _state.depth -= 1
        return False


def noise_enabled() -> bool:
    """False inside ``no_noise()`` (in this thread)."""
    return getattr(_state, "depth", 0) == 0


# ---------------------------------------------------------------------------------------------
# The differentiable op
# ---------------------------------------------------------------------------------------------
class _GaussianNoiseFunction(torch.autograd.Function):
    """The noise op of a resolved backend with the shared backward formula (t1t2_fast._noise_autograd),
    so the reference path regenerates ε too instead of keeping it for the backward."""

    @staticmethod
    def forward(ctx, x, sigma, key, channels, inner, mode, backend: Backend):
        y = backend.gaussian_noise(x, sigma, key, channels, inner, mode)
        save_for_backward(ctx, x, sigma, key, channels, inner, mode)
        ctx.fused_backward = None if backend.name == "reference" else backend.gaussian_noise_backward
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return (*backward_from_context(ctx, grad_y, ctx.fused_backward), None, None, None, None, None)


def gaussian_noise(x: torch.Tensor, sigma: torch.Tensor, key: int, channels: int = 1, inner: int = 1,
                   mode: str = "additive", backend: str = "auto") -> torch.Tensor:
    """Differentiable y = x + σ_c ε (additive) or x·(1 + σ_c ε) (multiplicative) with
    ε_i = randn(key, i) over the contiguous x and c = (i // inner) % channels. ``sigma``: ``channels``
    values in the compute dtype (float64 for float64 x, float32 otherwise). The backward regenerates
    ε (nothing but x, in multiplicative mode, is saved) and is itself differentiable (create_graph).
    ``backend``: "auto" | "reference" | "cpp" | "triton", resolved for x's device as for ``T1T2``
    (``t1t2_fast.backend.resolve_backend``)."""
    impl = resolve_backend(backend, x.device)
    return _GaussianNoiseFunction.apply(x.contiguous(), sigma, int(key), int(channels), int(inner), mode, impl)


# ---------------------------------------------------------------------------------------------
# The op under torch.compile
# ---------------------------------------------------------------------------------------------
# In eager mode each forward draws a Python int key (noise_key(seed, step, call)); dynamo would
# specialize a compiled graph on it and recompile at every forward. Under torch.compile the module
# instead hands the op its counters as a tensor (step, call) and the op, opaque to dynamo, derives
# the same key when it runs: one graph for every step, the same ε, bit for bit.
def _keyed(counters: torch.Tensor, seed: int) -> int:
    step, call = counters.tolist()
    return noise_key(seed, max(step, 0), call)


@torch.library.custom_op("t1t2_compile::gaussian_noise_keyed", mutates_args=())
def _gaussian_noise_keyed(x: torch.Tensor, sigma: torch.Tensor, counters: torch.Tensor, seed: int, channels: int,
                          inner: int, mode: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, a copy of the counters it drew with). The backward regenerates ε from that copy, a fresh
    output of this op: the counters tensor itself is advanced after the draw, and a compiler may
    save an input for the backward by reference."""
    impl = resolve_backend(backend, x.device)
    return impl.gaussian_noise(x.contiguous(), sigma, _keyed(counters, seed), channels, inner, mode), counters.clone()


@_gaussian_noise_keyed.register_fake
def _(x, sigma, counters, seed, channels, inner, mode, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(counters)


@torch.library.custom_op("t1t2_compile::gaussian_noise_keyed_backward", mutates_args=())
def _gaussian_noise_keyed_backward(grad_y: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, counters: torch.Tensor,
                                   seed: int, channels: int, inner: int, mode: str, backend: str, need_x_grad: bool,
                                   need_sigma_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    impl = resolve_backend(backend, grad_y.device)
    fused = None if impl.name == "reference" else impl.gaussian_noise_backward
    gx, gs = noise_backward(grad_y, x if x.numel() else None, sigma, _keyed(counters, seed), channels, inner, mode,
                            need_x_grad, need_sigma_grad, fused)
    # a custom op returns fresh tensors (additive ∂L/∂x is grad_y itself), empty ones where not asked for
    gx = grad_y.new_empty(0) if gx is None else gx.clone() if gx is grad_y else gx
    gs = sigma.new_empty(0) if gs is None else gs.to(sigma.dtype)
    return gx, gs


@_gaussian_noise_keyed_backward.register_fake
def _(grad_y, x, sigma, counters, seed, channels, inner, mode, backend, need_x_grad, need_sigma_grad):
    gx = torch.empty_like(grad_y, memory_format=torch.contiguous_format) if need_x_grad else grad_y.new_empty(0)
    return gx, (torch.empty_like(sigma) if need_sigma_grad else sigma.new_empty(0))


def _keyed_setup_context(ctx, inputs, output):
    x, sigma, counters, seed, channels, inner, mode, backend = inputs
    keep_x = mode == "multiplicative" and ctx.needs_input_grad[1]
    ctx.save_for_backward(x if keep_x else x.new_empty(0), sigma, output[1])
    ctx.args = (seed, channels, inner, mode, backend)


def _keyed_backward(ctx, grad_y, _grad_counters):
    x, sigma, counters = ctx.saved_tensors
    gx, gs = _gaussian_noise_keyed_backward(grad_y, x, sigma, counters, *ctx.args, ctx.needs_input_grad[0],
                                            ctx.needs_input_grad[1])
    return ((gx if ctx.needs_input_grad[0] else None), (gs if ctx.needs_input_grad[1] else None),
            None, None, None, None, None, None)


_gaussian_noise_keyed.register_autograd(_keyed_backward, setup_context=_keyed_setup_context)


# ---------------------------------------------------------------------------------------------
# What every replayed hyperparameter module shares (GaussianNoise here, t1t2_fast.Tunable)
# ---------------------------------------------------------------------------------------------
class RecordingLeaves:
    """The recording leaves and housekeeping of a module that holds a replayed hyperparameter λ in
    the buffer ``raw``, with ``value()`` and ``_accumulate`` (t1t2_fast.noise.hypergrad.Replayed).
    ``_leaves_attr`` / ``_grad_attr``: where the subclass keeps the eager leaves and the summed ∂L/∂c."""

    _leaves_attr = "_leaves"
    _grad_attr = "recorded_grad"

    def _new_leaf(self) -> torch.Tensor:
        leaf = self.value().detach().clone().requires_grad_(True)
        leaf.register_hook(self._accumulate)
        return leaf

    def _recording_leaf(self) -> torch.Tensor:
        """The leaf of this step's compiled forwards: made eagerly by ``reset_calls``/``record_grad``
        (a graph input, no graph break); after a copy of the module, made here (outside the graph)."""
        if self._compile_leaf is None:
            self._make_leaf_eagerly()
        return self._compile_leaf

    @torch.compiler.disable
    def _make_leaf_eagerly(self) -> None:
        self._compile_leaf = self._new_leaf()

    def _apply(self, fn, recurse=True):
        # model.half() / .bfloat16() must not round the hyperparameter: keep λ in float32 or wider
        raw = self.raw
        super()._apply(fn, recurse)
        if self.raw.dtype in (torch.float16, torch.bfloat16):
            self.raw = raw.to(device=self.raw.device, dtype=torch.float32)
        return self

    def __getstate__(self):
        # deepcopy / pickle: drop the autograd graph of the current step (the leaves, a summed
        # gradient built with create_graph)
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state[self._leaves_attr] = []
        state["_compile_leaf"] = None
        if state.get(self._grad_attr) is not None:
            state[self._grad_attr] = state[self._grad_attr].detach().clone()
        return state


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------
class GaussianNoise(RecordingLeaves, nn.Module):
    """Gaussian noise whose std σ = φ(λ) is a T1-T2 hyperparameter.

    Args:
        std: initial σ in natural scale: a number, or for per="unit" also one value per feature.
        per: "layer" (one σ) or "unit" (one σ per feature, i.e. per index of dim 1 of the input:
            the features of an (N, F) input, the channels of an (N, C, H, W) one).
        num_features: size of dim 1 of the input; required for per="unit".
        mode: "additive" (y = x + σε) or "multiplicative" (y = x(1 + σε), Gaussian dropout).
        transform: φ, "linear" (default, σ = λ, as in the paper), "log" or "softplus"
            (t1t2_fast.penalties).
        bounds: (lo, hi) for σ in natural scale (None: unbounded); ``project()`` clamps λ into them.
        backend: "auto" | "reference" | "cpp" | "triton" for the noise op (``T1T2`` sets "auto" to its own).

    The raw λ lives in the buffer ``raw`` (shape () or (num_features,)), not in ``parameters()``:
    the T1-T2 optimizer, not the training optimizer, updates it, in place.

    Noise acts in training mode, outside ``no_noise()``, and where σ is not all zero (or while
    recording σ-gradients); otherwise forward returns x itself. Keys: when ``seed`` is set (the
    optimizer sets ``seed`` and ``step``), the k-th forward since ``reset_calls()`` draws with
    key = noise_key(seed, step, k), so re-running a closure after ``reset_calls()`` replays the same
    ε exactly; with ``seed`` None every forward draws a fresh key from torch's global generator
    (``torch.manual_seed`` makes a run repeatable).

    ``record_grad(True)``: each forward uses σ as a fresh leaf tensor, and every backward through it
    adds ∂L/∂σ (natural scale, not ∂L/∂λ) into ``sigma_grad`` (shaped like ``raw``), summed over the
    forwards since ``reset_calls()``. With ``backward(create_graph=True)``, ``sigma_grad`` stays
    differentiable (e.g. with respect to the model's parameters).
    """

    _leaves_attr = "_sigma_leaves"  # RecordingLeaves: this module's names for the leaves and ∂L/∂σ
    _grad_attr = "sigma_grad"

    def __init__(self, std, per: str = "layer", num_features: int | None = None, mode: str = "additive",
                 transform: str = "linear", bounds: tuple[float | None, float | None] = (0.0, None),
                 backend: str = "auto"):
        super().__init__()
        if per not in NOISE_PER:
            raise ValueError(f"GaussianNoise: unknown per={per!r}; expected one of {NOISE_PER}")
        if mode not in NOISE_MODES:
            raise ValueError(f"GaussianNoise: unknown mode={mode!r}; expected one of {NOISE_MODES}")
        if backend not in BACKENDS:
            raise ValueError(f"GaussianNoise: unknown backend={backend!r}; expected one of {BACKENDS}")
        if per == "unit":
            if not isinstance(num_features, int) or num_features < 1:
                raise ValueError(f"GaussianNoise(per='unit') needs num_features = the size of dim 1 of its input "
                                 f"(a positive int), got {num_features!r}")
        elif num_features is not None:
            raise ValueError("GaussianNoise: num_features is only used with per='unit'")
        self.per, self.mode, self.num_features, self.backend = per, mode, num_features, backend
        self.transform = get_transform(transform)
        lo, hi = bounds
        self.bounds = (-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi))
        shape = (num_features,) if per == "unit" else ()
        init = torch.as_tensor(std, dtype=torch.float64).flatten()
        if init.numel() == 1:
            init = init.expand(shape if shape else 1)
        if init.numel() != max(1, math.prod(shape)):
            raise ValueError(f"GaussianNoise: std must be a number or {num_features} values (one per feature), "
                             f"got {init.numel()} values")
        raw = []
        for value in init.tolist():
            self.transform.check_init(value, "GaussianNoise std")
            if not self.bounds[0] <= value <= self.bounds[1]:
                raise ValueError(f"GaussianNoise: std {value} lies outside bounds {self.bounds}")
            raw.append(self.transform.inverse(value))
        self.register_buffer("raw", torch.tensor(raw, dtype=torch.get_default_dtype()).reshape(shape))
        # (step, call) of the next draw, in a small CPU tensor (not a buffer: not in state_dict, not
        # moved by .to()) that the torch.compile path hands its op; ``step``/``_calls`` read and write it
        self._counters = torch.tensor([-1, 0], dtype=torch.int64)
        self.seed: int | None = None
        self.step: int | None = None
        self.sigma_grad: torch.Tensor | None = None
        self._calls = 0
        self._recording = False
        self._sigma_leaves: list[torch.Tensor] = []
        self._compile_leaf: torch.Tensor | None = None  # the σ leaf of a compiled forward while recording
        self._compile_leaf_used = False

    def _read_counters(self) -> tuple[int, int]:
        """(step, calls) from the host copy kept with the counters tensor's version; the tensor itself
        is read only after the torch.compile path advanced it (a CPU tensor: no device sync, but the
        eager path needs no ``.item()`` at all)."""
        host = getattr(self, "_host_counters", None)
        if host is None or host[0] != self._counters._version:
            step, calls = self._counters.tolist()
            host = self._host_counters = (self._counters._version, step, calls)
        return host[1], host[2]

    def _write_counters(self, step: int, calls: int) -> None:
        self._counters[0] = step
        self._counters[1] = calls
        self._host_counters = (self._counters._version, step, calls)

    @property
    def step(self) -> int | None:
        """The T1 step the keys are drawn for (set by the optimizer; None: 0)."""
        step = self._read_counters()[0]
        return None if step < 0 else step

    @step.setter
    def step(self, value: int | None) -> None:
        self._write_counters(-1 if value is None else int(value), self._read_counters()[1])

    @property
    def _calls(self) -> int:
        return self._read_counters()[1]

    @_calls.setter
    def _calls(self, value: int) -> None:
        self._write_counters(self._read_counters()[0], int(value))

    # ---- the hyperparameter ----
    def value(self) -> torch.Tensor:
        """σ = φ(λ), shaped like ``raw``."""
        return self.transform.value(self.raw)

    def derivative(self) -> torch.Tensor:
        """dσ/dλ, shaped like ``raw``."""
        return self.transform.derivative(self.raw)

    def hyperparameter(self, name: str = "noise") -> Hyperparameter:
        """The raw λ as a t1t2_fast.penalties.Hyperparameter (it shares ``raw``'s storage)."""
        return Hyperparameter(name, "noise", False, self.transform, self.raw, self.bounds)

    def project(self) -> None:
        """Clamp λ so that σ stays inside ``bounds``."""
        self.hyperparameter().project()

    # ---- keys and σ-gradients ----
    def reset_calls(self) -> None:
        """Start counting forwards from 0 again (the next forward replays the first key of this
        seed/step) and, while recording, zero ``sigma_grad``."""
        self._calls = 0
        self._sigma_leaves = []
        self._compile_leaf = self._new_leaf() if self._recording else None
        self._compile_leaf_used = False
        self.sigma_grad = torch.zeros_like(self.raw) if self._recording else None

    def record_grad(self, enabled: bool = True) -> "GaussianNoise":
        """Start (or stop) accumulating ∂L/∂σ of the forwards into ``sigma_grad``."""
        self._recording = bool(enabled)
        self._sigma_leaves = []
        self._compile_leaf = self._new_leaf() if self._recording else None
        self._compile_leaf_used = False
        self.sigma_grad = torch.zeros_like(self.raw) if self._recording else None
        return self

    @property
    def sigma_leaves(self) -> list[torch.Tensor]:
        """The σ leaf tensors of the forwards since ``reset_calls()`` while recording (inputs for
        ``torch.autograd.grad``)."""
        if self._compile_leaf is not None and self._compile_leaf_used:  # compiled forwards share one leaf
            return list(self._sigma_leaves) + [self._compile_leaf]
        return list(self._sigma_leaves)

    # ---- the replayed-hyperparameter protocol (t1t2_fast.noise.hypergrad.Replayed) ----
    @property
    def recorded_leaves(self) -> list[torch.Tensor]:
        """The protocol's name for ``sigma_leaves``."""
        return self.sigma_leaves

    @property
    def recorded_grad(self) -> torch.Tensor | None:
        """The protocol's name for ``sigma_grad``: ∂L/∂σ summed over the recorded forwards."""
        return self.sigma_grad

    def keying_state(self) -> tuple:
        """Everything a forward and backward since ``reset_calls()`` changed: the key counters and the
        recording (``set_keying_state`` puts it back)."""
        return (self.step, self._calls, self._recording, self.sigma_grad, list(self._sigma_leaves),
                self._compile_leaf, self._compile_leaf_used)

    def set_keying_state(self, state: tuple) -> None:
        (self.step, self._calls, self._recording, self.sigma_grad, leaves, self._compile_leaf,
         self._compile_leaf_used) = state
        self._sigma_leaves = list(leaves)

    def _accumulate(self, grad: torch.Tensor) -> None:
        if self.sigma_grad is not None:
            self.sigma_grad = self.sigma_grad + grad.reshape(self.raw.shape).to(self.raw.dtype)

    def _next_key(self, draw: bool) -> int | None:
        call = self._calls
        self._calls += 1
        if self.seed is not None:
            return noise_key(self.seed, 0 if self.step is None else self.step, call)
        return int(torch.randint(0, 2**63 - 1, ()).item()) if draw else None

    # ---- forward ----
    def _layout(self, x: torch.Tensor) -> tuple[int, int]:
        if self.per == "layer":
            return 1, 1
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"GaussianNoise(per='unit', num_features={self.num_features}) needs an input of shape "
                             f"(N, {self.num_features}, ...), got {tuple(x.shape)}")
        return self.num_features, math.prod(x.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not noise_enabled():
            return x
        if torch.compiler.is_compiling() and self.seed is not None:
            return self._compiled_forward(x)
        channels, inner = self._layout(x)
        sigma = self.value().detach()
        # keyed by an optimizer (seed set): σ = 0 is not tested for (a host read), x + 0·ε is x
        active = self._recording or self.seed is not None or bool((sigma != 0).any())
        key = self._next_key(draw=active)
        if not active:
            return x
        sigma = sigma.to(device=x.device, dtype=compute_dtype(x.dtype))
        self.input_dtype = x.dtype  # what the noise hypergradient's finite difference is made of
        if self._recording:
            sigma = sigma.clone().requires_grad_(True)
            sigma.register_hook(self._accumulate)
            self._sigma_leaves.append(sigma)
        return gaussian_noise(x, sigma, key, channels, inner, self.mode, self.backend)

    def _compiled_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward as torch.compile traces it: the same draws as eager mode (the key comes from the
        counters tensor inside the op), with nothing a graph would specialize on per step. σ = 0 is not
        skipped (x + 0·ε is x). While recording, σ is one leaf per step (made outside the graph, see
        ``_recording_leaf``) whose hook adds ∂L/∂σ into ``sigma_grad``, as eager mode's leaves do;
        ``sigma_leaves`` (the exact noise hypergradient's double backward) is eager-only."""
        channels, inner = self._layout(x)
        if self._recording:
            sigma = self._recording_leaf()
            self._compile_leaf_used = True
        else:
            sigma = self.value().detach()
        sigma = sigma.to(device=x.device, dtype=compute_dtype(x.dtype))
        backend = self.backend if self.backend != "auto" else resolve_backend("auto", x.device).name
        y, _ = _gaussian_noise_keyed(x, sigma, self._counters, int(self.seed), channels, inner, self.mode, backend)
        self._counters[1] += 1
        return y

    def __setstate__(self, state):
        state = dict(state)
        if "_counters" not in state:  # pickled before step/_calls lived in the counters tensor
            step, calls = state.pop("step", None), state.pop("_calls", 0)
            state["_counters"] = torch.tensor([-1 if step is None else step, calls], dtype=torch.int64)
        state.setdefault("_compile_leaf", None)
        state.setdefault("_compile_leaf_used", False)
        super().__setstate__(state)

    def extra_repr(self) -> str:
        std = self.value().detach()
        std = f"{std.item():g}" if std.dim() == 0 else f"[{std.numel()} values]"
        unit = f", num_features={self.num_features}" if self.per == "unit" else ""
        return f"std={std}, per={self.per!r}{unit}, mode={self.mode!r}, transform={self.transform.name!r}"
