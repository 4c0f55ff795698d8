"""The ``train`` command: an MLP on a built-in dataset while T1-T2 tunes its regularization
hyperparameters on a validation split, then test accuracy on a split neither step has seen. Writes
``log.csv``, ``metrics.json`` and ``trajectories.png`` into the output folder; optionally checkpoints
and resumes bit-identically, and runs under torchrun (DistributedDataParallel, one shard of every
batch per rank)."""
from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import random
import sys
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import t1t2_fast as t1t2
from t1t2_fast import NonFiniteError

from .common import DEFAULT_LR, UsageError, args_config, progress, timestamped, torch_threads, write_json
from .data import BatchStream, load_data
from .models import make_mlp
from .plotting import plot_train


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _default_out(args) -> str:
    if args.name:
        return os.path.join("runs", args.name)
    return timestamped(os.path.join("runs", args.dataset))


def _summary_value(value) -> float:
    """A hyperparameter as one number: itself, or the mean of a tensor-valued one."""
    return float(value) if isinstance(value, float) else float(value.mean())


def _short(value) -> str:
    """Compact text for the progress bar: '1.2e-03', or the geometric mean '~1.2e-03' of a tensor."""
    if isinstance(value, float):
        return f"{value:.1e}"
    v = value.double().clamp_min(1e-300)
    return f"~{float(v.log().mean().exp()):.1e}"


def _compact_hypers(hypers: dict) -> str:
    """'l2 1.0e-03|9.8e-04|1.1e-03 l1 ...': one group per penalty kind, one value per layer."""
    groups: "OrderedDict[str, list[str]]" = OrderedDict()
    for name, value in hypers.items():
        groups.setdefault(name.split(".", 1)[0], []).append(_short(value))
    return " ".join(f"{kind} {'|'.join(vals)}" for kind, vals in groups.items())


def _json_value(value):
    """A hyperparameter for metrics.json: a float, or summary statistics (and the values when small)."""
    if isinstance(value, float):
        return value
    v = value.detach().double().cpu()
    out = {"shape": list(v.shape), "mean": float(v.mean()), "geomean": float(v.clamp_min(1e-300).log().mean().exp()),
           "min": float(v.min()), "max": float(v.max())}
    if v.numel() <= 1024:
        out["values"] = v.flatten().tolist()
    return out


class _Dist:
    """The process group of a `torchrun ... train` run: rank, world size, local rank."""

    def __init__(self, rank: int, world_size: int, local_rank: int):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank


def _torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun (its RANK / WORLD_SIZE / LOCAL_RANK
    variables), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UsageError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them)") from None
    return rank, world, local


CHECKPOINT_FORMAT = "t1t2-train-checkpoint"
# Flags that change where and how a run reports, not what it computes: they may differ on --resume.
# (--threads is not one of them: torch's kernels may sum in another order with another thread count.)
RUN_ONLY_FLAGS = ("out", "name", "quiet", "dist_timeout", "checkpoint", "checkpoint_every", "resume", "max_skips", "func",
                  "logger")


def _tensorboard_writer(out: str):
    """A ``torch.utils.tensorboard.SummaryWriter`` writing into the run's output folder."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch.utils.tensorboard needs the tensorboard package
        raise UsageError(f"--logger tensorboard needs the tensorboard package (pip install tensorboard): "
                         f"{exc}") from None
    return SummaryWriter(log_dir=out)


def _train_settings(args, world: int) -> dict:
    """What a `train` run computes from: every flag but the run-only ones (after defaults are
    resolved), and the number of processes."""
    settings = {k: v for k, v in vars(args).items() if k not in RUN_ONLY_FLAGS}
    settings["noise"] = list(settings["noise"])
    settings["world_size"] = world
    return settings


def _rng_states(device) -> dict:
    """torch's (and CUDA's), numpy's and Python's global generator states, in types that
    torch.load(weights_only=True) reads back."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": random.getstate()}


