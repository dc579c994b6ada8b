"""rdonnx.algo.layout (and rdonnx.graph.layers): which activation each weight multiplies, and E[x^2]
of its input features.

Every moment is checked against a brute-force numpy computation; the convolution reference is
an explicit im2col (zero padding included) that is itself checked against ONNX Runtime's Conv.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from _graphs import if_model, make_model, ort_run, tiny_mlp, vi
from onnx import TensorProto, helper

from rdonnx.algo.layout import LayerInput, SecondMoments, output_shift
from rdonnx.flow.curves import exposed_tensors, record
from rdonnx.graph.layers import (
    class_heads,
    decision_inputs,
    layer_biases,
    layer_inputs,
    lookup_indices,
    output_axes,
)
from rdonnx.graph.model import load_model
from rdonnx.graph.weights import find_codable, find_weights
from rdonnx.runtime.data import DataOptions, input_specs, make_batches
from rdonnx.runtime.session import Runner

F = TensorProto.FLOAT
SCALE8 = np.arange(1, 9, dtype=np.float32)  # features of different size


def _y():
    """The output "y" with no declared shape."""
    return helper.make_tensor_value_info("y", F, None)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _inputs(proto) -> dict[str, LayerInput]:
    model = load_model(proto)
    return layer_inputs(model, find_weights(model, min_params=1))


def _moments(entry: LayerInput, weight_shape, *batches: np.ndarray) -> np.ndarray:
    acc = SecondMoments(entry)
    for x in batches:
        acc.add_batch(x)
    return acc.moments(tuple(weight_shape))


# ---------------------------------------------------------------------------------------------
# layer_inputs: the right tensor and axes


def test_matmul_weight_on_the_right():
    w = _rng().standard_normal((8, 16)).astype(np.float32)
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                       [vi("x", F, ["N", 5, 8])], [vi("y", F, ["N", 5, 16])], {"W": w})
    entry = _inputs(proto)["W"]
    assert (entry.tensor, entry.op, entry.in_axis, entry.row_axis) == ("x", "MatMul", 0, 1)
    x = _rng(1).standard_normal((3, 5, 8)).astype(np.float32) * SCALE8
    got = _moments(entry, w.shape, x)
    assert got.shape == (8, 1)  # broadcasts against W[in, out]
    expected = np.mean(x.astype(np.float64).reshape(-1, 8) ** 2, axis=0)
    np.testing.assert_allclose(got[:, 0], expected, rtol=1e-6)


def test_matmul_weight_on_the_left():
    """y = W @ x with W[16, 8], x[N, 8, 5]: the features are x's second-to-last axis."""
    w = _rng().standard_normal((16, 8)).astype(np.float32)
    proto = make_model([helper.make_node("MatMul", ["W", "x"], ["y"])],
                       [vi("x", F, ["N", 8, 5])], [vi("y", F, ["N", 16, 5])], {"W": w})
    entry = _inputs(proto)["W"]
    assert (entry.tensor, entry.in_axis, entry.row_axis) == ("x", 1, 0)
    x = _rng(2).standard_normal((3, 8, 5)).astype(np.float32) * SCALE8[:, None]
    got = _moments(entry, w.shape, x)
    assert got.shape == (1, 8)
    expected = np.mean(np.moveaxis(x.astype(np.float64), 1, -1).reshape(-1, 8) ** 2, axis=0)
    np.testing.assert_allclose(got[0], expected, rtol=1e-6)
    # the moments really belong to the axis W multiplies: y = W @ x
    np.testing.assert_allclose(ort_run(proto, {"x": x})[0], w @ x, rtol=1e-4, atol=1e-4)


def test_batched_matmul_weight_averages_over_every_leading_axis():
    w = _rng().standard_normal((2, 8, 16)).astype(np.float32)
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                       [vi("x", F, ["N", 2, 5, 8])], [vi("y", F, ["N", 2, 5, 16])], {"W": w})
    entry = _inputs(proto)["W"]
    assert (entry.in_axis, entry.row_axis) == (1, 2)
    x = _rng(3).standard_normal((4, 2, 5, 8)).astype(np.float32) * SCALE8
    got = _moments(entry, w.shape, x)
    assert got.shape == (1, 8, 1)
    np.testing.assert_allclose(got[0, :, 0], np.mean(x.astype(np.float64).reshape(-1, 8) ** 2,
                                                     axis=0), rtol=1e-6)


