"""What a training loop keeps alive from one iteration to the next, over long runs.

Three measurements, used by ``tests/apps/test_long_run.py`` (exact, at small scale) and
``bench/long_run.py`` (full scale, with the process's memory):

- ``live_tensors()``: the torch.Tensor objects Python can reach (a gc scan) and the bytes of their
  distinct storages;
- ``optimizer_footprint(opt)``: entries and bytes of every container a ``T1T2`` keeps between
  iterations (optimizer state, stash and save buffers, hyper-optimizer state, last hypergradients,
  the noise modules' σ leaves and recorded ∂L/∂σ);
- ``GraphWatch``: whether the autograd graphs of an iteration die. Every tensor that autograd
  saves for backward while it watches is packed in a small holder object the graph owns; a holder
  still alive after the iteration means its graph is.

``process_memory()`` reads the resident set and its peak (VmRSS, VmHWM) from /proc/self/status.
"""
from __future__ import annotations

import gc
import warnings

import torch


def process_memory() -> dict[str, int] | None:
    """{"rss": bytes, "peak_rss": bytes} of this process from /proc/self/status (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    kib = lambda key: int(fields[key].split()[0]) * 1024  # "123456 kB"
    return {"rss": kib("VmRSS"), "peak_rss": kib("VmHWM")}


def _storage_key(t: torch.Tensor):
    try:
        s = t.untyped_storage()
        return (t.device.type, t.device.index, s.data_ptr(), s.nbytes())
    except (RuntimeError, NotImplementedError):  # sparse, meta or other storage-less tensors
        return None


def _is_tensor(obj) -> bool:
    try:
        return isinstance(obj, torch.Tensor)
    except ReferenceError:  # a weakref proxy whose referent died
        return False


def live_tensors() -> tuple[int, int]:
    """(number of torch.Tensor objects reachable by the garbage collector, bytes of their distinct
    storages), after a full collection. Tensors held only inside an autograd graph are not Python
    objects and are not counted: ``GraphWatch`` sees those."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance on some deprecated torch aliases warns
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if _is_tensor(o)]
    for obj in objects:
        key = _storage_key(obj)
        if key is not None:
            storages[key] = key[3]
    return len(objects), sum(storages.values())


def _size(x) -> tuple[int, int]:
    """(tensors, bytes) in a nest of dicts, lists and tuples."""
    if isinstance(x, torch.Tensor):
        return 1, x.numel() * x.element_size()
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        parts = [_size(v) for v in x]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)
    return 0, 0


def optimizer_footprint(opt) -> dict[str, tuple[int, int]]:
    """{container: (tensors, bytes)} for what a ``T1T2`` keeps between iterations; in a run that
    does not grow, every entry is the same after iteration k1 and k2 (once each kind of iteration
    has been seen)."""
    out = {
        "optimizer state": _size([dict(st) for st in opt.state.values()]),
        "stash buffers": _size(opt._stash_buffers),
        "save buffers": _size(opt._save_buffers),
        "stash": _size({k: v for k, v in (opt._stash or {}).items() if k != "noise"}),
        "hyper-optimizer state": _size(opt._hyper_state),
        "last hypergradients": _size(opt.last_hypergrad),
        "raw hyperparameters": _size([h.raw for h in opt.all_hypers]),
        # the replayed hyperparameters: noise levels and Tunables (noise.hypergrad.Replayed)
        "noise bindings": (len(opt._noise), 0),
        "noise σ leaves": _size([b.module.recorded_leaves for b in opt._noise]),
        "noise ∂L/∂σ": _size([b.module.recorded_grad for b in opt._noise]),
    }
    noise_stash = (opt._stash or {}).get("noise")
    if noise_stash is not None:
        out["stash (noise)"] = _size(noise_stash.get("g0") or [])
    return out


class _Saved:
    """A tensor autograd saved for backward, as the graph holds it while a GraphWatch looks on; the
    watch counts the holders alive."""

    __slots__ = ("tensor", "watch")

    def __init__(self, tensor: torch.Tensor, watch: "GraphWatch"):
        self.tensor, self.watch = tensor, watch
        watch.live += 1
        watch.packed += 1

    def __del__(self):
        self.watch.live -= 1


class GraphWatch:
    """Watches whether autograd graphs die: inside ``with watch.watching():`` every tensor autograd
    saves for backward (forward passes, and backward passes with create_graph) is handed to the
    graph in a holder object that counts itself; ``watch.alive()`` is the number of holders, hence
    of graphs' saved tensors, still alive. Numerics are unchanged (the holder gives back the same
    tensor), and the watch itself keeps nothing per saved tensor."""

    def __init__(self):
        self.live = 0    # holders alive now
        self.packed = 0  # holders made so far

    def _pack(self, t: torch.Tensor) -> _Saved:
        return _Saved(t, self)

    @staticmethod
    def _unpack(holder: _Saved) -> torch.Tensor:
        return holder.tensor

    def watching(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def alive(self) -> int:
        """Holders still alive after a full collection (of reference cycles through a graph)."""
        gc.collect()
        return self.live
