"""What the commands share: usage errors, output folders and files, progress bars, torch's thread
count, and the training steps every experiment takes."""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

# Learning rate of the weights' optimizer when --lr is not given.
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3}


class UsageError(Exception):
    """A bad combination of flags found after parsing; reported like an argparse error."""


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
def timestamped(base: str) -> str:
    """``base-YYYYmmdd-HHMMSS``, with ``-1``, ``-2``, ... appended while that path exists."""
    base = f"{base}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out, k = base, 1
    while os.path.exists(out):
        out, k = f"{base}-{k}", k + 1
    return out


def args_config(args) -> dict:
    """A command's parsed flags for its summary file (all but the dispatch function)."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def strict_json(obj):
    """NaN/inf become null: a JSON file stays valid JSON for every reader, even after divergence."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json(path: str, obj) -> None:
    """``obj`` as indented strict JSON (see ``strict_json``), ending in a newline."""
    with open(path, "w") as f:
        json.dump(strict_json(obj), f, indent=2, allow_nan=False)
        f.write("\n")


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def write_csv(path: str, header: list[str], rows: list[list]) -> None:
    """A CSV file; floats with 6 significant digits."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([[_fmt(v) for v in r] for r in rows])


def progress(total: int, desc: str, quiet: bool, unit: str = "run"):
    """A progress bar on stderr (disabled by ``quiet``)."""
    from tqdm.auto import tqdm  # optional dependency (the apps extra), needed only when a command runs

    return tqdm(total=total, desc=desc, disable=quiet, file=sys.stderr, dynamic_ncols=True, unit=unit, leave=True)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside, restored afterwards: main() may be called
    in-process (tests, notebooks), and leaves torch as it found it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# training steps
# ---------------------------------------------------------------------------------------------
def t1t2_iteration(opt, model, batch, val_batch=None, *, stop_on_nonfinite: bool = False, criterion=None):
    """One T1 step of the T1T2 optimizer ``opt`` on the cross-entropy of ``model`` on ``batch`` (x, y),
    then, if ``val_batch`` is given and a T2 step is due, one T2 step on ``val_batch()`` (called only
    then, so a stream of validation batches advances once per T2 step). With ``stop_on_nonfinite``
    no T2 step follows a non-finite T1 loss (the caller ends the run there); without it nothing
    waits for the loss's value. ``criterion(logits, y)``: the training loss (default cross-entropy);
    the validation loss is always the cross-entropy. Returns the T1 loss."""
    x, y = batch
    train_loss = F.cross_entropy if criterion is None else criterion
    loss = opt.step(lambda: train_loss(model(x), y))
    if val_batch is not None and opt.hyper_due and not (stop_on_nonfinite and not math.isfinite(float(loss))):
        xv, yv = val_batch()
        opt.hyper_step(lambda: F.cross_entropy(model(xv), yv))
    return loss


def plain_step(opt, model, batch) -> None:
    """One step of a torch optimizer on the cross-entropy of ``model`` on ``batch`` (x, y)."""
    x, y = batch
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
