"""rdonnx.algo.prune: in-layer scores, exact-count masks and pruning."""

from __future__ import annotations

import numpy as np
import pytest

from rdonnx.algo.prune import Ranking, Scores, activation, magnitude, prune


def _expected_mask(values: np.ndarray, keep: int) -> np.ndarray:
    """Brute force: the `keep` highest values, ties to the lower flat index."""
    flat = values.reshape(-1)
    order = np.lexsort((np.arange(flat.size), -flat))
    mask = np.zeros(flat.size, bool)
    mask[order[:max(0, min(keep, flat.size))]] = True
    return mask.reshape(values.shape)


@pytest.mark.parametrize("shape", [(37,), (6, 7), (4, 3, 2, 2)])
def test_mask_keeps_exactly_k_largest(shape):
    rng = np.random.default_rng(sum(shape))
    values = rng.standard_normal(shape).astype(np.float32)
    scores = magnitude(values)
    ranking = Ranking(scores)
    size = values.size
    for keep in range(size + 1):
        mask = ranking.mask(keep)
        assert mask.shape == values.shape and mask.dtype == bool
        assert int(mask.sum()) == keep
        if 0 < keep < size:
            assert np.abs(values[mask]).min() > np.abs(values[~mask]).max()
        np.testing.assert_array_equal(mask, _expected_mask(scores.values, keep))


def test_mask_clamps_keep():
    ranking = Ranking(magnitude(np.arange(1, 6, dtype=np.float32)))
    assert not ranking.mask(-3).any()
    assert ranking.mask(99).all()
    assert ranking.size == 5


def test_ties_go_to_the_lower_index():
    values = np.array([1, 2, 2, 0, 2, 2, 1, 2], np.float32)
    mask = Ranking(Scores(values)).mask(3)
    assert mask.tolist() == [False, True, True, False, True, False, False, False]
    flat = np.zeros(100, np.float32)
    assert np.flatnonzero(Ranking(Scores(flat)).mask(7)).tolist() == list(range(7))


def test_ties_random_against_brute_force():
    rng = np.random.default_rng(5)
    for _ in range(50):
        values = rng.integers(0, 4, size=rng.integers(2, 60)).astype(np.float32)
        keep = int(rng.integers(0, values.size + 1))
        np.testing.assert_array_equal(Ranking(Scores(values)).mask(keep),
                                      _expected_mask(values, keep))


def test_magnitude_scores_are_float32_absolute_values():
    weight = np.array([[-3.0, 0.5], [2.0, -0.25]], np.float16)
    scores = magnitude(weight)
    assert scores.values.dtype == np.float32
    assert scores.row_axis is None and scores.criterion == "magnitude"
    np.testing.assert_array_equal(scores.values, np.abs(weight.astype(np.float32)))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_prune_zeroes_the_rest_and_keeps_dtype(dtype):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((8, 9)).astype(dtype)
    original = weight.copy()
    for keep in (0, 1, 10, 71, 72, 100):
        pruned = prune(weight, keep)
        assert pruned.dtype == dtype and pruned.shape == weight.shape
        kept = min(keep, weight.size)
        assert np.count_nonzero(pruned) == kept
        nonzero = pruned != 0
        np.testing.assert_array_equal(pruned[nonzero], weight[nonzero])  # values untouched
        if 0 < kept < weight.size:
            assert np.abs(weight[nonzero]).min() >= np.abs(weight[~nonzero]).max()
    np.testing.assert_array_equal(weight, original)


def test_prune_does_not_modify_input():
    weight = np.array([3.0, -1.0, 2.0, -4.0], np.float32)
    before = weight.copy()
    pruned = prune(weight, 2)
    np.testing.assert_array_equal(weight, before)
    np.testing.assert_array_equal(pruned, [3.0, 0.0, 0.0, -4.0])


def test_prune_with_given_scores():
    weight = np.array([10.0, 20.0, 30.0, 40.0], np.float32)
    scores = Scores(np.array([4.0, 3.0, 2.0, 1.0], np.float32))
    np.testing.assert_array_equal(prune(weight, 2, scores), [10.0, 20.0, 0.0, 0.0])


def test_activation_scores_and_per_row_masks():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((6, 5)).astype(np.float32)  # MatMul weight [in, out]
    moments = rng.uniform(0.1, 4.0, size=(6, 1)).astype(np.float32)  # E[x^2] per input
    scores = activation(weight, moments, row_axis=1)  # rows: one per output column
    assert scores.criterion == "activation" and scores.row_axis == 1
    np.testing.assert_allclose(scores.values, weight**2 * moments, rtol=1e-6)
    ranking = Ranking(scores)
    for keep in range(weight.size + 1):
        mask = ranking.mask(keep)
        assert int(mask.sum()) == keep
        per_row = mask.sum(axis=0)
        assert per_row.max() - per_row.min() <= 1  # the same count in every output row
        for j in range(weight.shape[1]):  # within a row: that row's highest scores
            np.testing.assert_array_equal(mask[:, j],
                                          _expected_mask(scores.values[:, j], per_row[j]))


def test_per_row_extra_entries_go_to_rows_with_highest_next_score():
    values = np.array([[9.0, 1.0], [8.0, 7.0], [6.0, 2.0]], np.float32)
    mask = Ranking(Scores(values, row_axis=0)).mask(4)  # one each, then the best second
    assert mask.tolist() == [[True, False], [True, True], [True, False]]
