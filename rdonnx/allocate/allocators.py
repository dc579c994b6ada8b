"""Allocators: how many entries each weight keeps so that the model meets the global rate.

Every allocator takes the same `Allocation` inputs and returns kept counts per weight that sum
to round(rate * N). Adding one is a function and a line in `ALLOCATORS`.

`rd` minimises the sum of measured per-weight output distortions D_l(d_l) subject to the rate:
each curve is replaced by its lower convex hull over kept entries, and hull segments are bought
in order of distortion saved per kept entry (the Lagrangian equal-slope solution), the last one
in part, so the rate is met exactly with densities interpolated between grid points.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from rdonnx import choices
from rdonnx.allocate.widths import solve_widths
from rdonnx.errors import UsageError


@dataclass(frozen=True)
class Curve:
    """Measured output distortion of pruning one weight alone, at each grid density."""

    densities: Sequence[float]  # descending, the first is 1.0
    distortions: Sequence[float]


@dataclass(frozen=True)
class Allocation:
    """What allocators may use: in-layer scores and, for `rd`, measured curves; `pqi` and
    `hsic` read their own fields (filled by `pqi.prepare` and `hsic.prepare`)."""

    scores: Mapping[str, np.ndarray]  # per weight, the criterion's scores (weight's shape)
    curves: Mapping[str, Curve] = field(default_factory=dict)
    normalize: bool = False  # global: scores divided by each tensor's RMS first
    bounds: Mapping[str, np.ndarray] = field(default_factory=dict)  # pqi: kept share per row
    importance: Mapping[str, float] = field(default_factory=dict)  # hsic: alpha, graph order
    costs: Mapping[str, float] = field(default_factory=dict)  # hsic: params or MACs at density 1

    def sizes(self) -> dict[str, int]:
        return {name: int(s.size) for name, s in self.scores.items()}


Allocator = Callable[[Allocation, float], dict[str, int]]


def target_count(sizes: Mapping[str, int], rate: float) -> int:
    """Entries kept in all: `rate` of the prunable parameters, rounded."""
    return int(round(rate * sum(sizes.values())))


def round_counts(exact: Mapping[str, float], sizes: Mapping[str, int],
                 total: int) -> dict[str, int]:
    """Integer counts near `exact` that sum to `total` (largest remainder, capped by size)."""
    keep = {n: int(min(np.floor(v), sizes[n])) for n, v in exact.items()}
    short = total - sum(keep.values())
    order = sorted(exact, key=lambda n: (-(exact[n] - keep[n]), n))
    while short > 0:
        grown = False
        for name in order:
            if short and keep[name] < sizes[name]:
                keep[name] += 1
                short -= 1
                grown = True
        if not grown:
            break
    return keep


def uniform(inputs: Allocation, rate: float) -> dict[str, int]:
    """The same density in every weight."""
    sizes = inputs.sizes()
    return round_counts({n: rate * s for n, s in sizes.items()}, sizes, target_count(sizes, rate))


def _threshold(scores: Mapping[str, np.ndarray], total: int) -> dict[str, int]:
    """Counts of each tensor's entries among the `total` highest scores overall."""
    names = list(scores)
    flat = [scores[n].reshape(-1).astype(np.float32) for n in names]
    joined = np.concatenate(flat)
    if total >= joined.size:
        return {n: f.size for n, f in zip(names, flat)}
    if total <= 0:
        return {n: 0 for n in names}
    chosen = np.argpartition(-joined, total - 1)[:total]
    bounds = np.cumsum([0] + [f.size for f in flat])
    return {n: int(c) for n, c in zip(names, np.histogram(chosen, bins=bounds)[0])}


def global_threshold(inputs: Allocation, rate: float) -> dict[str, int]:
    """One score threshold across all weights (scores divided by tensor RMS if `normalize`)."""
    scores = dict(inputs.scores)
    if inputs.normalize:
        scores = {n: s / max(float(np.sqrt(np.mean(s.astype(np.float64) ** 2))), 1e-30)
                  for n, s in scores.items()}
    return _threshold(scores, target_count(inputs.sizes(), rate))


def lamp_scores(scores: np.ndarray) -> np.ndarray:
    """LAMP: s_u^2 / sum of s_v^2 over entries at least as large (each tensor's top scores 1)."""
    flat = scores.reshape(-1).astype(np.float64) ** 2
    order = np.argsort(flat, kind="stable")
    ascending = flat[order]
    tail = np.cumsum(ascending[::-1])[::-1]  # sum over v >= u in ascending order
    result = np.empty_like(flat)
    result[order] = ascending / np.maximum(tail, 1e-300)
    return result.reshape(scores.shape)


