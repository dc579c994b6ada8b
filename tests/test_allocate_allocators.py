"""rdonnx.allocate.allocators: kept counts per weight that meet the global rate exactly."""

from __future__ import annotations

import numpy as np
import pytest

from rdonnx.allocate.allocators import (
    ALLOCATORS,
    Allocation,
    Curve,
    global_threshold,
    lamp,
    lamp_scores,
    predicted,
    rd,
    rd_dp,
    round_counts,
    target_count,
    uniform,
)
from rdonnx.errors import UsageError

RATES = (0.0, 0.013, 0.1, 0.25, 1 / 3, 0.5, 0.77, 0.999, 1.0)


def _scores(sizes, seed=0, scales=None):
    rng = np.random.default_rng(seed)
    scales = scales or [1.0] * len(sizes)
    return {f"w{i}": np.abs(rng.standard_normal(n) * s).astype(np.float32)
            for i, (n, s) in enumerate(zip(sizes, scales))}


def _brute_force_global(scores, total):
    names = list(scores)
    joined = np.concatenate([scores[n].reshape(-1) for n in names])
    owner = np.concatenate([[i] * scores[n].size for i, n in enumerate(names)])
    top = np.argsort(-joined, kind="stable")[:total]
    counts = np.bincount(owner[top], minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts)}


def test_target_count_rounds():
    assert target_count({"a": 10, "b": 5}, 0.5) == 8  # 7.5 rounds to even
    assert target_count({"a": 10, "b": 7}, 0.5) == 8  # 8.5 rounds to even
    assert target_count({"a": 3}, 0.5) == 2
    assert target_count({"a": 1000}, 0.2345) == 234


def test_registry_names():
    assert {"uniform", "global", "lamp", "rd", "pqi", "hsic"} <= set(ALLOCATORS)
    assert ALLOCATORS["uniform"] is uniform and ALLOCATORS["global"] is global_threshold


@pytest.mark.parametrize("seed", range(5))
def test_uniform_hits_the_count_and_every_density(seed):
    rng = np.random.default_rng(seed)
    sizes = [int(n) for n in rng.integers(1, 500, size=rng.integers(1, 9))]
    scores = _scores(sizes, seed)
    n_total = sum(sizes)
    for rate in RATES:
        keep = uniform(Allocation(scores), rate)
        assert set(keep) == set(scores)
        assert sum(keep.values()) == round(rate * n_total)
        for name, s in scores.items():
            assert 0 <= keep[name] <= s.size
            assert abs(keep[name] / s.size - rate) < 1 / s.size


@pytest.mark.parametrize("seed", range(5))
def test_global_keeps_the_globally_largest(seed):
    rng = np.random.default_rng(100 + seed)
    sizes = [int(n) for n in rng.integers(1, 400, size=rng.integers(1, 7))]
    scales = [float(s) for s in rng.uniform(0.1, 10, size=len(sizes))]
    scores = _scores(sizes, seed, scales)
    for rate in RATES:
        keep = global_threshold(Allocation(scores), rate)
        total = round(rate * sum(sizes))
        assert sum(keep.values()) == total
        assert keep == _brute_force_global(scores, total)


def test_global_normalized_differs_from_plain_on_different_scales():
    rng = np.random.default_rng(9)
    scores = {"big": np.abs(rng.standard_normal(400) * 100).astype(np.float32),
              "small": np.abs(rng.standard_normal(400)).astype(np.float32)}
    plain = global_threshold(Allocation(scores), 0.5)
    normalized = global_threshold(Allocation(scores, normalize=True), 0.5)
    assert sum(plain.values()) == sum(normalized.values()) == 400
    assert plain["big"] > 390  # the large-scale tensor takes nearly all the budget
    assert 150 < normalized["big"] < 250 and 150 < normalized["small"] < 250
    rms = {n: float(np.sqrt(np.mean(s.astype(np.float64) ** 2))) for n, s in scores.items()}
    assert normalized == _brute_force_global({n: s / rms[n] for n, s in scores.items()}, 400)
    # scale-free: multiplying one tensor changes plain global but not the normalized one
    scaled = {"big": scores["big"] / 1000, "small": scores["small"]}
    assert global_threshold(Allocation(scaled, normalize=True), 0.5) == normalized
    assert global_threshold(Allocation(scaled), 0.5) != plain


