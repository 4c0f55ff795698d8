"""What ``T1T2.state_dict()`` saves and how ``load_state_dict`` restores it, so that a resumed run
continues the identical trajectory. Keyed by parameter and hyperparameter names; the model's own
parameters are saved by the model's state_dict.

Layout (version 1): ``param_group`` (the options of the one parameter group) or, with several
groups, ``param_groups`` (a list of {"params": [names], options}; loading accepts either), and
``hyper_group`` (learning rates, betas, eps, fd_eps),
``state`` (the T1 optimizer state per parameter name), ``steps``/``hyper_steps``, ``raw`` (λ per
hyperparameter name), ``hyper_state`` (the hyper-optimizer's moments), ``stash`` (the pending T1
step's stash, or None), ``last_hypergrad``, ``counters`` (skip and clip counts) and ``settings``
(the constructor choices that a resumed run must share).
"""
from __future__ import annotations

import copy

import torch

from .functional import Stash
from .noise.hypergrad import NoiseStash

VERSION = 1

# Counters besides steps / hyper_steps that a resumed run must continue from: the non-finite
# guard's (consecutive_skips decides when NonFiniteError comes) and the bounds' clip counts.
COUNTERS = ("skipped", "consecutive_skips", "clipped")


def trajectory_settings(opt) -> dict:
    """Constructor settings that are not in the param group or the state, and without which the
    saved state does not continue the same trajectory: the layout of the optimizer state and of
    the stash, the stash schedule and the noise keys."""
    return {"optimizer": opt.optimizer_name, "hyper_optimizer": opt.hyper_optimizer_name,
            "hypergrad": opt.hypergrad_mode, "noise_hypergrad": opt.noise_hypergrad_mode,
            "hyper_every": opt.hyper_every, "seed": opt.seed}


def hyper_group(opt) -> dict:
    """The hyper-optimizer's (and the noise finite difference's) numbers, saved and restored like the
    param group's lr."""
    return {"hyper_lr": opt.hyper_lr, "hyper_betas": tuple(opt.hyper_betas), "hyper_eps": opt.hyper_eps,
            "fd_eps": opt.fd_eps}


def save(opt) -> dict:
    """``opt.state_dict()``."""
    clone = lambda x: x.clone() if isinstance(x, torch.Tensor) else x
    state = {opt.param_names[i]: {k: clone(v) for k, v in opt.state[p].items()}
             for i, p in enumerate(opt.params) if p in opt.state}
    stash = None
    if opt._stash is not None:
        stash = opt._stash.state(opt.param_names)
        if opt._stash.noise is not None:
            stash["noise"] = opt._stash.noise.state()
    out = {"version": VERSION}
    if len(opt.param_groups) == 1:  # the single-group layout, as before parameter groups existed
        out["param_group"] = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    else:
        out["param_groups"] = group_options(opt)
    return {
        **out,
        "hyper_group": hyper_group(opt),
        "state": state,
        "steps": opt.steps,
        "hyper_steps": opt.hyper_steps,
        "raw": {h.name: h.raw.detach().clone() for h in opt.all_hypers},
        "hyper_state": {n: {k: v.clone() for k, v in st.items()} for n, st in opt._hyper_optim.state.items()},
        "stash": stash,
        "last_hypergrad": {n: g.clone() for n, g in opt.last_hypergrad.items()},
        "counters": {n: copy.deepcopy(getattr(opt, n)) for n in COUNTERS},
        "settings": trajectory_settings(opt),
    }


