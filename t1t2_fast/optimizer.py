"""The ``T1T2`` optimizer: T1 steps on the training loss, T2 steps on the hyperparameters.

This class is the orchestration and the bookkeeping; the work lives in modules named for it:
``functional`` (the fused T1 step, the T2 penalty reductions, the stash), ``penalties`` (L2/L1,
transforms, bounds), ``noise.hypergrad`` (noise hyperparameters: keys, replay, hypergradient),
``hyper_optim`` (the update of λ), ``guard`` (the non-finite guard), ``distributed`` (process
groups), ``checkpoint`` (state_dict). The math is docs/design.md.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Iterable

import torch
from torch import nn

from . import checkpoint, distributed
from .batchnorm import keeps_running_stats
from ._dtypes import OPTIMIZERS, SUPPORTED_DTYPES, compute_dtype
from .backend import Backend, resolve_backend
from . import closures
from .closures import scalar_loss
from .functional import Stash, penalty_hypergrads, reused_buffer, t1_step
from .guard import NonFiniteError, SkipGuard, all_finite, finite_flag, host_list
from .hyper_optim import HYPER_OPTIMIZERS, HyperOptimizer
from .noise import hypergrad as noise_hyper
from .penalties import (L2, Hyperparameter, LogTransform, ParamFilter, Penalty, Target, bind_penalties,
                        set_bounds)
from .tunables import Tunable, evaluating

HYPERGRAD_MODES = ("exact", "sgd")
# What T1T2(optimizer=) accepts: the fused op's optimizers, and "adamw" (adam plus a tuned decoupled L2)
T1T2_OPTIMIZERS = OPTIMIZERS + ("adamw",)
# The options a parameter group may set (torch.optim semantics); the others are the run's
GROUP_OPTIONS = ("lr", "momentum", "nesterov", "betas", "eps")
# T1T2(tune_lr=): one learning-rate scale for the network, per parameter tensor, or per parameter group
TUNE_LR_CHOICES = (None, "network", "layer", "group")
LR_SCALE_BOUNDS = (1e-3, 1e3)

__all__ = ["T1T2", "NonFiniteError", "OPTIMIZERS", "HYPER_OPTIMIZERS", "HYPERGRAD_MODES", "SUPPORTED_DTYPES"]


def _check_choice(what, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {what}={value!r}; expected one of {choices}")


def _check_arguments(optimizer, hyper_optimizer, hypergrad, noise_hypergrad, distributed_noise, fd_eps, lr, momentum,
                     nesterov, betas, hyper_every) -> None:
    """The constructor's argument checks, each with the message a user needs."""
    _check_choice("optimizer", optimizer, T1T2_OPTIMIZERS)
    _check_choice("hyper_optimizer", hyper_optimizer, HYPER_OPTIMIZERS)
    _check_choice("hypergrad", hypergrad, HYPERGRAD_MODES)
    _check_choice("noise_hypergrad", noise_hypergrad, noise_hyper.NOISE_HYPERGRAD_MODES)
    _check_choice("distributed_noise", distributed_noise, distributed.DISTRIBUTED_NOISE)
    if not (fd_eps > 0 and math.isfinite(fd_eps)):
        raise ValueError(f"fd_eps must be a finite number > 0, got {fd_eps}")
    _check_group_options(optimizer, lr, momentum, nesterov, betas, "")
    if int(hyper_every) != hyper_every or hyper_every < 1:
        raise ValueError(f"hyper_every must be a positive integer, got {hyper_every!r}")


def _check_group_options(optimizer, lr, momentum, nesterov, betas, where: str) -> None:
    """The checks of the options a parameter group may set; ``where`` names the group in the message."""
    if not (lr >= 0 and math.isfinite(lr)):
        raise ValueError(f"{where}lr must be a finite number >= 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"{where}momentum must lie in [0, 1), got {momentum}")
    if nesterov and (optimizer != "sgd" or momentum <= 0):
        raise ValueError(f"{where}nesterov=True needs optimizer='sgd' and momentum > 0")
    if len(tuple(betas)) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"{where}betas must be two numbers in [0, 1), got {betas}")


def _group_selects(spec, name: str, param: torch.Tensor) -> bool:
    """Whether a parameter group's "params" selects a parameter: a list of exact names, a regular
    expression searched in the name, or a callable (name, param) -> bool (as a penalty's params=)."""
    if callable(spec):
        return bool(spec(name, param))
    if isinstance(spec, str):
        return re.search(spec, name) is not None
    return name in spec


def _build_groups(named, groups, defaults: dict, optimizer: str) -> list[dict]:
    """torch.optim param groups from the user's ``param_groups``: each group's "params" (names, a
    regex or a callable) resolved to tensors in model order, its options over the constructor's;
    the parameters no group selects form a last group with the constructor's options (left out
    when empty). A parameter two groups select, an unknown key or a group that selects nothing is an
    error."""
    owner: dict[str, int] = {}
    out = []
    for k, g in enumerate(groups):
        if not isinstance(g, dict) or "params" not in g:
            raise ValueError(f"param_groups[{k}] must be a dict with a 'params' entry (parameter names, a regex "
                             f"or a callable (name, param) -> bool) and options among {GROUP_OPTIONS}")
        unknown = sorted(set(g) - {"params", *GROUP_OPTIONS})
        if unknown:
            raise ValueError(f"param_groups[{k}] has unknown keys {unknown}; a group may set {GROUP_OPTIONS} "
                             f"(the other settings are the run's)")
        spec = g["params"]
        if not (callable(spec) or isinstance(spec, str)):
            spec = list(spec)
            if not all(isinstance(n, str) for n in spec):
                raise TypeError(f"param_groups[{k}]['params'] must hold parameter names (str), a regex or a "
                                f"callable (name, param) -> bool; tensors are not accepted, as hyperparameters "
                                f"are named after parameters")
            missing = sorted(set(spec) - {n for n, _ in named})
            if missing:
                raise ValueError(f"param_groups[{k}] names unknown parameters {missing}; the trainable ones are "
                                 f"{[n for n, _ in named]}")
        chosen = [n for n, p in named if _group_selects(spec, n, p)]
        if not chosen:
            raise ValueError(f"param_groups[{k}] selects no trainable parameter (its params are {g['params']!r})")
        for n in chosen:
            if n in owner:
                raise ValueError(f"parameter {n!r} is selected by param_groups[{owner[n]}] and param_groups[{k}]; "
                                 f"a parameter belongs to one group")
            owner[n] = k
        options = {**defaults, **{key: g[key] for key in GROUP_OPTIONS if key in g}}
        options["betas"] = tuple(options["betas"])
        _check_group_options(optimizer, options["lr"], options["momentum"], options["nesterov"], options["betas"],
                             f"param_groups[{k}]: ")
        out.append((chosen, options))
    rest = [n for n, _ in named if n not in owner]
    if rest:  # the default group: last, with the constructor's options
        out.append((rest, dict(defaults)))
    tensors = dict(named)
    return [{"params": [tensors[n] for n in names], **options} for names, options in out]