def _set_rng_states(states: dict, device) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
    name, key, *rest = states["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def write_checkpoint(path: str, state: dict) -> None:
    """torch.save to a temporary file next to ``path``, flushed to disk, then renamed over it: a
    crash mid-write leaves the previous checkpoint whole."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path: str, settings: dict) -> dict:
    """The checkpoint at ``path``, refused (UsageError) unless a `train` run with ``settings`` wrote it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"--resume {path}: no such file") from None
    except Exception as exc:  # not a torch file, truncated, or holding other objects
        raise UsageError(f"--resume {path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"--resume {path}: not a checkpoint written by `t1t2 train --checkpoint`")
    saved = state["settings"]
    differ = [k for k in sorted(set(saved) | set(settings)) if saved.get(k, "(unset)") != settings.get(k, "(unset)")]
    if differ:
        detail = "; ".join(f"{k.replace('_', '-')}: {saved.get(k, '(unset)')!r} there, "
                           f"{settings.get(k, '(unset)')!r} here" for k in differ)
        raise UsageError(f"--resume {path}: the checkpoint was written by a run with other settings ({detail}); "
                         f"resume with the command that wrote it")
    return state


def run(args) -> int:
    """The `train` command: one run, or under torchrun this process's rank of one."""
    env = _torchrun_env()
    with torch_threads(args.threads):
        if env is None:
            return _train(args)
        # torchrun: one process per rank; gloo on CPU, nccl on CUDA (nothing else in the run changes)
        rank, world, local = env
        backend = "nccl" if torch.device(args.device).type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=_dt.timedelta(seconds=args.dist_timeout))
        try:
            status = _train(args, _Dist(rank, world, local))
            dist.barrier()  # leave together: no rank tears its connections down while rank 0 still writes
            return status
        finally:
            dist.destroy_process_group()


