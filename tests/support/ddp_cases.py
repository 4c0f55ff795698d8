"""Cases of tests/optimizer/test_distributed.py: the rank workers (run as ``python ddp_cases.py MODE RANK WORLD
INIT_FILE OUT``, gloo on CPU, float64) and their one-process references, in one place so both
sides build exactly the same model, data and optimizer.

Reference of a penalty case: one process, one T1T2, mean losses over the concatenated shards.
Reference of a tunable case (a label-smoothing ``Tunable`` in the training loss, no noise): like a
penalty case, one process on the concatenated batch; its hypergradient, like a noise level's, needs the
ranks' mean v (distributed_noise="exact").
Reference of a noise case: the ranks draw different ε (each rank's noise modules have their own
seed, t1t2_fast.distributed.module_seed), so no one-process run on the concatenated batch draws the
same sample. The reference is then one process that simulates the ranks: its closure runs every
shard with that rank's noise seeds and averages the losses; everything else is one ordinary T1T2.
"""
from __future__ import annotations

import datetime
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn

import t1t2_fast as t1t2
from host_reads import HostReads
from t1t2_fast.distributed import module_seed

STEPS = 5
GLOBAL_BATCH = 8
SEED = 3
CASES = {
    # name: (optimizer kwargs, noise in the model (or "tunable": a label-smoothing Tunable in the loss),
    # noise_hypergrad)
    "momentum-penalties": (dict(optimizer="sgd", lr=0.3, momentum=0.9), False, "fd"),
    "adam-penalties": (dict(optimizer="adam", lr=0.05, betas=(0.8, 0.9)), False, "fd"),
    "momentum-noise-fd": (dict(optimizer="sgd", lr=0.3, momentum=0.9), True, "fd"),
    "adam-noise-fd": (dict(optimizer="adam", lr=0.05, betas=(0.8, 0.9)), True, "fd"),
    "adam-noise-exact": (dict(optimizer="adam", lr=0.05, betas=(0.8, 0.9)), True, "exact"),
    # learning-rate scales: their hypergradients ride in the same all-reduce and λ check
    "momentum-lr-layer": (dict(optimizer="sgd", lr=0.3, momentum=0.9, tune_lr="layer"), False, "fd"),
    "adam-noise-lr-network": (dict(optimizer="adam", lr=0.05, betas=(0.8, 0.9), tune_lr="network"), True, "fd"),
    "adam-tunable-fd": (dict(optimizer="adam", lr=0.05, betas=(0.8, 0.9)), "tunable", "fd"),
}

# the framework pattern (run_framework): penalties, and noise whose replay runs through the DDP wrapper
FRAMEWORK_CASES = ("momentum-penalties", "adam-penalties", "adam-noise-fd")


def make_model(noise: bool | str) -> nn.Module:
    torch.manual_seed(SEED)
    noise = noise is True
    layers = [t1t2.GaussianNoise(0.3, per="unit", num_features=4)] if noise else []
    layers += [nn.Linear(4, 6), nn.Tanh()]
    layers += [t1t2.GaussianNoise(0.2, mode="multiplicative")] if noise else []
    layers += [nn.Linear(6, 3)]
    return nn.Sequential(*layers).double()


def make_opt(model, case: str, **kw):
    opt_kw, noise, noise_mode = CASES[case]
    pens = [t1t2.L2(0.05, per="layer"), t1t2.L1(0.01, per="unit", transform="softplus"),
            t1t2.L2(0.01, per="network", decoupled=True, params="bias")]
    tunables = [t1t2.Tunable(0.1, transform="linear", bounds=(0, 1), eval_value=0.0, name="label_smoothing")] \
        if noise == "tunable" else []
    opt = t1t2.T1T2(model, pens, hyper_every=1, hyper_lr=0.05, noise_hypergrad=noise_mode, seed=SEED,
                    tunables=tunables, **opt_kw, **kw)
    opt.case_smoothing = tunables[0] if tunables else None
    return opt


def criterion(opt, logits, y):
    """The training loss of a case: cross-entropy, label-smoothed by the case's Tunable if it has one."""
    if opt.case_smoothing is None:
        return F.cross_entropy(logits, y)
    return t1t2.smoothed_cross_entropy(logits, y, opt.case_smoothing)


