"""The ``T1T2`` optimizer: T1 steps on the training loss, T2 steps on the hyperparameters.

The math is DESIGN.md §2. The T1 update and the T2 penalty reductions run through the selected
backend's fused ops; noise hyperparameters are handled in ``noise_hyper``.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Iterable

import torch
from torch import nn

from . import distributed, noise_hyper, reference
from .backend import Backend, resolve_backend
from .hyper import Hyperparameter, Penalty, bind_penalties
from .steps import penalty_hypergrads, reused_buffer, t1_step

OPTIMIZERS = ("sgd", "adam")
HYPER_OPTIMIZERS = ("sgd", "adam")
HYPERGRAD_MODES = ("exact", "sgd")
SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _check_choice(what, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {what}={value!r}; expected one of {choices}")


def _scalar_loss(loss, where: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the {where} closure must return a scalar loss tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"the {where} closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}; "
                         f"reduce it (e.g. .mean()) inside the closure")
    if not loss.requires_grad:
        raise ValueError(f"the {where} closure returned a loss that does not require grad; is it computed from "
                         f"the model's parameters outside torch.no_grad()?")
    return loss.reshape(())


def _stashed_rng(noise_stash: dict) -> tuple | None:
    """torch's generator state(s) just before the stashed T1 step's closure ran (None if unknown):
    from the step's replay, or from a loaded state_dict."""
    replay = noise_stash.get("replay")
    return replay.rng if replay is not None else noise_stash.get("rng")


def _copy_rng(state: tuple | None) -> tuple | None:
    """A copy of a (CPU generator state, CUDA generator state or None) pair; generator states are
    CPU byte tensors wherever the model lives."""
    if state is None:
        return None
    return tuple(None if t is None else t.detach().to("cpu", copy=True) for t in state)


