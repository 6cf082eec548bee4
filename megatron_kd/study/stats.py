"""Intervals for exact-match cells pooled over seeds x samples, and for KD - CE differences.

A cell is a list of per-seed 0/1 outcome arrays. With one seed the 95% interval is Wilson's
(binomial); with several it is a two-level bootstrap (resample seeds, then samples within each
seed), so seed-to-seed variation widens the interval instead of being hidden in the pooled n.
A KD - CE difference resamples the same seed indices for both arms (paired by seed: the two arms
of one seed share the phase-1 weights and the phase-2 data order).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np

BOOTSTRAP = 2000
Z95 = 1.959964


def wilson(k: int, n: int) -> List[float]:
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    den = 1 + Z95 ** 2 / n
    mid = (p + Z95 ** 2 / (2 * n)) / den
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / den
    return [max(0.0, mid - half), min(1.0, mid + half)]


def _resampled_means(cell: Sequence[np.ndarray], seed_idx: np.ndarray, rng) -> np.ndarray:
    """[B] pooled means, bootstrap replicate b using seeds seed_idx[b] (each resampled within)."""
    out = np.empty(seed_idx.shape[0])
    for b, picks in enumerate(seed_idx):
        hits = total = 0
        for s in picks:
            x = cell[s]
            if len(x):
                hits += rng.binomial(len(x), x.mean())  # resampling n outcomes of a 0/1 array
                total += len(x)
        out[b] = hits / max(total, 1)
    return out


def cell_summary(cell: Sequence[Sequence[int]], seed: int = 0) -> Dict[str, object]:
    """{"exact_match", "ci95", "n", "seeds", "per_seed"} of per-seed 0/1 outcomes."""
    arrs = [np.asarray(x, dtype=np.float64) for x in cell]
    n = int(sum(len(a) for a in arrs))
    k = int(sum(a.sum() for a in arrs))
    mean = k / n if n else float("nan")
    if len(arrs) <= 1:
        ci = wilson(k, n)
    else:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(arrs), size=(BOOTSTRAP, len(arrs)))
        means = _resampled_means(arrs, idx, rng)
        ci = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return {"exact_match": mean, "ci95": [round(ci[0], 4), round(ci[1], 4)], "n": n, "seeds": len(arrs),
            "per_seed": [float(a.mean()) if len(a) else None for a in arrs]}


def difference(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]], seed: int = 0) -> Dict[str, object]:
    """Pooled mean(a) - mean(b) with a 95% paired bootstrap interval (seed i of a with seed i of b)."""
    if len(a) != len(b):
        raise ValueError(f"paired difference needs the same seeds: {len(a)} vs {len(b)}")
    aa = [np.asarray(x, dtype=np.float64) for x in a]
    bb = [np.asarray(x, dtype=np.float64) for x in b]
    ma = sum(x.sum() for x in aa) / max(sum(len(x) for x in aa), 1)
    mb = sum(x.sum() for x in bb) / max(sum(len(x) for x in bb), 1)
    rng = np.random.default_rng(seed)
    if len(aa) > 1:
        idx = rng.integers(0, len(aa), size=(BOOTSTRAP, len(aa)))
    else:
        idx = np.zeros((BOOTSTRAP, 1), dtype=np.int64)
    d = _resampled_means(aa, idx, rng) - _resampled_means(bb, idx, rng)
    return {"difference": float(ma - mb),
            "ci95": [round(float(np.percentile(d, 2.5)), 4), round(float(np.percentile(d, 97.5)), 4)],
            "n": [int(sum(len(x) for x in aa)), int(sum(len(x) for x in bb))], "seeds": len(aa)}
