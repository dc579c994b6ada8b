"""Allocators: how many entries each weight keeps so that the model meets the global rate.

An allocator maps per-weight scores (from the in-layer criterion) and the rate to a count of
kept entries per weight. Adding one is a function and a line in `ALLOCATORS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

Allocator = Callable[[Mapping[str, np.ndarray], float], dict[str, int]]


def target_count(scores: Mapping[str, np.ndarray], rate: float) -> int:
    """Entries kept in all: `rate` of the prunable parameters, rounded."""
    return int(round(rate * sum(s.size for s in scores.values())))


def uniform(scores: Mapping[str, np.ndarray], rate: float) -> dict[str, int]:
    """The same density in every weight (largest-remainder rounding hits the total exactly)."""
    exact = {name: rate * s.size for name, s in scores.items()}
    keep = {name: int(np.floor(v)) for name, v in exact.items()}
    short = target_count(scores, rate) - sum(keep.values())
    by_remainder = sorted(exact, key=lambda n: (-(exact[n] - keep[n]), n))
    for name in by_remainder[:max(short, 0)]:
        keep[name] += 1
    return keep


def global_threshold(scores: Mapping[str, np.ndarray], rate: float,
                     normalize: bool = False) -> dict[str, int]:
    """One threshold across all weights; with `normalize`, scores divided by each tensor's RMS."""
    names = list(scores)
    flat = [scores[n].reshape(-1).astype(np.float32) for n in names]
    if normalize:
        flat = [f / max(float(np.sqrt(np.mean(f.astype(np.float64) ** 2))), 1e-30) for f in flat]
    joined = np.concatenate(flat)
    total = target_count(scores, rate)
    if total >= joined.size:
        return {n: scores[n].size for n in names}
    if total <= 0:
        return {n: 0 for n in names}
    chosen = np.argpartition(-joined, total - 1)[:total]
    bounds = np.cumsum([0] + [f.size for f in flat])
    counts = np.histogram(chosen, bins=bounds)[0]
    return {n: int(c) for n, c in zip(names, counts)}


def global_normalized(scores: Mapping[str, np.ndarray], rate: float) -> dict[str, int]:
    return global_threshold(scores, rate, normalize=True)


ALLOCATORS: dict[str, Allocator] = {
    "uniform": uniform,
    "global": global_threshold,
}