def batches():
    """STEPS global training and validation batches (x, y), float64."""
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)
        xv = torch.randn(GLOBAL_BATCH, 4, generator=g, dtype=torch.float64)
        yv = torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)
        out.append((x, y, xv, yv))
    return out


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.tensor_split(world)[rank]


def snapshot(model, opt) -> dict:
    return {"theta": {n: p.detach().clone() for n, p in model.named_parameters()},
            "raw": {n: r.detach().clone() for n, r in opt.raw_hyperparameters().items()},
            "hypergrad": {n: g.clone() for n, g in opt.last_hypergrad.items()}}


def reference(case: str, world: int) -> dict:
    """One process: penalties on the concatenated batch; noise by simulating the ranks' shards."""
    noise = CASES[case][1]
    model = make_model(noise)
    opt = make_opt(model, case)
    modules = [m for m in model.modules() if isinstance(m, t1t2.GaussianNoise)]

    def as_rank(rank):  # what rank `rank` draws in its k-th forward of this step: its seed, calls from 0
        for i, m in enumerate(modules):
            m.seed, m._calls = module_seed(SEED, i, rank), 0

    def train_loss(x, y):
        if noise is not True:
            return criterion(opt, model(x), y)
        losses = []
        for r in range(world):
            as_rank(r)
            losses.append(F.cross_entropy(model(shard(x, r, world)), shard(y, r, world)))
        as_rank(0)
        return sum(losses) / world

    for x, y, xv, yv in batches():
        opt.step(lambda: train_loss(x, y))
        opt.hyper_step(lambda: F.cross_entropy(model(xv), yv))
    return snapshot(model, opt)


def run_rank(case: str, rank: int, world: int, **kw) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    inner = make_model(CASES[case][1])
    model = DDP(inner)
    opt = make_opt(model, case, **kw)
    reads = {"step": 0, "hyper_step": 0}  # the most host reads one call made
    for x, y, xv, yv in batches():
        xs, ys, xvs, yvs = (shard(t, rank, world) for t in (x, y, xv, yv))
        with HostReads() as counted:
            opt.step(lambda: criterion(opt, model(xs), ys))
        reads["step"] = max(reads["step"], counted.count)
        with HostReads() as counted:
            opt.hyper_step(lambda: F.cross_entropy(model(xvs), yvs))
        if counted.count > reads["hyper_step"]:
            reads.update(hyper_step=counted.count, where=f"{dict(counted.where)}, {counted.listed} host_list")
    out = snapshot(inner, opt)
    out.update(reads=reads, comm_bytes=opt.comm_bytes, state_keys=sorted(opt.state_dict()["state"]),
               world_size=opt.world_size, params=sum(p.numel() for p in inner.parameters()),
               hypers=sum(r.numel() for r in opt.raw_hyperparameters().values()))
    return out


def run_framework(case: str, rank: int, world: int) -> dict:
    """The frameworks' pattern (Lightning, Hugging Face Trainer/accelerate): the optimizer is built
    on the unwrapped module, training runs through a DDP wrapper the optimizer never sees; T1T2 then
    reduces over the default group (process_group=None)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    inner = make_model(CASES[case][1])
    opt = make_opt(inner, case)
    model = DDP(inner)
    for x, y, xv, yv in batches():
        xs, ys, xvs, yvs = (shard(t, rank, world) for t in (x, y, xv, yv))
        opt.step(lambda: criterion(opt, model(xs), ys))
        opt.hyper_step(lambda: F.cross_entropy(model(xvs), yvs))
    out = snapshot(inner, opt)
    out.update(world_size=opt.world_size, comm_bytes=opt.comm_bytes,
               opted_out_world_size=make_opt(make_model(False), case, process_group=False).world_size)
    return out


def drift(rank: int, world: int, **kw) -> tuple[int, str]:
    """Rank 1 writes its own λ: a hyper_step must fail on every rank, naming it. Returns (which hyper
    step raised, 1-based, or 0 for none; the message). The default (lazy) guard checks on the device
    and reports at the next hyper step's one host read; skip_nonfinite="grads" reads it at once."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model(False))
    opt = make_opt(model, "momentum-penalties", **kw)
    if rank == 1:
        with torch.no_grad():
            opt.raw_hyperparameters()["l2.2.weight"].add_(1e-3)
    for k, batch in enumerate(batches()[:3], 1):
        x, y, xv, yv = (shard(t, rank, world) for t in batch)
        opt.step(lambda: F.cross_entropy(model(x), y))
        try:
            opt.hyper_step(lambda: F.cross_entropy(model(xv), yv))
        except RuntimeError as exc:
            return k, str(exc)
    return 0, "no error"