def test_round_counts_sums_to_total_and_respects_sizes():
    sizes = {"a": 3, "b": 10, "c": 1}
    keep = round_counts({"a": 2.9, "b": 9.5, "c": 0.6}, sizes, 14)
    assert keep == {"a": 3, "b": 10, "c": 1}
    keep = round_counts({"a": 1.2, "b": 4.7, "c": 0.1}, sizes, 6)
    assert keep == {"a": 1, "b": 5, "c": 0}
    keep = round_counts({"a": 5.0, "b": 0.0, "c": 0.0}, sizes, 6)  # capped, rest spread
    assert sum(keep.values()) == 6 and keep["a"] == 3


def test_lamp_scores_match_definition():
    rng = np.random.default_rng(4)
    s = rng.standard_normal((5, 6)).astype(np.float32)
    flat = s.reshape(-1).astype(np.float64) ** 2
    manual = np.array([v / flat[flat >= v].sum() for v in flat]).reshape(s.shape)
    np.testing.assert_allclose(lamp_scores(s), manual, rtol=1e-9)
    assert lamp_scores(s).max() == pytest.approx(1.0)


def test_lamp_hits_the_count_and_keeps_every_layer_alive():
    scores = _scores([50, 500, 5000], seed=2, scales=[1000.0, 1.0, 0.001])
    for rate in (0.001, 0.01, 0.2, 0.9):
        keep = lamp(Allocation(scores), rate)
        assert sum(keep.values()) == round(rate * 5550)
        assert all(k >= 1 for k in keep.values())


# ---------------------------------------------------------------- rate-distortion allocation

GRID = (1.0, 0.75, 0.5, 0.3, 0.2, 0.1, 0.05)


def _convex_curves(sizes, seed):
    rng = np.random.default_rng(seed)
    curves = {}
    for name, _ in sizes.items():
        a, b = rng.uniform(0.01, 5), rng.uniform(1, 8)
        curves[name] = Curve(GRID, [a * (np.exp(-b * d) - np.exp(-b)) for d in GRID])
    return curves


def test_rd_gives_entries_to_the_weight_that_needs_them():
    scores = {"steep": np.ones(100, np.float32), "flat": np.ones(100, np.float32)}
    grid = (1.0, 0.5, 0.25, 0.0)
    curves = {"steep": Curve(grid, [0.0, 1.0, 4.0, 10.0]),
              "flat": Curve(grid, [0.0, 0.02, 0.05, 0.1])}
    keep = rd(Allocation(scores, curves), 0.5)
    assert keep == {"steep": 100, "flat": 0}
    keep = rd(Allocation(scores, curves), 0.625)  # 25 more entries go to "flat"
    assert keep == {"steep": 100, "flat": 25}


@pytest.mark.parametrize("seed", range(4))
def test_rd_hits_the_count_and_is_optimal_on_convex_curves(seed):
    rng = np.random.default_rng(seed)
    scores = _scores([int(n) for n in rng.integers(20, 400, size=5)], seed)
    sizes = {n: s.size for n, s in scores.items()}
    inputs = Allocation(scores, _convex_curves(sizes, seed))
    for rate in (0.06, 0.15, 0.4, 0.8, 1.0):
        keep = rd(inputs, rate)
        assert sum(keep.values()) == round(rate * sum(sizes.values()))
        assert all(0 <= keep[n] <= sizes[n] for n in sizes)
        best = predicted(inputs, keep)
        slack = 1e-6 + 0.02 * max(max(c.distortions) for c in inputs.curves.values())
        assert best <= predicted(inputs, rd_dp(inputs, rate)) + slack
        assert best <= predicted(inputs, uniform(inputs, rate)) + 1e-9


def test_rd_below_the_grid_or_without_curves_raises():
    scores = {"a": np.ones(100, np.float32)}
    curves = {"a": Curve((1.0, 0.5), (0.0, 1.0))}
    with pytest.raises(UsageError, match="below the smallest density"):
        rd(Allocation(scores, curves), 0.2)
    with pytest.raises(UsageError, match="below the smallest density"):
        rd_dp(Allocation(scores, curves), 0.2)
    with pytest.raises(UsageError, match="no R-D curve"):
        rd(Allocation({**scores, "b": np.ones(4, np.float32)}, curves), 0.8)


def test_predicted_interpolates_the_curve():
    scores = {"a": np.ones(100, np.float32)}
    inputs = Allocation(scores, {"a": Curve((1.0, 0.5, 0.0), (0.0, 2.0, 10.0))})
    assert predicted(inputs, {"a": 100}) == pytest.approx(0.0)
    assert predicted(inputs, {"a": 75}) == pytest.approx(1.0)
    assert predicted(inputs, {"a": 25}) == pytest.approx(6.0)
