"""Find the prunable weights: float tensors feeding the weight inputs of linear operators."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from rdonnx.choices import DEFAULT_MIN_PARAMS
from rdonnx.graph.model import Model, TensorSlot, iter_graphs, slot_array, tensor_slots

# Operator -> input positions that carry a weight (MatMul / Gemm: whichever side is constant).
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1),
    "LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2),
}
# Operators that only move or retype data: a weight reaches its consumer through them.
LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Identity", "Cast", "Slice", "Concat",
                        "Unsqueeze", "Squeeze"})
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16})


@dataclass(frozen=True)
class Weight:
    """One prunable weight tensor (shared by all the nodes that use it)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # ONNX element type name, e.g. "FLOAT"
    op_types: tuple[str, ...]  # the operators it feeds ("" when only named by --include)
    location: str  # "initializer" or "constant" (a Constant node's value)
    in_subgraph: bool

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def op(self) -> str:
        return "/".join(self.op_types) or "-"


def find_weights(model: Model, min_params: int = DEFAULT_MIN_PARAMS,
                 include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[Weight]:
    """The prunable weights of `model`, in graph order.

    A float initializer (or Constant node value, also inside If/Loop/Scan bodies) is prunable
    when it reaches a weight input of Conv, ConvTranspose, Gemm, MatMul, LSTM, GRU or RNN,
    directly or through layout-only operators, and has at least `min_params` elements.
    `include` globs add any float tensor; `exclude` globs remove matches.
    """
    slots = tensor_slots(model.proto)
    main = model.proto.graph
    producers = {out: node for g in iter_graphs(main) for node in g.node for out in node.output}
    found: dict[str, list[str]] = {}
    for graph in iter_graphs(main):
        for node in graph.node:
            for index in WEIGHT_INPUTS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") \
                    else ():
                if index < len(node.input) and node.input[index]:
                    for name in _trace(node.input[index], slots, producers):
                        ops = found.setdefault(name, [])
                        if node.op_type not in ops:
                            ops.append(node.op_type)
    weights = []
    for name, slot in slots.items():
        if slot.tensor.data_type not in FLOAT_TYPES:
            continue
        ops = found.get(name)
        size = int(np.prod(slot.dims, dtype=np.int64))
        included = any(fnmatch.fnmatchcase(name, p) for p in include)
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if included or (ops is not None and size >= min_params):
            weights.append(Weight(
                name=name, shape=slot.dims,
                dtype=TensorProto.DataType.Name(slot.tensor.data_type),
                op_types=tuple(sorted(ops or ())),
                location="constant" if slot.node is not None else "initializer",
                in_subgraph=slot.graph is not main))
    return weights


def _trace(name: str, slots: dict[str, TensorSlot],
           producers: dict[str, onnx.NodeProto]) -> list[str]:
    """The float constant tensors that flow into `name` through layout-only operators."""
    if name in slots:
        return [name] if slots[name].tensor.data_type in FLOAT_TYPES else []
    node = producers.get(name)
    if node is None or node.op_type not in LAYOUT_OPS or not node.input:
        return []
    inputs = node.input if node.op_type == "Concat" else node.input[:1]
    return [w for i in inputs if i for w in _trace(i, slots, producers)]


def read_weights(model: Model, weights: Sequence[Weight]) -> dict[str, np.ndarray]:
    """The current values of `weights` (external data read from disk)."""
    slots = tensor_slots(model.proto)
    return {w.name: slot_array(model, slots[w.name]) for w in weights}


def find_codable(model: Model, prunable: Sequence[Weight],
                 min_params: int = DEFAULT_MIN_PARAMS) -> list[Weight]:
    """Other float tensors of at least `min_params` elements (embedding tables, large
    constants): not pruned, but quantized and entropy-coded in an `.rdonnx` artifact."""
    taken = {w.name for w in prunable}
    slots = tensor_slots(model.proto)
    consumers: dict[str, list[str]] = {}
    for graph in iter_graphs(model.proto.graph):
        for node in graph.node:
            for name in node.input:
                ops = consumers.setdefault(name, [])
                if node.op_type not in ops:
                    ops.append(node.op_type)
    main = model.proto.graph
    return [Weight(name=name, shape=slot.dims,
                   dtype=TensorProto.DataType.Name(slot.tensor.data_type),
                   op_types=tuple(sorted(consumers.get(name, ()))),
                   location="constant" if slot.node is not None else "initializer",
                   in_subgraph=slot.graph is not main)
            for name, slot in slots.items()
            if name not in taken and slot.tensor.data_type in FLOAT_TYPES
            and int(np.prod(slot.dims, dtype=np.int64)) >= min_params]
