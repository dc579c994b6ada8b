"""In-layer criteria and masks: which entries of one weight tensor to keep.

`magnitude` compares |w| across the whole tensor. `activation` is the inference-only form of
Gao et al.'s output-distortion objective, w_ij^2 * E[x_j^2], compared within each output row
(Wanda's grouping). A `Ranking` orders a tensor's entries once, so pruning it to any number of
kept entries (one per point of an R-D curve) is a single comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rdonnx.choices import DEFAULT_CRITERION


@dataclass(frozen=True)
class Scores:
    """Importance of each entry of a weight (higher is kept first)."""

    values: np.ndarray  # float32, the weight's shape
    row_axis: int | None = None  # compare within rows indexed by this axis; None: whole tensor
    criterion: str = DEFAULT_CRITERION  # what was really used for this weight


def magnitude(weight: np.ndarray) -> Scores:
    """|w|, compared across the whole tensor."""
    return Scores(np.abs(np.asarray(weight, dtype=np.float32)))


def activation(weight: np.ndarray, moments: np.ndarray, row_axis: int) -> Scores:
    """w^2 * E[x^2] (`moments` broadcast against the weight), compared within output rows."""
    w = np.asarray(weight, dtype=np.float32)
    return Scores((w * w * moments).astype(np.float32), row_axis, "activation")


class Ranking:
    """The entries of one weight in keep-first order (stable: ties go to the lower index)."""

    def __init__(self, scores: Scores):
        values = scores.values
        self.shape = values.shape
        self.row_axis = scores.row_axis
        if self.row_axis is None:
            table = values.reshape(1, -1)
        else:
            table = np.moveaxis(values, self.row_axis, 0).reshape(values.shape[self.row_axis], -1)
        order = np.argsort(-table, axis=1, kind="stable")
        dtype = np.int32 if table.shape[1] < 2**31 else np.int64
        self.rank = np.empty(table.shape, dtype=dtype)
        np.put_along_axis(self.rank, order, np.arange(table.shape[1], dtype=dtype)[None, :]
                          .repeat(table.shape[0], axis=0), axis=1)
        self._sorted = np.take_along_axis(table, order, axis=1)

    @property
    def size(self) -> int:
        return self.rank.size

    def mask(self, keep: int) -> np.ndarray:
        """Boolean mask (weight's shape) keeping exactly `keep` entries."""
        rows, cols = self.rank.shape
        keep = int(min(max(keep, 0), self.size))
        base, extra = divmod(keep, rows)
        per_row = np.full(rows, base, dtype=np.int64)
        if extra:  # the rows whose next entry scores highest keep one more
            nxt = self._sorted[:, min(base, cols - 1)]
            per_row[np.argsort(-nxt, kind="stable")[:extra]] += 1
        table = self.rank < per_row[:, None]
        if self.row_axis is None:
            return table.reshape(self.shape)
        moved = (self.shape[self.row_axis], *np.delete(self.shape, self.row_axis))
        return np.moveaxis(table.reshape(moved), 0, self.row_axis)

    def apply(self, weight: np.ndarray, keep: int) -> np.ndarray:
        """A copy of `weight` with all but `keep` entries set to zero."""
        return np.where(self.mask(keep), weight, np.zeros((), dtype=weight.dtype)) \
            .astype(weight.dtype, copy=False)


def prune(weight: np.ndarray, keep: int, scores: Scores | None = None) -> np.ndarray:
    """A copy of `weight` keeping its `keep` highest-scoring entries (magnitude by default)."""
    return Ranking(scores or magnitude(weight)).apply(weight, keep)