@pytest.mark.parametrize("trans_a,trans_b", list(itertools.product((0, 1), repeat=2)))
def test_gemm_with_transposes(trans_a, trans_b):
    k, m, n = 8, 6, 12
    w = _rng().standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    a_shape = [k, m] if trans_a else [m, k]
    proto = make_model([helper.make_node("Gemm", ["a", "W"], ["y"], transA=trans_a,
                                         transB=trans_b)],
                       [vi("a", F, a_shape)], [vi("y", F, [m, n])], {"W": w})
    entry = _inputs(proto)["W"]
    assert entry.tensor == "a" and entry.op == "Gemm"
    assert entry.in_axis == (1 if trans_b else 0)  # W's axis of length K
    assert entry.row_axis == (0 if trans_b else 1)  # W's axis of length N
    assert w.shape[entry.in_axis] == k and w.shape[entry.row_axis] == n
    scale = np.arange(1, k + 1, dtype=np.float32)
    a = _rng(4).standard_normal(a_shape).astype(np.float32) * (scale[:, None] if trans_a
                                                               else scale[None, :])
    got = _moments(entry, w.shape, a)
    features = (a.T if trans_a else a).astype(np.float64)  # [M, K]
    expected = np.mean(features**2, axis=0)
    shape = [1, 1]
    shape[entry.in_axis] = k
    assert got.shape == tuple(shape)
    np.testing.assert_allclose(got.reshape(-1), expected, rtol=1e-6)
    # the reference is right: ORT computes op(a) @ op(W) with these features
    y = ort_run(proto, {"a": a})[0]
    np.testing.assert_allclose(y, (a.T if trans_a else a) @ (w.T if trans_b else w), rtol=1e-4,
                               atol=1e-4)


def test_conv_entry_carries_every_attribute():
    w = _rng().standard_normal((6, 2, 3, 5)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W"], ["y"], strides=[2, 1], dilations=[1, 2],
                            pads=[1, 0, 2, 1], group=2)
    proto = make_model([node], [vi("x", F, ["N", 4, 9, 9])], [_y()], {"W": w})
    entry = _inputs(proto)["W"]
    assert (entry.tensor, entry.op, entry.in_axis, entry.row_axis) == ("x", "Conv", None, 0)
    assert entry.kernel == (3, 5) and entry.strides == (2, 1) and entry.dilations == (1, 2)
    assert entry.pads == (1, 0, 2, 1) and entry.groups == 2 and entry.auto_pad == "NOTSET"


def test_conv_auto_pad_is_text():
    w = _rng().standard_normal((4, 3, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])
    proto = make_model([node], [vi("x", F, ["N", 3, 8, 8])], [_y()], {"W": w})
    assert _inputs(proto)["W"].auto_pad == "SAME_UPPER"


def test_conv_transpose_uses_input_channels():
    """ConvTranspose W[C_in, C_out, k, k]: axis 0 meets the input channels."""
    w = _rng().standard_normal((4, 6, 3, 3)).astype(np.float32)
    proto = make_model([helper.make_node("ConvTranspose", ["x", "W"], ["y"])],
                       [vi("x", F, ["N", 4, 5, 5])], [_y()], {"W": w})
    entry = _inputs(proto)["W"]
    assert (entry.tensor, entry.op, entry.in_axis, entry.row_axis) == ("x", "ConvTranspose", 0,
                                                                       1)
    scale = np.arange(1, 5, dtype=np.float32)[:, None, None]
    x = _rng(5).standard_normal((2, 4, 5, 5)).astype(np.float32) * scale
    got = _moments(entry, w.shape, x)
    assert got.shape == (4, 1, 1, 1)
    expected = np.mean(np.moveaxis(x.astype(np.float64), 1, -1).reshape(-1, 4) ** 2, axis=0)
    np.testing.assert_allclose(got.reshape(-1), expected, rtol=1e-6)


def _lstm(hidden: int = 4, features: int = 8):
    rng = _rng(6)
    arrays = {"W": rng.standard_normal((1, 4 * hidden, features)).astype(np.float32),
              "R": rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32)}
    node = helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=hidden)
    return make_model([node], [vi("x", F, [5, "N", features])], [_y()], arrays)


