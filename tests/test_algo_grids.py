"""Per-channel log-scale grids, clipping search, RDOQ and the steps' coding."""

import math

import numpy as np
import pytest

from rdonnx.algo import grids
from rdonnx.algo.quantize import quantize
from rdonnx.codec import encode_integers


def outlier_weight(seed: int = 0) -> np.ndarray:
    """A [64, 256] weight whose first 4 output rows are 50x larger (as re-parameterised convs
    and FFN output projections of real models)."""
    w = np.random.default_rng(seed).standard_normal((64, 256)).astype(np.float32) * 0.02
    w[:4] *= 50
    return w


def relative_error(w: np.ndarray, grid: grids.Grid, bits: int) -> float:
    q = grids.round_to(w, grid, bits)
    return float(np.sum((w - q * grid.broadcast(w.ndim)) ** 2) / np.sum(w ** 2))


@pytest.mark.parametrize("t", [-4000, -33, -32, -1, 0, 1, 31, 32, 33, 1000, 3000])
def test_step_indices_are_exact_and_monotone(t):
    s = grids.step_of(t)
    assert s.dtype == np.float32 and s > 0
    assert grids.index_at_least(s) == t
    assert grids.index_at_least(np.nextafter(s, np.float32(np.inf))) == t + 1
    assert grids.step_of(t + 1) > s
    assert grids.step_of(t + 1) / s <= 1 + 2.0 ** -grids.MANTISSA_BITS + 1e-7


def test_per_channel_is_far_below_per_tensor_on_outlier_rows():
    w = outlier_weight()
    tensor = relative_error(w, grids.fit(w, 8, None)[0], 8)
    channels = relative_error(w, grids.fit(w, 8, 0)[0], 8)
    assert channels < tensor / 20
    assert grids.choose(w, 8, 0).axis == 0


def test_without_outliers_the_side_bits_do_not_pay():
    w = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    w[np.random.default_rng(2).random(w.shape) > 0.1] = 0  # 10% survivors: 1-2 per row
    assert grids.choose(w, 8, 0).axis is None


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_clipping_search_never_worse_than_the_unclipped_step(bits):
    w = outlier_weight(bits)
    levels = 2 ** (bits - 1) - 1
    grid, error = grids.fit(w, bits, 0)
    unclipped = grids.Grid(grids.step_of(grids.index_at_least(
        np.abs(w).max(axis=1) / np.float32(levels))), 0)  # the top level reaches each row's max
    q = grids.round_to(w, unclipped, bits)
    plain = float(np.sum((w - q * unclipped.broadcast(2)) ** 2))
    assert error <= plain
    if bits <= 3:  # at few levels clipping pays
        assert error < 0.9 * plain


def test_importance_moves_the_grid_to_the_inputs_that_matter():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 512)).astype(np.float32)
    w[:, 0] *= 20  # one large input feature per row
    imp = np.ones((1, 512), np.float32)
    imp[0, 0] = 1e-6  # ... that the layer input never excites
    plain, _ = grids.fit(w, 4, 0)
    weighted, _ = grids.fit(w, 4, 0, imp)
    assert np.all(weighted.steps < plain.steps)  # clipped: the big column does not matter


def test_zero_channels_and_non_finite_values():
    w = outlier_weight()
    w[10] = 0
    grid, _ = grids.fit(w, 8, 0)
    assert np.all(grids.round_to(w, grid, 8)[10] == 0)
    w[3, 3] = np.inf
    with pytest.raises(ValueError, match="inf or NaN"):
        grids.fit(w, 8, 0)


