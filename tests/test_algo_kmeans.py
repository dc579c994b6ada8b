"""Activation-weighted k-means quantization (`rdonnx.algo.kmeans`): the defining properties."""

from __future__ import annotations

import numpy as np
import pytest

from rdonnx.algo.kmeans import (
    codebook_size,
    importance_weights,
    kmeans_quantize,
    lloyd,
    weighted_error,
    weighted_quantiles,
)
from rdonnx.algo.quantize import quantize


def _pruned(rng: np.random.Generator, shape=(48, 64), density=0.4, scale=1.0) -> np.ndarray:
    w = (rng.standard_normal(shape) * scale).astype(np.float32)
    w[rng.random(shape) > density] = 0.0
    return w


def _importance(rng: np.random.Generator, columns: int) -> np.ndarray:
    """Per-input-feature E[x^2] spanning four decades, broadcast over rows ([1, columns])."""
    return 10.0 ** rng.uniform(-2, 2, (1, columns))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("weighted", [False, True])
def test_never_worse_than_uniform_rounding(bits, weighted):
    """Same bits = same number of levels (2^b - 1 codes besides pruned): k-means' weighted
    error is at most uniform rounding's, and well below it at low widths."""
    for seed in range(4):
        rng = np.random.default_rng(seed)
        w = _pruned(rng, scale=10.0 ** rng.uniform(-3, 3))
        w[0, 0] = 40 * np.abs(w).max()  # an outlier stretches the uniform grid
        importance = _importance(rng, w.shape[1]) if weighted else None
        km = kmeans_quantize(w, bits, importance)
        uniform = quantize(w, bits)
        mine = weighted_error(w, km.values(np.float32), importance)
        theirs = weighted_error(w, uniform.values(np.float32), importance)
        assert mine <= theirs * (1 + 1e-12), (seed, mine, theirs)
        if bits <= 4:
            assert mine < 0.5 * theirs
        assert km.codebook.size <= codebook_size(bits)


def test_activation_weighted_beats_unweighted():
    """Where importances vary, the weighted codebook has the lower importance-weighted error
    (and the higher plain error: it spends its levels where inputs are large)."""
    rng = np.random.default_rng(5)
    w = _pruned(rng, shape=(64, 96), density=0.5)
    importance = np.ones((1, 96))
    importance[0, :8] = 1e3  # a few hot input features
    w[:, :8] *= 0.2  # ...whose weights are small, so plain k-means spends few levels there
    for bits in (3, 4, 5):
        weighted = kmeans_quantize(w, bits, importance).values(np.float32)
        plain = kmeans_quantize(w, bits).values(np.float32)
        assert weighted_error(w, weighted, importance) < 0.8 * weighted_error(w, plain, importance)
        assert weighted_error(w, plain) < weighted_error(w, weighted)


def test_lloyd_never_increases_the_objective():
    rng = np.random.default_rng(9)
    for trial in range(6):
        x = np.sort(rng.standard_t(3, 4000))
        w = 10.0 ** rng.uniform(-2, 2, x.size)
        init = rng.choice(x, 15, replace=False) if trial % 2 else weighted_quantiles(x, w, 15)
        result = lloyd(x, w, init, max_iterations=200, tolerance=0.0)
        history = np.array(result.history)
        assert len(history) > 3  # it really iterates
        assert np.all(np.diff(history) <= 1e-12 * history[:-1]), np.diff(history).max()
        assert history[-1] < history[0]
        assert np.all(np.diff(result.centroids) > 0)  # ascending, distinct
        # the returned centroids are a fixed point up to the tolerance: their clusters' means
        middle = (result.centroids[:-1] + result.centroids[1:]) / 2
        cluster = np.searchsorted(middle, x, side="left")
        means = np.bincount(cluster, w * x) / np.bincount(cluster, w)
        assert np.allclose(means, result.centroids, rtol=1e-6, atol=1e-9)


def test_pruned_entries_stay_zero_and_survivors_get_a_centroid():
    rng = np.random.default_rng(2)
    w = _pruned(rng, density=0.3)
    w[1, :4] = [-0.0, 0.0, 1e-30, -1e-30]  # tiny survivors stay survivors
    importance = _importance(rng, w.shape[1])
    importance[0, 3] = 0.0  # a dead input feature: floored, still quantized
    for bits in (2, 3, 4, 8, 16):
        got = kmeans_quantize(w, bits, importance)
        values = got.values(np.float32)
        assert got.q.dtype == np.int32 and got.q.shape == w.shape
        assert np.all(got.q[w == 0] == 0) and np.all(got.q[w != 0] >= 1)
        assert int(got.q.max()) <= got.codebook.size <= codebook_size(bits)
        assert values[w == 0].tobytes() == np.zeros(int((w == 0).sum()), np.float32).tobytes()
        assert got.codebook.dtype == np.float32 and np.all(np.diff(got.codebook) > 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_values_are_a_float32_lookup_cast_to_dtype(dtype):
    rng = np.random.default_rng(3)
    w = _pruned(rng).astype(dtype)
    got = kmeans_quantize(w, 4, _importance(rng, w.shape[1]))
    expected = np.where(got.q > 0, got.codebook[np.maximum(got.q, 1) - 1], np.float32(0))
    assert got.values(np.dtype(dtype)).tobytes() == expected.astype(dtype).tobytes()


def test_deterministic():
    rng = np.random.default_rng(4)
    w = _pruned(rng, shape=(128, 64))
    importance = _importance(rng, 64)
    first = kmeans_quantize(w, 4, importance)
    for _ in range(2):
        again = kmeans_quantize(w.copy(), 4, importance.copy())
        assert again.q.tobytes() == first.q.tobytes()
        assert again.codebook.tobytes() == first.codebook.tobytes()


def test_few_distinct_values_are_exact():
    w = np.array([[0, 1.5, -2.25, 1.5], [3.0, 0, -2.25, 0]], np.float32)
    got = kmeans_quantize(w, 2)  # 3 distinct survivors fit 2^2 - 1 centroids
    assert got.codebook.tolist() == [-2.25, 1.5, 3.0]
    assert got.values(np.float32).tobytes() == w.tobytes()


def test_all_zero_and_empty():
    for w in (np.zeros((3, 4), np.float32), np.zeros((0, 5), np.float32)):
        got = kmeans_quantize(w, 4)
        assert not got.q.any() and got.codebook.size == 0
        assert got.values(np.float32).tobytes() == w.tobytes()


def test_bad_input():
    with pytest.raises(ValueError, match="value bits"):
        kmeans_quantize(np.ones(4, np.float32), 1)
    with pytest.raises(ValueError, match="value bits"):
        kmeans_quantize(np.ones(4, np.float32), 17)
    with pytest.raises(ValueError, match="inf or NaN"):
        kmeans_quantize(np.array([1.0, np.nan], np.float32), 4)


def test_importance_weights_fall_back_to_ones():
    mask = np.array([[True, False, True]])
    assert importance_weights(None, (1, 3), mask).tolist() == [1.0, 1.0]
    assert importance_weights(np.zeros((1, 3)), (1, 3), mask).tolist() == [1.0, 1.0]
    got = importance_weights(np.array([[2.0, 5.0, 0.0]]), (1, 3), mask)
    assert got.tolist() == [2.0, 1e-6]  # divided by the survivors' mean, floored
