"""ITPruner (Zheng et al., arXiv 2108.08532): layer importance from the normalised HSIC between
layer activations, and the paper's width program solved with SLSQP.

The activation of a weight is the output of its consumer (MatMul / Gemm / Conv ...), collected
with ONNX Runtime on the first `hsic_samples` calibration samples. With a linear kernel nHSIC is
linear CKA: <K_i, K_j>_F / (||K_i||_F ||K_j||_F) with K = Xc Xc^T of the centred, flattened
activations. Redundancy s_i = sum_{j != i} nHSIC(i, j), normalised to sum to 1; importance
alpha_i = exp(-beta s_i). Since s_i ~ 1/L, beta defaults to `BETA_PER_LAYER` * L (the paper's
scripts use beta / L between about 12 and 250).

The program keeps the paper's structure: x_i is the width multiplier of layer i's outputs (graph
order), layer i's density is x_{i-1} x_i (the first layer's input width is 1), and

    maximise sum_i alpha_i x_i  subject to  sum_i c_i x_{i-1} x_i <= rate * sum_i c_i,

with c_i the parameters of weight i (or its multiply-accumulates per sample with
`--budget flops`), bounds x in [sqrt(DENSITY_FLOOR), 1], start x = 1. The densities are then
applied as unstructured kept counts (see `allocate.hsic`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from .errors import UsageError
from .weights import LAYOUT_OPS, WEIGHT_INPUTS, Weight

if TYPE_CHECKING:
    from .allocate import Allocation
    from .calibration import Calibration
    from .config import CompressConfig
    from .model import Model

BUDGETS = ("params", "flops")
DEFAULT_SAMPLES = 64
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


def solve_widths(alpha: np.ndarray, costs: np.ndarray, rate: float,
                 floor: float = DENSITY_FLOOR) -> np.ndarray:
    """Width multipliers x maximising sum alpha_i x_i subject to the quadratic budget
    sum_i c_i x_{i-1} x_i <= rate * sum_i c_i (x_0 = 1), x in [sqrt(floor), 1] (SLSQP)."""
    from scipy.optimize import minimize

    alpha = np.asarray(alpha, dtype=np.float64)
    cost = np.asarray(costs, dtype=np.float64) / max(float(np.sum(costs)), 1e-300)
    n = len(alpha)
    if rate >= 1 or n == 0:
        return np.ones(n)
    weight = alpha / max(float(alpha.max()), 1e-300)

    def spent(x: np.ndarray) -> float:
        return float(np.sum(cost * x * np.concatenate([[1.0], x[:-1]])))

    def spent_grad(x: np.ndarray) -> np.ndarray:
        prev = np.concatenate([[1.0], x[:-1]])
        grad = cost * prev
        grad[:-1] += cost[1:] * x[1:]
        return grad

    low = float(np.sqrt(floor))
    result = minimize(lambda x: -float(weight @ x), np.ones(n), jac=lambda x: -weight,
                      method="SLSQP", bounds=[(low, 1.0)] * n,
                      constraints=[{"type": "ineq", "fun": lambda x: rate - spent(x),
                                    "jac": lambda x: -spent_grad(x)}],
                      options={"maxiter": 500, "ftol": 1e-10})
    return np.clip(result.x, low, 1.0)


def consumer_outputs(model: Model, weights: Sequence[Weight]) -> dict[str, tuple[str, str]]:
    """(output tensor, op) of the main-graph consumer of each weight, followed through
    layout-only operators; weights used only in subgraphs have no entry."""
    nodes = list(model.proto.graph.node)
    users: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            users.setdefault(name, []).append(node)
    found = {}
    for w in weights:
        tensor, hops = w.name, 0
        while hops < 8 and tensor in users:
            node = users[tensor][0]
            if node.op_type in WEIGHT_INPUTS and node.domain in ("", "ai.onnx"):
                found[w.name] = (node.output[0], node.op_type)
                break
            if node.op_type not in LAYOUT_OPS:
                break
            tensor, hops = node.output[0], hops + 1
    return found


def collect(cal: Calibration, tensors: Sequence[str], samples: int
            ) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    """The named intermediate tensors on the first `samples` replayed calibration samples, one
    row per sample ([samples, -1]), and each tensor's shape on the first batch. Tensors whose
    first axis is not the batch (sequence-first layouts, batch x tokens folded into one axis:
    the sample of a row is unknown) are left out. The calibration session exposes them
    (`calibrate_model` asks for `consumer_outputs` with --method hsic)."""
    parts: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    shapes: dict[str, tuple[int, ...]] = {}
    seen = 0
    for feed, _ in cal.replay:
        batch = len(next(iter(feed.values())))
        values = dict(zip(tensors, cal.runner.run(feed, outputs=list(tensors))))
        for t in tensors:
            value = np.asarray(values[t])
            shapes.setdefault(t, value.shape)
            if parts[t] is not None and value.ndim and value.shape[0] == batch:
                parts[t].append(value.reshape(batch, -1))
            else:
                parts[t] = None
        seen += batch
        if seen >= samples:
            break
    return {t: np.concatenate(p)[:samples] for t, p in parts.items() if p}, shapes


def macs(size: int, output_shape: Sequence[int], op: str) -> float:
    """Multiply-accumulates of a weight's consumer per sample: weight size times the output
    positions (spatial size for Conv, the middle axes for MatMul / Gemm)."""
    middle = output_shape[2:] if op in SPATIAL_OPS else output_shape[1:-1]
    return float(size) * float(np.prod(middle, dtype=np.float64))


def prepare(cal: Calibration, config: CompressConfig, allocation: Allocation) -> Allocation:
    """`allocation` with each weight's importance alpha and budget cost (params or MACs)."""
    found = consumer_outputs(cal.model, cal.weights)
    tensors = sorted({t for t, _ in found.values()})
    acts, shapes = collect(cal, tensors, config.hsic_samples) if tensors else ({}, {})
    seen = [w for w in cal.weights if w.name in found and found[w.name][0] in acts]
    if len(seen) >= 2:
        alpha = importance(similarity([acts[found[w.name][0]] for w in seen]),
                           config.hsic_beta)
    else:  # no pair to compare: every layer equally important, the budget still shapes widths
        cal.notices.append("hsic: fewer than two layer outputs are observable, so every layer "
                           "gets the same importance")
        alpha, seen = np.ones(1), []
    alphas = dict(zip((w.name for w in seen), alpha.tolist()))
    neutral = float(np.median(alpha))
    costs: dict[str, float] = {}
    for w in cal.weights:
        if config.budget == "flops" and w.name in found:
            tensor, op = found[w.name]
            costs[w.name] = macs(w.size, shapes[tensor], op)
        else:
            costs[w.name] = float(w.size)
    if config.budget == "flops":
        cal.notices.append(f"hsic: --rate counts multiply-accumulates per sample "
                           f"({sum(costs.values()):,.0f} in the prunable layers)")
    if seen and len(seen) < len(cal.weights):
        cal.notices.append(f"hsic: {len(cal.weights) - len(seen)} weight(s) without an "
                           "observable output get the median importance")
    return replace(allocation, importance={w.name: alphas.get(w.name, neutral)
                                           for w in cal.weights}, costs=costs)


__all__ = ["BUDGETS", "cka", "collect", "consumer_outputs", "importance", "macs", "prepare",
           "redundancy", "similarity", "solve_widths"]
