"""Joint allocation of density and value bits per weight under a budget of coded bits.

Each weight gets operating points (density d on the R-D grid, value width b): the estimated
coded size n * H2(d) + nnz * (H(|levels|) + H(sign)) from its own quantized survivors, and the
predicted distortion D(d) + d * Q(b), with D the measured pruning curve and Q(b) the measured
distortion of quantizing the whole weight to b bits. The lower convex hull of each weight's
points is walked in order of distortion saved per bit, as for `allocate.rd`, without splitting
a step: the budget is never exceeded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rdonnx.algo.prune import Ranking
from rdonnx.algo.quantize import Quantized, quantize
from rdonnx.allocate.allocators import hull
from rdonnx.errors import UsageError

Quantizer = Callable[[np.ndarray, int], Quantized]  # (pruned weight, bits) -> quantized

JOINT_VALUE_BITS = (3, 4, 5, 6, 7, 8)


@dataclass(frozen=True)
class Option:
    """One operating point of one weight."""

    density: float
    bits: int
    cost: float  # estimated coded bits
    distortion: float  # predicted output distortion of this weight alone


def _entropy(counts: np.ndarray) -> float:
    counts = counts[counts > 0].astype(np.float64)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


def estimate_bits(weight: np.ndarray, mask: np.ndarray, bits: int,
                  quantizer: Quantizer = quantize) -> float:
    """i.i.d. entropy estimate of the coded tensor: positions plus quantized survivors (plus
    32 bits per centroid of a k-means codebook)."""
    quantized = quantizer(np.where(mask, weight, 0), bits)
    q = quantized.q
    levels = q[q != 0]
    n, nnz = q.size, levels.size
    positions = _entropy(np.array([nnz, n - nnz]))
    table = 0 if quantized.codebook is None else 32 * quantized.codebook.size
    if nnz == 0:
        return positions + table
    signs = _entropy(np.array([(levels > 0).sum(), (levels < 0).sum()]))
    return positions + table + signs + _entropy(np.bincount(np.abs(levels)))


def options_for(weight: np.ndarray, ranking: Ranking, grid: Sequence[float],
                curve: Sequence[float], quantization: Mapping[int, float],
                quantizer: Quantizer = quantize) -> list[Option]:
    """Every (grid density, value width) point of one weight."""
    options = []
    for density, pruned_distortion in zip(grid, curve):
        mask = ranking.mask(int(round(density * weight.size)))
        for bits, q in quantization.items():
            options.append(Option(density, bits, estimate_bits(weight, mask, bits, quantizer),
                                  pruned_distortion + density * q))
    return options


def allocate_joint(options: Mapping[str, Sequence[Option]], budget: float) -> dict[str, Option]:
    """The options minimising summed predicted distortion within `budget` estimated bits."""
    hulls: dict[str, list[Option]] = {}
    for name, opts in options.items():
        costs = np.array([o.cost for o in opts])
        distortions = np.array([o.distortion for o in opts])
        xs, ys = hull(costs, distortions)
        by_point = {(c, d): o for c, d, o in zip(costs, distortions, opts)}
        hulls[name] = [by_point[(x, y)] for x, y in zip(xs, ys)]
    chosen = {name: 0 for name in hulls}
    left = budget - sum(h[0].cost for h in hulls.values())
    if left < -1e-5 * max(budget, 1.0):  # (callers round budgets to 6 significant digits)
        raise UsageError("the bits budget is below the smallest coded size the grid allows; "
                         "raise --bits-per-weight or calibrate a --grid that reaches lower")
    segments = [((h[i].distortion - h[i + 1].distortion) / (h[i + 1].cost - h[i].cost), name, i)
                for name, h in hulls.items() for i in range(len(h) - 1)]
    for _, name, i in sorted(segments, key=lambda s: (-s[0], s[1], s[2])):
        h = hulls[name]
        step = h[i + 1].cost - h[i].cost
        if chosen[name] == i and step <= left:
            chosen[name] = i + 1
            left -= step
    return {name: hulls[name][i] for name, i in chosen.items()}


def cost_range(options: Mapping[str, Sequence[Option]]) -> tuple[float, float]:
    """The smallest and largest total estimated bits over all choices."""
    return (sum(min(o.cost for o in opts) for opts in options.values()),
            sum(max(o.cost for o in opts) for opts in options.values()))
