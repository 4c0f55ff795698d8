"""The statistics that judge the paper's claims (issue 17): the grid's optimal band and the paired
sign test of before/after.

Optimal band. Each grid cell is trained with ``seeds`` initializations (the same seeds in every
cell); its error is their mean. The band is the set of cells whose mean test error is within two
standard errors of the *difference* from the best cell: cell c is in it when
``err_c - err_best <= 2 * se(c, best)``, ``se(c, best) = sqrt(s_c^2 / n + s_best^2 / n)`` with
``s`` the cells' sample standard deviations over the seeds (n >= 2 needed). The best cell is in the
band by definition. A single T1-T2 run's own test error is in the band when
``err_run - err_best <= 2 * sqrt(s_best^2 / n + s_pool^2)``, ``s_pool`` the root mean square of
the cells' standard deviations (the spread of one run, which a single run cannot measure itself).
A run's end point is in the band when its nearest cell is (end points outside the grid count as
the nearest edge cell, and are flagged).

Sign test. Before/after pairs from the same random start: ``k`` improved, ``m`` got worse, ties
dropped; one-sided p-value P[Bin(k + m, 1/2) >= k] (the chance of so many improvements if after and
before were exchangeable), and the two-sided one.
"""
from __future__ import annotations

import math

import numpy as np


def sample_std(values) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1)) if v.size >= 2 else math.nan


def optimal_band(cells: list[dict]) -> dict:
    """Mark each cell (dicts with "test_error" and "test_errors" per seed) with "in_band" and
    "band_margin" (2 SE of the difference from the best); returns the band's description."""
    n = len(cells[0]["test_errors"])
    if n < 2:
        raise ValueError("the optimal band needs at least 2 seeds per cell (a standard error)")
    best = min(cells, key=lambda c: (c["test_error"], c.get("rank", 0)))
    s_best = sample_std(best["test_errors"])
    for c in cells:
        margin = 2.0 * math.sqrt(sample_std(c["test_errors"]) ** 2 / n + s_best ** 2 / n)
        c["band_margin"] = margin
        c["in_band"] = bool(c is best or c["test_error"] - best["test_error"] <= margin)
    s_pool = math.sqrt(float(np.mean([sample_std(c["test_errors"]) ** 2 for c in cells])))
    run_margin = 2.0 * math.sqrt(s_best ** 2 / n + s_pool ** 2)
    return {"best_test_error": best["test_error"], "best_cell_std": s_best, "pooled_std": s_pool,
            "cells_in_band": int(sum(c["in_band"] for c in cells)), "cells": len(cells),
            "run_threshold": best["test_error"] + run_margin, "run_margin": run_margin, "seeds": n}


def sign_test(before, after) -> dict:
    """Paired sign test of after < before (improvement)."""
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    k, m = int((a < b).sum()), int((a > b).sum())
    n = k + m
    one = sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n if n else 1.0
    lo = min(k, m)
    two = min(1.0, 2 * sum(math.comb(n, i) for i in range(0, lo + 1)) / 2 ** n) if n else 1.0
    return {"improved": k, "worse": m, "tied": int(len(b) - n), "p_one_sided": one, "p_two_sided": two,
            "fraction_after_le_before": float(np.mean(a <= b)) if len(b) else math.nan}
