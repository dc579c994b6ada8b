"""rdonnx.graph.tail: which outputs are a constant matrix product of an earlier tensor, and the
Gram factor that gives their squared error from that tensor's change."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _graphs import make_model, tailed_model, vi
from onnx import TensorProto, helper

from rdonnx.graph.model import load_model
from rdonnx.graph.tail import error_graph, error_name, gram_factor, linear_tails, reference_name
from rdonnx.runtime.session import create_session

RNG = np.random.default_rng(0)


def test_a_gemm_and_a_matmul_with_constant_operands_are_tails():
    graph = tailed_model().graph
    tails = linear_tails(graph, [])
    assert set(tails) == {"y", "z"}
    y, z = tails["y"], tails["z"]
    assert (y.input, y.matrix, y.transposed, y.scale) == ("h", "Wc", True, 0.5)
    assert [graph.node[i].op_type for i in y.nodes] == ["Gemm", "Reshape"]
    assert y.reads == {"Wc", "bc", "shape"}
    assert (z.input, z.matrix, z.transposed, z.scale) == ("h", "M", False, 1.0)
    assert z.reads == {"M", "b"}


def test_data_added_to_a_product_or_a_product_read_elsewhere_is_no_tail():
    assert set(linear_tails(tailed_model(residual=True).graph, [])) == {"y"}
    assert set(linear_tails(tailed_model(shared=True).graph, [])) == {"z"}


def test_weights_fed_as_inputs_count_as_constants_and_data_does_not():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 4]),
                               vi("W", TensorProto.FLOAT, [4, 32])],
                       [vi("y", TensorProto.FLOAT, ["N", 32])])
    assert linear_tails(model.graph, []) == {}  # W could be data
    assert linear_tails(model.graph, ["W"])["y"].matrix == "W"
    gemm = make_model([helper.make_node("Gemm", ["x", "W"], ["y"], transA=1)],
                      [vi("x", TensorProto.FLOAT, [4, "N"])],
                      [vi("y", TensorProto.FLOAT, ["N", 32])],
                      {"W": np.ones((4, 32), np.float32)})
    assert linear_tails(gemm.graph, []) == {}  # transA: rows of x are not samples


@pytest.mark.parametrize("transposed", [False, True])
def test_the_gram_factor_gives_the_squared_norm_of_the_product(transposed):
    m = RNG.standard_normal((16, 48))
    stored = m.T.copy() if transposed else m
    factor = gram_factor(stored, transposed, scale=0.5)
    assert factor is not None and factor.shape == (16, 16)
    d = RNG.standard_normal((5, 3, 16))
    expected = np.sum((0.5 * d @ m) ** 2)
    assert np.sum((d.reshape(-1, 16) @ factor) ** 2) == pytest.approx(expected, rel=1e-5)


def test_a_low_rank_matrix_keeps_only_its_rank_and_a_wide_one_saves_nothing():
    low = RNG.standard_normal((16, 3)) @ RNG.standard_normal((3, 48))
    factor = gram_factor(low)
    assert factor.shape == (16, 3)
    d = RNG.standard_normal((7, 16))
    assert np.sum((d @ factor) ** 2) == pytest.approx(np.sum((d @ low) ** 2), rel=1e-5)
    assert gram_factor(RNG.standard_normal((16, 12))) is None  # N <= K: the product is cheaper


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_the_error_graph_computes_the_change_times_the_factor(dtype):
    """In ONNX Runtime, from the tail's input and its reference (cast to float32 first)."""
    tail = linear_tails(tailed_model().graph, [])["z"]
    factor = gram_factor(RNG.standard_normal((16, 48)))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, constants, reference = error_graph(tail, factor, elem)
    graph = helper.make_graph(nodes, "e", [vi("h", elem, [2, 3, 16]), reference],
                              [onnx.ValueInfoProto(name=error_name(tail))], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session, _ = create_session(model.SerializeToString(), load_model(model), "cpu")
    h, ref = RNG.standard_normal((2, 3, 16)).astype(dtype), RNG.standard_normal((2, 3, 16)
                                                                               ).astype(dtype)
    got = session.run(None, {"h": h, reference_name(tail): ref})[0]
    change = h.astype(np.float32) - ref.astype(np.float32)
    np.testing.assert_allclose(got, change.reshape(-1, 16) @ factor, rtol=1e-4, atol=1e-4)
