"""ITPruner (Zheng et al., arXiv 2108.08532): layer importance from the normalised HSIC between
layer activations; the math on arrays.

With a linear kernel nHSIC is linear CKA: <K_i, K_j>_F / (||K_i||_F ||K_j||_F) with
K = Xc Xc^T of the centred, flattened activations. Redundancy s_i = sum_{j != i} nHSIC(i, j),
normalised to sum to 1; importance alpha_i = exp(-beta s_i). Since s_i ~ 1/L, beta defaults to
`BETA_PER_LAYER` * L (the paper's scripts use beta / L between about 12 and 250).

The width program (`rdonnx.allocate.widths`) keeps the paper's structure: x_i is the width
multiplier of layer i's outputs (graph order), layer i's density is x_{i-1} x_i (the first
layer's input width is 1), and

    maximise sum_i alpha_i x_i  subject to  sum_i c_i x_{i-1} x_i <= rate * sum_i c_i,

with c_i the parameters of weight i (or its multiply-accumulates per sample, `macs`, with
`--budget flops`), bounds x in [sqrt(DENSITY_FLOOR), 1], start x = 1. The densities are then
applied as unstructured kept counts (see `allocate.allocators.hsic`). The activations are
collected by `rdonnx.flow.methods.hsic`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from rdonnx.choices import BUDGETS
from rdonnx.errors import UsageError

if TYPE_CHECKING:
    pass

BETA_PER_LAYER = 10.0
DENSITY_FLOOR = 0.01  # the program keeps every density at least this (x >= 0.1)
SPATIAL_OPS = frozenset({"Conv", "ConvTranspose"})  # output [N, C, *spatial]


def _centred(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return x - x.mean(axis=0, keepdims=True)


def _gram(x: np.ndarray) -> np.ndarray:
    """The centred linear Gram matrix K = Xc Xc^T (N x N)."""
    c = _centred(x)
    return c @ c.T


def cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (= nHSIC with a linear kernel) of two activations with the same samples on
    axis 0; 0 when either is constant."""
    if len(x) != len(y):
        raise UsageError(f"CKA needs the same samples, got {len(x)} and {len(y)}")
    return float(similarity([x, y])[0, 1])


def similarity(activations: Sequence[np.ndarray]) -> np.ndarray:
    """nHSIC of every pair of activations (L x L, ones on the diagonal for non-constant ones)."""
    grams = [_gram(a) for a in activations]
    norms = np.array([np.linalg.norm(k) for k in grams])
    flat = np.stack([k.reshape(-1) for k in grams])
    inner = flat @ flat.T
    scale = np.outer(norms, norms)
    return np.where(scale > 0, inner / np.where(scale > 0, scale, 1.0), 0.0)


def redundancy(sim: np.ndarray) -> np.ndarray:
    """s_i = sum_{j != i} nHSIC(i, j) / sum_k sum_{j != k} nHSIC(k, j) (uniform if all 0)."""
    off = np.asarray(sim, dtype=np.float64) - np.diag(np.diag(sim))
    row = off.sum(axis=1)
    total = row.sum()
    return row / total if total > 0 else np.full(len(row), 1.0 / max(len(row), 1))


def importance(sim: np.ndarray, beta: float | None = None) -> np.ndarray:
    """alpha_i = exp(-beta s_i) up to one common factor; beta defaults to BETA_PER_LAYER * L."""
    s = redundancy(sim)
    beta = BETA_PER_LAYER * len(s) if beta is None else beta
    return np.exp(-beta * (s - s.min()))  # shifted: only ratios matter, no underflow


def macs(size: int, output_shape: Sequence[int], op: str) -> float:
    """Multiply-accumulates of a weight's consumer per sample: weight size times the output
    positions (spatial size for Conv, the middle axes for MatMul / Gemm)."""
    middle = output_shape[2:] if op in SPATIAL_OPS else output_shape[1:-1]
    return float(size) * float(np.prod(middle, dtype=np.float64))


__all__ = ["BUDGETS", "cka", "importance", "macs", "redundancy", "similarity"]