def test_lstm_input_weight_has_an_entry_and_the_recurrent_one_has_none():
    proto = _lstm()
    model = load_model(proto)
    weights = find_weights(model, min_params=1)
    assert {w.name for w in weights} == {"W", "R"}  # both are prunable
    inputs = layer_inputs(model, weights)
    assert set(inputs) == {"W"}
    entry = inputs["W"]
    assert (entry.tensor, entry.op, entry.in_axis, entry.row_axis) == ("x", "LSTM", 2, 1)
    x = _rng(7).standard_normal((5, 3, 8)).astype(np.float32) * SCALE8
    got = _moments(entry, (1, 16, 8), x)
    assert got.shape == (1, 1, 8)
    np.testing.assert_allclose(got.reshape(-1),
                               np.mean(x.astype(np.float64).reshape(-1, 8) ** 2, axis=0),
                               rtol=1e-6)


def test_weight_reached_through_transpose_has_no_entry():
    w = _rng().standard_normal((16, 8)).astype(np.float32)
    proto = make_model([helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
                        helper.make_node("MatMul", ["x", "Wt"], ["y"])],
                       [vi("x", F, ["N", 8])], [vi("y", F, ["N", 16])], {"W": w})
    model = load_model(proto)
    weights = find_weights(model, min_params=1)
    assert [w.name for w in weights] == ["W"]
    assert layer_inputs(model, weights) == {}


@pytest.mark.parametrize("constant", [False, True])
def test_weights_used_inside_subgraphs_have_no_entry(constant):
    proto, _ = if_model(constant=constant)
    model = load_model(proto)
    weights = find_weights(model, min_params=1)
    assert {w.name for w in weights} == {"W", "Wt"}
    assert layer_inputs(model, weights) == {}


def test_weight_used_in_the_main_graph_and_in_a_subgraph_has_no_entry():
    """One use is seen, the other (inside If) is not: its input statistics are unknown."""
    rng = _rng(8)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"])], "then", [],
                             [vi("t", F, ["N", 16])])
    other = helper.make_graph([helper.make_node("Neg", ["h"], ["e"])], "else", [],
                              [vi("e", F, ["N", 16])])
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["h"]),
                        helper.make_node("If", ["c"], ["y"], then_branch=then,
                                         else_branch=other)],
                       [vi("x", F, ["N", 8]), vi("c", TensorProto.BOOL, [])],
                       [vi("y", F, ["N", 16])], {"W": w})
    model = load_model(proto)
    weights = find_weights(model, min_params=1)
    assert [w.name for w in weights] == ["W"]
    assert layer_inputs(model, weights) == {}


def test_weight_shared_by_two_main_graph_consumers_keeps_its_entry():
    w = _rng().standard_normal((8, 8)).astype(np.float32)
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["h"]),
                        helper.make_node("MatMul", ["h", "W"], ["y"])],
                       [vi("x", F, ["N", 8])], [vi("y", F, ["N", 8])], {"W": w})
    entry = _inputs(proto)["W"]
    assert entry.in_axis == 0 and entry.row_axis == 1


# ---------------------------------------------------------------------------------------------
# Convolutions: moments per (input channel, kernel position) against an explicit im2col


def _same_pads(size, kernel, strides, dilations, mode):
    begin, end = [], []
    for s, k, st, d in zip(size, kernel, strides, dilations):
        out = math.ceil(s / st)
        total = max((out - 1) * st + (k - 1) * d + 1 - s, 0)
        small, large = total // 2, total - total // 2
        b, e = (small, large) if mode == "SAME_UPPER" else (large, small)
        begin.append(b)
        end.append(e)
    return begin, end


