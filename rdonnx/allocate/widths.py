"""ITPruner's width program: width multipliers under a quadratic parameter / FLOPs budget (SLSQP).
"""

from __future__ import annotations

import numpy as np

from rdonnx.algo.hsic import DENSITY_FLOOR


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
