"""Joint allocation of density and value bits per weight under a budget of coded bits.

Each weight gets operating points (density d on the R-D grid, value width b): the estimated
coded size n * H2(d) + nnz * (H(|levels|) + H(sign)) from its own quantized survivors, and the
predicted distortion D(d) + d * Q(b), with D the measured pruning curve and Q(b) the measured
distortion of quantizing the whole weight to b bits. One point per weight is chosen by dynamic
programming over the budget (`allocate.knapsack`): the budget is never exceeded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rdonnx.algo import grids
from rdonnx.algo.prune import Ranking
from rdonnx.algo.quantize import Quantized, quantize
from rdonnx.allocate.allocators import knapsack
from rdonnx.errors import UsageError

Quantizer = Callable[[np.ndarray, int], Quantized]  # (pruned weight, bits) -> quantized

JOINT_VALUE_BITS = (2, 3, 4, 5, 6, 7, 8)  # measured value curves
WIDE_BITS = (10, 12, 16)  # also offered, predicted (`with_wide_widths`)
JOINT_UNITS = 4096  # budget steps of the joint allocation's dynamic programming


@dataclass(frozen=True)
class Option:
    """One operating point of one weight."""

    density: float
    bits: int
    cost: float  # estimated coded bits
    distortion: float  # predicted output distortion of this weight alone


def estimate_bits(weight: np.ndarray, mask: np.ndarray, bits: int,
                  quantizer: Quantizer = quantize) -> float:
    """i.i.d. entropy estimate of the coded tensor: positions plus quantized survivors (plus
    32 bits per centroid of a k-means codebook, or the coded per-channel steps)."""
    quantized = quantizer(np.where(mask, weight, 0), bits)
    q = quantized.q
    nnz = int(np.count_nonzero(q))
    table = 0 if quantized.codebook is None else 32 * quantized.codebook.size
    if quantized.axis is not None:  # per-channel steps (coded log-scale indices, or float32)
        table += grids.steps_bits(grids.Grid(np.ravel(quantized.step), quantized.axis))
    return grids.entropy_bits(np.array([nnz, q.size - nnz])) + table + grids.level_bits(q)


def with_wide_widths(quantization: Mapping[int, float]) -> dict[int, float]:
    """Measured Q(b) plus widths of `WIDE_BITS`, predicted from the widest measured one at the
    high-rate slope (4x less distortion a bit): bounds tighter than 8 bits allow stay
    reachable without probing every width."""
    widest = max(quantization)
    return {**quantization, **{b: quantization[widest] * 4.0 ** (widest - b)
                               for b in WIDE_BITS if b > widest}}


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


def allocate_joint(options: Mapping[str, Sequence[Option]], budget: float,
                   units: int = JOINT_UNITS) -> dict[str, Option]:
    """The options minimising summed predicted distortion within `budget` estimated bits, by
    dynamic programming over `units` steps of the budget: costs rounded to the nearest step
    (up, if that choice would overrun the budget), so the budget is never exceeded. A hull
    walk over such steps skips whole layers whose first step is large."""
    names = list(options)
    unit = max(budget, 1.0) / units
    costs = [np.array([o.cost for o in options[n]]) / unit for n in names]
    for rounding in (np.rint, lambda c: np.ceil(c - 1e-9)):
        picks = knapsack([(rounding(c).astype(np.int64),
                           np.array([o.distortion for o in options[n]]))
                          for c, n in zip(costs, names)], units)
        if picks is not None and sum(options[n][j].cost for n, j in zip(names, picks)) <= \
                budget * (1 + 1e-12):
            return {n: options[n][j] for n, j in zip(names, picks)}
    cheapest = {n: min(options[n], key=lambda o: (o.cost, o.distortion)) for n in names}
    if sum(o.cost for o in cheapest.values()) <= budget * (1 + 1e-12):  # rounded out above
        return cheapest
    raise UsageError("the bits budget is below the smallest coded size the grid allows; "
                     "raise --bits-per-weight or calibrate a --grid that reaches lower")


def cost_range(options: Mapping[str, Sequence[Option]]) -> tuple[float, float]:
    """The smallest and largest total estimated bits over all choices."""
    return (sum(min(o.cost for o in opts) for opts in options.values()),
            sum(max(o.cost for o in opts) for opts in options.values()))
