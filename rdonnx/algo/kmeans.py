"""Activation-weighted k-means quantization of surviving values (Gao et al., ICML 2019).

The survivors w_i of one tensor are clustered into at most K = 2^b - 1 centroids, so that b bits
index the codebook with index 0 kept for pruned entries. The centroids minimise

    J = sum_i I_i (w_i - c(w_i))^2,   I_i = E[x_j^2],

the second moment of the layer input that entry i multiplies (its share of the layer's output
error); I = 1 gives plain k-means. In one dimension clusters are intervals of the sorted values,
so weighted Lloyd iterations are exact and cheap: assignment = nearest centroid (ties go to the
lower one), update = importance-weighted mean of each interval. Three candidates are kept and
the one with the lowest J (after rounding the centroids to float32) wins, ties to the earlier:

1. Lloyd from the weighted quantiles (k + 1/2) / K of the survivors;
2. Lloyd from the levels uniform rounding (`quantize.quantize`) uses at the same bits;
3. those uniform levels themselves, so k-means is never worse than uniform rounding.

When Lloyd leaves fewer than K clusters (empty ones are dropped), the clusters with the largest
error are split at their weighted median (`refill`) and Lloyd runs again.

Everything is deterministic: fixed initialisations, at most `MAX_ITERATIONS` iterations, stop
when J falls by less than `TOLERANCE` of itself, stable tie-breaks.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from rdonnx.algo.quantize import VALUE_BITS, Quantized, quantize

MAX_ITERATIONS = 50
TOLERANCE = 1e-7  # Lloyd stops when J decreases by less than this share of J
IMPORTANCE_FLOOR = 1e-6  # importances are divided by their mean and floored at this


@dataclass(frozen=True)
class Clustering:
    """The result of weighted Lloyd iterations on sorted values."""

    centroids: np.ndarray  # float64, ascending, every one the centre of a non-empty cluster
    history: tuple[float, ...]  # J after each assignment step (non-increasing)


def codebook_size(bits: int) -> int:
    """The most centroids b bits can index with 0 reserved for pruned entries: 2^b - 1."""
    return 2 ** bits - 1


def _splits(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Cluster boundaries in sorted `x`: cluster k is x[s[k]:s[k + 1]] (ties to the lower)."""
    middle = (centroids[:-1] + centroids[1:]) / 2
    return np.concatenate([[0], np.searchsorted(x, middle, side="right"), [x.size]])


def _objective(x: np.ndarray, w: np.ndarray, centroids: np.ndarray, splits: np.ndarray) -> float:
    assigned = np.repeat(centroids, np.diff(splits))
    return float(np.sum(w * (x - assigned) ** 2))


def lloyd(x: np.ndarray, w: np.ndarray, init: np.ndarray,
          max_iterations: int = MAX_ITERATIONS, tolerance: float = TOLERANCE) -> Clustering:
    """Weighted Lloyd iterations on ascending `x` with positive weights `w` from `init`.

    Returns the centroids with the lowest J seen (empty clusters dropped) and J per step.
    """
    centroids = np.unique(np.asarray(init, np.float64))
    best, best_j, history = centroids, np.inf, []
    for _ in range(max_iterations):
        splits = _splits(x, centroids)
        starts = splits[:-1][np.diff(splits) > 0]
        centroids = centroids[np.diff(splits) > 0]
        splits = np.concatenate([starts, [x.size]])
        j = _objective(x, w, centroids, splits)
        history.append(j)
        if j < best_j:
            best, best_j = centroids, j
        if len(history) > 1 and history[-2] - j <= tolerance * history[-2]:
            break
        # the update: weighted mean of each interval (sums per segment, no long prefix sums)
        updated = np.add.reduceat(w * x, starts) / np.add.reduceat(w, starts)
        centroids = np.unique(np.clip(updated, x[starts], x[splits[1:] - 1]))
    return Clustering(best, tuple(history))


def refill(x: np.ndarray, w: np.ndarray, centroids: np.ndarray, k: int) -> np.ndarray:
    """Up to `k` centroids: the clusters of `centroids` with the largest weighted error are
    split at their weighted median (never inside a run of equal values) until there are `k`
    or none can be split; returns the means of the resulting intervals. Splitting an interval
    never increases J."""
    splits = _splits(x, centroids)
    cw, cwx, cwxx = (np.concatenate([[0.0], np.cumsum(v)]) for v in (w, w * x, w * x * x))

    def error(s: int, e: int) -> float:
        return float(cwxx[e] - cwxx[s] - (cwx[e] - cwx[s]) ** 2 / (cw[e] - cw[s]))

    done, heap = [], []
    for s, e in zip(splits[:-1].tolist(), splits[1:].tolist()):
        if e > s:
            (heapq.heappush(heap, (-error(s, e), s, e)) if x[e - 1] > x[s] else
             done.append((s, e)))
    while heap and len(done) + len(heap) < k:
        _, s, e = heapq.heappop(heap)
        mid = int(np.searchsorted(cw, (cw[s] + cw[e]) / 2, side="left"))
        mid = s + int(np.searchsorted(x[s:e], x[min(max(mid, s + 1), e - 1)], side="left"))
        if mid == s:  # the median falls in the first run: split after it
            mid = s + int(np.searchsorted(x[s:e], x[s], side="right"))
        for a, b in ((s, mid), (mid, e)):
            (heapq.heappush(heap, (-error(a, b), a, b)) if x[b - 1] > x[a] else
             done.append((a, b)))
    intervals = sorted(done + [(s, e) for _, s, e in heap])
    return np.array([(cwx[e] - cwx[s]) / (cw[e] - cw[s]) for s, e in intervals])


