"""rdonnx.graph.weights: which tensors are prunable weights."""

from __future__ import annotations

import numpy as np
import pytest
from _graphs import if_model, make_model, parse, tiny_mlp, vi
from onnx import TensorProto, helper, numpy_helper

from rdonnx.graph.model import load_model
from rdonnx.graph.weights import DEFAULT_MIN_PARAMS, Weight, find_weights, read_weights

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def _rand(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def _by_name(weights: list[Weight]) -> dict[str, Weight]:
    return {w.name: w for w in weights}


def _names(model, **kwargs) -> set[str]:
    return {w.name for w in find_weights(load_model(model), **kwargs)}


def test_conv_gemm_matmul_weights_found_biases_not():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        agraph (float[N, 3, 8, 8] x) => (float[N, 4] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, Wc, bc)
            f = Flatten <axis = 1> (c)
            g = Gemm <transB = 1> (f, Wg, bg)
            m = MatMul (g, Wm)
            y = Add (m, bm)
        }""")
    inits = {"Wc": _rand(8, 3, 3, 3), "bc": _rand(8), "Wg": _rand(16, 512), "bg": _rand(16),
             "Wm": _rand(16, 4), "bm": _rand(4)}
    model.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in inits.items())
    weights = _by_name(find_weights(load_model(model), min_params=1))
    assert list(weights) == ["Wc", "Wg", "Wm"]  # graph (initializer) order
    assert weights["Wc"].op_types == ("Conv",) and weights["Wc"].shape == (8, 3, 3, 3)
    assert weights["Wg"].op == "Gemm" and weights["Wg"].size == 16 * 512
    assert weights["Wm"].op_types == ("MatMul",)
    for w in weights.values():
        assert w.dtype == "FLOAT" and w.location == "initializer" and not w.in_subgraph


def test_matmul_weight_on_the_left():
    model = make_model([helper.make_node("MatMul", ["W", "x"], ["y"])],
                       [vi("x", F, [8, "N"])], [vi("y", F, [16, "N"])], {"W": _rand(16, 8)})
    assert _names(model, min_params=1) == {"W"}


def test_matmul_of_two_activations_has_no_weight():
    model = make_model([helper.make_node("MatMul", ["a", "b"], ["y"])],
                       [vi("a", F, [4, 8]), vi("b", F, [8, 4])], [vi("y", F, [4, 4])])
    assert _names(model, min_params=1) == set()


def test_weight_reached_through_transpose_cast_reshape():
    nodes = [
        helper.make_node("Transpose", ["Wt"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["a"]),
        helper.make_node("Cast", ["Wh"], ["wh"], to=F),
        helper.make_node("MatMul", ["a", "wh"], ["b"]),
        helper.make_node("Reshape", ["Wflat", "shape"], ["wr"]),
        helper.make_node("Identity", ["wr"], ["wri"]),
        helper.make_node("MatMul", ["b", "wri"], ["y"]),
    ]
    inits = [numpy_helper.from_array(_rand(16, 8), "Wt"),
             numpy_helper.from_array(_rand(16, 16, dtype=np.float16), "Wh"),
             numpy_helper.from_array(_rand(64), "Wflat"),
             numpy_helper.from_array(np.array([16, 4], np.int64), "shape")]
    model = make_model(nodes, [vi("x", F, ["N", 8])], [vi("y", F, ["N", 4])], inits)
    weights = _by_name(find_weights(load_model(model), min_params=1))
    assert set(weights) == {"Wt", "Wh", "Wflat"}  # never the int64 shape constant
    assert weights["Wh"].dtype == "FLOAT16"
    assert weights["Wflat"].shape == (64,)
    assert all(w.op_types == ("MatMul",) for w in weights.values())


def test_shared_weight_is_one_weight_with_all_its_ops():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]),
             helper.make_node("MatMul", ["x", "W"], ["b"]),
             helper.make_node("Gemm", ["x", "W"], ["c"]),
             helper.make_node("Sum", ["a", "b", "c"], ["y"])]
    model = make_model(nodes, [vi("x", F, [4, 8])], [vi("y", F, [4, 8])], {"W": _rand(8, 8)})
    weights = find_weights(load_model(model), min_params=1)
    assert len(weights) == 1
    assert weights[0].name == "W"
    assert weights[0].op_types == ("Gemm", "MatMul")
    assert weights[0].op == "Gemm/MatMul"


def test_shared_by_two_matmuls_only():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]),
             helper.make_node("MatMul", ["a", "W"], ["y"])]
    model = make_model(nodes, [vi("x", F, [4, 8])], [vi("y", F, [4, 8])], {"W": _rand(8, 8)})
    weights = find_weights(load_model(model), min_params=1)
    assert [(w.name, w.op_types) for w in weights] == [("W", ("MatMul",))]


def test_batchnorm_gather_and_int64_constants_not_found():
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        agraph (int64[N, 5] ids) => (float[N, 5, 32] y) {
            e = Gather <axis = 0> (table, ids)
            t = Transpose <perm = [0, 2, 1]> (e)
            n = BatchNormalization (t, scale, bias, mean, var)
            u = Transpose <perm = [0, 2, 1]> (n)
            r = Reshape (u, shape)
            m = MatMul (r, W)
            y = Add (m, pos)
        }""")
    inits = {"table": _rand(1000, 32), "scale": _rand(32), "bias": _rand(32),
             "mean": _rand(32), "var": np.abs(_rand(32)), "shape": np.array([0, 5, 32], np.int64),
             "W": _rand(32, 32), "pos": _rand(5, 32)}
    model.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in inits.items())
    assert _names(model, min_params=1) == {"W"}
    assert _names(model) == {"W"}  # 1024 params >= default threshold