def _model_cost(w, q, grid, bits):
    """D + lambda R under the coder model that rdoq uses, with the histogram of `q`."""
    levels = 2 ** (bits - 1) - 1
    s = np.broadcast_to(grid.broadcast(w.ndim), w.shape).astype(np.float64)
    live = q != 0
    mag = np.abs(q[live])
    counts = np.bincount(mag, minlength=levels + 1).astype(np.float64)
    value_bits = -np.log2((counts[1:] + 0.5) / (counts[1:].sum() + 0.5 * levels)) + 1.0
    density = (live.sum() + 0.5) / (q.size + 1.0)
    rate = live.sum() * -math.log2(density) + value_bits[mag - 1].sum() + \
        (q.size - live.sum()) * -math.log2(1 - density)
    lam = math.log(2) / 6.0 * s[live] ** 2
    dist = np.sum((w - q * s) ** 2)
    return dist + float(np.mean(lam)) * rate


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_rdoq_lowers_d_plus_lambda_r_and_coded_size(bits):
    w = outlier_weight(bits)
    grid = grids.fit(w, bits, None)[0]  # one step: lambda is uniform
    plain = grids.round_to(w, grid, bits)
    tuned = grids.rdoq(w, plain, grid, bits, passes=1)
    assert _model_cost(w, tuned, grid, bits) <= _model_cost(w, plain, grid, bits)
    assert np.all(np.abs(tuned - plain) <= np.abs(plain))  # a neighbour level, or zero

    def coded(q):
        p, v = encode_integers(q)
        return len(p.payload) + len(v.payload)
    assert coded(tuned) < coded(plain)


def test_rdoq_keeps_pruned_entries_pruned():
    w = outlier_weight()
    w[:, ::2] = 0
    grid, _ = grids.fit(w, 4, 0)
    q = grids.rdoq(w, grids.round_to(w, grid, 4), grid, 4)
    assert np.all(q[:, ::2] == 0)


@pytest.mark.parametrize("index", [
    np.array([], np.int64), np.array([7]), np.arange(-300, -100, 3),
    np.random.default_rng(4).integers(-4000, 4000, 300)])
def test_steps_round_trip(index):
    payload = grids.encode_steps(index)
    assert np.array_equal(grids.decode_steps(payload, index.size), index)


def test_steps_are_compact_and_damage_is_refused():
    index = grids.fit(outlier_weight(), 8, 0)[0].index
    payload = grids.encode_steps(index)
    assert 8 * len(payload) <= 10 * index.size + 40  # not 32 bits a channel
    with pytest.raises(ValueError):
        grids.decode_steps(payload, index.size + 1)
    with pytest.raises(ValueError):
        grids.decode_steps(payload[:-1], index.size)
    with pytest.raises(ValueError):
        grids.decode_steps(payload + b"\0", index.size)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_one_step_for_the_tensor_is_never_worse_than_plain_rounding(bits):
    w = np.random.default_rng(bits).laplace(0, 0.05, (128, 64)).astype(np.float32)
    plain = quantize(w, bits)
    plain_error = float(np.sum((plain.values(np.float32) - w) ** 2))
    grid, error = grids.fit(w, bits, None)
    assert error <= plain_error
    assert error == pytest.approx(np.sum((w - grids.round_to(w, grid, bits) * grid.steps[0]) ** 2),
                                  rel=1e-5)


def test_a_split_grid_codes_the_coarse_rows_at_their_own_width():
    """Rows marked coarse get the steps and levels of their own narrower fit, the others those
    of the width's; every level stays within the width's range."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((12, 40)).astype(np.float32) * rng.uniform(0.1, 3, (12, 1))
    coarse = np.arange(12) % 3 == 0
    grid, q = grids.fit_split(w, 8, 0, coarse, 4)
    fine_grid, _ = grids.fit(w[~coarse], 8, 0)
    coarse_grid, _ = grids.fit(w[coarse], 4, 0)
    assert np.array_equal(grid.steps[~coarse], fine_grid.steps)
    assert np.array_equal(grid.steps[coarse], coarse_grid.steps)
    assert np.abs(q[coarse]).max() <= 7 and np.abs(q[~coarse]).max() > 7
    assert np.array_equal(q[coarse], grids.round_to(w[coarse], coarse_grid, 4))
    assert grids.steps_bits(grid) == grids.side_bits(grid)  # steps on the log scale