def _with_weight_decay(penalties: list, named, optimizer: str, weight_decay, weight_decay_params) -> list:
    """``optimizer="adamw"``: AdamW's decay η·wd·θ is the decoupled L2 η·2cθ with c = wd/2, added as a
    tuned hyperparameter ``l2.<name>`` per decayed tensor (dim >= 2 unless ``weight_decay_params``)."""
    if optimizer != "adamw":
        if weight_decay is not None or weight_decay_params is not None:
            raise ValueError(f"weight_decay= and weight_decay_params= belong to optimizer='adamw' (got "
                             f"optimizer={optimizer!r}); for {optimizer} add a penalty, e.g. L2(c, decoupled=True)")
        return penalties
    wd = 1e-2 if weight_decay is None else float(weight_decay)
    if not (wd > 0 and math.isfinite(wd)):
        raise ValueError(f"optimizer='adamw' needs weight_decay > 0 (its coefficient is tuned in log scale), got "
                         f"{weight_decay}; use optimizer='adam' for no decay")
    decay = L2(wd / 2, per="layer", decoupled=True, params=weight_decay_params)
    for pen in penalties:
        if isinstance(pen, Penalty) and pen.kind == "l2" and pen.decoupled:
            both = [n for n, p in named if pen.selects(n, p) and decay.selects(n, p)]
            if both:
                raise ValueError(f"optimizer='adamw' already applies its weight decay to {both} as a tuned decoupled "
                                 f"L2 (l2.<name>, c = weight_decay/2), and {pen!r} is a decoupled L2 on them too; "
                                 f"drop it, or narrow weight_decay_params= or its params=")
    return penalties + [decay]


def _lr_scale_hypers(tune_lr, named, group_indices: list[list[int]], dtype: torch.dtype) -> list[Hyperparameter]:
    """``tune_lr``'s hyperparameters: a multiplier s = exp(λ) (init 1, bounds LR_SCALE_BOUNDS) on the lr
    of the tensors it targets: ``lr_scale`` (every tensor), ``lr_scale.<param name>`` (one per tensor)
    or ``lr_scale.group<k>`` (one per parameter group)."""
    if tune_lr not in TUNE_LR_CHOICES:
        raise ValueError(f"unknown tune_lr={tune_lr!r}; expected one of {TUNE_LR_CHOICES}")
    if tune_lr is None:
        return []
    device = named[0][1].device

    def make(name, indices):
        raw = torch.zeros((), dtype=dtype, device=device)  # s = exp(0) = 1: the lr as given
        return Hyperparameter(name, "lr", False, LogTransform(), raw, LR_SCALE_BOUNDS, [Target(i, 1) for i in indices])

    if tune_lr == "network":
        return [make("lr_scale", range(len(named)))]
    if tune_lr == "layer":
        return [make(f"lr_scale.{n}", [i]) for i, (n, _) in enumerate(named)]
    return [make(f"lr_scale.group{k}", indices) for k, indices in enumerate(group_indices)]


def _scaler_scale(scaler) -> torch.Tensor | None:
    """A GradScaler's current scale as a 0-d tensor on its device (``get_scale()`` would read it back
    to the host), or None without an enabled scaler."""
    if scaler is None or not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    if scale is None:  # before its first scale(): the initial value
        return torch.tensor(float(scaler.get_scale()), dtype=torch.float32)
    return scale.detach().reshape(())


