"""In-layer pruning: keep the highest-scoring entries of a weight tensor."""

from __future__ import annotations

import numpy as np


def magnitude_scores(weight: np.ndarray) -> np.ndarray:
    """|w| as float32, the magnitude criterion."""
    return np.abs(np.asarray(weight, dtype=np.float32))


def top_mask(scores: np.ndarray, keep: int) -> np.ndarray:
    """Boolean mask of exactly `keep` highest scores (ties broken by position, deterministic)."""
    flat = scores.reshape(-1)
    keep = int(min(max(keep, 0), flat.size))
    mask = np.zeros(flat.size, dtype=bool)
    if keep == flat.size:
        mask[:] = True
    elif keep > 0:
        mask[np.argpartition(-flat, keep - 1, kind="introselect")[:keep]] = True
    return mask.reshape(scores.shape)


def prune(weight: np.ndarray, keep: int, scores: np.ndarray | None = None) -> np.ndarray:
    """A copy of `weight` with all but its `keep` highest-scoring entries set to zero."""
    mask = top_mask(magnitude_scores(weight) if scores is None else scores, keep)
    return np.where(mask, weight, np.zeros((), dtype=weight.dtype)).astype(weight.dtype)