def lamp(inputs: Allocation, rate: float) -> dict[str, int]:
    """Data-free LAMP scores with one global threshold."""
    return _threshold({n: lamp_scores(s) for n, s in inputs.scores.items()},
                      target_count(inputs.sizes(), rate))


def fill_factor(shares: np.ndarray, costs: np.ndarray, budget: float) -> float:
    """The factor c with sum_i min(c * shares_i, 1) * costs_i = budget (exact, piecewise linear).

    Past the largest reachable budget (every share > 0 saturated) the factor that saturates
    all is returned.
    """
    shares = np.asarray(shares, dtype=np.float64).reshape(-1)
    costs = np.asarray(costs, dtype=np.float64).reshape(-1)
    live = shares > 0
    shares, costs = shares[live], costs[live]
    if budget <= 0 or shares.size == 0:
        return 0.0
    knots = 1.0 / shares  # c at which each entry saturates
    order = np.argsort(knots, kind="stable")
    knots, shares, costs = knots[order], shares[order], costs[order]
    saturated = np.concatenate([[0.0], np.cumsum(costs)])  # cost of entries saturated before k
    slope = np.concatenate([np.cumsum((shares * costs)[::-1])[::-1], [0.0]])  # rest's slope
    at_knot = saturated[1:] + knots * slope[1:]  # spent at c = knots[k]
    k = int(np.searchsorted(at_knot, budget))
    if k >= knots.size:
        return float(knots[-1])
    return float((budget - saturated[k]) / slope[k])


def pqi(inputs: Allocation, rate: float) -> dict[str, int]:
    """PQ-index densities (Diao et al.): each row keeps min(c * r_i, 1) of its entries, r_i
    its PQI retained-fraction bound, one factor c across the model so the rate is met."""
    sizes = inputs.sizes()
    missing = set(sizes) - set(inputs.bounds)
    if missing:
        raise UsageError(f"no PQI bound for {sorted(missing)[:3]}")
    rows = {n: np.asarray(inputs.bounds[n], dtype=np.float64).reshape(-1) for n in sizes}
    row_size = {n: sizes[n] / max(rows[n].size, 1) for n in sizes}
    total = target_count(sizes, rate)
    c = fill_factor(np.concatenate(list(rows.values())),
                    np.concatenate([np.full(rows[n].size, row_size[n]) for n in sizes]), total)
    exact = {n: float(np.minimum(c * rows[n], 1.0).sum() * row_size[n]) for n in sizes}
    return round_counts(exact, sizes, total)


def hsic(inputs: Allocation, rate: float) -> dict[str, int]:
    """ITPruner densities: width multipliers from the nHSIC importance program (see
    `hsic.solve_widths`), density = input width * output width, scaled so the budget (sum of
    `costs` kept) is met exactly."""
    sizes = inputs.sizes()
    names = list(sizes)
    if set(names) - set(inputs.importance) or set(names) - set(inputs.costs):
        raise UsageError("--method hsic needs layer importances; run it through compress")
    costs = np.array([inputs.costs[n] for n in names], dtype=np.float64)
    widths = solve_widths(np.array([inputs.importance[n] for n in names]), costs, rate)
    density = widths * np.concatenate([[1.0], widths[:-1]])
    c = fill_factor(density, costs, rate * costs.sum())
    exact = {n: float(min(c * d, 1.0) * sizes[n]) for n, d in zip(names, density)}
    if np.allclose(costs, [sizes[n] for n in names]):  # a parameter budget: the exact count
        return round_counts(exact, sizes, target_count(sizes, rate))
    return round_counts(exact, sizes, int(round(sum(exact.values()))))


