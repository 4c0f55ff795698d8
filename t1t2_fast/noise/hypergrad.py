"""Replayed hyperparameters inside ``T1T2``: noise levels (the model's ``GaussianNoise`` modules)
and user-defined ``Tunable`` values of the training loss; their binding, keys, and hypergradient
(docs/design.md)

    h = dc/dλ · ∂/∂c [uᵀ ∇θL(θ; c, ε)],   u = J ⊙ v,

a mixed second derivative through the network at the pre-step θ and the T1 step's own noise
sample ε (c = σ for a noise level). Three ways to get it (``noise_hypergrad=``, for both kinds):

- ``"fd"``: (∇cL(θ + r u) − ∇cL(θ)) / r with r = fd_eps / ‖u‖₂; ∇cL(θ) comes from the T1
  backward, so this costs one extra forward/backward.
- ``"fd-central"``: (∇cL(θ + r u) − ∇cL(θ − r u)) / (2r): two extra passes, error O(r²).
- ``"exact"``: one forward at θ, the parameter gradient with ``create_graph=True``, and a second
  backward of uᵀ∇θL to c. Exact to rounding; holds the double-backward graph.

One code path serves both kinds: each module implements the small protocol ``Replayed`` (a leaf
tensor of c per forward while recording, its gradients summed by hooks, and the key counters a
replay resets).

θ is moved with the fused ``perturb_`` op (θ ← θ_stash + s·u, first saving θ⁺) and put back with
``restore_``, a bit-exact copy of θ⁺. Each extra pass replays the T1 step's ε (the modules' keys
depend on the step and the call index only), its dropout masks (torch's generator is rewound to
the state the T1 closure saw, then returned to where training left it), and leaves the model's
buffers (BatchNorm running statistics) as the T1 step left them.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from .. import closures
from ..closures import scalar_loss
from ..distributed import module_seed
from ..penalties import Hyperparameter
from ..tunables import Tunable
from .module import GaussianNoise, no_noise

NOISE_HYPERGRAD_MODES = ("fd", "fd-central", "exact")


class Replayed(Protocol):
    """What a module whose value c = φ(λ) enters the training loss offers the replayed hypergradient
    (``GaussianNoise``: c = σ; ``Tunable``: c itself)."""

    raw: "torch.Tensor"                 # λ, updated in place by the hyper-optimizer
    bounds: tuple                       # (lo, hi) of c, kept in sync with the hyperparameter's
    step: int | None                    # the T1 step its random draws are keyed by

    def reset_calls(self) -> None: ...  # a new forward sequence: draws from the first key, recorded grad zeroed
    def record_grad(self, enabled: bool): ...  # while recording, each forward uses c as a fresh leaf
    @property
    def recorded_leaves(self) -> list: ...     # those leaves since reset_calls (for a double backward)
    @property
    def recorded_grad(self): ...               # ∂L/∂c summed over them by their hooks (None: not recording)
    def keying_state(self) -> tuple: ...       # counters and recording, for set_keying_state
    def set_keying_state(self, state: tuple) -> None: ...


@dataclass
class Binding:
    """One replayed module (a GaussianNoise of the model, a Tunable of the model or of the loss) and
    the hyperparameter that holds its λ (the module's own ``raw`` buffer)."""

    hyper: Hyperparameter
    module: Replayed


NoiseBinding = Binding  # the name from before Tunables existed


def bind_noise(model: nn.Module, seed: int, backend: str, rank: int = 0) -> list[Binding]:
    """The model's GaussianNoise modules as hyperparameters ``noise.<module name>``. The raw tensor
    is the module's own buffer, so the hyper-optimizer's in-place updates reach the module. A
    module left at backend="auto" runs its noise op on the optimizer's backend. ``rank``: the
    process's rank, folded into the modules' keys (distributed.module_seed) so ranks draw their own ε."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, GaussianNoise):
            module.seed = module_seed(seed, len(out), rank)  # keyed by its position among the noise modules
            hyper = Hyperparameter(f"noise.{name}" if name else "noise", "noise", False, module.transform,
                                   module.raw, tuple(module.bounds), [])
            out.append(Binding(hyper, module))
            if module.backend == "auto":
                module.backend = backend
    return out


def bind_tunables(model: nn.Module, tunables: Sequence[Tunable], taken: Sequence[str] = ()) -> list[Binding]:
    """The model's ``Tunable`` submodules as hyperparameters ``tunable.<module name>``, then the
    loss's (``tunables``, passed to T1T2) as ``tunable.<name>``. ``taken``: the names already in use
    (penalties, noise); a clash, a loss Tunable without a name, or one that is also in the model is a
    ``ValueError``."""
    out, seen = [], set(taken)
    in_model = {}
    for name, module in model.named_modules():
        if isinstance(module, Tunable):
            in_model[id(module)] = name
            out.append(Binding(module.hyperparameter(f"tunable.{name}" if name else "tunable"), module))
    for k, t in enumerate(tunables):
        if not isinstance(t, Tunable):
            raise TypeError(f"tunables[{k}] must be a t1t2_fast.Tunable, got {type(t).__name__}")
        if id(t) in in_model:
            raise ValueError(f"tunables[{k}] ({t.name or 'unnamed'}) is the model's submodule {in_model[id(t)]!r}, "
                             f"which T1T2 finds by itself (as tunable.{in_model[id(t)]}); pass only the Tunables "
                             f"that live outside the model (in the loss)")
        if t.name is None:
            raise ValueError(f"tunables[{k}] has no name: a Tunable used in the loss is named by "
                             f"Tunable(..., name='...'), its hyperparameter being tunable.<name>")
        out.append(Binding(t.hyperparameter(f"tunable.{t.name}"), t))
    for b in out:
        if b.hyper.name in seen:
            raise ValueError(f"two hyperparameters are named {b.hyper.name!r}; give the Tunables distinct names")
        seen.add(b.hyper.name)
    return out


def norm_sq(backend, u: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """2‖u‖² as a float64 0-d tensor on the device (no host read): the backend's fused dot (no upcast
    copy of u), whose "l2" kind weighs u by m = 2u, so each term is 2‖u_t‖²."""
    terms = [backend.penalty_segment_dot(x, x, 1, "l2")[0].to(torch.float64) for x in u if x.numel()]
    if not terms:
        return torch.zeros((), dtype=torch.float64, device=device)
    total = terms[0]
    for t in terms[1:]:  # left to right, as a host sum of the same floats
        total = total + t
    return total


def prepare(bindings: list[Binding], step: int, record: bool) -> None:
    """Key the modules' noise for T1 step ``step`` (1-based) from the first forward on, and say
    whether their forwards should keep c as a leaf whose gradient can be read back."""
    for b in bindings:
        b.module.step = step
        b.module.reset_calls()
        b.module.record_grad(record)


def recorded_grads(bindings: list[Binding], dtype: torch.dtype) -> list[torch.Tensor]:
    """∂L/∂c per module, summed over the forwards since ``prepare`` (zeros if none reached c)."""
    out = []
    for b in bindings:
        g = b.module.recorded_grad
        out.append(torch.zeros_like(b.hyper.raw, dtype=dtype) if g is None else g.detach().to(dtype))
    return out


def keying(bindings: list[Binding]) -> list[tuple]:
    """The modules' keying and recording state (``set_keying`` puts it back): what a forward and
    backward run since ``prepare`` left in them."""
    return [b.module.keying_state() for b in bindings]


def set_keying(bindings: list[Binding], saved: list[tuple]) -> None:
    """Put back the state ``keying`` took."""
    for b, state in zip(bindings, saved):
        b.module.set_keying_state(state)


@dataclass
class Replay:
    """What a hyper step needs to rerun the training closure of the stashed T1 step."""

    closure: Callable[[], torch.Tensor]
    step: int
    rng: tuple | None  # torch's generator state(s) just before the T1 closure ran


@dataclass
class NoiseStash:
    """The noise hyperparameters' part of a T1 step's stash: the step number its keys came from,
    ∇cL(θ) recorded in its backward (for "fd"), and how to rerun its training closure (``replay``,
    or after a resume only torch's generator state ``rng`` from the checkpoint)."""

    step: int
    g0: list[torch.Tensor] | None
    replay: Replay | None = None
    rng: tuple | None = None

    def rng_state(self) -> tuple | None:
        """torch's generator state(s) just before the stashed T1 step's closure ran (None if unknown)."""
        return self.replay.rng if self.replay is not None else self.rng

    def state(self) -> dict:
        """A state_dict entry (the closure itself is not saved: pass ``hyper_step(train=)`` after a resume)."""
        return {"step": self.step, "g0": None if self.g0 is None else [g.clone() for g in self.g0],
                "rng": copy_rng(self.rng_state())}

    @classmethod
    def from_state(cls, saved: dict | None, step: int, device: torch.device) -> "NoiseStash":
        """The inverse of ``state``; ``step`` is used for a checkpoint saved without the noise part."""
        saved = saved or {"step": step, "g0": None}
        return cls(saved["step"], None if saved["g0"] is None else [g.to(device).clone() for g in saved["g0"]],
                   rng=copy_rng(saved.get("rng")))


def copy_rng(state: tuple | None) -> tuple | None:
    """A copy of a (CPU generator state, CUDA generator state or None) pair; generator states are
    CPU byte tensors wherever the model lives."""
    if state is None:
        return None
    return tuple(None if t is None else t.detach().to("cpu", copy=True) for t in state)


def sync_bounds(bindings: list[Binding]) -> None:
    """Give each module the bounds of its hyperparameter (a module projects with its own copy)."""
    for b in bindings:
        b.module.bounds = tuple(b.hyper.bounds)


def rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.random.get_rng_state(), cuda


def set_rng_state(device: torch.device, state: tuple) -> None:
    cpu, cuda = state
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


@contextmanager
def replaying(model: nn.Module, bindings: list[Binding], replay: Replay, device: torch.device, record: bool):
    """Rerun conditions for the stashed step's training closure: same noise keys and generator
    state, model buffers restored afterwards, training RNG stream and noise keys left as before."""
    raws = {id(b.hyper.raw) for b in bindings}
    buffers = [(b, b.clone()) for b in model.buffers() if id(b) not in raws]
    after = rng_state(device)
    saved = keying(bindings)
    try:
        if replay.rng is not None:
            set_rng_state(device, replay.rng)
        prepare(bindings, replay.step, record)
        yield
    finally:
        with torch.no_grad():
            for b, copy in buffers:
                b.copy_(copy)
        set_rng_state(device, after)
        set_keying(bindings, saved)


def noise_hypergrads(*, mode: str, fd_eps: float, backend, model: nn.Module, bindings: list[Binding],
                     params: list[torch.Tensor], theta: list[torch.Tensor], u: list[torch.Tensor],
                     g0: list[torch.Tensor] | None, replay: Replay, save: list[torch.Tensor],
                     dtype: torch.dtype, loss_scale: float | torch.Tensor | None = None,
                     norm: float | None = None) -> dict[str, torch.Tensor]:
    """Hypergradients of the raw replayed hyperparameters (noise levels and tunables; before the
    hyper-optimizer), h = dc/dλ · ∂c(uᵀ∇θL).

    ``params`` are the tensors the T1 step updated (now θ⁺), ``theta`` their stashed pre-step
    values and ``u`` = J ⊙ v, all aligned; ``save`` receives θ⁺ (same shapes and dtype as
    params) so that it can be restored bit-exactly; ``g0`` is ∇cL(θ) from the T1 backward (fd),
    unscaled. ``loss_scale``: the GradScaler scale of the T1 step; the replayed training loss is
    multiplied by it for the backward (fp16 autocast) and the c-gradients divided by it again.
    ``norm``: ‖u‖ if the caller has read it already (``norm_sq``), else it is read here (one host read)."""
    device = params[0].device if params else torch.device("cpu")
    zeros = {b.hyper.name: torch.zeros_like(b.hyper.raw) for b in bindings}
    # ‖u‖ with the backend's fused dot (no upcast copy of u): its "l2" kind weighs u by m = 2u, so
    # each term is 2‖u_t‖², halved (exactly) before the square root
    if norm is None:
        from ..guard import host_list
        norm = math.sqrt(0.5 * host_list(norm_sq(backend, u, device).reshape(1))[0]) if u else 0.0
    if norm == 0.0 or not math.isfinite(norm):
        return zeros  # v ⊥ every direction the step can move, or a non-finite v: no information

    def unscaled(grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return grads if loss_scale is None else [g / loss_scale for g in grads]

    def sigma_grads_at(scale: float) -> list[torch.Tensor]:
        backend.perturb_(params, [], theta, u, scale)
        with replaying(model, bindings, replay, device, record=True), torch.enable_grad():
            # the parameters' grads are set aside: a closure that runs its own backward (torch.optim's
            # convention) leaves ∇cL in the modules' recorded_grad, and T1's grads stay as they were
            with closures.grads_set_aside(model_params):
                out = replay.closure()
                if any(p.grad is not None for p in model_params):
                    if loss_scale is not None:
                        raise closures.backward_closure_error("a noise hypergradient after a GradScaler step")
                    return [_recorded(b, dtype) for b in bindings]
                if out is None:
                    raise closures.backward_closure_error(f"noise_hypergrad={mode!r}")
                loss = scalar_loss(out, "training")
                return unscaled(_grad_per_module(loss if loss_scale is None else loss * loss_scale, bindings, dtype))

    model_params = [p for p in model.parameters() if p.requires_grad]
    backend.perturb_(params, save, theta, u, 0.0)  # θ⁺ → save, θ ← θ_stash (exact: θ + 0·u)
    try:
        if mode == "exact":
            with replaying(model, bindings, replay, device, record=True), torch.enable_grad(), \
                    closures.grads_set_aside(model_params):
                out = replay.closure()
                if out is None or any(p.grad is not None for p in model_params):
                    raise closures.backward_closure_error("noise_hypergrad='exact' (a double backward)")
                loss = scalar_loss(out, "training")
                loss = loss if loss_scale is None else loss * loss_scale
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                inner = sum((g * ui.to(g.dtype)).sum() for g, ui in zip(grads, u) if g is not None)
                h = unscaled(_grad_per_module(inner, bindings, dtype))
        else:
            r = fd_eps / norm
            plus = sigma_grads_at(r)
            low = sorted({str(b.module.input_dtype) for b in bindings
                          if getattr(b.module, "input_dtype", None) in (torch.float16, torch.bfloat16)})
            if low:
                warnings.warn(f"noise_hypergrad={mode!r} differences two forward/backward passes that run in "
                              f"{', '.join(low)} (autocast or low-precision parameters): with fd_eps={fd_eps:g} "
                              f"the difference is mostly rounding and the noise levels drift. Use "
                              f"noise_hypergrad='exact', or fd_eps >= 0.1 (docs/reliability.md)", RuntimeWarning,
                              stacklevel=4)
            if mode == "fd":
                if g0 is None:
                    raise RuntimeError("noise_hypergrad='fd' needs ∇cL(θ) from the T1 backward, and the T1 step "
                                       "did not record it")
                h = [(a - b) / r for a, b in zip(plus, g0)]
            else:
                minus = sigma_grads_at(-r)
                h = [(a - b) / (2 * r) for a, b in zip(plus, minus)]
    finally:
        backend.restore_(params, save)
    return {b.hyper.name: (b.hyper.derivative().detach().to(dtype) * hb.reshape(b.hyper.raw.shape)).to(
        b.hyper.raw.dtype) for b, hb in zip(bindings, h)}


def _recorded(b: Binding, dtype: torch.dtype) -> torch.Tensor:
    """∂L/∂c of a module from a backward the training closure ran itself (zeros if none reached c)."""
    g = b.module.recorded_grad
    return torch.zeros(b.hyper.raw.shape, dtype=dtype, device=b.hyper.raw.device) if g is None else \
        g.detach().to(dtype).reshape(b.hyper.raw.shape)


def _grad_per_module(output, bindings, dtype) -> list[torch.Tensor]:
    """∂output/∂c per module, summed over the c leaves of its forwards since the replay began
    (zeros where output does not depend on them)."""
    leaves = [b.module.recorded_leaves for b in bindings]
    flat = [x for group in leaves for x in group]
    depends = flat and isinstance(output, torch.Tensor) and output.requires_grad
    grads = iter(torch.autograd.grad(output, flat, allow_unused=True) if depends else [None] * len(flat))
    out = []
    for b, group in zip(bindings, leaves):
        total = torch.zeros(b.hyper.raw.shape, dtype=dtype, device=b.hyper.raw.device)
        for g in (next(grads) for _ in group):
            if g is not None:
                total = total + g.detach().to(dtype).reshape(total.shape)
        out.append(total)
    return out


__all__ = ["NOISE_HYPERGRAD_MODES", "Binding", "NoiseBinding", "NoiseStash", "Replay", "Replayed", "bind_noise",
           "bind_tunables", "copy_rng", "keying",
           "prepare", "recorded_grads", "rng_state", "set_keying", "set_rng_state", "sync_bounds", "noise_hypergrads"]