def _trainable(model: nn.Module) -> tuple[list[tuple[str, torch.Tensor]], torch.device, torch.dtype]:
    """The model's trainable (name, parameter) pairs, which must share one device and one dtype."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    dtypes = {p.dtype for _, p in named}
    devices = {p.device for _, p in named}
    if len(devices) > 1 or len(dtypes) > 1:
        detail = ", ".join(f"{n}: {p.dtype} on {p.device}" for n, p in named)
        raise ValueError(f"T1T2 needs all trainable parameters on one device with one dtype, found "
                         f"{sorted(map(str, devices))} and {sorted(map(str, dtypes))} ({detail}); "
                         f"move the model with model.to(device, dtype)")
    dtype = dtypes.pop()
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported parameter dtype {dtype}; expected one of {SUPPORTED_DTYPES}")
    return named, devices.pop(), dtype


class T1T2(torch.optim.Optimizer):
    """Trains a model's parameters (T1) and tunes its regularization hyperparameters (T2).

    ``step(closure)`` does one training step with the penalty gradients added to the data gradient;
    after a step where ``hyper_due`` is true, ``hyper_step(val_closure)`` differentiates the
    validation loss through that step and updates the hyperparameters (docs/design.md).

    Across processes (``t1t2_fast.distributed``): ``model`` may be a ``DistributedDataParallel``
    wrapper (hyperparameters are named after the module inside it). ``process_group`` None reduces
    over the wrapper's group; for a plain module, over the default group when torch.distributed is
    initialized with more than one process (frameworks build the optimizer from the unwrapped module
    and train through a DDP wrapper), else over none. ``process_group=False`` opts out (no
    reduction: each rank's λ follows its own hypergradients); an explicit group is used as given.
    Each rank then calls ``step``/``hyper_step`` with its own shards; ``hyper_step`` averages the
    ranks' hypergradients (one small all-reduce, which also checks that λ agrees on every rank).
    ``distributed_noise``: "exact" (default) averages the validation gradient first when the model
    has noise hyperparameters, whose hypergradient is bilinear in it and the training shard, so the
    result is the one-process value; "local" uses each rank's own (unbiased, only the small vector
    is sent).

    Reliability (docs/reliability.md): with ``skip_nonfinite=True`` (default, lazy), a T1 step whose
    training loss is Inf/NaN, or whose gradients GradScaler found Inf/NaN in, is skipped on the
    device: the fused op reads the flag there and writes nothing (θ, momentum, Adam's moments, the
    stash), with no host sync; the step still counts (``steps``, Adam's bias-correction count, the
    noise keys move on). A ``step()`` without a loss (no closure) and without a GradScaler scans the
    gradients in the op instead. ``skip_nonfinite="grads"`` scans every step's gradients and reads the
    flag back (one sync per step): a skipped step is then as if it were not there. A T2 step whose
    validation loss, validation gradient or hypergradient is non-finite is skipped too (λ and the
    hyper-optimizer state unchanged); ``skipped`` counts them and ``last_skip`` says why (read from
    the device when asked), and ``max_consecutive_skips`` skips in a row raise ``NonFiniteError``
    (lazy: at the next hyper step). ``torch.amp.GradScaler``: ``scaler.step(opt)`` after
    ``scaler.scale(loss).backward()``, or ``opt.step(closure, scaler=scaler)``; the fused op unscales
    in its pass and honours the scaler's found_inf. ``bounds`` ({name or glob pattern: (lo, hi)},
    natural scale) override the declared bounds; a hyper step that would leave them is clipped and
    counted in ``clipped``.

    ``param_groups``: torch.optim parameter groups, ``[{"params": names | regex | callable(name, p),
    "lr"|"momentum"|"nesterov"|"betas"|"eps": ...}, ...]``; the parameters no group selects form a
    last group with the constructor's options (docs/guide.md, "Parameter groups").
    ``optimizer="adamw"``: adam plus a tuned decoupled L2 ``L2(weight_decay / 2, decoupled=True)`` on
    the tensors ``weight_decay_params`` selects (default dim >= 2), torch.optim.AdamW's update.
    ``free_grads``: set every parameter's ``.grad`` to None after each T1 step that was taken, as
    ``zero_grad()`` would before the next one, so that the hyper step's validation gradient does not
    sit in memory beside them (one parameter-sized buffer less at the peak); opt-in, because code that
    reads ``.grad`` after ``step()`` (gradient logging, clipping statistics) would find None.
    ``tunables``: the ``Tunable`` values the training loss uses outside the model (each with a
    ``name=``), tuned as ``tunable.<name>``; the model's own Tunables are found like its
    GaussianNoise modules (``tunable.<module name>``). ``noise_hypergrad`` and ``fd_eps`` govern
    the mixed-term hypergradient of both kinds (docs/tunables.md).
    """

    # torch.amp.GradScaler.step hands this optimizer grad_scale/found_inf instead of unscaling itself
    _step_supports_amp_scaling = True

    def __init__(self, model: nn.Module, penalties: Iterable[Penalty] = (), *, optimizer: str = "sgd",
                 lr: float = 0.1, momentum: float = 0.0, nesterov: bool = False,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 hyper_optimizer: str = "adam", hyper_lr: float = 1e-3,
                 hyper_betas: tuple[float, float] = (0.9, 0.999), hyper_eps: float = 1e-8,
                 hyper_every: int = 1, hypergrad: str = "exact", noise_hypergrad: str = "fd",
                 fd_eps: float = 1e-3, backend: str = "auto", seed: int = 0, process_group=None,
                 distributed_noise: str = "exact", skip_nonfinite: bool | str = True,
                 max_consecutive_skips: int | None = 25,
                 bounds: dict[str, tuple[float | None, float | None]] | None = None,
                 param_groups: Iterable[dict] | None = None, weight_decay: float | None = None,
                 weight_decay_params: ParamFilter = None, free_grads: bool = False,
                 tunables: Iterable[Tunable] = (), tune_lr: str | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"T1T2 takes the model (an nn.Module) so it can name hyperparameters after its "
                            f"parameters; got {type(model).__name__}")
        _check_arguments(optimizer, hyper_optimizer, hypergrad, noise_hypergrad, distributed_noise, fd_eps, lr,
                         momentum, nesterov, betas, hyper_every)
        guard = SkipGuard(skip_nonfinite, max_consecutive_skips)
        # A DistributedDataParallel model: names (and noise modules) from the module inside it
        inner, self._ddp = distributed.unwrap(model)
        named, device, dtype = _trainable(inner)

        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, betas=tuple(betas), eps=eps)
        groups = [p for _, p in named] if param_groups is None else _build_groups(named, list(param_groups),
                                                                                  defaults, optimizer)
        super().__init__(groups, defaults)
        self.param_names = [n for n, _ in named]
        self._params = [p for _, p in named]  # model order: the indices stash, state and λ targets use
        index = {id(p): i for i, p in enumerate(self._params)}
        self._group_indices = [[index[id(p)] for p in g["params"]] for g in self.param_groups]
        penalties = _with_weight_decay(list(penalties), named, optimizer, weight_decay, weight_decay_params)
        self.optimizer_name, self.hypergrad_mode = optimizer, hypergrad
        # the fused op's optimizer: adamw is adam plus the decoupled L2 added above
        self._step_optimizer = "adam" if optimizer == "adamw" else optimizer
        self.hyper_every, self.seed = int(hyper_every), int(seed)
        self.compute_dtype = compute_dtype(dtype)
        self.backend: Backend = resolve_backend(backend, device)
        self.hypers: list[Hyperparameter] = bind_penalties(list(penalties), named, self.compute_dtype)
        # learning-rate scales (kind "lr"): after the penalties, handled by the same fused T1/T2 calls
        self.tune_lr = tune_lr
        self.hypers += _lr_scale_hypers(tune_lr, named, self._group_indices, self.compute_dtype)
        self.steps = 0
        self.hyper_steps = 0
        self._stash: Stash | None = None
        self._drift_check: torch.Tensor | None = None  # DDP, lazy guard: the last hyper step's "same λ on every rank"
        self._stash_buffers: dict = {}  # reused stash storage (see functional.t1_step)
        self._coefficients: dict = {}  # per parameter group, the penalty coefficients while λ is unchanged
        self.last_hypergrad: dict[str, torch.Tensor] = {}
        # Noise hyperparameters: the model's GaussianNoise modules
        self.noise_hypergrad_mode, self.fd_eps = noise_hypergrad, float(fd_eps)
        self._model = inner
        # Across processes: the group T2 all-reduces its hypergradients over (DDP averages T1's gradients)
        group = distributed.resolve_group(self._ddp, process_group)
        self._dist = distributed.Reducer(group) if group is not None else None
        self.distributed_noise = distributed_noise
        rank = self._dist.rank if self._dist is not None else 0
        # The replayed hyperparameters (their hypergradient reruns the training closure): the model's
        # GaussianNoise modules, then its Tunables and the loss's (``tunables``), one code path for all
        # (noise.hypergrad's Replayed protocol). The loss's Tunables follow the parameters' device, λ in
        # the compute dtype (float64 for a float64 model).
        tunables = list(tunables)
        for t in tunables:
            if isinstance(t, Tunable):
                t.to(device=device, dtype=self.compute_dtype)
        noise = noise_hyper.bind_noise(inner, self.seed, self.backend.name, rank=rank)
        taken = [h.name for h in self.hypers] + [b.hyper.name for b in noise]
        self._noise = noise + noise_hyper.bind_tunables(inner, tunables, taken)
        self._save_buffers: dict = {}  # θ⁺ while a noise hypergradient moves θ
        self._guard = guard
        self._hyper_optim = HyperOptimizer(hyper_optimizer, hyper_lr, hyper_betas, hyper_eps,
                                           [h.name for h in self.all_hypers])
        self.free_grads = bool(free_grads)  # .grad = None after each T1 step (see the class docstring)
        self._pending = None  # a step(closure, scaler=) waiting for scaler.step(self)
        self._call = None  # the training closure step() is running (closures.TrainingCall)
        for pattern, (lo, hi) in (bounds or {}).items():
            self.set_bounds(pattern, lo, hi)
        self._prepare_noise()

    # -- public views -----------------------------------------------------------------------
    @property
    def params(self) -> list[torch.Tensor]:
        """Every trainable parameter, in the model's order (across the parameter groups)."""
        return self._params

    @property
    def hyper_due(self) -> bool:
        """True right after a T1 step whose stash a ``hyper_step`` can use."""
        return self._stash is not None

    @property
    def world_size(self) -> int:
        """Number of processes the hyper steps reduce over (1 without a process group)."""
        return 1 if self._dist is None else self._dist.world_size

    @property
    def comm_bytes(self) -> int:
        """Bytes of tensors all-reduced by this optimizer's hyper steps so far (payload sizes; DDP's own
        gradient all-reduce in the T1 backward is not counted). 0 without a process group."""
        return 0 if self._dist is None else self._dist.comm_bytes

    @property
    def all_hypers(self) -> list[Hyperparameter]:
        """Penalty hyperparameters, learning-rate scales, then noise ones, then tunables."""
        return self.hypers + [b.hyper for b in self._noise]

    def hyperparameters(self) -> dict[str, float | torch.Tensor]:
        """{name: value c in natural scale}: a float for network/layer, a tensor for unit/element."""
        out = {}
        for h in self.all_hypers:
            c = h.value().detach()
            out[h.name] = c.item() if c.dim() == 0 else c.clone()
        return out

    def log_dict(self, prefix: str = "t1t2/") -> dict[str, float]:
        """A flat {key: float} for a logger (TensorBoard, CSV, a framework's ``log_dict``), all keys
        starting with ``prefix``: one value per network/layer hyperparameter (natural scale, under its
        name); ``name/mean``, ``name/min`` and ``name/max`` for unit/element ones; after a hyper step,
        ``hypergrad/name`` (the last hypergradient, its mean for a tensor); ``skipped/t1``,
        ``skipped/t2`` and ``clipped/name`` (the counts). The tensors are read with one host sync."""
        keys, vals = [], []
        with torch.no_grad():
            for h in self.all_hypers:
                c = h.value().detach().to(torch.float64)
                if c.dim() == 0:
                    keys.append(h.name)
                    vals.append(c)
                else:
                    keys += [f"{h.name}/mean", f"{h.name}/min", f"{h.name}/max"]
                    vals += [c.mean(), c.min(), c.max()]
            for name, g in self.last_hypergrad.items():
                keys.append(f"hypergrad/{name}")
                vals.append(g.detach().to(torch.float64).mean())
            # the lazy guard's and the clip counts' device counters ride along in the same read
            pending = self._guard.pending()
            n_pending = sum(p.numel() for p in pending)
            clips = self._hyper_optim._clip_pending
            extra = pending + ([clips.to(torch.float64)] if clips is not None else [])
            dev = vals[0].device if vals else (extra[0].device if extra else None)
            flat = [v.reshape(1).to(dev) for v in vals] + [e.reshape(-1).to(dev) for e in extra]
            values = host_list(torch.cat(flat)) if flat else []  # the one host sync
        rest = values[len(vals):]
        self._guard.materialize(rest[:n_pending], steps=self.steps, raise_error=False)
        if clips is not None:
            self._hyper_optim.fold_clips(rest[n_pending:])
        out = {prefix + k: float(v) for k, v in zip(keys, values[:len(vals)])}
        for kind in ("t1", "t2"):
            out[f"{prefix}skipped/{kind}"] = float(self.skipped.get(kind, 0))
        for name, count in self.clipped.items():
            out[f"{prefix}clipped/{name}"] = float(count)
        return out

    def raw_hyperparameters(self) -> dict[str, torch.Tensor]:
        """{name: raw λ}; the tensors themselves, so in-place writes change the hyperparameters."""
        return {h.name: h.raw for h in self.all_hypers}

    def bounds(self) -> dict[str, tuple[float, float]]:
        """{name: (lo, hi)} in natural scale; every hyper step keeps the values inside."""
        return {h.name: tuple(h.bounds) for h in self.all_hypers}

    def set_bounds(self, pattern: str, lo: float | None = None, hi: float | None = None) -> list[str]:
        """Bound the hyperparameters whose name matches ``pattern`` (a name or a glob such as
        "l2.*") to [lo, hi] in natural scale (None: unbounded on that side), and project their
        current values inside at once. Returns the names it set."""
        matched = set_bounds(self.all_hypers, pattern, lo, hi)
        noise_hyper.sync_bounds(self._noise)
        return [h.name for h in matched]

    # The hyper-optimizer's settings and counts, and the guard's, as attributes of the optimizer
    def _delegate(owner: str, name: str, doc: str):  # noqa: N805  (a helper run at class creation)
        return property(lambda self: getattr(getattr(self, owner), name),
                        lambda self, value: setattr(getattr(self, owner), name, value), doc=doc)

    hyper_optimizer_name = _delegate("_hyper_optim", "name", "The hyper-optimizer: 'sgd' or 'adam'.")
    hyper_lr = _delegate("_hyper_optim", "lr", "The hyper-optimizer's learning rate η_h.")
    hyper_betas = _delegate("_hyper_optim", "betas", "The hyper-optimizer's Adam betas.")
    hyper_eps = _delegate("_hyper_optim", "eps", "The hyper-optimizer's Adam eps.")
    _hyper_state = _delegate("_hyper_optim", "state", "The hyper-optimizer's Adam moments per hyperparameter name.")
    clipped = _delegate("_hyper_optim", "clipped", "Per hyperparameter name, the hyper steps that hit a bound.")
    skip_nonfinite = _delegate("_guard", "mode", "The non-finite guard: True (lazy), 'grads' or False.")
    max_consecutive_skips = _delegate("_guard", "max_consecutive_skips",
                                      "Skips in a row after which NonFiniteError is raised (None: never).")

    def _counter(name: str, doc: str):  # noqa: N805  (a helper run at class creation)
        def get(self):  # the lazy guard's device counters are read here, when asked for (one host read)
            self._guard.materialize(steps=self.steps, raise_error=False)
            return getattr(self._guard, name)

        def put(self, value):  # what was counted on the device before is folded in first, then replaced
            self._guard.materialize(steps=self.steps, raise_error=False)
            setattr(self._guard, name, value)
        return property(get, put, doc=doc)

    skipped = _counter("skipped", "Steps skipped for Inf/NaN in all, per kind ('t1', 't2').")
    consecutive_skips = _counter("consecutive_skips", "Steps skipped in a row, per kind.")
    last_skip = _counter("last_skip", "Why the latest step was skipped (None: it was taken).")
    del _delegate, _counter

    def check_nonfinite(self) -> None:
        """Read the lazy guard's device counters now (one host read) and raise ``NonFiniteError`` if
        ``max_consecutive_skips`` steps were skipped in a row; ``hyper_step`` does this by itself, a loop
        without hyper steps calls it when it wants to know (``t1t2 train`` does, every iteration)."""
        self._guard.materialize(steps=self.steps)

    # -- T1 -----------------------------------------------------------------------------------
    # step and hyper_step run eagerly inside torch.compile'd code (a graph break): their work is already
    # one fused op per pass, and tracing them would guard on every float they read (each new lr from a
    # scheduler, adam's bias corrections) and recompile at every step.
    @torch.compiler.disable
    def step(self, closure: Callable[[], torch.Tensor] | None = None, *, scaler=None,
             loss: torch.Tensor | None = None) -> torch.Tensor | None:
        """One T1 step. With a closure: zero the grads, evaluate it, backward, update; a closure that
        runs its own backward (torch.optim's convention, PyTorch Lightning's) or returns None after a
        backward done before ``step`` is recognised and not backwarded again (docs/guide.md,
        "Closures"). Without: use the existing ``.grad`` (noise and tunable hyperparameters then need
        ``hyper_step(val, train=closure)``).
        ``scaler``: a ``torch.amp.GradScaler``; the closure's loss is scaled for the backward and the
        step goes through ``scaler.step(self)`` (call ``scaler.update()`` after, as usual). Returns
        the (detached, unscaled) training loss, or None without a closure.
        ``loss``: without a closure, the loss of the backward run before ``step`` (``loss.backward();
        opt.step(loss=loss)``, or ``scaler.step(opt, loss=loss)``): the default guard checks it on the
        device instead of scanning the gradients. A step skipped for Inf/NaN (``last_skip`` says why)
        leaves θ and the optimizer's buffers unchanged (docs/reliability.md)."""
        if loss is not None:
            if closure is not None or scaler is not None:
                raise ValueError("step(loss=) is for a backward run before step(); with a closure the loss is the "
                                 "closure's")
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError(f"step(loss=) takes the scalar loss tensor of the backward, got {loss!r}")
            loss = loss.detach().reshape(())
        # Set by torch.amp.GradScaler.step around this call (_step_supports_amp_scaling)
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if scaler is not None:
            if closure is None:
                raise ValueError("step(scaler=...) needs the training closure: it scales the closure's loss for "
                                 "the backward. Without a closure call scaler.scale(loss).backward(); "
                                 "scaler.step(opt)")
            if grad_scale is not None or found_inf is not None or self._pending is not None:
                raise RuntimeError("step(closure, scaler=) was called from inside GradScaler.step; call one of them")
            loss, rng, kind = self._forward_backward(closure, scaler)
            self._pending = (loss, closure, rng, kind)
            try:
                scaler.step(self)  # its inf check, then self.step() with grad_scale/found_inf set
            finally:
                self._pending = None
            return loss
        if self._pending is not None:  # the inner call of step(closure, scaler=)
            loss, closure, rng, kind = self._pending
            self._pending = None
        elif closure is not None:
            if grad_scale is not None or found_inf is not None:
                raise RuntimeError("GradScaler.step(opt, closure) cannot scale the closure's backward; use "
                                   "opt.step(closure, scaler=scaler), or scaler.scale(loss).backward() then "
                                   "scaler.step(opt)")
            loss, rng, kind = self._forward_backward(closure, None)
        else:
            rng, kind = None, None
        return self._update(loss, closure if kind in (closures.FORWARD, closures.BACKWARD) else None, rng,
                            grad_scale, found_inf)

    def _forward_backward(self, closure, scaler) -> tuple[torch.Tensor | None, tuple | None, str]:
        """Evaluate the training closure and, unless it ran its own backward or left the grads of a
        backward before ``step`` (closures.call_training), backward (scaled by ``scaler`` if given)."""
        stash_now = (self.steps + 1) % self.hyper_every == 0
        rng = None
        keyed = noise_hyper.keying(self._noise)  # put back if the backward ran before step()
        if self._noise:
            self._prepare_noise()  # the noise keys of this step, from its first forward
            rng = noise_hyper.rng_state(self.params[0].device) if stash_now else None
        with torch.enable_grad():
            self._call = closures.TrainingCall(self.params)
            try:
                kind, out = self._call.run(closure)
            finally:
                self._call = None
            if kind != closures.FORWARD and scaler is not None:
                noise_hyper.set_keying(self._noise, keyed)  # the refused step leaves the noise keys as found
                raise RuntimeError("step(closure, scaler=) scales the closure's loss for the backward, and this "
                                   "closure ran its own backward (or returned None): return the loss without "
                                   "calling backward, or call scaler.scale(loss).backward(); scaler.step(opt)")
            if kind == closures.NONE:  # the backward ran before step(): its grads (and ∇σL) are the step's
                noise_hyper.set_keying(self._noise, keyed)
                return None, rng, kind
            if kind == closures.BACKWARD:
                return closures.reported_loss(out), rng, kind
            loss = scalar_loss(out, "training")
            for p in self.params:  # zero_grad(set_to_none=True)
                p.grad = None
            (loss if scaler is None else scaler.scale(loss)).backward()
        return loss.detach(), rng, kind

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if getattr(self, "_call", None) is not None:  # inside step's closure: a backward after this one is its own
            self._call.zeroed()

    def _update(self, loss, closure, rng, grad_scale, found_inf) -> torch.Tensor | None:
        stash_now = (self.steps + 1) % self.hyper_every == 0
        found, check = self._guard.t1_flags(loss, found_inf, self.params[0].device, self._dist is not None)
        lazy = self._guard.lazy
        self._stash = self._t1_update(stash_now, grad_scale, found, check, lazy)
        if lazy:  # the flag stays on the device: counted there, read when asked (guard.SkipGuard)
            self._guard.record("t1", found, self.steps + 1, self._guard.t1_code(loss, found_inf, check))
        elif found is not None and float(found) > 0:
            self._stash = None
            reason = self._guard.t1_reason(loss, found_inf, grad_scale)
            self._guard.skip("t1", f"T1 step {self.steps + 1}: {reason}", self.steps)
            self._prepare_noise()  # the retry draws this step's noise again
            return loss
        else:
            self._guard.took("t1")
        g0 = None
        if self._noise and stash_now and self.noise_hypergrad_mode == "fd":
            g0 = noise_hyper.recorded_grads(self._noise, self.compute_dtype)
            if grad_scale is not None:  # recorded from the scaled backward (a power of 2: exact)
                inv = 1.0 / grad_scale.to(self.compute_dtype)
                g0 = [g * inv for g in g0]
        self.steps += 1
        if self.free_grads:  # the step has used them: the hyper step's v need not sit beside them
            for p in self.params:
                p.grad = None
        if self._stash is not None:
            self._stash.grad_scale = None if grad_scale is None else grad_scale.detach().clone()
            self._stash.found = found if lazy else None  # a lazily skipped step left nothing in the stash
            if self._noise:
                self._stash.noise = noise_hyper.NoiseStash(
                    self.steps, g0, replay=None if closure is None else noise_hyper.Replay(closure, self.steps, rng))
        self._prepare_noise()  # for a forward the user runs before the next step()
        return loss

    def _prepare_noise(self) -> None:
        """Key the noise modules for the next T1 step; record ∇σL when that step feeds an 'fd'
        hypergradient (it comes for free from the T1 backward)."""
        if not self._noise:
            return
        nxt = self.steps + 1
        record = self.noise_hypergrad_mode == "fd" and nxt % self.hyper_every == 0
        noise_hyper.prepare(self._noise, nxt, record)

    def _t1_update(self, stash: bool, grad_scale=None, found_inf=None, check_finite=False,
                   lazy=False) -> Stash | None:
        if len(self.param_groups) == 1:  # one fused call, as before parameter groups existed
            return self._t1_group(0, stash, grad_scale, found_inf, check_finite, lazy)
        # Several groups: one fused call per group with its options. The non-finite scan comes first,
        # over every group, so that a skipped step writes nothing in any group.
        if check_finite:
            ok = finite_flag([p.grad for p in self.params if p.grad is not None])
            if ok is not None:  # on the device: found_inf |= not ok
                found_inf.copy_(torch.maximum(found_inf, (~ok).to(found_inf.dtype)))
        if lazy:  # every group's op reads the flag on the device and writes nothing when it is set
            parts = [self._t1_group(k, stash, grad_scale, found_inf, False, True)
                     for k in range(len(self.param_groups))]
        elif found_inf is not None and float(found_inf) > 0:
            return None
        else:
            parts = [self._t1_group(k, stash, grad_scale, None, False) for k in range(len(self.param_groups))]
        if not stash:
            return None
        merged = Stash(self.param_groups[0]["lr"], {}, {}, lrs={})
        for k, part in enumerate(parts):
            if part is None:  # no tensor of the group had a gradient
                continue
            merged.theta.update(part.theta)
            merged.jac.update(part.jac)
            merged.lrs.update({i: part.lr for i in part.theta})
            if part.scale is not None:
                merged.scale = {**(merged.scale or {}), **part.scale}
        return merged

    def _t1_group(self, k: int, stash: bool, grad_scale, found_inf, check_finite, lazy=False) -> Stash | None:
        """The fused T1 step of parameter group ``k`` (its tensors with a gradient)."""
        group = self.param_groups[k]
        indices = [i for i in self._group_indices[k] if self.params[i].grad is not None]
        if not indices and len(self.param_groups) > 1:
            return None
        params = [self.params[i] for i in indices]
        return t1_step(self.backend, params, [p.grad for p in params], [self.state[p] for p in params],
                       self.hypers, indices, self._step_optimizer, group["lr"], group["momentum"],
                       group["nesterov"], group["betas"], group["eps"], self.hypergrad_mode, stash,
                       buffers=self._stash_buffers, grad_scale=grad_scale, found_inf=found_inf,
                       check_finite=check_finite, lazy=lazy, coefficients=self._coefficients.setdefault(k, {}))

    # -- T2 -----------------------------------------------------------------------------------
    @torch.compiler.disable
    @keeps_running_stats  # batch norm's running statistics: as the T1 step left them (batchnorm.py)
    def hyper_step(self, closure: Callable[[], torch.Tensor],
                   train: Callable[[], torch.Tensor] | None = None, *, scaler=None) -> torch.Tensor:
        """One T2 step: v = ∇θ C2(θ⁺) from the validation closure (run inside ``evaluating()``: no
        noise, every Tunable at its evaluation value), hypergradients through the last T1 step, then
        the hyper-optimizer update. Noise and tunable hyperparameters rerun the T1 step's training
        closure (the one given to ``step``, or ``train`` here). ``scaler``: a GradScaler whose scale
        multiplies the validation loss for the backward (fp16 autocast), v is unscaled in float32/64
        before use. With ``skip_nonfinite``, an Inf/NaN validation loss, v or hypergradient skips the
        update (λ and the hyper-optimizer state stay as they were; ``last_skip`` says why). Returns
        the (detached) validation loss."""
        if self._stash is None:
            if self.steps == 0:
                raise RuntimeError("hyper_step() called before any step(): run a T1 step first")
            raise RuntimeError(f"hyper_step() needs the stash of the T1 step just taken, and there is none: "
                               f"stashes are taken every hyper_every={self.hyper_every} steps and used once. "
                               f"Call hyper_step only when opt.hyper_due is True")
        stash, self._stash = self._stash, None
        replay = None
        if self._noise:
            replay = stash.noise.replay
            if train is not None:  # the T1 step's generator state still applies (its dropout masks)
                replay = noise_hyper.Replay(train, stash.noise.step, stash.noise.rng_state())
            if replay is None:
                kinds = sorted({b.hyper.kind for b in self._noise})
                raise RuntimeError(f"this T1T2 has {' and '.join(kinds)} hyperparameters, whose hypergradient reruns "
                                   f"the T1 step's training loss: call step(closure), or pass it here as "
                                   f"hyper_step(val_closure, train=train_closure)")
        indices = sorted(stash.theta)
        guard, lazy = self._guard.enabled, self._guard.lazy
        scale = _scaler_scale(scaler)
        # Under DDP, the validation pass and the noise replay run in no_sync(): each rank's v stays its
        # own (no parameter-sized all-reduce) and DDP's reducer is not left waiting for a backward.
        # evaluating(): noise off, every Tunable at its evaluation value (the validation loss is λ-free)
        with torch.enable_grad(), evaluating(), distributed.no_sync(self._ddp):
            loss = scalar_loss(closure(), "validation")
            bad = None
            if guard and not lazy and not bool(torch.isfinite(loss)):
                bad = f"non-finite validation loss ({float(loss.detach())})"
                if self._dist is None:  # across processes every rank must reach the all-reduces below
                    return self._skip_hyper(bad, loss)
            grads = torch.autograd.grad(loss if scale is None else loss * scale, [self.params[i] for i in indices],
                                        allow_unused=True)
        acc = self.compute_dtype
        v = [torch.zeros_like(stash.theta[i]) if g is None else g.detach().to(acc).contiguous()
             for i, g in zip(indices, grads)]
        if scale is not None:  # in the compute dtype: no fp16 underflow left
            torch._foreach_mul_(v, (1.0 / scale.to(torch.float64)).to(acc))
        norm = u = hypergrads = None
        if self._noise and self._dist is not None and self.distributed_noise == "exact":
            # h_σ is bilinear in v and the training shard: it needs the ranks' mean v (module docstring
            # of t1t2_fast.distributed); the penalty h is linear in v and uses the local one, taken first
            # (the lr scales' segments read θ⁺ from the parameters, which nothing has moved yet)
            hypergrads = penalty_hypergrads(self.backend, self.hypers, indices, v, stash,
                                            params=[self.params[i] for i in indices])
            self._dist.mean_(v, "validation gradients (noise hypergradient)")  # in place
        if self._noise:
            u = [v_i * stash.jac_of(i) for i, v_i in zip(indices, v)]
        if lazy:  # the hyper step's one host read: the checks, fd's ‖u‖ and the guard's device counters
            bad, norm = self._lazy_checks(stash, loss, v, u)
            t1_skipped = bad is not None and bad.startswith("its T1 step")
            # a skipped T1 step is skipped on every rank alike (it scanned the all-reduced gradients)
            if bad and (self._dist is None or t1_skipped):
                return self._skip_hyper(bad, loss, count=not t1_skipped)
        elif guard and bad is None and not all_finite(v):
            bad = "non-finite validation gradient"
            if self._dist is None:
                return self._skip_hyper(bad, loss)
        if hypergrads is None:  # (before the noise hypergradient moves θ: the lr segments read θ⁺)
            hypergrads = penalty_hypergrads(self.backend, self.hypers, indices, v, stash,
                                            params=[self.params[i] for i in indices])
        if self._noise:
            params = [self.params[i] for i in indices]
            with distributed.no_sync(self._ddp):
                hypergrads.update(noise_hyper.noise_hypergrads(
                    mode=self.noise_hypergrad_mode, fd_eps=self.fd_eps, backend=self.backend, model=self._model,
                    bindings=self._noise, params=params, theta=[stash.theta[i] for i in indices], u=u,
                    g0=stash.noise.g0, replay=replay, save=self._saved_theta(indices), dtype=acc,
                    loss_scale=stash.grad_scale, norm=norm))
        if bad is not None:  # a rank's own Inf/NaN: NaN hypergradients make every rank skip together
            hypergrads = {n: torch.full_like(g, math.nan) for n, g in hypergrads.items()}
        same = None
        if self._dist is not None and hypergrads:
            # mean over ranks of the per-rank hypergradients and the check that λ agrees everywhere
            # (lazy: a device flag, read by the next hyper step's one read, which raises then)
            hypergrads, same = self._dist.reduce_hypergrads(hypergrads, self.all_hypers, lazy=lazy)
            self._drift_check = same
        ok = None
        if lazy:  # a non-finite hypergradient: the update is masked on the device and counted there
            ok = finite_flag(list(hypergrads.values()))  # False after a rank's own Inf/NaN (NaN above)
            self._guard.took("t2")
            if ok is not None:
                self._guard.record("t2", (~ok).to(torch.float32), self.steps, 5)
                old = self.last_hypergrad
                hypergrads = {n: torch.where(ok, g, old[n]) if n in old and old[n].shape == g.shape else g
                              for n, g in hypergrads.items()}
        elif guard and not all_finite(list(hypergrads.values())):  # one pass; names only when it fails
            nonfinite = [n for n, g in hypergrads.items() if not bool(torch.isfinite(g).all())]
            if nonfinite:
                return self._skip_hyper(bad or f"non-finite hypergradient of {', '.join(nonfinite[:3])}"
                                        + (f" and {len(nonfinite) - 3} more" if len(nonfinite) > 3 else "")
                                        + ("" if self._dist is None else " (on some rank)"), loss)
        else:
            self._guard.took("t2")
        self.last_hypergrad = hypergrads
        if same is not None:  # drifted λ is not updated: it is reported, by name, at the next hyper step
            ok = same if ok is None else ok & same
        self._hyper_optim.step(self.all_hypers, hypergrads, self.hyper_steps + 1, ok=ok)
        self.hyper_steps += 1
        return loss.detach()

    def _lazy_checks(self, stash: Stash, loss: torch.Tensor, v: list[torch.Tensor],
                     u: list[torch.Tensor] | None) -> tuple[str | None, float | None]:
        """The lazy guard's checks of a hyper step, read back in one host read together with the fd
        noise hypergradient's ‖u‖ (when it can be computed here) and the guard's device counters
        (which may raise NonFiniteError): (why to skip or None, ‖u‖ or None)."""
        dev = v[0].device if v else loss.device
        one = torch.ones((), dtype=torch.float64, device=dev)
        v_ok = finite_flag(v)
        parts = [torch.isfinite(loss.detach()).to(torch.float64).reshape(()),
                 one if v_ok is None else v_ok.to(torch.float64),
                 one if stash.found is None else (stash.found <= 0).to(torch.float64).reshape(())]
        fd = u is not None
        drift = self._drift_check is not None
        if drift:  # the previous hyper step's check that every rank had the same λ
            parts.append(self._drift_check.to(torch.float64).reshape(()))
            self._drift_check = None
        if fd:
            parts.append(noise_hyper.norm_sq(self.backend, u, dev))
        pending = self._guard.pending()
        values = host_list(torch.cat([torch.stack(parts).to(dev)] + [p.to(dev) for p in pending]))
        k = len(parts)
        if drift and values[3] == 0:
            self._dist.raise_drift(self.all_hypers)  # every rank read the same flag: all raise together
        self._guard.materialize(values[k:], steps=self.steps)
        norm = math.sqrt(0.5 * values[3 + drift]) if fd else None
        if values[2] == 0:
            return "its T1 step was skipped", norm
        if values[0] == 0:
            return f"non-finite validation loss ({float(loss.detach())})", norm
        if values[1] == 0:
            return "non-finite validation gradient", norm
        return None, norm

    def _skip_hyper(self, reason: str, loss: torch.Tensor, count: bool = True) -> torch.Tensor:
        """A T2 step skipped for Inf/NaN: λ, the hyper-optimizer state and last_hypergrad unchanged.
        ``count`` False: skipped because its T1 step was (lazy guard), which is counted already."""
        if count:
            self._guard.skip("t2", f"T2 step after T1 step {self.steps}: {reason}", self.steps)
        return loss.detach()

    def _saved_theta(self, indices: list[int]) -> list[torch.Tensor]:
        """Buffers that hold θ⁺ while the noise hypergradient moves θ (kept between hyper steps)."""
        return [reused_buffer(self._save_buffers, i, self.params[i], self.params[i].dtype) for i in indices]

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically (the model's parameters are saved by the
        model's own state_dict). Keyed by parameter and hyperparameter names (t1t2_fast.checkpoint)."""
        return checkpoint.save(self)

    def load_state_dict(self, state_dict: dict) -> None:
        checkpoint.load(self, state_dict)
        self._prepare_noise()

    # torch.optim.Optimizer pickles only defaults/state/param_groups; keep everything for deepcopy.
    def __getstate__(self):
        if self._dist is not None:
            raise TypeError("a T1T2 bound to a process group cannot be copied or pickled (the group is a live "
                            "connection); save opt.state_dict() instead, which any rank or a single process loads")
        return self.__dict__.copy()

    def __repr__(self):
        hs = ", ".join(h.name for h in self.all_hypers) or "none"
        return (f"T1T2(optimizer={self.optimizer_name!r}, lr={self.param_groups[0]['lr']}, "
                f"hypergrad={self.hypergrad_mode!r}, hyper_every={self.hyper_every}, "
                f"backend={self.backend.name!r}, hyperparameters=[{hs}])")