def _train(args, ddp: _Dist | None = None) -> int:
    """One `train` run; with ``ddp``, this process is one rank of a torchrun job: the model is
    wrapped in DistributedDataParallel, every global batch (the same one a single process would
    draw) is split into equal disjoint shards, one per rank, and only rank 0 evaluates, prints and
    writes."""
    main_rank = ddp is None or ddp.rank == 0
    if not main_rank:
        args.quiet = True
    t_start = time.perf_counter()
    if args.l1 == 0:  # --l1 0 means no L1, like --l2 0
        args.l1 = None
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.momentum == 0 and args.nesterov:
        raise UsageError("--nesterov needs --momentum > 0")
    if args.nesterov and args.optimizer != "sgd":
        raise UsageError("--nesterov applies to --optimizer sgd only")

    try:
        device = torch.device(args.device)
        if ddp is not None and device.type == "cuda":  # one GPU per rank
            device = torch.device("cuda", ddp.local_rank)
            torch.cuda.set_device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise UsageError(f"--device {args.device!r} is not usable here: {exc}") from None

    try:
        data = load_data(args.dataset, seed=args.seed, samples=args.samples, data_dir=args.data_dir)
    except RuntimeError as exc:  # e.g. mnist1d not installed
        print(f"t1t2 train: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    train_x, train_y = data.train.x.to(device), data.train.y.to(device)
    val_x, val_y = data.val.x.to(device), data.val.y.to(device)
    test_x, test_y = data.test.x.to(device), data.test.y.to(device)
    n_train, n_val = len(data.train), len(data.val)

    batch = min(args.batch_size, n_train)
    val_batch = min(args.val_batch_size or args.batch_size, n_val)
    steps_per_epoch = math.ceil(n_train / batch)
    total_steps = args.steps if args.steps is not None else (args.epochs or 100) * steps_per_epoch
    log_every = args.log_every or max(1, total_steps // 200)
    world = 1 if ddp is None else ddp.world_size
    if world > 1 and min(batch, val_batch) < world:
        raise UsageError(f"--batch-size {batch} and the validation batch size {val_batch} must be at least the "
                         f"number of processes ({world}): every rank takes an equal share of each batch")

    if "hidden" in args.noise and args.depth == 0:
        raise UsageError("--noise hidden needs hidden layers (--depth >= 1)")
    settings = _train_settings(args, world)
    # every rank reads the file rank 0 wrote (one state for all: DDP keeps θ, the optimizer and λ
    # identical on every rank, and every rank draws the same global batches)
    ckpt = read_checkpoint(args.resume, settings) if args.resume else None

    _seed_everything(args.seed)
    model = make_mlp(data.num_features, data.num_classes, args.width, args.depth, noise=args.noise,
                     noise_init=args.noise_init, noise_per=args.noise_per, noise_mode=args.noise_mode,
                     batchnorm=args.batchnorm).to(device)
    net = model  # the module itself: evaluation and names; `model` is what the training closures call
    if ddp is not None:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    penalties = []
    if args.l2 > 0:
        penalties.append(t1t2.L2(args.l2, per=args.per, decoupled=args.decoupled, transform=args.l2_transform))
    elif args.decoupled:
        raise UsageError("--decoupled needs L2 (--l2 > 0)")
    if args.l1 is not None:
        penalties.append(t1t2.L1(args.l1, per=args.per, transform=args.l2_transform))
    # label smoothing of the training loss: a Tunable in the loss with --label-smoothing-tune (its
    # evaluation value 0: T2's validation loss is plain cross-entropy), else a fixed number or none
    smoothing = args.label_smoothing or 0.0
    tunables = []
    if args.label_smoothing_tune:
        smoothing = t1t2.Tunable(0.1 if args.label_smoothing is None else args.label_smoothing, transform="linear",
                                 bounds=(0.0, 1.0), eval_value=0.0, name="label_smoothing")
        tunables.append(smoothing)
    try:
        opt = t1t2.T1T2(model, penalties, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
                        nesterov=args.nesterov, hyper_optimizer=args.hyper_optimizer, hyper_lr=args.hyper_lr,
                        hyper_every=args.hyper_every, hypergrad=args.hypergrad,
                        noise_hypergrad=args.noise_hypergrad, fd_eps=args.fd_eps, backend=args.backend,
                        seed=args.seed, max_consecutive_skips=args.max_skips, tunables=tunables,
                        tune_lr=getattr(args, "tune_lr", None))
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        raise UsageError(str(exc)) from None
    backend_name = getattr(getattr(opt, "backend", None), "name", args.backend)
    tuning = bool(opt.hyperparameters())

    out = args.out or _default_out(args)
    if main_rank:
        os.makedirs(out, exist_ok=True)
    # --logger tensorboard: event files next to log.csv (which is written either way), rank 0 only
    writer = _tensorboard_writer(out) if main_rank and getattr(args, "logger", "csv") == "tensorboard" else None
    paths = {k: os.path.join(out, f) for k, f in
             (("log", "log.csv"), ("metrics", "metrics.json"), ("plot", "trajectories.png"))}

    if not args.quiet:
        if ddp is not None:
            print(f"distributed: {world} processes ({torch.distributed.get_backend()}), each takes 1/{world} "
                  f"of every batch")
        print(f"{data.describe()}; MLP {data.num_features}-{'-'.join([str(args.width)] * args.depth)}"
              f"{'-' if args.depth else ''}{data.num_classes}; {total_steps} steps "
              f"({total_steps / steps_per_epoch:.3g} epochs of {steps_per_epoch}), backend {backend_name}")
        if not tuning:
            print("no penalty, noise or tuned label smoothing selected (--l2 0, no --l1, no --noise, no "
                  "--label-smoothing-tune): plain training, nothing to tune")

    train_batches = BatchStream(n_train, batch, args.seed, device)
    val_batches = BatchStream(n_val, val_batch, args.seed + 1, device)

    @torch.no_grad()
    def evaluate(x, y):
        net.eval()
        logits = net(x)
        net.train()
        return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())

    hyper_names = list(opt.hyperparameters())
    columns = ["step", "train_loss", "val_loss"] + [
        n if isinstance(v, float) else f"{n}[mean]" for n, v in opt.hyperparameters().items()]
    rows: list[list] = []
    bands: dict[str, list[tuple[float, float]]] = {n: [] for n in hyper_names}
    initial = opt.hyperparameters()

    def record(step):
        tl, _ = evaluate(train_x, train_y)
        vl, _ = evaluate(val_x, val_y)
        hp = opt.hyperparameters()
        rows.append([step, tl, vl] + [_summary_value(hp[n]) for n in hyper_names])
        for n in hyper_names:
            v = hp[n]
            bands[n].append((v, v) if isinstance(v, float) else (float(v.min()), float(v.max())))
        if writer is not None:
            writer.add_scalar("t1t2/loss/train", tl, step)
            writer.add_scalar("t1t2/loss/val", vl, step)
            for key, value in opt.log_dict(prefix="t1t2/").items():
                writer.add_scalar(key, value, step)
        return tl, vl, hp

    bar = progress(total_steps, f"train {args.dataset}", args.quiet, unit="step")

    def criterion(logits, y, reduction, smoothed):
        """Cross-entropy; the training loss (``smoothed``) with the label smoothing: torch's own for a
        fixed coefficient, t1t2.smoothed_cross_entropy (differentiable in c) for the tuned one."""
        if smoothed and tunables:
            return t1t2.smoothed_cross_entropy(logits, y, smoothing, reduction=reduction)
        return F.cross_entropy(logits, y, reduction=reduction, label_smoothing=smoothing if smoothed else 0.0)

    def shard_loss(x, y, idx, smoothed=False):
        """The training or validation loss of the global batch ``idx`` as this process sees it: the
        mean cross-entropy (label-smoothed with ``smoothed``: the training loss), or under torchrun
        this rank's share of the sum scaled by world / batch, so that DDP's mean over the ranks (and
        T2's) is the whole batch's mean, shards equal or not."""
        if ddp is None:
            return lambda: criterion(model(x[idx]), y[idx], "mean", smoothed)
        part = idx.tensor_split(world)[ddp.rank]
        xs, ys, scale = x[part], y[part], world / len(idx)
        return lambda: criterion(model(xs), ys, "sum", smoothed) * scale

    def global_loss(loss):
        """The whole batch's training loss on every rank (so all stop together on divergence)."""
        if ddp is None:
            return loss
        total = loss.detach().to(torch.float64).reshape(1)
        torch.distributed.all_reduce(total)
        return total[0] / world

    done, train_time_before = 0, 0.0
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        train_batches.load_state_dict(ckpt["train_batches"])
        val_batches.load_state_dict(ckpt["val_batches"])
        _set_rng_states(ckpt["rng"], device)
        done, train_time_before = int(ckpt["step"]), float(ckpt["train_time_s"])
        rows[:] = [list(r) for r in ckpt["log"]["rows"]]
        bands.update({n: [tuple(b) for b in v] for n, v in ckpt["log"]["bands"].items()})
        initial = ckpt["log"]["initial"]
        bar.update(done)
        if ckpt["backend_used"] != backend_name:  # --backend auto found another implementation here
            print(f"t1t2 train: warning: the checkpoint was written with backend {ckpt['backend_used']}, this run "
                  f"uses {backend_name}: the continuation is not bit-identical to the original run's",
                  file=sys.stderr)
        if not args.quiet:
            print(f"resumed from {args.resume} at step {done}")

    def checkpoint(step, train_time):
        if not (args.checkpoint and main_rank):
            return
        write_checkpoint(args.checkpoint, {
            "format": CHECKPOINT_FORMAT, "version": 1, "settings": settings, "step": step,
            "train_time_s": train_time, "backend_used": backend_name,
            "model": net.state_dict(), "opt": opt.state_dict(),
            "train_batches": train_batches.state_dict(), "val_batches": val_batches.state_dict(),
            "rng": _rng_states(device), "log": {"rows": rows, "bands": bands, "initial": initial}})

    if main_rank and not args.resume:
        record(0)
    model.train()
    diverged, stop_reason = None, None
    logged_skips = 0

    def log_skip(step):
        """Each skipped step on its own line (the first 20, then every 100th), above the bar."""
        nonlocal logged_skips
        total = sum(opt.skipped.values())
        if main_rank and opt.last_skip and total > logged_skips:
            logged_skips = total
            if total <= 20 or total % 100 == 0:
                bar.write(f"t1t2 train: iteration {step}: skipped {opt.last_skip} ({opt.skipped['t1']} T1 and "
                          f"{opt.skipped['t2']} T2 steps skipped so far)")

    t_train = time.perf_counter()
    try:
        for step in range(done + 1, total_steps + 1):
            try:
                loss = global_loss(opt.step(shard_loss(train_x, train_y, next(train_batches), smoothed=True)))
                opt.check_nonfinite()  # the lazy guard's counters: NonFiniteError without hyper steps too
                log_skip(step)
                if tuning and opt.hyper_due:
                    opt.hyper_step(shard_loss(val_x, val_y, next(val_batches)))
                    log_skip(step)
            except NonFiniteError as exc:  # --max-skips consecutive skips: the run is not recovering
                log_skip(step)
                diverged, stop_reason = step, str(exc)
                loss = torch.tensor(math.nan)
            if not opt.skip_nonfinite and not math.isfinite(float(loss)):
                diverged = step
            if main_rank and (step % log_every == 0 or step == total_steps or diverged):
                tl, vl, hp = record(step)
                bar.set_postfix_str(f"loss {tl:.3f} val {vl:.3f} {_compact_hypers(hp)}", refresh=False)
            bar.update(1)
            if diverged:  # no checkpoint: the last one written stays the last good state
                break
            if step % args.checkpoint_every == 0 or step == total_steps:
                checkpoint(step, train_time_before + time.perf_counter() - t_train)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    train_time = train_time_before + time.perf_counter() - t_train
    if done == total_steps:  # resumed from the final checkpoint: nothing ran, the outputs are rewritten
        checkpoint(done, train_time)
    if not main_rank:  # rank 0 evaluates, writes and reports
        return 1 if diverged else 0

    test_loss, test_acc = evaluate(test_x, test_y)
    val_loss, val_acc = evaluate(val_x, val_y)
    train_loss, train_acc = evaluate(train_x, train_y)
    final = opt.hyperparameters()

    with open(paths["log"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([r[0]] + [f"{x:.8g}" for x in r[1:]])  # float32 values: 8 digits is plenty

    config = args_config(args)
    config.update(out=out, steps=total_steps, steps_per_epoch=steps_per_epoch, batch_size_used=batch,
                  val_batch_size_used=val_batch, log_every=log_every, backend_used=backend_name)
    plot_train(paths["plot"], columns, rows, hyper_names, bands, title=(
        f"{args.dataset}: MLP width {args.width} depth {args.depth}, {args.optimizer} lr {args.lr:g}, "
        f"hyper {args.hyper_optimizer} lr {args.hyper_lr:g} every {args.hyper_every}; "
        f"test acc {test_acc:.3f}"))

    wall = time.perf_counter() - t_start
    metrics = {
        "test_accuracy": test_acc, "test_loss": test_loss,
        "val_accuracy": val_acc, "val_loss": val_loss,
        "train_accuracy": train_acc, "train_loss": train_loss,
        "hyperparameters": {n: _json_value(v) for n, v in final.items()},
        "initial_hyperparameters": {n: _json_value(v) for n, v in initial.items()},
        "steps_done": rows[-1][0], "hyper_steps": int(getattr(opt, "hyper_steps", 0)),
        "world_size": world, "hyper_comm_bytes": int(getattr(opt, "comm_bytes", 0)),
        "diverged_at_step": diverged,
        "skipped_steps": dict(opt.skipped), "clipped_hyper_steps": dict(opt.clipped),
        "train_time_s": train_time, "wall_time_s": wall,
        "dataset": {"name": data.name, "train": n_train, "val": n_val, "test": len(data.test),
                    "features": data.num_features, "classes": data.num_classes},
        "config": config,
        "versions": {"t1t2_fast": getattr(t1t2, "__version__", "?"), "torch": torch.__version__,
                     "python": platform.python_version()},
    }
    write_json(paths["metrics"], metrics)

    print(f"test accuracy {test_acc:.4f}  test loss {test_loss:.4f}  (val accuracy {val_acc:.4f}, "
          f"train accuracy {train_acc:.4f})")
    if final:
        width = max(len(n) for n in final)
        print("final hyperparameters" + (" (mean over entries)" if any(not isinstance(v, float)
                                                                     for v in final.values()) else "") + ":")
        for n, v in final.items():
            init = _summary_value(initial[n])
            print(f"  {n:<{width}}  {_summary_value(v):.4g}  (initial {init:.4g})")
    print(f"run time {wall:.1f} s ({train_time:.1f} s training, {rows[-1][0]} steps, "
          f"{metrics['hyper_steps']} hyper steps, backend {backend_name})")
    written = list(paths.values()) + ([args.checkpoint] if args.checkpoint else [])
    print("wrote " + "\n      ".join(written))
    if any(opt.skipped.values()):
        print(f"skipped for Inf/NaN: {opt.skipped['t1']} T1 and {opt.skipped['t2']} T2 steps")
    if diverged:
        why = stop_reason or "the training loss became non-finite. Try a smaller --lr or --hyper-lr"
        print(f"t1t2 train: error: training stopped at iteration {diverged}: {why}", file=sys.stderr)
        return 1
    return 0