def _im2col(x, kernel, strides, dilations, begin, end):
    """[N, C, *spatial] -> columns [C, *kernel, N, *out] by explicit indexing (zero padding)."""
    x = np.pad(x.astype(np.float64), [(0, 0), (0, 0), *zip(begin, end)])
    out = [(x.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
           for i in range(len(kernel))]
    cols = np.zeros((x.shape[1], *kernel, x.shape[0], *out))
    for offset in itertools.product(*(range(k) for k in kernel)):
        for pos in itertools.product(*(range(o) for o in out)):
            index = tuple(p * s + k * d for p, s, k, d in zip(pos, strides, offset, dilations))
            cols[(slice(None), *offset, slice(None), *pos)] = x[(slice(None), slice(None),
                                                                 *index)].T  # [C, N]
    return cols


def _conv_from_columns(w, cols, groups):
    """y[N, O, *out] = sum over the group's channels and kernel of W * columns."""
    out_channels, per_group = w.shape[:2]
    spatial = w.ndim - 2
    y = []
    for o in range(out_channels):
        g = o // (out_channels // groups)
        chans = cols[g * per_group:(g + 1) * per_group]
        y.append(np.tensordot(w[o].astype(np.float64), chans,
                              axes=(list(range(1 + spatial)), list(range(1 + spatial)))))
    return np.stack(y, axis=1)


CONV_CASES = {
    # name: (x shape, weight shape, Conv attributes)
    "2d_stride2_pad1_groups2": ((3, 4, 7, 7), (6, 2, 3, 3),
                                dict(strides=[2, 2], pads=[1, 1, 1, 1], dilations=[1, 1],
                                     group=2)),
    "2d_asymmetric_pads_dilation": ((2, 3, 9, 8), (4, 3, 3, 2),
                                    dict(strides=[1, 2], pads=[2, 0, 1, 1], dilations=[2, 1])),
    "2d_same_upper": ((2, 3, 8, 8), (4, 3, 3, 3), dict(strides=[2, 2], auto_pad="SAME_UPPER")),
    "2d_same_lower_groups": ((2, 4, 7, 6), (4, 2, 2, 3),
                             dict(strides=[2, 1], auto_pad="SAME_LOWER", group=2)),
    "2d_valid": ((2, 3, 6, 6), (4, 3, 3, 3), dict(auto_pad="VALID")),
    "1d_stride2_pad1_groups2": ((3, 4, 11), (6, 2, 3),
                                dict(strides=[2], pads=[1, 1], dilations=[1], group=2)),
    "1d_asymmetric_dilation": ((2, 3, 12), (4, 3, 3), dict(pads=[2, 0], dilations=[2])),
    "1d_same_upper": ((2, 3, 10), (5, 3, 4), dict(strides=[3], auto_pad="SAME_UPPER")),
}


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_moments_equal_an_explicit_im2col(name):
    x_shape, w_shape, attrs = CONV_CASES[name]
    rng = _rng(9)
    w = rng.standard_normal(w_shape).astype(np.float32)
    channel_scale = np.arange(1, x_shape[1] + 1, dtype=np.float32).reshape(
        1, -1, *[1] * (len(x_shape) - 2))
    x = (rng.standard_normal(x_shape) + 0.5).astype(np.float32) * channel_scale
    proto = make_model([helper.make_node("Conv", ["x", "W"], ["y"], **attrs)],
                       [vi("x", F, ["N", *x_shape[1:]])], [_y()], {"W": w})
    entry = _inputs(proto)["W"]
    spatial = len(w_shape) - 2
    kernel = w_shape[2:]
    strides = attrs.get("strides", [1] * spatial)
    dilations = attrs.get("dilations", [1] * spatial)
    mode = attrs.get("auto_pad", "NOTSET")
    if mode.startswith("SAME"):
        begin, end = _same_pads(x_shape[2:], kernel, strides, dilations, mode)
    elif mode == "VALID":
        begin, end = [0] * spatial, [0] * spatial
    else:
        pads = attrs.get("pads", [0] * 2 * spatial)
        begin, end = pads[:spatial], pads[spatial:]
    cols = _im2col(x, kernel, strides, dilations, begin, end)
    groups = attrs.get("group", 1)
    # the reference im2col is ONNX's convolution
    np.testing.assert_allclose(ort_run(proto, {"x": x})[0], _conv_from_columns(w, cols, groups),
                               rtol=1e-4, atol=1e-4)
    per_channel = np.mean(cols.reshape(*cols.shape[:1 + spatial], -1) ** 2, axis=-1)
    got = _moments(entry, w.shape, x)
    assert got.shape == w.shape  # [out, in/groups, *kernel]
    per_group = w_shape[1]
    out_per_group = w_shape[0] // groups
    for o in range(w_shape[0]):
        g = o // out_per_group
        np.testing.assert_allclose(got[o], per_channel[g * per_group:(g + 1) * per_group],
                                   rtol=1e-6, err_msg=f"output channel {o}")


def test_conv_moments_see_the_zero_padding():
    """With padding, border kernel positions average in zeros: their moments are smaller."""
    x_shape, w_shape, attrs = CONV_CASES["2d_stride2_pad1_groups2"]
    w = np.ones(w_shape, np.float32)
    x = np.ones(x_shape, np.float32)
    proto = make_model([helper.make_node("Conv", ["x", "W"], ["y"], **attrs)],
                       [vi("x", F, ["N", *x_shape[1:]])], [_y()], {"W": w})
    got = _moments(_inputs(proto)["W"], w_shape, x)
    # 7x7 input padded to 9x9, stride 2: 4x4 positions; kernel row 0 reads padded rows
    # 0, 2, 4, 6 (row 0 is padding), row 1 reads 1, 3, 5, 7 (all real), row 2 reads 2..8
    # (row 8 is padding)
    assert got[0, 0, 1, 1] == pytest.approx(1.0)
    assert got[0, 0, 0, 1] == pytest.approx(3 / 4)
    assert got[0, 0, 1, 2] == pytest.approx(3 / 4)
    assert got[0, 0, 0, 0] == pytest.approx(9 / 16)
    assert got[0, 0, 2, 2] == pytest.approx(9 / 16)


# ---------------------------------------------------------------------------------------------
# Running mean over batches of different sizes


@pytest.mark.parametrize("kind", ["matmul", "conv", "gemm_trans_a"])
def test_running_mean_over_uneven_batches_equals_the_one_shot_mean(kind):
    rng = _rng(10)
    if kind == "matmul":
        w_shape = (8, 4)
        proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                           [vi("x", F, ["N", 3, 8])], [_y()],
                           {"W": np.ones(w_shape, np.float32)})
        shape = (3, 8)
    elif kind == "conv":
        w_shape = (6, 2, 3, 3)
        x_shape, _, attrs = CONV_CASES["2d_stride2_pad1_groups2"]
        proto = make_model([helper.make_node("Conv", ["x", "W"], ["y"], **attrs)],
                           [vi("x", F, ["N", *x_shape[1:]])], [_y()],
                           {"W": np.ones(w_shape, np.float32)})
        shape = x_shape[1:]
    else:
        w_shape = (8, 4)
        proto = make_model([helper.make_node("Gemm", ["x", "W"], ["y"], transA=1)],
                           [vi("x", F, [8, "N"])], [_y()],
                           {"W": np.ones(w_shape, np.float32)})
        shape = None
    entry = _inputs(proto)["W"]
    sizes = (5, 1, 9, 2, 7)
    if shape is None:  # Gemm transA: samples along axis 1
        batches = [(rng.standard_normal((8, n)) * rng.uniform(0.1, 10)).astype(np.float32)
                   for n in sizes]
        whole = np.concatenate(batches, axis=1)
    else:
        batches = [(rng.standard_normal((n, *shape)) * rng.uniform(0.1, 10)).astype(np.float32)
                   for n in sizes]
        whole = np.concatenate(batches, axis=0)
    running = _moments(entry, w_shape, *batches)
    once = _moments(entry, w_shape, whole)
    np.testing.assert_allclose(running, once, rtol=1e-9)
    # and both equal the plain numpy mean of the features' squares
    if kind == "matmul":
        np.testing.assert_allclose(once[:, 0], np.mean(whole.astype(np.float64).reshape(-1, 8)
                                                       ** 2, axis=0), rtol=1e-9)
    elif kind == "gemm_trans_a":
        np.testing.assert_allclose(once[:, 0], np.mean(whole.astype(np.float64) ** 2, axis=1),
                                   rtol=1e-9)
    acc, single = SecondMoments(entry), SecondMoments(entry)
    for b in batches:
        acc.add_batch(b)
    single.add_batch(whole)
    assert acc.count == single.count > 0


