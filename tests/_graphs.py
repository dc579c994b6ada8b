"""Tiny ONNX graphs and helpers shared by the unit tests (built in memory, never downloaded)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 17


def vi(name: str, elem: int, shape: Sequence[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


def make_model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
               outputs: Sequence[onnx.ValueInfoProto],
               initializers: Mapping[str, np.ndarray] | Sequence[TensorProto] = (),
               ir_version: int = IR_VERSION, opset: int = OPSET) -> onnx.ModelProto:
    if isinstance(initializers, Mapping):
        initializers = [numpy_helper.from_array(np.asarray(a), n) for n, a in initializers.items()]
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    assert model.ir_version, "always set ir_version in the text"
    return model


def tiny_mlp(seed: int = 0, d_in: int = 8, hidden: int = 32, d_out: int = 4,
        dtype: type = np.float32) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x[N, d_in] -> MatMul W1 + b1 -> Relu -> MatMul W2 + b2 -> y[N, d_out]."""
    rng = np.random.default_rng(seed)
    arrays = {
        "W1": rng.standard_normal((d_in, hidden)).astype(dtype),
        "b1": rng.standard_normal(hidden).astype(dtype),
        "W2": rng.standard_normal((hidden, d_out)).astype(dtype),
        "b2": rng.standard_normal(d_out).astype(dtype),
    }
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("MatMul", ["h", "W2"], ["y0"]),
        helper.make_node("Add", ["y0", "b2"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", elem, ["N", d_in])], [vi("y", elem, ["N", d_out])],
                       arrays)
    return model, arrays


def tiny_mlp_reference(x: np.ndarray, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    h = np.maximum(x @ arrays["W1"] + arrays["b1"], 0)
    return h @ arrays["W2"] + arrays["b2"]


def ort_run(model: onnx.ModelProto | str | Path, feed: Mapping[str, np.ndarray],
            optimize: bool = True) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(feed))


def sparsify(array: np.ndarray, density: float, seed: int = 0) -> np.ndarray:
    """A copy with exactly round(density * size) nonzero entries (the others set to 0)."""
    rng = np.random.default_rng(seed)
    flat = array.reshape(-1).copy()
    keep = int(round(density * flat.size))
    zero = rng.permutation(flat.size)[keep:]
    flat[zero] = 0
    flat[flat == 0] = 0  # keep -0.0 out
    out = flat.reshape(array.shape)
    assert np.count_nonzero(out) == keep, "test weights must have no exact zeros"
    return out


def if_model(seed: int = 0, constant: bool = False) -> tuple[onnx.ModelProto,
                                                              dict[str, np.ndarray]]:
    """y = If(c, then: x @ Wt (Wt an initializer or Constant inside the branch), else: x @ W)."""
    rng = np.random.default_rng(seed)
    arrays = {"W": rng.standard_normal((8, 16)).astype(np.float32),
              "Wt": rng.standard_normal((8, 16)).astype(np.float32)}
    then_nodes = [helper.make_node("MatMul", ["x", "Wt"], ["t"])]
    then_inits = [numpy_helper.from_array(arrays["Wt"], "Wt")]
    if constant:
        then_nodes.insert(0, helper.make_node("Constant", [], ["Wt"],
                                              value=numpy_helper.from_array(arrays["Wt"], "Wt")))
        then_inits = []
    then = helper.make_graph(then_nodes, "then", [], [vi("t", TensorProto.FLOAT, ["N", 16])],
                             then_inits)
    other = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["e"])], "else", [],
                              [vi("e", TensorProto.FLOAT, ["N", 16])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 8]),
                               vi("c", TensorProto.BOOL, [])],
                       [vi("y", TensorProto.FLOAT, ["N", 16])], {"W": arrays["W"]})
    return model, arrays


def tailed_model(residual: bool = False, shared: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul W1 -> Relu -> h; y = Reshape(0.5 * h @ Wc^T + bc) (Gemm, transB); z = h @ M +
    b (MatMul, Add). `residual`: z adds x-derived data instead of a constant; `shared`: the
    Gemm's result is a second output too."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"]),
             helper.make_node("Relu", ["a"], ["h"]),
             helper.make_node("Gemm", ["h", "Wc", "bc"], ["g"], transB=1, alpha=0.5),
             helper.make_node("Reshape", ["g", "shape"], ["y"]),
             helper.make_node("MatMul", ["h", "M"], ["m"]),
             helper.make_node("Add", ["m", "a2" if residual else "b"], ["z"])]
    if residual:
        nodes.insert(0, helper.make_node("MatMul", ["x", "W2"], ["a2"]))
    outputs = [vi("y", TensorProto.FLOAT, ["N", 8, 8]), vi("z", TensorProto.FLOAT, ["N", 48])]
    if shared:
        outputs.append(vi("g", TensorProto.FLOAT, ["N", 64]))
    arrays = {"W1": rng.standard_normal((8, 16)), "Wc": rng.standard_normal((64, 16)),
              "bc": rng.standard_normal(64), "M": rng.standard_normal((16, 48)),
              "b": rng.standard_normal(48), "W2": rng.standard_normal((8, 48))}
    initializers = {k: v.astype(np.float32) for k, v in arrays.items()}
    initializers["shape"] = np.array([-1, 8, 8], np.int64)
    return make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 8])], outputs, initializers)