def test_min_params_threshold_is_inclusive():
    model, _ = tiny_mlp(d_in=8, hidden=32, d_out=4)  # W1: 256, W2: 128
    assert DEFAULT_MIN_PARAMS == 256
    assert _names(model) == {"W1"}
    assert _names(model, min_params=256) == {"W1"}
    assert _names(model, min_params=257) == set()
    assert _names(model, min_params=128) == {"W1", "W2"}
    assert _names(model, min_params=1) == {"W1", "W2"}  # never the biases


def test_include_and_exclude_globs():
    model, _ = tiny_mlp()
    weights = _by_name(find_weights(load_model(model), min_params=1, include=["b*"]))
    assert set(weights) == {"W1", "W2", "b1", "b2"}
    assert weights["b1"].op_types == () and weights["b1"].op == "-"
    assert _names(model, min_params=1, exclude=["W1"]) == {"W2"}
    assert _names(model, min_params=1, exclude=["W?"]) == set()
    # exclude wins over include; include ignores min_params
    assert _names(model, min_params=10_000, include=["*"], exclude=["b2"]) == {"W1", "W2", "b1"}
    # glob matching is case-sensitive and whole-name
    assert _names(model, min_params=1, exclude=["w1"]) == {"W1", "W2"}
    assert _names(model, min_params=1, exclude=["W"]) == {"W1", "W2"}


def test_include_does_not_add_integer_tensors():
    model = make_model([helper.make_node("Reshape", ["x", "shape"], ["y"])],
                       [vi("x", F, [2, 6])], [vi("y", F, [3, 4])],
                       {"shape": np.array([3, 4], np.int64)})
    assert _names(model, include=["*"]) == set()


def test_constant_node_weight_found():
    w = numpy_helper.from_array(_rand(8, 16), "Wc")
    nodes = [helper.make_node("Constant", [], ["Wc"], value=w),
             helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(
                 np.array([1, 16], np.int64), "k")),
             helper.make_node("MatMul", ["x", "Wc"], ["m"]),
             helper.make_node("Reshape", ["m", "k"], ["y"])]
    model = make_model(nodes, [vi("x", F, [1, 8])], [vi("y", F, [1, 16])])
    weights = find_weights(load_model(model), min_params=1)
    assert [(w.name, w.location, w.shape, w.in_subgraph) for w in weights] == \
        [("Wc", "constant", (8, 16), False)]


