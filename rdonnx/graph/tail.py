"""Linear tails: graph outputs that are a constant matrix product of an earlier tensor, reshaped.

When an output is `y = reshape(h @ M + c)` with M and c constant (a classifier's Gemm, a language
model's lm_head), a change of h changes the output by `dh @ M`, whose squared norm is
`dh (M M^T) dh^T` = `||dh @ F||^2` with F F^T = M M^T: probes measuring nmse stop at h and
compute `(h - h_ref) @ F` instead of the product with M (F has K columns or fewer, M has N)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.numpy_helper

from rdonnx.graph.cut import node_reads

# ops that move or relabel entries without changing their sum of squares
NORM_PRESERVING = frozenset({"Reshape", "Transpose", "Identity", "Flatten", "Squeeze",
                             "Unsqueeze"})


@dataclass(frozen=True)
class LinearTail:
    """Graph output `output` = the norm-preserving reshaping of `scale * h @ M (+ constant)`,
    with M = `matrix` ([K, N]; stored [N, K] when `transposed`)."""

    output: str
    input: str  # h
    matrix: str
    transposed: bool
    scale: float
    nodes: tuple[int, ...]  # the tail's nodes (indices into graph.node)
    reads: frozenset[str]  # constants the tail reads (matrix, bias, shapes): a probe changing
    # one of them cannot use the tail


def linear_tails(graph: onnx.GraphProto, constants: Iterable[str]) -> dict[str, LinearTail]:
    """Per graph output with a linear tail, the tail. `constants`: tensors that do not change
    with the data (initializers, weights fed as inputs); the main graph only."""
    constants = set(constants) | {t.name for t in graph.initializer}
    producer = {o: i for i, node in enumerate(graph.node) for o in node.output if o}
    readers = Counter(n for node in graph.node for n in node_reads(node))
    outputs = Counter(v.name for v in graph.output)
    ranks = {t.name: len(t.dims) for t in graph.initializer}
    ranks.update({v.name: len(v.type.tensor_type.shape.dim) for v in graph.input
                  if v.type.tensor_type.HasField("shape")})
    found = {}
    for name in outputs:
        if readers[name] or outputs[name] > 1:
            continue
        tail = _tail(graph, name, producer, readers, outputs, constants, ranks)
        if tail is not None:
            found[name] = tail
    return found


def _tail(graph: onnx.GraphProto, output: str, producer: dict[str, int], readers: Counter,
          outputs: Counter, constants: set[str], ranks: dict[str, int]) -> LinearTail | None:
    """The linear tail ending at `output`, if the nodes producing it form one."""
    nodes: list[int] = []
    reads: set[str] = set()
    tensor = output
    while tensor in producer:
        if tensor != output and (readers[tensor] != 1 or outputs[tensor]):
            return None  # read elsewhere too: the tail's nodes cannot be skipped
        index = producer[tensor]
        node = graph.node[index]
        inputs = list(node.input)
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute):
            return None
        nodes.append(index)
        if node.op_type in NORM_PRESERVING and inputs:
            reads.update(n for n in inputs[1:] if n)
            tensor = inputs[0]
        elif node.op_type in ("Add", "Sub") and len(inputs) == 2 and \
                sum(n in constants for n in inputs) == 1:
            constant = inputs[0] if inputs[0] in constants else inputs[1]
            reads.add(constant)
            tensor = inputs[1] if constant == inputs[0] else inputs[0]
        elif node.op_type == "MatMul" and len(inputs) == 2 and inputs[1] in constants and \
                ranks.get(inputs[1]) == 2 and inputs[0] not in constants:
            return LinearTail(output, inputs[0], inputs[1], False, 1.0, tuple(sorted(nodes)),
                              frozenset(reads | {inputs[1]}))
        elif node.op_type == "Gemm" and inputs[1] in constants and inputs[0] not in constants \
                and all(n in constants for n in inputs[2:] if n):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0):
                return None
            return LinearTail(output, inputs[0], inputs[1], bool(attrs.get("transB", 0)),
                              float(attrs.get("alpha", 1.0)), tuple(sorted(nodes)),
                              frozenset(reads | {n for n in inputs[1:] if n}))
        else:
            return None
    return None


def gram_factor(matrix: np.ndarray, transposed: bool = False, scale: float = 1.0) \
        -> np.ndarray | None:
    """F ([K, rank], float32) with F F^T = scale^2 M M^T, so ||d @ M||^2 = ||d @ F||^2 for
    any d ([..., K]): from the eigen-decomposition of the Gram matrix in float64. None when F
    has as many columns as M (nothing saved)."""
    m = np.asarray(matrix, dtype=np.float64)
    m = m.T if transposed else m
    values, vectors = np.linalg.eigh((m @ m.T) * scale**2)
    keep = values > max(float(values.max(initial=0.0)), 0.0) * 1e-12
    if keep.sum() >= m.shape[1]:
        return None
    return (vectors[:, keep] * np.sqrt(values[keep])).astype(np.float32)


def reference_name(tail: LinearTail) -> str:
    """The slice input fed with the tail input's reference value."""
    return f"rdonnx.tail/{tail.output}/reference"


def error_name(tail: LinearTail) -> str:
    """The slice output holding (h - h_ref) @ F, whose sum of squares is the output's error."""
    return f"rdonnx.tail/{tail.output}/error"


def error_graph(tail: LinearTail, factor: np.ndarray, elem_type: int) \
        -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], onnx.ValueInfoProto]:
    """Nodes computing `error_name(tail)` from the tail's input and its reference (an input of
    `elem_type`, declared by the returned value info), their initializers."""
    prefix = f"rdonnx.tail/{tail.output}/"
    ref = reference_name(tail)
    h = tail.input
    nodes = []
    if elem_type != onnx.TensorProto.FLOAT:
        nodes += [onnx.helper.make_node("Cast", [h], [prefix + "input"], to=onnx.TensorProto.FLOAT),
                  onnx.helper.make_node("Cast", [ref], [prefix + "ref"], to=onnx.TensorProto.FLOAT)]
        h, ref = prefix + "input", prefix + "ref"
    nodes += [onnx.helper.make_node("Sub", [h, ref], [prefix + "change"]),
              onnx.helper.make_node("Reshape", [prefix + "change", prefix + "rows"],
                                    [prefix + "flat"]),
              onnx.helper.make_node("MatMul", [prefix + "flat", prefix + "factor"],
                                    [error_name(tail)])]
    constants = [onnx.numpy_helper.from_array(np.array([-1, factor.shape[0]], np.int64),
                                              prefix + "rows"),
                 onnx.numpy_helper.from_array(np.ascontiguousarray(factor), prefix + "factor")]
    return nodes, constants, onnx.helper.make_tensor_value_info(reference_name(tail), elem_type,
                                                                None)