def hull(kept: np.ndarray, distortion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower convex hull of (kept, distortion) points, sorted by kept entries."""
    order = np.lexsort((distortion, kept))
    xs, ys = kept[order], distortion[order]
    kept_points: list[int] = []
    for i in range(len(xs)):
        if kept_points and xs[kept_points[-1]] == xs[i]:
            continue  # same x: the lower y came first
        while len(kept_points) >= 2:
            a, b = kept_points[-2], kept_points[-1]
            if (ys[b] - ys[a]) * (xs[i] - xs[a]) >= (ys[i] - ys[a]) * (xs[b] - xs[a]):
                kept_points.pop()  # b lies on or above the segment a-i
            else:
                break
        kept_points.append(i)
    return xs[kept_points], ys[kept_points]


def _curve_points(inputs: Allocation) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    missing = set(inputs.scores) - set(inputs.curves)
    if missing:
        raise UsageError(f"no R-D curve for {sorted(missing)[:3]}; recalibrate")
    points = {}
    for name, size in inputs.sizes().items():
        curve = inputs.curves[name]
        kept = np.asarray(curve.densities, dtype=np.float64) * size
        points[name] = (kept, np.asarray(curve.distortions, dtype=np.float64))
    return points


def rd(inputs: Allocation, rate: float) -> dict[str, int]:
    """Minimum summed curve distortion at the rate (Lagrangian on the convex hulls)."""
    sizes = inputs.sizes()
    total = target_count(sizes, rate)
    hulls = {n: hull(*p) for n, p in _curve_points(inputs).items()}
    exact = {n: float(h[0][0]) for n, h in hulls.items()}
    budget = total - sum(exact.values())
    if total < sum(np.floor(v) for v in exact.values()):
        raise UsageError(f"rate {rate} is below the smallest density of the R-D grid; "
                         "calibrate with a --grid that reaches lower")
    budget = max(budget, 0.0)
    segments = []  # (distortion saved per entry, name, start, length)
    for name, (xs, ys) in hulls.items():
        for i in range(len(xs) - 1):
            length = xs[i + 1] - xs[i]
            segments.append(((ys[i] - ys[i + 1]) / length, name, i, length))
    segments.sort(key=lambda s: (-s[0], s[1], s[2]))
    for _, name, _, length in segments:
        if budget <= 0:
            break
        step = min(length, budget)
        exact[name] += step
        budget -= step
    return round_counts(exact, sizes, total)


def rd_dp(inputs: Allocation, rate: float, units: int = 2000) -> dict[str, int]:
    """Exact dynamic programming over the grid points (budget in `units` steps), for checks.

    Grid choices alone rarely sum to the rate: the leftover budget is spread by `round_counts`.
    """
    sizes = inputs.sizes()
    total = target_count(sizes, rate)
    unit = max(sum(sizes.values()) / units, 1.0)
    points = _curve_points(inputs)
    picks = knapsack([(np.ceil(points[n][0] / unit - 1e-9).astype(np.int64), points[n][1])
                      for n in sizes], int(np.floor(total / unit + 1e-9)))
    if picks is None:
        raise UsageError(f"rate {rate} is below the smallest density of the R-D grid; "
                         "calibrate with a --grid that reaches lower")
    exact = {n: float(points[n][0][j]) for n, j in zip(sizes, picks)}
    return round_counts(exact, sizes, total)


def knapsack(items: Sequence[tuple[np.ndarray, np.ndarray]], budget: int) -> list[int] | None:
    """One choice per item (integer costs, distortions) minimising the summed distortion with
    the summed cost at most `budget`, by dynamic programming; None when nothing fits."""
    best = np.zeros(budget + 1)
    picks = []
    for cost, distortion in items:
        new = np.full(budget + 1, np.inf)
        pick = np.full(budget + 1, -1, dtype=np.int64)
        for j, (c, d) in enumerate(zip(cost, distortion)):
            if c > budget:
                continue
            cand = np.full(budget + 1, np.inf)
            cand[c:] = best[: budget + 1 - c] + d
            better = cand < new
            new[better], pick[better] = cand[better], j
        best = new
        picks.append((pick, cost))
    if not np.isfinite(best[budget]):
        return None
    chosen, b = [], budget
    for pick, cost in reversed(picks):
        j = int(pick[b])
        chosen.append(j)
        b -= int(cost[j])
    return chosen[::-1]


def predicted(inputs: Allocation, keep: Mapping[str, int]) -> float:
    """Sum over weights of the measured curve interpolated at the kept counts."""
    points = _curve_points(inputs)
    return float(sum(np.interp(keep[n], p[0][::-1], p[1][::-1]) for n, p in points.items()))


# the names, in --method order, are written once in rdonnx.choices
ALLOCATORS: dict[str, Allocator] = dict(zip(
    choices.ALLOCATOR_NAMES, (rd, uniform, global_threshold, lamp, pqi, hsic), strict=True))
SOLVERS: dict[str, Allocator] = dict(zip(choices.SOLVERS, (rd, rd_dp), strict=True))
