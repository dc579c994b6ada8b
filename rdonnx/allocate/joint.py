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

# (pruned weight, bits, the indices along the output axis it holds when it is a sample of the
# weight, else None) -> quantized
Quantizer = Callable[[np.ndarray, int, np.ndarray | None], Quantized]
ESTIMATE_ENTRIES = 1 << 18  # larger weights: sizes estimated on evenly spaced output channels

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


def _plain(weight: np.ndarray, bits: int, rows: np.ndarray | None = None) -> Quantized:
    return quantize(weight, bits)


def sample_rows(shape: tuple[int, ...], axis: int | None) -> np.ndarray | None:
    """Evenly spaced indices along the output `axis` holding about `ESTIMATE_ENTRIES`
    entries, or None when the weight is small enough to estimate whole."""
    size = int(np.prod(shape))
    if axis is None or size <= ESTIMATE_ENTRIES or shape[axis] < 2:
        return None
    channels = shape[axis]
    take = max(1, ESTIMATE_ENTRIES * channels // size)
    return np.unique(np.linspace(0, channels - 1, take).round().astype(np.int64))


def estimate_bits(weight: np.ndarray, mask: np.ndarray, bits: int,
                  quantizer: Quantizer = _plain, axis: int | None = None) -> float:
    """i.i.d. entropy estimate of the coded tensor: positions plus quantized survivors (plus
    32 bits per centroid of a k-means codebook, or the coded per-channel steps).

    A weight of more than `ESTIMATE_ENTRIES` entries with an output `axis` is quantized on
    evenly spaced channels (`sample_rows`) only: their bits per survivor, their share of
    survivors that round to zero and their steps' bits per channel are scaled to the whole
    weight's survivors and channels (the clip search of per-channel grids made each option of
    the OCR model's 8.4M-entry classifier cost 2.8 s, 690 s for its 200 options)."""
    rows = sample_rows(np.shape(weight), axis)
    kept = np.where(mask, weight, 0)
    sample = kept if rows is None else np.take(kept, rows, axis)
    quantized = quantizer(sample, bits, rows)
    q = quantized.q
    nnz = int(np.count_nonzero(q))
    channels = 1.0 if rows is None else np.shape(weight)[axis] / rows.size
    table = 0 if quantized.codebook is None else 32 * quantized.codebook.size
    if quantized.axis is not None:  # per-channel steps (coded log-scale indices, or float32)
        table += channels * grids.steps_bits(grids.Grid(np.ravel(quantized.step),
                                                        quantized.axis))
    levels = grids.level_bits(q, quantized.classes, quantized.axis)
    if rows is None:
        return grids.entropy_bits(np.array([nnz, q.size - nnz])) + levels + table
    survivors = np.count_nonzero(sample)
    total = nnz / survivors * np.count_nonzero(kept) if survivors else 0.0
    per_survivor = levels / nnz if nnz else 0.0
    return grids.entropy_bits(np.array([total, kept.size - total])) + total * per_survivor + \
        table


def with_wide_widths(quantization: Mapping[int, float]) -> dict[int, float]:
    """Measured Q(b) plus widths of `WIDE_BITS`, predicted from the widest measured one at the
    high-rate slope (4x less distortion a bit): bounds tighter than 8 bits allow stay
    reachable without probing every width."""
    widest = max(quantization)
    return {**quantization, **{b: quantization[widest] * 4.0 ** (widest - b)
                               for b in WIDE_BITS if b > widest}}


def options_for(weight: np.ndarray, ranking: Ranking, grid: Sequence[float],
                curve: Sequence[float], quantization: Mapping[int, float],
                quantizer: Quantizer = _plain, axis: int | None = None) -> list[Option]:
    """Every (grid density, value width) point of one weight (`axis`: its output axis)."""
    options = []
    for density, pruned_distortion in zip(grid, curve):
        mask = ranking.mask(int(round(density * weight.size)))
        for bits, q in quantization.items():
            options.append(Option(density, bits,
                                  estimate_bits(weight, mask, bits, quantizer, axis),
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