@pytest.mark.parametrize("constant", [False, True])
def test_if_branch_weights_found_in_subgraph(constant):
    model, _ = if_model(constant=constant)
    weights = _by_name(find_weights(load_model(model), min_params=1))
    assert set(weights) == {"W", "Wt"}
    assert weights["W"].in_subgraph is False and weights["W"].location == "initializer"
    assert weights["Wt"].in_subgraph is True
    assert weights["Wt"].location == ("constant" if constant else "initializer")
    assert weights["Wt"].op_types == ("MatMul",)


def test_loop_body_weight_found_in_subgraph():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["h_in", "Wl"], ["h_out"])],
        "body",
        [vi("i", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []),
         vi("h_in", F, [1, 8])],
        [vi("cond_out", TensorProto.BOOL, []), vi("h_out", F, [1, 8])],
        [numpy_helper.from_array(_rand(8, 8), "Wl")])
    nodes = [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)]
    model = make_model(nodes, [vi("x", F, [1, 8]), vi("n", TensorProto.INT64, [])],
                       [vi("y", F, [1, 8])])
    weights = find_weights(load_model(model), min_params=1)
    assert [(w.name, w.in_subgraph, w.op) for w in weights] == [("Wl", True, "MatMul")]


def test_lstm_w_and_r_found_not_b():
    hidden, inp = 8, 4
    inits = {"W": _rand(1, 4 * hidden, inp), "R": _rand(1, 4 * hidden, hidden),
             "B": _rand(1, 8 * hidden)}
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=hidden)]
    model = make_model(nodes, [vi("x", F, [5, 1, inp])], [vi("y", F, [5, 1, 1, hidden])], inits)
    weights = _by_name(find_weights(load_model(model), min_params=1))
    assert set(weights) == {"W", "R"}
    assert weights["R"].op_types == ("LSTM",) and weights["R"].shape == (1, 32, 8)


def test_gru_and_conv_transpose_weights_found():
    inits = {"Wd": _rand(4, 2, 3, 3), "W": _rand(1, 3 * 4, 2), "R": _rand(1, 3 * 4, 4)}
    nodes = [helper.make_node("ConvTranspose", ["x", "Wd"], ["d"]),
             helper.make_node("GRU", ["s", "W", "R"], ["g"], hidden_size=4)]
    model = make_model(nodes, [vi("x", F, [1, 4, 5, 5]), vi("s", F, [3, 1, 2])],
                       [vi("d", F, [1, 2, 7, 7]), vi("g", F, [3, 1, 1, 4])], inits)
    weights = _by_name(find_weights(load_model(model), min_params=1))
    assert set(weights) == {"Wd", "W", "R"}
    assert weights["Wd"].op == "ConvTranspose" and weights["W"].op == "GRU"


def test_fp16_weights_found():
    model, arrays = tiny_mlp(dtype=np.float16)
    weights = _by_name(find_weights(load_model(model), min_params=1))
    assert set(weights) == {"W1", "W2"}
    assert {w.dtype for w in weights.values()} == {"FLOAT16"}
    values = read_weights(load_model(model), list(weights.values()))
    assert values["W1"].dtype == np.float16
    np.testing.assert_array_equal(values["W1"], arrays["W1"])


def test_integer_weight_of_matmul_not_found():
    """MatMulInteger-style int8 weights feeding a float MatMul through Cast are not float."""
    nodes = [helper.make_node("Cast", ["Wq"], ["w"], to=F),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = make_model(nodes, [vi("x", F, [1, 8])], [vi("y", F, [1, 8])],
                       {"Wq": np.ones((8, 8), np.int8)})
    assert _names(model, min_params=1) == set()


def test_read_weights_returns_current_values():
    model, arrays = tiny_mlp()
    loaded = load_model(model)
    values = read_weights(loaded, find_weights(loaded, min_params=1))
    assert set(values) == {"W1", "W2"}
    for name, value in values.items():
        np.testing.assert_array_equal(value, arrays[name])
