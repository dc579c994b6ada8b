"""Uniform scalar quantization of surviving values (`rdonnx.algo.quantize`)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rdonnx.algo.quantize import AUTO_BITS, VALUE_BITS, Quantized, choose_bits, dequantize, quantize


def _pruned(rng: np.random.Generator, shape=(24, 40), density=0.4, scale=1.0) -> np.ndarray:
    w = (rng.standard_normal(shape) * scale).astype(np.float32)
    w[rng.random(shape) > density] = 0.0
    return w


SCALES = (1e-5, 0.03, 1.0, 7.5, 3e3)


@pytest.mark.parametrize("bits", list(VALUE_BITS))
def test_levels_within_range_and_top_level_reached(bits):
    rng = np.random.default_rng(bits)
    levels = 2 ** (bits - 1) - 1
    for scale in SCALES:
        w = _pruned(rng, scale=scale)
        got = quantize(w, bits)
        assert got.q.dtype == np.int32 and got.q.shape == w.shape
        assert int(np.abs(got.q).max()) == levels
        assert got.q.min() >= -levels and got.q.max() <= levels
        # the largest magnitude sits exactly on the top level (with its sign) and is
        # reconstructed to within one float32 ulp
        i = np.unravel_index(np.argmax(np.abs(w)), w.shape)
        assert got.q[i] == np.sign(w[i]) * levels
        back = got.values(np.float32)[i]
        assert abs(float(back) - float(w[i])) <= float(np.spacing(np.abs(w[i])))
        # the step is a float32 value
        assert float(np.float32(got.step)) == got.step and got.step > 0


def test_largest_magnitude_exact_for_representable_cases():
    """Powers of two and small integers: level x step is exact in float32."""
    for bits in (2, 3, 4, 8, 16):
        levels = 2 ** (bits - 1) - 1
        for largest in (1.0, 2.0 ** -10, 2.0 ** 12, float(levels), -3.0 * levels):
            w = np.array([0.0, largest / 3, largest, -largest / 7], np.float32)
            got = quantize(w, bits)
            assert got.values(np.float32)[2] == np.float32(largest), (bits, largest)


def test_zeros_stay_zero_and_tiny_survivors_become_pruned():
    rng = np.random.default_rng(0)
    w = _pruned(rng, density=0.3)
    w[0, :3] = [-0.0, 0.0, -0.0]
    for bits in (2, 4, 8, 16):
        got = quantize(w, bits)
        assert np.all(got.q[w == 0] == 0)
        assert np.all(got.values(np.float32)[w == 0] == 0)
    w = np.array([10.0, 0.01, -0.01, 0.0], np.float32)
    got = quantize(w, 4)  # step 10/7: +-0.01 round to level 0
    assert got.q.tolist() == [7, 0, 0, 0]


def test_all_zero_and_empty():
    for w in (np.zeros((3, 4), np.float32), np.zeros((0, 5), np.float32)):
        got = quantize(w, 8)
        assert got.q.shape == w.shape and not got.q.any() and got.step == 1.0
        assert got.values(np.float32).shape == w.shape


@pytest.mark.parametrize("bits", [0, 1, 17, 32, -3])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="value bits"):
        quantize(np.ones(4, np.float32), bits)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_values_are_float32_product_cast_to_dtype(dtype):
    rng = np.random.default_rng(3)
    for bits in (3, 6, 8, 11, 16):
        for scale in (1e-3, 1.0, 300.0):
            w = _pruned(rng, scale=scale)
            got = quantize(w.astype(dtype), bits)
            expected = (got.q.astype(np.float32) * np.float32(got.step)).astype(dtype)
            values = got.values(np.dtype(dtype))
            assert values.dtype == np.dtype(dtype)
            # bit for bit, not merely close: the decoder recomputes exactly this
            assert values.tobytes() == expected.tobytes()
            assert dequantize(got.q, got.step, np.dtype(dtype)).tobytes() == expected.tobytes()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 12, 16])
def test_error_within_half_a_step(bits):
    rng = np.random.default_rng(100 + bits)
    for scale in SCALES:
        w = _pruned(rng, shape=(64, 33), density=0.7, scale=scale)
        got = quantize(w, bits)
        deq = got.values(np.float32)
        err = np.abs(w.astype(np.float64) - deq.astype(np.float64))
        # step / 2 from rounding, plus float32 rounding of the product and of w / step
        slack = 2 * np.spacing(np.abs(w)).astype(np.float64)
        assert np.all(err <= got.step / 2 + slack), float((err - got.step / 2).max())
        # and not trivially: most entries carry a nonzero error below the bound
        assert err.max() > got.step / 8


def test_more_bits_less_error():
    rng = np.random.default_rng(7)
    w = _pruned(rng, shape=(50, 50), density=0.8)
    errors = [float(np.mean((w - quantize(w, b).values(np.float32)) ** 2)) for b in (2, 4, 8, 16)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 1e6


# ----------------------------------------------------------------------------------------------
# choose_bits


def _mse_measure(tensors, calls):
    def measure(values):
        calls.append(values)
        figure = sum(float(np.mean((tensors[n] - v) ** 2)) for n, v in values.items())
        return figure, ("distortion", figure)
    return measure


@pytest.fixture
def tensors():
    rng = np.random.default_rng(11)
    return {"a": _pruned(rng, (32, 32)), "b": _pruned(rng, (16, 48), scale=0.2),
            "c": _pruned(rng, (8, 64)).astype(np.float16)}


def _figure(tensors, bits):
    return sum(float(np.mean((tensors[n] - quantize(a, bits).values(a.dtype)) ** 2))
               for n, a in tensors.items())


def _make(tensors):
    """Plain per-tensor quantization at one width, as the pipeline's `make` without
    reconstruction."""
    def make(bits):
        quantized = {n: quantize(a, bits) for n, a in tensors.items()}
        return {n: q.values(tensors[n].dtype) for n, q in quantized.items()}, quantized
    return make


@pytest.mark.parametrize("target", [4, 6, 8, 12])
def test_choose_bits_fewest_within_limit(tensors, target):
    figures = {b: _figure(tensors, b) for b in AUTO_BITS}
    # a limit just above the figure at `target` and below the one of the width before it
    limit = figures[target] * 1.0001
    previous = [b for b in AUTO_BITS if b < target]
    if previous:
        assert figures[previous[-1]] > limit
    calls = []
    choice = choose_bits(_make(tensors), _mse_measure(tensors, calls), limit)
    assert choice.bits == target
    # bisection: the widest, then about log2 of the widths, not every width up to the target
    assert len(calls) <= 1 + math.ceil(math.log2(len(AUTO_BITS)))
    assert choice.distortion == ("distortion", pytest.approx(figures[target]))
    assert set(choice.quantized) == set(choice.values) == set(tensors)
    for name, q in choice.quantized.items():
        assert isinstance(q, Quantized)
        assert int(np.abs(q.q).max()) == 2 ** (target - 1) - 1
        assert choice.values[name].dtype == tensors[name].dtype
        assert choice.values[name].tobytes() == q.values(tensors[name].dtype).tobytes()
        # what the measure saw is what the choice holds
        assert any(c[name].tobytes() == choice.values[name].tobytes() for c in calls)


def test_choose_bits_without_limit_takes_the_fewest(tensors):
    calls = []
    choice = choose_bits(_make(tensors), _mse_measure(tensors, calls), None)
    assert choice.bits == AUTO_BITS[0] and len(calls) == 1


def test_choose_bits_unreachable_limit_gives_none(tensors):
    """Even the widest misses: None after one measurement (the caller keeps values exact)."""
    calls = []
    assert choose_bits(_make(tensors), _mse_measure(tensors, calls), -1.0) is None
    assert len(calls) == 1


@pytest.mark.parametrize("bits", [2, 3, 9, 16])
def test_choose_bits_honours_explicit_bits(tensors, bits):
    calls = []
    # the limit would be met at 4 bits already, or never: explicit bits win either way
    for limit in (1e9, -1.0, None):
        calls.clear()
        choice = choose_bits(_make(tensors), _mse_measure(tensors, calls), limit, bits)
        assert choice.bits == bits and len(calls) == 1
        assert all(int(np.abs(q.q).max()) == 2 ** (bits - 1) - 1
                   for q in choice.quantized.values())


# ----------------------------------------------------------------------------------------------
# codebook values (k-means): the same `Quantized`, decoded by lookup


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_codebook_values_are_a_float32_lookup(dtype):
    codebook = np.array([-1.5, 0.1, 2.0], np.float32)
    q = np.array([[0, 1, 3], [2, 0, 1]], np.int32)
    got = Quantized(q, 1.0, codebook).values(np.dtype(dtype))
    expected = np.array([[0, -1.5, 2.0], [0.1, 0, -1.5]], np.float32).astype(dtype)
    assert got.dtype == np.dtype(dtype) and got.tobytes() == expected.tobytes()
    assert np.signbit(got[q == 0]).sum() == 0  # pruned entries are +0.0
    # without a codebook the same levels mean q x step
    assert Quantized(q, 0.5).values(np.float32).tolist() == [[0, 0.5, 1.5], [1.0, 0, 0.5]]