def weighted_quantiles(x: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """The values of ascending `x` at cumulative weight shares (i + 1/2) / k, i = 0..k-1."""
    cumulative = np.cumsum(w)
    targets = (np.arange(k) + 0.5) / k * cumulative[-1]
    return x[np.minimum(np.searchsorted(cumulative, targets, side="left"), x.size - 1)]


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of ascending `centroids` for each x (ties to the lower one)."""
    hi = np.clip(np.searchsorted(centroids, x, side="left"), 0, centroids.size - 1)
    lo = np.maximum(hi - 1, 0)
    closer_hi = np.abs(x - centroids[hi]) < np.abs(x - centroids[lo])
    return np.where(closer_hi, hi, lo)


def importance_weights(importance: np.ndarray | None, shape: tuple[int, ...],
                       mask: np.ndarray) -> np.ndarray:
    """Per-survivor weights: `importance` broadcast to `shape`, divided by its mean over the
    survivors and floored at IMPORTANCE_FLOOR (all ones when None or all zero)."""
    count = int(mask.sum())
    if importance is None:
        return np.ones(count)
    values = np.broadcast_to(np.asarray(importance, np.float64), shape)[mask]
    mean = float(values.mean()) if count else 0.0
    if not (np.isfinite(mean) and mean > 0):
        return np.ones(count)
    return np.maximum(values / mean, IMPORTANCE_FLOOR)


def kmeans_quantize(weight: np.ndarray, bits: int,
                    importance: np.ndarray | None = None) -> Quantized:
    """Codebook indices (1..K, 0 = pruned) and a float32 codebook for the nonzero entries.

    `importance` (broadcastable against `weight`) weighs each entry's squared error; None: plain
    k-means. Zeros stay zero; every survivor gets a nonzero index. Non-finite values and bits
    outside 2..16 raise ValueError.
    """
    if bits not in VALUE_BITS:
        raise ValueError(f"value bits must be in {VALUE_BITS.start}..{VALUE_BITS.stop - 1}")
    w32 = np.asarray(weight, dtype=np.float32)
    if not np.all(np.isfinite(w32)):
        raise ValueError("the tensor holds inf or NaN values; use exact values")
    mask = w32 != 0
    q = np.zeros(w32.shape, dtype=np.int32)
    if not mask.any():
        return Quantized(q, 1.0, np.zeros(0, np.float32))
    values = w32[mask].astype(np.float64)
    weights = importance_weights(importance, w32.shape, mask)
    order = np.argsort(values, kind="stable")
    x, w = values[order], weights[order]
    k = codebook_size(bits)
    distinct = np.unique(x)
    if distinct.size <= k:  # every distinct value gets its own centroid: no error at all
        codebook = distinct.astype(np.float32)
    else:
        uniform = quantize(w32, bits)
        grid = np.unique(uniform.values(np.float32)[mask]).astype(np.float64)
        candidates = [grid]
        for init in (weighted_quantiles(x, w, k), grid):
            centroids = lloyd(x, w, init).centroids
            if centroids.size < k:  # empty clusters were dropped: split the worst ones
                centroids = lloyd(x, w, refill(x, w, centroids, k)).centroids
            candidates.insert(-1, centroids)
        codebook, best = None, np.inf
        for centroids in candidates:
            rounded = np.unique(centroids.astype(np.float32))
            j = float(np.sum(w * (x - rounded.astype(np.float64)[nearest(x, rounded)]) ** 2))
            if j < best:
                codebook, best = rounded, j
    codebook = codebook + np.float32(0.0)  # -0.0 -> +0.0
    q[mask] = nearest(values, codebook.astype(np.float64)).astype(np.int32) + 1
    return Quantized(q, 1.0, codebook)


def weighted_error(weight: np.ndarray, values: np.ndarray,
                   importance: np.ndarray | None = None) -> float:
    """sum_i I_i (w_i - v_i)^2 over the nonzero entries of `weight` (I = 1 when None)."""
    w = np.asarray(weight, np.float64)
    mask = w != 0
    i = np.ones(w.shape) if importance is None else np.broadcast_to(
        np.asarray(importance, np.float64), w.shape)
    return float(np.sum(i[mask] * (w[mask] - np.asarray(values, np.float64)[mask]) ** 2))


__all__ = ["Clustering", "MAX_ITERATIONS", "TOLERANCE", "codebook_size", "kmeans_quantize",
           "lloyd", "nearest", "weighted_error", "weighted_quantiles"]