def nonfinite(case: str, rank: int, world: int) -> dict:
    """Rank 1 alone gets a NaN in its training shard at step 2 and in its validation shard at step 4:
    every rank must skip the same T1 and T2 steps (DDP's all-reduce spreads the NaN gradient; the
    hypergradient all-reduce spreads a rank's skip) and stay identical."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    inner = make_model(CASES[case][1])
    model = DDP(inner)
    opt = make_opt(model, case)
    skips = []
    for k, (x, y, xv, yv) in enumerate(batches()):
        xs, ys, xvs, yvs = (shard(t, rank, world).clone() for t in (x, y, xv, yv))
        if rank == 1 and k == 1:
            xs[0, 0] = float("nan")
        if rank == 1 and k == 3:
            xvs[0, 0] = float("nan")
        opt.step(lambda: F.cross_entropy(model(xs), ys))
        if opt.hyper_due:
            opt.hyper_step(lambda: F.cross_entropy(model(xvs), yvs))
        skips.append(dict(opt.skipped))
    out = snapshot(inner, opt)
    out.update(skips=skips, steps=opt.steps, hyper_steps=opt.hyper_steps)
    return out


def main(mode: str, rank: int, world: int, init_file: str, out: str) -> int:
    import torch.distributed as dist

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=float(os.environ.get("T1T2_TEST_TIMEOUT", "30")))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout)
    try:
        if mode == "equivalence":
            result = {case: run_rank(case, rank, world) for case in CASES}
            result["drift"] = drift(rank, world)
            result["drift-grads"] = drift(rank, world, skip_nonfinite="grads")
            # each rank's own v in the noise hypergradient: no parameter-sized all-reduce
            result["local-noise"] = run_rank("momentum-noise-fd", rank, world, distributed_noise="local")
            result["nonfinite"] = {case: nonfinite(case, rank, world) for case in ("momentum-penalties",
                                                                                  "adam-noise-fd")}
            torch.save(result, out)
            return 0
        if mode == "framework":
            torch.save({case: run_framework(case, rank, world) for case in FRAMEWORK_CASES}, out)
            return 0
        # mode "hang": rank 1 raises in its validation closure at the 3rd hyper step and, instead of
        # dying (which would close its connections at once), stays alive for a while: rank 0 must
        # not wait forever in its all-reduce.
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(make_model(False))
        opt = make_opt(model, "momentum-penalties")
        t0 = time.monotonic()
        try:
            for k, (x, y, xv, yv) in enumerate(batches()):
                xs, ys, xvs, yvs = (shard(t, rank, world) for t in (x, y, xv, yv))

                def val():
                    if rank == 1 and k == 2:
                        raise ValueError("boom in rank 1's validation closure")
                    return F.cross_entropy(model(xvs), yvs)

                opt.step(lambda: F.cross_entropy(model(xs), ys))
                opt.hyper_step(val)
        except Exception as exc:  # noqa: BLE001 - reported to the test, then a non-zero exit
            with open(out, "w") as f:
                f.write(f"{time.monotonic() - t0:.2f}\n{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            if rank == 1:  # alive until the test has seen rank 0 give up (T1T2_TEST_RELEASE is created)
                release = os.environ.get("T1T2_TEST_RELEASE")
                deadline = time.monotonic() + float(os.environ.get("T1T2_TEST_LINGER", "10"))
                while time.monotonic() < deadline and not (release and os.path.exists(release)):
                    time.sleep(0.05)
            os._exit(1)  # no destroy_process_group: it would wait for the peer
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]))
