"""Cases of tests/optimizer/test_resume.py: training runs that are checkpointed with torch.save mid-run and
resumed in a new process (``python resume_cases.py CHECKPOINT OUT [--drop WHAT]``).

A run: a tiny MLP with GaussianNoise modules (one per layer, additive; one per unit,
multiplicative) and a Dropout (so the T1 closure draws from torch's global generator, which the
noise replay of a hyper step must rewind), L2 and L1 penalties at several granularities, and a
data order drawn on the fly from two torch.Generators (training and validation batches). Each
iteration is ``step`` on a training batch, then ``hyper_step`` on a validation batch when
``opt.hyper_due``. ``trajectory`` records θ and λ after every iteration.

A checkpoint is taken either after a whole iteration ("after_iter") or between an iteration's
``step`` and its ``hyper_step`` ("after_step"; ``opt.hyper_due`` is then whatever the schedule says,
and the stash is in the optimizer's state_dict). It holds what a training script must save besides
the model and the optimizer: the samplers' generator states, torch's global RNG state and, for
"after_step", the training batch of the pending hyper step (its noise replay reruns that batch).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

import t1t2_fast as t1t2

ITERS = 10
N_TRAIN, N_VAL, BATCH = 40, 20, 8
FEATURES, HIDDEN, CLASSES = 5, 6, 3

CASES = {
    # heavy-ball sgd, a T2 step after every T1 step, forward-difference noise hypergradients
    "sgd-every1-fd": dict(
        opt=dict(optimizer="sgd", lr=0.2, momentum=0.9, hyper_every=1, noise_hypergrad="fd",
                 hyper_optimizer="adam", hyper_lr=0.05),
        penalties=lambda: [t1t2.L2(1e-2, per="layer"), t1t2.L1(1e-3, per="unit")]),
    # adam with its exact Jacobian (a tensor in the stash), a T2 step every 3, exact noise hypergradients
    "adam-every3-exact": dict(
        opt=dict(optimizer="adam", lr=0.03, betas=(0.8, 0.9), hypergrad="exact", hyper_every=3,
                 noise_hypergrad="exact", hyper_optimizer="adam", hyper_lr=0.05),
        penalties=lambda: [t1t2.L2(1e-2, per="network"), t1t2.L1(1e-3, per="element"),
                           t1t2.L2(1e-2, per="unit", decoupled=True, params="bias")]),
}

# (case, phase, iteration): where a checkpoint is taken, and whether the optimizer then has a stash
CHECKPOINTS = [
    ("sgd-every1-fd", "after_step", 4),      # hyper_due: the stash (with ∇σL and the replay RNG) is saved
    ("sgd-every1-fd", "after_iter", 4),      # between iterations: no stash
    ("adam-every3-exact", "after_step", 6),  # hyper_due
    ("adam-every3-exact", "after_step", 7),  # mid-iteration but no hyper step due: no stash
    ("adam-every3-exact", "after_iter", 5),  # the next step takes a stash
]


def hyper_due_at(case: str, phase: str, k: int) -> bool:
    return phase == "after_step" and k % CASES[case]["opt"]["hyper_every"] == 0


class Run:
    """One training run of ``case`` on ``backend``, from iteration 0."""

    def __init__(self, case: str, backend: str):
        self.case, self.backend = case, backend
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(N_TRAIN, FEATURES, generator=g)
        self.y = torch.randint(0, CLASSES, (N_TRAIN,), generator=g)
        self.xv = torch.randn(N_VAL, FEATURES, generator=g)
        self.yv = torch.randint(0, CLASSES, (N_VAL,), generator=g)
        torch.manual_seed(2)
        self.model = nn.Sequential(
            t1t2.GaussianNoise(0.2), nn.Linear(FEATURES, HIDDEN), nn.ReLU(),
            t1t2.GaussianNoise(0.1, per="unit", num_features=HIDDEN, mode="multiplicative"),
            nn.Dropout(0.2), nn.Linear(HIDDEN, CLASSES))
        spec = CASES[case]
        self.opt = t1t2.T1T2(self.model, spec["penalties"](), backend=backend, seed=7, **spec["opt"])
        self.train_gen = torch.Generator().manual_seed(3)
        self.val_gen = torch.Generator().manual_seed(4)
        torch.manual_seed(5)  # the dropout stream
        self.done = 0          # iterations completed
        self.pending = None    # the training batch of a step whose hyper step is still to come

    def closure(self, idx, x, y):
        return lambda: F.cross_entropy(self.model(x[idx]), y[idx])

    def t1(self) -> None:
        idx = torch.randint(N_TRAIN, (BATCH,), generator=self.train_gen)
        self.opt.step(self.closure(idx, self.x, self.y))
        self.pending = idx

    def t2(self, resumed: bool = False) -> None:
        if self.opt.hyper_due:
            vidx = torch.randint(N_VAL, (BATCH,), generator=self.val_gen)
            # after a resume the step's closure is gone: the hyper step gets it as train=
            train = self.closure(self.pending, self.x, self.y) if resumed else None
            self.opt.hyper_step(self.closure(vidx, self.xv, self.yv), train=train)
        self.pending = None
        self.done += 1

    def iterate(self, n: int, record: list | None = None) -> None:
        for _ in range(n):
            self.t1()
            self.t2()
            if record is not None:
                record.append(self.snapshot())

    def snapshot(self) -> dict:
        return {"iteration": self.done, "steps": self.opt.steps, "hyper_steps": self.opt.hyper_steps,
                "theta": {n: p.detach().clone() for n, p in self.model.named_parameters()},
                "raw": {n: r.detach().clone() for n, r in self.opt.raw_hyperparameters().items()}}

    def checkpoint(self, phase: str) -> dict:
        return {"case": self.case, "backend": self.backend, "phase": phase, "done": self.done,
                "model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "train_gen": self.train_gen.get_state(), "val_gen": self.val_gen.get_state(),
                "torch_rng": torch.get_rng_state(), "pending": self.pending}


def run_to_checkpoint(case: str, backend: str, phase: str, k: int) -> dict:
    """A fresh run up to iteration ``k`` (its step only for "after_step"); returns the checkpoint."""
    run = Run(case, backend)
    run.iterate(k - 1 if phase == "after_step" else k)
    if phase == "after_step":
        run.t1()
    return run.checkpoint(phase)


def resume(ckpt: dict, drop: str | None = None) -> list[dict]:
    """Continue the checkpointed run to ITERS iterations; the snapshots of the iterations it finishes.
    ``drop`` leaves out one piece of the checkpoint (the negative controls of test_resume.py)."""
    run = Run(ckpt["case"], ckpt["backend"])  # a fresh model and optimizer, then overwritten by the load
    opt_sd = ckpt["opt"]
    if drop == "hyper_state":
        opt_sd = {**opt_sd, "hyper_state": {}}
    elif drop == "stash_rng":
        opt_sd = {**opt_sd, "stash": {**opt_sd["stash"], "noise": {**opt_sd["stash"]["noise"], "rng": None}}}
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(opt_sd)
    run.train_gen.set_state(ckpt["train_gen"])
    run.val_gen.set_state(ckpt["val_gen"])
    if drop != "torch_rng":
        torch.set_rng_state(ckpt["torch_rng"])
    run.done, run.pending = ckpt["done"], ckpt["pending"]
    out = []
    if ckpt["phase"] == "after_step":
        run.t2(resumed=True)
        out.append(run.snapshot())
    run.iterate(ITERS - run.done, out)
    return out


def main(argv: list[str]) -> int:
    path, out = argv[0], argv[1]
    drop = argv[3] if len(argv) > 3 and argv[2] == "--drop" else None
    torch.save(resume(torch.load(path), drop), out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