def test_moments_are_taken_in_double_precision():
    """Large activations: float32 accumulation would lose the small feature's moment."""
    w_shape = (2, 4)
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                       [vi("x", F, ["N", 2])], [_y()],
                       {"W": np.ones(w_shape, np.float32)})
    entry = _inputs(proto)["W"]
    x = np.empty((100_000, 2), np.float32)
    x[:, 0] = 3.0
    x[:, 1] = 1e-3
    got = _moments(entry, w_shape, *np.array_split(x, 7))
    np.testing.assert_allclose(got[:, 0], [9.0, 1e-6], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# End to end: record() exposes intermediate tensors and streams their moments


def test_record_streams_the_moments_of_an_intermediate_tensor():
    proto, arrays = tiny_mlp(seed=3)
    model = load_model(proto)
    weights = find_weights(model, min_params=1)
    inputs = layer_inputs(model, weights)
    assert {n: e.tensor for n, e in inputs.items()} == {"W1": "x", "W2": "h"}
    assert exposed_tensors(model, inputs) == ["h"]
    x = _rng(11).standard_normal((23, 8)).astype(np.float32)
    batches = make_batches({"x": x}, input_specs(model), DataOptions(batch_size=5))
    runner = Runner(model, weights, "cpu", exposed_tensors(model, inputs))
    replay, moments, _ = record(runner, batches, inputs)
    assert len(replay) == 5
    h = np.maximum(x.astype(np.float64) @ arrays["W1"] + arrays["b1"], 0)
    np.testing.assert_allclose(moments["W2"].moments(arrays["W2"].shape)[:, 0],
                               np.mean(h**2, axis=0), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(moments["W1"].moments(arrays["W1"].shape)[:, 0],
                               np.mean(x.astype(np.float64) ** 2, axis=0), rtol=1e-6)
    # the replayed outputs are the model's own outputs, not the exposed tensor
    for feed, outputs in replay:
        assert len(outputs) == 1 and outputs[0].shape == (feed["x"].shape[0], 4)


def test_output_axes_follow_the_layer_rows_and_default_to_axis_0():
    """Quantization channels: LSTM W and R per gate row (axis 1), ConvTranspose per output
    channel (axis 1), a weight reached through Transpose on axis 0, a vector on none."""
    rng = _rng(8)
    model = load_model(_lstm())
    assert output_axes(model, find_weights(model, min_params=1)) == {"W": 1, "R": 1}
    w = rng.standard_normal((4, 6, 3, 3)).astype(np.float32)
    proto = make_model([helper.make_node("ConvTranspose", ["x", "W"], ["y"])],
                       [vi("x", F, ["N", 4, 5, 5])], [_y()], {"W": w})
    model = load_model(proto)
    assert output_axes(model, find_weights(model, min_params=1)) == {"W": 1}
    arrays = {"W": rng.standard_normal((6, 8)).astype(np.float32),
              "b": rng.standard_normal(8).astype(np.float32)}
    proto = make_model([helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
                        helper.make_node("MatMul", ["x", "Wt"], ["h"]),
                        helper.make_node("Add", ["h", "b"], ["y"])],
                       [vi("x", F, ["N", 8])], [_y()], arrays)
    model = load_model(proto)
    weights = find_weights(model, min_params=1, include=["b"])
    assert output_axes(model, weights) == {"W": 0, "b": None}


@pytest.mark.parametrize("attrs", [dict(pads=[1, 1, 1, 1], group=4), dict(strides=[2, 2]),
                                   dict(auto_pad="SAME_UPPER", group=2)])
def test_output_shift_is_the_change_of_the_conv_output_mean(attrs):
    """Bias correction's figure: E[y'] - E[y] per output channel of a Conv (padding, strides,
    groups), from the measured E[x] of each (channel, kernel position), equals the mean change
    ONNX Runtime measures when the weight changes by delta."""
    rng = _rng(11)
    groups = attrs.get("group", 1)
    w = rng.standard_normal((8, 4 // groups, 3, 3)).astype(np.float32)
    delta = (rng.standard_normal(w.shape) * 0.1).astype(np.float32)
    x = (rng.standard_normal((5, 4, 7, 7)) + np.arange(1, 5)[None, :, None, None]).astype(
        np.float32)  # channels of different means
    node = helper.make_node("Conv", ["x", "W"], ["y"], **attrs)
    proto = make_model([node], [vi("x", F, ["N", 4, 7, 7])], [_y()], {"W": w})
    entry = _inputs(proto)["W"]
    acc = SecondMoments(entry)
    acc.add_batch(x[:2])
    acc.add_batch(x[2:])
    got = output_shift(delta, acc.means(w.shape), entry.row_axis)

    def mean_out(weight):
        p = make_model([node], [vi("x", F, ["N", 4, 7, 7])], [_y()], {"W": weight})
        return ort_run(p, {"x": x})[0].astype(np.float64).mean(axis=(0, 2, 3))

    np.testing.assert_allclose(got, mean_out(w + delta) - mean_out(w), rtol=1e-4, atol=1e-5)
    assert np.abs(got).max() > 0.1  # the shift is not trivially zero


def test_output_shift_of_a_matmul_and_the_biases_found():
    """MatMul [K, N] + Add: the shift per output column; `layer_biases` finds the Add's
    constant and Gemm's C, and skips a MatMul whose output has two users and an Add whose
    other input is no constant."""
    rng = _rng(12)
    arrays = {"W": rng.standard_normal((6, 5)).astype(np.float32),
              "b": rng.standard_normal(5).astype(np.float32),
              "G": rng.standard_normal((3, 5)).astype(np.float32),
              "c": rng.standard_normal((1, 3)).astype(np.float32),
              "V": rng.standard_normal((3, 2)).astype(np.float32),
              "s": rng.standard_normal(2).astype(np.float32),
              "U": rng.standard_normal((2, 2)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h0"]),
             helper.make_node("Add", ["b", "h0"], ["h"]),
             helper.make_node("Gemm", ["h", "G", "c"], ["g"], transB=1),
             helper.make_node("MatMul", ["g", "V"], ["v"]),
             helper.make_node("Add", ["v", "s"], ["v1"]),
             helper.make_node("Add", ["v", "s"], ["v2"]),  # V's output has two users
             helper.make_node("MatMul", ["v1", "U"], ["u"]),
             helper.make_node("Add", ["u", "v2"], ["y"])]  # U's "bias" is no constant
    proto = make_model(nodes, [vi("x", F, ["N", 6])], [_y()], arrays)
    model = load_model(proto)
    weights = find_weights(model, min_params=1)
    found = {w: b.name for w, b in layer_biases(model, weights).items()}
    assert found == {"W": "b", "G": "c"}
    entry = layer_inputs(model, weights)["W"]
    x = (rng.standard_normal((40, 6)) + 2.0).astype(np.float32)
    acc = SecondMoments(entry)
    acc.add_batch(x)
    delta = rng.standard_normal(arrays["W"].shape)
    np.testing.assert_allclose(output_shift(delta, acc.means(arrays["W"].shape), 1),
                               (x.astype(np.float64) @ delta).mean(axis=0), rtol=1e-9)
    # an unrolled recurrent layer: one weight, two steps, the same bias after each
    shared = {"R": arrays["W"][:5], "r": arrays["b"]}
    nodes = [helper.make_node("MatMul", ["x", "R"], ["a0"]),
             helper.make_node("Add", ["a0", "r"], ["a"]),
             helper.make_node("MatMul", ["a", "R"], ["c0"]),
             helper.make_node("Add", ["c0", "r"], ["y"])]
    model = load_model(make_model(nodes, [vi("x", F, ["N", 5])], [_y()], shared))
    found = layer_biases(model, find_weights(model, min_params=1))
    assert {w: b.name for w, b in found.items()} == {"R": "r"}


def test_lookup_tables_are_those_gathered_by_a_graph_input():
    """A table read by Gather along axis 0 with indices straight from a graph input is a
    lookup table; one also read by MatMul (a tied output head), gathered along axis 1, or by
    computed indices is not."""
    rng = np.random.default_rng(0)
    tables = {n: rng.standard_normal((20, 8)).astype(np.float32)
              for n in ("tokens", "tied", "cols", "computed")}
    nodes = [helper.make_node("Gather", ["tokens", "ids"], ["a"], axis=0),
             helper.make_node("Gather", ["tied", "ids"], ["b"], axis=0),
             helper.make_node("MatMul", ["a", "tied_t"], ["logits"]),
             helper.make_node("Transpose", ["tied"], ["tied_t"], perm=[1, 0]),
             helper.make_node("Gather", ["cols", "few"], ["c"], axis=1),
             helper.make_node("Add", ["ids", "one"], ["shifted"]),
             helper.make_node("Gather", ["computed", "shifted"], ["d"], axis=0)]
    model = make_model(nodes, [vi("ids", TensorProto.INT64, ["N", 4]),
                               vi("few", TensorProto.INT64, [2])],
                       [vi("logits", TensorProto.FLOAT, ["N", 4, 20]),
                        vi("b", TensorProto.FLOAT, ["N", 4, 8]),
                        vi("c", TensorProto.FLOAT, [20, 2]),
                        vi("d", TensorProto.FLOAT, ["N", 4, 8])],
                       {**tables, "one": np.ones((), np.int64)})
    loaded = load_model(model)
    tables = find_codable(loaded, [], min_params=1)  # every float tensor, the tied one too
    assert {"tokens", "tied", "cols", "computed"} <= {w.name for w in tables}
    assert lookup_indices(loaded, tables) == {"tokens": "ids"}


def test_decisions_are_argmaxes_the_graph_reads_on():
    """The scores behind an ArgMax whose result another node reads (a greedy decoder's step)
    are decisions; an ArgMax that only leaves the graph is not, nor one of a graph input."""
    nodes = [helper.make_node("Relu", ["x"], ["s1"]),
             helper.make_node("ArgMax", ["s1"], ["a1"], axis=1, keepdims=0),
             helper.make_node("Gather", ["E", "a1"], ["e"], axis=0),
             helper.make_node("ArgMax", ["e"], ["a2"], axis=-1, keepdims=0),
             helper.make_node("ArgMax", ["x"], ["a0"], axis=1, keepdims=0),
             helper.make_node("Cast", ["a0"], ["c0"], to=TensorProto.FLOAT)]
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 5])],
                       [vi("a2", TensorProto.INT64, ["N"]), vi("c0", TensorProto.FLOAT, ["N"])],
                       {"E": np.ones((5, 3), np.float32)})
    assert decision_inputs(load_model(model)) == {"s1": 1}


def test_class_heads_are_the_last_linear_layers_before_an_output():
    """A Gemm whose output reaches a graph output through its bias Add, a Reshape and a
    LogSoftmax is a classifier head, as is a MatMul head through a Transpose that keeps the last
    axis; a layer behind a residual Add, a LayerNorm-like op, a Transpose that moves the last
    axis, or a weight read twice is not."""
    rng = np.random.default_rng(0)
    w = {n: rng.standard_normal(s).astype(np.float32) for n, s in
         (("G", (12, 6)), ("b", (12,)), ("M", (6, 10)), ("R", (6, 6)), ("N", (6, 6)),
          ("P", (6, 9)), ("S", (6, 7)), ("Q", (6, 5)))}
    nodes = [helper.make_node("Gemm", ["x", "G"], ["g"], transB=1),
             helper.make_node("Add", ["g", "b"], ["gb"]),
             helper.make_node("Reshape", ["gb", "shape"], ["gr"]),
             helper.make_node("LogSoftmax", ["gr"], ["out_g"], axis=-1),
             helper.make_node("MatMul", ["x3", "M"], ["m"]),
             helper.make_node("Transpose", ["m"], ["out_m"], perm=[1, 0, 2]),
             helper.make_node("MatMul", ["x", "R"], ["r"]),
             helper.make_node("Add", ["r", "x"], ["out_r"]),
             helper.make_node("MatMul", ["x", "N"], ["n"]),
             helper.make_node("Sigmoid", ["n"], ["out_n"]),
             helper.make_node("MatMul", ["x3", "P"], ["p"]),
             helper.make_node("Transpose", ["p"], ["out_p"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["x3", "Q"], ["q"]),
             helper.make_node("Transpose", ["q"], ["out_q"]),  # no perm: every axis reversed
             helper.make_node("MatMul", ["x", "S"], ["out_s"]),
             helper.make_node("MatMul", ["x", "S"], ["out_s2"])]
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 6]),
                               vi("x3", TensorProto.FLOAT, ["T", "N", 6])],
                       [vi(o, TensorProto.FLOAT, []) for o in
                        ("out_g", "out_m", "out_r", "out_n", "out_p", "out_q", "out_s",
                         "out_s2")],
                       {**w, "shape": np.array([-1, 1, 12], np.int64)})
    loaded = load_model(model)
    heads = class_heads(loaded, find_weights(loaded, min_params=1))
    assert heads == {"G": "out_g", "M": "out_m"}
