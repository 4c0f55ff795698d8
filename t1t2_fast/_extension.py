"""Loads the compiled extension (``t1t2_fast._C``) that registers the ``torch.ops.t1t2`` ops.

Without it the package still works on the reference path; the first time the compiled backend
is asked for and missing, one warning says why and how to build it. ``T1T2_DISABLE_EXT=1`` makes
the extension count as missing (to test the fallback).
"""
from __future__ import annotations

import os
import warnings

import torch  # noqa: F401  (the extension links against libtorch; load it first)


class CompiledBackendMissing(RuntimeWarning):
    """The C++ extension is not built or failed to load; the reference path is used."""


def _import() -> tuple[bool, str | None]:
    if os.environ.get("T1T2_DISABLE_EXT") == "1":
        return False, "disabled by T1T2_DISABLE_EXT=1"
    try:
        from . import _C  # noqa: F401
    except (ImportError, OSError) as exc:  # not built, or built against another torch
        return False, f"{type(exc).__name__}: {exc}"
    return True, None


AVAILABLE, LOAD_ERROR = _import()
_warned = False


def warn_if_missing() -> None:
    """Say once per process that the compiled backend is missing, why, and how to build it."""
    global _warned
    if AVAILABLE or _warned:
        return
    _warned = True
    warnings.warn(
        f"t1t2_fast: the compiled backend is missing ({LOAD_ERROR}); using the pure-PyTorch reference "
        f"path, which is correct but slower. To build it (needs a C++ compiler and ninja): "
        f"pip install --no-build-isolation -e .",
        CompiledBackendMissing, stacklevel=3)


def load() -> bool:
    """Whether the compiled ops are registered (``torch.ops.t1t2.*``); warns once if they are not."""
    warn_if_missing()
    return AVAILABLE