class T1T2(torch.optim.Optimizer):
    """Trains a model's parameters (T1) and tunes its regularization hyperparameters (T2).

    ``step(closure)`` does one training step with the penalty gradients added to the data gradient;
    after a step where ``hyper_due`` is true, ``hyper_step(val_closure)`` differentiates the
    validation loss through that step and updates the hyperparameters. See DESIGN.md §2-3.

    Across processes (``t1t2_fast.distributed``): ``model`` may be a ``DistributedDataParallel``
    wrapper (hyperparameters are named after the module inside it). ``process_group`` None reduces
    over the wrapper's group, or over none for a plain module; an explicit group is used as given.
    Each rank then calls ``step``/``hyper_step`` with its own shards; ``hyper_step`` averages the
    ranks' hypergradients (one small all-reduce, which also checks that λ agrees on every rank).
    ``distributed_noise``: "exact" (default) averages the validation gradient first when the model
    has noise hyperparameters, whose hypergradient is bilinear in it and the training shard, so the
    result is the one-process value; "local" uses each rank's own (unbiased, only the small vector
    is sent).
    """

    def __init__(self, model: nn.Module, penalties: Iterable[Penalty] = (), *, optimizer: str = "sgd",
                 lr: float = 0.1, momentum: float = 0.0, nesterov: bool = False,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 hyper_optimizer: str = "adam", hyper_lr: float = 1e-3,
                 hyper_betas: tuple[float, float] = (0.9, 0.999), hyper_eps: float = 1e-8,
                 hyper_every: int = 1, hypergrad: str = "exact", noise_hypergrad: str = "fd",
                 fd_eps: float = 1e-3, backend: str = "auto", seed: int = 0, process_group=None,
                 distributed_noise: str = "exact"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"T1T2 takes the model (an nn.Module) so it can name hyperparameters after its "
                            f"parameters; got {type(model).__name__}")
        _check_choice("optimizer", optimizer, OPTIMIZERS)
        _check_choice("hyper_optimizer", hyper_optimizer, HYPER_OPTIMIZERS)
        _check_choice("hypergrad", hypergrad, HYPERGRAD_MODES)
        _check_choice("noise_hypergrad", noise_hypergrad, noise_hyper.NOISE_HYPERGRAD_MODES)
        _check_choice("distributed_noise", distributed_noise, distributed.DISTRIBUTED_NOISE)
        if not (fd_eps > 0 and math.isfinite(fd_eps)):
            raise ValueError(f"fd_eps must be a finite number > 0, got {fd_eps}")
        if not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        if nesterov and (optimizer != "sgd" or momentum <= 0):
            raise ValueError("nesterov=True needs optimizer='sgd' and momentum > 0")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if int(hyper_every) != hyper_every or hyper_every < 1:
            raise ValueError(f"hyper_every must be a positive integer, got {hyper_every!r}")

        # A DistributedDataParallel model: names (and noise modules) from the module inside it
        inner, self._ddp = distributed.unwrap(model)
        named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
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

        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, betas=tuple(betas), eps=eps)
        super().__init__([p for _, p in named], defaults)
        self.param_names = [n for n, _ in named]
        self.optimizer_name, self.hypergrad_mode = optimizer, hypergrad
        self.hyper_optimizer_name, self.hyper_lr = hyper_optimizer, hyper_lr
        self.hyper_betas, self.hyper_eps = tuple(hyper_betas), hyper_eps
        self.hyper_every, self.seed = int(hyper_every), int(seed)
        self.compute_dtype = reference.accumulate_dtype(dtype)
        self.backend: Backend = resolve_backend(backend, devices.pop())
        self.hypers: list[Hyperparameter] = bind_penalties(list(penalties), named, self.compute_dtype)
        self._by_param: list[list[Hyperparameter]] = [[] for _ in named]
        for h in self.hypers:
            for t in h.targets:
                self._by_param[t.index].append(h)
        self.steps = 0
        self.hyper_steps = 0
        self._hyper_state: dict[str, dict[str, torch.Tensor]] = {}
        self._stash: dict | None = None
        self._stash_buffers: dict = {}  # reused stash storage (see steps.t1_step)
        self.last_hypergrad: dict[str, torch.Tensor] = {}
        # Noise hyperparameters: the model's GaussianNoise modules (DESIGN.md §2).
        self.noise_hypergrad_mode, self.fd_eps = noise_hypergrad, float(fd_eps)
        self._model = inner
        # Across processes: the group T2 all-reduces its hypergradients over (DDP averages T1's gradients)
        group = distributed.resolve_group(self._ddp, process_group)
        self._dist = distributed.Reducer(group) if group is not None else None
        self.distributed_noise = distributed_noise
        rank = self._dist.rank if self._dist is not None else 0
        self._noise = noise_hyper.bind_noise(inner, self.seed, self.backend.name, rank=rank)
        self._save_buffers: dict = {}  # θ⁺ while a noise hypergradient moves θ
        self._prepare_noise()

    # -- public views -----------------------------------------------------------------------
    @property
    def params(self) -> list[torch.Tensor]:
        return self.param_groups[0]["params"]

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
        """Penalty hyperparameters, then noise ones."""
        return self.hypers + [b.hyper for b in self._noise]

    def hyperparameters(self) -> dict[str, float | torch.Tensor]:
        """{name: value c in natural scale}: a float for network/layer, a tensor for unit/element."""
        out = {}
        for h in self.all_hypers:
            c = h.value().detach()
            out[h.name] = c.item() if c.dim() == 0 else c.clone()
        return out

    def raw_hyperparameters(self) -> dict[str, torch.Tensor]:
        """{name: raw λ}; the tensors themselves, so in-place writes change the hyperparameters."""
        return {h.name: h.raw for h in self.all_hypers}

    # -- T1 -----------------------------------------------------------------------------------
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One T1 step. With a closure: zero the grads, evaluate it, backward, update. Without: use
        the existing ``.grad`` (noise hyperparameters then need ``hyper_step(val, train=closure)``).
        Returns the (detached) training loss, or None without a closure."""
        stash_now = (self.steps + 1) % self.hyper_every == 0
        loss, rng = None, None
        if closure is not None:
            if self._noise:
                self._prepare_noise()  # the noise keys of this step, from its first forward
                rng = noise_hyper.rng_state(self.params[0].device) if stash_now else None
            with torch.enable_grad():
                self.zero_grad(set_to_none=True)
                loss = _scalar_loss(closure(), "training")
                loss.backward()
            loss = loss.detach()
        g0 = None
        if self._noise and stash_now and self.noise_hypergrad_mode == "fd":
            g0 = noise_hyper.recorded_grads(self._noise, self.compute_dtype)
        self.steps += 1
        self._stash = self._t1_update(stash_now)
        if self._stash is not None and self._noise:
            self._stash["noise"] = {"g0": g0, "step": self.steps,
                                    "replay": None if closure is None else
                                    noise_hyper.Replay(closure, self.steps, rng)}
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

    def _t1_update(self, stash: bool) -> dict | None:
        group = self.param_groups[0]
        indices = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in indices]
        return t1_step(self.backend, params, [p.grad for p in params], [self.state[p] for p in params],
                       self.hypers, indices, self.optimizer_name, group["lr"], group["momentum"],
                       group["nesterov"], group["betas"], group["eps"], self.hypergrad_mode, stash,
                       buffers=self._stash_buffers)

    # -- T2 -----------------------------------------------------------------------------------
    def hyper_step(self, closure: Callable[[], torch.Tensor],
                   train: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """One T2 step: v = ∇θ C2(θ⁺) from the validation closure (run without noise),
        hypergradients through the last T1 step, then the hyper-optimizer update. Noise
        hyperparameters rerun the T1 step's training closure (the one given to ``step``, or
        ``train`` here). Returns the (detached) validation loss."""
        if self._stash is None:
            if self.steps == 0:
                raise RuntimeError("hyper_step() called before any step(): run a T1 step first")
            raise RuntimeError(f"hyper_step() needs the stash of the T1 step just taken, and there is none: "
                               f"stashes are taken every hyper_every={self.hyper_every} steps and used once. "
                               f"Call hyper_step only when opt.hyper_due is True")
        stash, self._stash = self._stash, None
        replay = None
        if self._noise:
            replay = stash["noise"]["replay"]
            if train is not None:  # the T1 step's generator state still applies (its dropout masks)
                replay = noise_hyper.Replay(train, stash["noise"]["step"], _stashed_rng(stash["noise"]))
            if replay is None:
                raise RuntimeError("the model has noise hyperparameters, whose hypergradient reruns the T1 step's "
                                   "training loss: call step(closure), or pass it here as "
                                   "hyper_step(val_closure, train=train_closure)")
        indices = sorted(stash["theta"])
        # Under DDP, the validation pass and the noise replay run in no_sync(): each rank's v stays its
        # own (no parameter-sized all-reduce) and DDP's reducer is not left waiting for a backward.
        with torch.enable_grad(), noise_hyper.no_noise(), distributed.no_sync(self._ddp):
            loss = _scalar_loss(closure(), "validation")
            grads = torch.autograd.grad(loss, [self.params[i] for i in indices], allow_unused=True)
        acc = self.compute_dtype
        v = [torch.zeros_like(stash["theta"][i]) if g is None else g.detach().to(acc).contiguous()
             for i, g in zip(indices, grads)]
        hypergrads = penalty_hypergrads(self.backend, self.hypers, indices, v, stash)
        if self._noise:
            if self._dist is not None and self.distributed_noise == "exact":
                # h_σ is bilinear in v and the training shard: it needs the ranks' mean v (module docstring
                # of t1t2_fast.distributed); the penalty h above is linear in v and used the local one.
                self._dist.mean_(v, "validation gradients (noise hypergradient)")  # in place
            u = [v_i * stash["jac"][i] for i, v_i in zip(indices, v)]
            params = [self.params[i] for i in indices]
            with distributed.no_sync(self._ddp):
                hypergrads.update(noise_hyper.noise_hypergrads(
                    mode=self.noise_hypergrad_mode, fd_eps=self.fd_eps, backend=self.backend, model=self._model,
                    bindings=self._noise, params=params, theta=[stash["theta"][i] for i in indices], u=u,
                    g0=stash["noise"]["g0"], replay=replay, save=self._saved_theta(indices), dtype=acc))
        if self._dist is not None and hypergrads:
            # mean over ranks of the per-rank hypergradients (and the check that λ agrees everywhere)
            hypergrads = self._dist.reduce_hypergrads(hypergrads, self.all_hypers)
        self.last_hypergrad = hypergrads
        self._hyper_update(hypergrads)
        self.hyper_steps += 1
        return loss.detach()

    def _saved_theta(self, indices: list[int]) -> list[torch.Tensor]:
        """Buffers that hold θ⁺ while the noise hypergradient moves θ (kept between hyper steps)."""
        return [reused_buffer(self._save_buffers, i, self.params[i], self.params[i].dtype) for i in indices]

    @torch.no_grad()
    def _hyper_update(self, hypergrads: dict[str, torch.Tensor]) -> None:
        t = self.hyper_steps + 1
        for h in self.all_hypers:
            g = hypergrads[h.name]
            if self.hyper_optimizer_name == "sgd":
                h.raw.add_(g, alpha=-self.hyper_lr)
            else:
                b1, b2 = self.hyper_betas
                st = self._hyper_state.get(h.name)
                if st is None:
                    st = self._hyper_state[h.name] = {"exp_avg": torch.zeros_like(h.raw),
                                                      "exp_avg_sq": torch.zeros_like(h.raw)}
                st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (st["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(self.hyper_eps)
                h.raw.addcdiv_(st["exp_avg"], denom, value=-self.hyper_lr / (1 - b1 ** t))
            h.project()

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically (the model's parameters are saved by the
        model's own state_dict). Keyed by parameter and hyperparameter names."""
        clone = lambda x: x.clone() if isinstance(x, torch.Tensor) else x
        state = {self.param_names[i]: {k: clone(v) for k, v in self.state[p].items()}
                 for i, p in enumerate(self.params) if p in self.state}
        stash = None
        if self._stash is not None:
            stash = {"lr": self._stash["lr"],
                     "theta": {self.param_names[i]: t.clone() for i, t in self._stash["theta"].items()},
                     "jac": {self.param_names[i]: clone(j) for i, j in self._stash["jac"].items()}}
            if "noise" in self._stash:  # the training closure itself is not saved: pass hyper_step(train=)
                g0 = self._stash["noise"]["g0"]
                stash["noise"] = {"step": self._stash["noise"]["step"],
                                  "g0": None if g0 is None else [g.clone() for g in g0],
                                  "rng": _copy_rng(_stashed_rng(self._stash["noise"]))}
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {
            "version": 1,
            "param_group": group,
            "hyper_group": self._hyper_group(),
            "state": state,
            "steps": self.steps,
            "hyper_steps": self.hyper_steps,
            "raw": {h.name: h.raw.detach().clone() for h in self.all_hypers},
            "hyper_state": {n: {k: v.clone() for k, v in st.items()} for n, st in self._hyper_state.items()},
            "stash": stash,
            "last_hypergrad": {n: g.clone() for n, g in self.last_hypergrad.items()},
            "counters": {n: copy.deepcopy(getattr(self, n)) for n in self._EXTRA_COUNTERS if hasattr(self, n)},
            "settings": self._trajectory_settings(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("version") != 1:
            raise ValueError("not a T1T2 state_dict (missing version 1); was it saved by T1T2.state_dict()?")
        names = {n: i for i, n in enumerate(self.param_names)}
        ours = {h.name for h in self.all_hypers}
        theirs = set(state_dict["raw"])
        if ours != theirs:
            raise ValueError(f"state_dict hyperparameters {sorted(theirs)} do not match this optimizer's "
                             f"{sorted(ours)}; build the T1T2 with the same penalties and model")
        unknown = set(state_dict["state"]) - set(names)
        if unknown:
            raise ValueError(f"state_dict has optimizer state for unknown parameters {sorted(unknown)}")
        self._check_settings(state_dict.get("settings"))
        dev = self.params[0].device
        move = lambda x: x.to(dev) if isinstance(x, torch.Tensor) and x.dim() > 0 else (x.clone() if isinstance(x, torch.Tensor) else x)
        self.param_groups[0].update(state_dict["param_group"])
        for k, v in state_dict.get("hyper_group", {}).items():  # like the param group: the saved values win
            setattr(self, k, tuple(v) if isinstance(v, (list, tuple)) else v)
        self.state.clear()
        for n, st in state_dict["state"].items():
            self.state[self.params[names[n]]] = {k: move(v) for k, v in st.items()}
        self.steps, self.hyper_steps = int(state_dict["steps"]), int(state_dict["hyper_steps"])
        with torch.no_grad():
            for h in self.all_hypers:
                h.raw.copy_(state_dict["raw"][h.name])
        self._hyper_state = {n: {k: v.to(dev).clone() for k, v in st.items()}
                             for n, st in state_dict["hyper_state"].items()}
        stash = state_dict["stash"]
        self._stash = None if stash is None else {
            "lr": stash["lr"],
            "theta": {names[n]: t.to(dev).clone() for n, t in stash["theta"].items()},
            "jac": {names[n]: move(j) for n, j in stash["jac"].items()}}
        if stash is not None and self._noise:
            saved = stash.get("noise") or {"step": self.steps, "g0": None}
            self._stash["noise"] = {"step": saved["step"], "replay": None, "rng": _copy_rng(saved.get("rng")),
                                    "g0": None if saved["g0"] is None else [g.to(dev).clone() for g in saved["g0"]]}
        self._prepare_noise()
        self.last_hypergrad = {n: g.to(dev).clone() for n, g in state_dict["last_hypergrad"].items()}
        for n, value in state_dict.get("counters", {}).items():
            if n in self._EXTRA_COUNTERS:
                setattr(self, n, copy.deepcopy(value))

    # Counters besides steps / hyper_steps that a resumed run must continue from (saved when the
    # optimizer has them).
    _EXTRA_COUNTERS = ("skipped",)

    def _hyper_group(self) -> dict:
        """The hyper-optimizer's (and the noise finite difference's) numbers, saved and restored like the
        param group's lr."""
        return {"hyper_lr": self.hyper_lr, "hyper_betas": tuple(self.hyper_betas), "hyper_eps": self.hyper_eps,
                "fd_eps": self.fd_eps}

    def _trajectory_settings(self) -> dict:
        """Constructor settings that are not in the param group or the state, and without which the
        saved state does not continue the same trajectory: the layout of the optimizer state and of
        the stash, the stash schedule and the noise keys."""
        return {"optimizer": self.optimizer_name, "hyper_optimizer": self.hyper_optimizer_name,
                "hypergrad": self.hypergrad_mode, "noise_hypergrad": self.noise_hypergrad_mode,
                "hyper_every": self.hyper_every, "seed": self.seed}

    def _check_settings(self, saved: dict | None) -> None:
        if saved is None:  # a state_dict from before the settings were saved
            return
        ours = self._trajectory_settings()
        differ = {k: (v, ours.get(k)) for k, v in saved.items() if ours.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}={a!r} there, {b!r} here" for k, (a, b) in differ.items())
            raise ValueError(f"state_dict was saved by a T1T2 with other settings ({detail}); build the T1T2 with "
                             f"the settings of the run that saved it")

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