def load(opt, state_dict: dict) -> None:
    """``opt.load_state_dict(state_dict)``: checks that it fits ``opt`` first, with a clear error."""
    if state_dict.get("version") != VERSION:
        raise ValueError("not a T1T2 state_dict (missing version 1); was it saved by T1T2.state_dict()?")
    names = {n: i for i, n in enumerate(opt.param_names)}
    ours = {h.name for h in opt.all_hypers}
    theirs = set(state_dict["raw"])
    if ours != theirs:
        raise ValueError(f"state_dict hyperparameters {sorted(theirs)} do not match this optimizer's "
                         f"{sorted(ours)}; build the T1T2 with the same penalties and model")
    unknown = set(state_dict["state"]) - set(names)
    if unknown:
        raise ValueError(f"state_dict has optimizer state for unknown parameters {sorted(unknown)}")
    _check_settings(opt, state_dict.get("settings"))
    _check_groups(opt, state_dict)
    dev = opt.params[0].device
    # optimizer state: tensors to the parameters' device, except 0-d ones (Adam's step stays on the CPU)
    move = lambda x: x.to(dev) if isinstance(x, torch.Tensor) and x.dim() > 0 else (
        x.clone() if isinstance(x, torch.Tensor) else x)
    _load_groups(opt, state_dict)
    for k, v in state_dict.get("hyper_group", {}).items():  # like the param group: the saved values win
        setattr(opt, k, tuple(v) if isinstance(v, (list, tuple)) else v)
    opt.state.clear()
    for n, st in state_dict["state"].items():
        opt.state[opt.params[names[n]]] = {k: move(v) for k, v in st.items()}
    opt.steps, opt.hyper_steps = int(state_dict["steps"]), int(state_dict["hyper_steps"])
    with torch.no_grad():
        for h in opt.all_hypers:
            h.raw.copy_(state_dict["raw"][h.name])
    opt._hyper_optim.state = {n: {k: v.to(dev).clone() for k, v in st.items()}
                              for n, st in state_dict["hyper_state"].items()}
    stash = state_dict["stash"]
    opt._stash = None if stash is None else Stash.from_state(stash, names, dev)
    if stash is not None and opt._noise:
        opt._stash.noise = NoiseStash.from_state(stash.get("noise"), opt.steps, dev)
    opt.last_hypergrad = {n: g.to(dev).clone() for n, g in state_dict["last_hypergrad"].items()}
    opt._guard._pending.clear()  # the lazy guard's device counters belong to the run being replaced
    opt._guard._tripped = None
    for n, value in state_dict.get("counters", {}).items():
        if n in COUNTERS:
            setattr(opt, n, copy.deepcopy(value))
    opt.last_skip = None


def group_options(opt) -> list[dict]:
    """Per parameter group: its options and, under "params", its parameters' names."""
    name = {id(p): n for n, p in zip(opt.param_names, opt.params)}
    return [{"params": [name[id(p)] for p in g["params"]], **{k: v for k, v in g.items() if k != "params"}}
            for g in opt.param_groups]


def _check_groups(opt, state_dict: dict) -> None:
    """That the saved parameter groups are this optimizer's (same members, same order)."""
    ours = [g["params"] for g in group_options(opt)]
    if "param_groups" in state_dict:
        theirs = [list(g["params"]) for g in state_dict["param_groups"]]
    elif "param_group" in state_dict:
        theirs = [list(opt.param_names)]  # the single-group layout: every parameter in one group
    else:
        raise ValueError("state_dict has neither 'param_groups' nor 'param_group'; was it saved by T1T2.state_dict()?")
    if len(theirs) == 1 and len(ours) == 1:
        return
    if theirs != ours:
        raise ValueError(f"state_dict was saved with {len(theirs)} parameter group(s) {theirs}, and this T1T2 has "
                         f"{len(ours)}: {ours}; build it with the same param_groups")


def _load_groups(opt, state_dict: dict) -> None:
    """Each group's saved options (lr, betas, a scheduler's initial_lr, ...) over the current ones."""
    if "param_groups" in state_dict:
        for group, saved in zip(opt.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
    else:
        opt.param_groups[0].update(state_dict["param_group"])


def _check_settings(opt, saved: dict | None) -> None:
    if saved is None:  # a state_dict from before the settings were saved
        return
    ours = trajectory_settings(opt)
    differ = {k: (v, ours.get(k)) for k, v in saved.items() if ours.get(k) != v}
    if differ:
        detail = ", ".join(f"{k}={a!r} there, {b!r} here" for k, (a, b) in differ.items())
        raise ValueError(f"state_dict was saved by a T1T2 with other settings ({detail}); build the T1T2 with "
                         f"the settings of the run that saved it")
