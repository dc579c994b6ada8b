"""PQ Index soft sparsity (Diao et al., ICLR 2023; Yang et al.): a data-free density per weight.

For 0 < p < q, over the nonzero entries of w (the paper's unmasked entries),

    PQI_{p,q}(w) = 1 - M_p / M_q,   M_s = (mean |w_i|^s)^(1/s)

is a sparsity measure in [0, 1). Its retained-fraction bound

    r = (1 + eta)^(-q/(q-p)) * (M_p / M_q)^(pq/(q-p))

is the share of entries the paper keeps; one SAP step prunes rho = clip(gamma * (1 - r), 0, 0.9)
of the survivors by magnitude. Iterated without retraining, the step keeps shrinking the
survivors: the survivors of a threshold look denser, so rho falls, but it never reaches 0 for
unbounded distributions. The "fixed point" here is where one step would remove less than
`FIXED_TOL` (1%) of the survivors; it is the data-free compressibility estimate, and it depends
on that tolerance (see docs/BENCHMARKS.md).

Densities are computed per output row (`neuron`) or per weight (`layer`, one row). Every kept
share is of the row's entries: r of its nonzero entries, so already-pruned weights stay sparse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from rdonnx.algo.prune import Scores
from rdonnx.choices import GRANULARITIES, PQI_MODES, PQIOptions
from rdonnx.errors import UsageError

if TYPE_CHECKING:
    pass

MAX_PRUNE = 0.9  # beta: at most this share of the survivors goes in one SAP step
FIXED_TOL = 0.01  # the fixed point: one step would prune less than this share of survivors
FIXED_STEPS = 1000
INSPECT_PAIRS = ((0.5, 1.0), (1.0, 2.0))  # the (p, q) pairs `rdonnx inspect` reports
DEFAULTS = PQIOptions()  # the paper's p, q, eta and gamma


def _magnitudes(w: np.ndarray) -> np.ndarray:
    a = np.abs(np.asarray(w, dtype=np.float64).reshape(-1))
    return a[a > 0]


def norm_ratio(w: np.ndarray, p: float, q: float) -> float:
    """M_p / M_q over the nonzero entries (1.0 for a weight with none)."""
    a = _magnitudes(w)
    if a.size == 0:
        return 1.0
    scale = a.max()  # scale-free: avoids under/overflow of the powers
    a = a / scale
    return float(np.mean(a ** p) ** (1 / p) / np.mean(a ** q) ** (1 / q))


def pq_index(w: np.ndarray, p: float = 0.5, q: float = 1.0) -> float:
    """PQI_{p,q}(w) = 1 - M_p / M_q: 0 for equal magnitudes, towards 1 for sparse weights."""
    PQIOptions(p, q).check()
    return 1.0 - norm_ratio(w, p, q)


def _bound(ratio: np.ndarray | float, options: PQIOptions) -> np.ndarray:
    p, q = options.p, options.q
    return (1 + options.eta) ** (-q / (q - p)) * np.asarray(ratio) ** (p * q / (q - p))


def retained_fraction(w: np.ndarray, options: PQIOptions = DEFAULTS) -> float:
    """The PQI lower bound on the share of nonzero entries to keep, r."""
    options.check()
    return float(_bound(norm_ratio(w, options.p, options.q), options))


def prune_ratio(w: np.ndarray, options: PQIOptions = DEFAULTS,
                max_prune: float = MAX_PRUNE) -> float:
    """The SAP step: rho = clip(gamma * (1 - r), 0, max_prune) of the nonzero entries."""
    return float(np.clip(options.gamma * (1 - retained_fraction(w, options)), 0, max_prune))


def _table(array: np.ndarray, row_axis: int | None) -> np.ndarray:
    """|w| as [rows, entries] (one row without a row axis), each row sorted descending."""
    a = np.abs(np.asarray(array, dtype=np.float64))
    a = a.reshape(1, -1) if row_axis is None else \
        np.moveaxis(a, row_axis, 0).reshape(a.shape[row_axis], -1)
    return -np.sort(-a, axis=1)


def row_bounds(array: np.ndarray, options: PQIOptions, mode: str = "single",
               row_axis: int | None = None) -> np.ndarray:
    """Kept share of each row's entries: the PQI bound (`single`) or the fixed point of the
    iterated SAP step (`fixed`), over nonzero entries; one value without a row axis."""
    options.check()
    if mode not in PQI_MODES:
        raise UsageError(f"unknown --pqi-mode {mode!r}; choose one of {', '.join(PQI_MODES)}")
    table = _table(array, row_axis)
    rows, width = table.shape
    scale = np.maximum(table[:, :1], 1e-300)
    table = table / scale
    zero = np.zeros((rows, 1))
    sum_p = np.concatenate([zero, np.cumsum(table ** options.p, axis=1)], axis=1)
    sum_q = np.concatenate([zero, np.cumsum(table ** options.q, axis=1)], axis=1)
    index = np.arange(rows)

    def bound(kept: np.ndarray) -> np.ndarray:  # r over the `kept` largest entries of each row
        k = np.maximum(kept, 1)
        m_p = (sum_p[index, kept] / k) ** (1 / options.p)
        m_q = (sum_q[index, kept] / k) ** (1 / options.q)
        return np.where(kept > 0, _bound(m_p / np.maximum(m_q, 1e-300), options), 0.0)

    kept = np.count_nonzero(table, axis=1)
    if mode == "single":
        return bound(kept) * kept / max(width, 1)
    for _ in range(FIXED_STEPS):
        rho = np.clip(options.gamma * (1 - bound(kept)), 0, MAX_PRUNE)
        cut = np.floor(kept * rho).astype(kept.dtype)
        step = (rho >= FIXED_TOL) & (cut > 0)
        if not step.any():
            break
        kept = np.where(step, kept - cut, kept)
    return kept / max(width, 1)


def suggest_rate(arrays: Mapping[str, np.ndarray], options: PQIOptions = DEFAULTS) -> float:
    """The data-free compressibility estimate: the fixed-point kept share of every weight
    (layer scope), weighted by size."""
    total = sum(a.size for a in arrays.values())
    kept = sum(float(row_bounds(a, options, "fixed")[0]) * a.size for a in arrays.values())
    return kept / max(total, 1)


def neuron_scores(scores: Scores, bounds: np.ndarray, row_axis: int) -> Scores:
    """Whole-tensor scores whose ranking keeps each row in proportion to its bound r_i.

    The entry of within-row rank j (by `scores`) in row i scores -(j + 0.5) / (r_i d_i), ties
    broken by the original score; any kept count then gives row i about min(c r_i, 1) d_i."""
    values = np.moveaxis(np.asarray(scores.values, dtype=np.float64), row_axis, 0)
    moved = values.shape
    table = values.reshape(moved[0], -1)
    rows, width = table.shape
    rank = np.empty(table.shape, dtype=np.float64)
    np.put_along_axis(rank, np.argsort(-table, axis=1, kind="stable"),
                      np.arange(width, dtype=np.float64)[None, :].repeat(rows, axis=0), axis=1)
    key = (rank + 0.5) / np.maximum(np.asarray(bounds, dtype=np.float64) * width, 1e-12)[:, None]
    order = np.lexsort((-table.reshape(-1), key.reshape(-1)))  # primary: key, then score
    result = np.empty(table.size, dtype=np.float64)
    result[order] = -np.arange(table.size, dtype=np.float64)
    return Scores(np.moveaxis(result.reshape(moved), 0, row_axis), None, scores.criterion)


__all__ = ["GRANULARITIES", "PQIOptions", "PQI_MODES", "neuron_scores", "norm_ratio",
           "pq_index", "prune_ratio", "retained_fraction", "row_bounds",
           "suggest_rate"]
