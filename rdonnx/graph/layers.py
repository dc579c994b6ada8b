"""Layer discovery in the graph: the layer input each weight multiplies (`LayerInput`), and the
output of each weight's consumer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import onnx

from rdonnx.algo.layout import LayerInput
from rdonnx.graph.model import Model, iter_graphs, tensor_slots
from rdonnx.graph.weights import FLOAT_TYPES, LAYOUT_OPS, WEIGHT_INPUTS, Weight, find_weights


def layer_inputs(model: Model, weights: Sequence[Weight]) -> dict[str, LayerInput]:
    """The layer input of each weight that feeds main-graph consumers directly.

    Weights reached through reshaping operators, used only inside subgraphs, feeding recurrent
    state (LSTM/GRU/RNN `R`), or shared by consumers that disagree on the layout have no entry:
    the activation criterion falls back to magnitude for them.
    """
    names = {w.name for w in weights}
    shapes = {w.name: w.shape for w in weights}
    found: dict[str, list[LayerInput]] = {}
    for node in model.proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for index, name in enumerate(node.input):
            if name in names:
                entry = _entry(node, index, name, shapes[name], attrs)
                found.setdefault(name, []).append(entry)
    result = {}
    for name, entries in found.items():
        uses = sum(1 for node in _all_nodes(model) for i in node.input if i == name)
        if None not in entries and len(entries) == uses and len(
                {(e.in_axis, e.row_axis, e.feature_axis, e.op, e.kernel, e.strides,
                  e.dilations, e.pads, e.auto_pad, e.groups) for e in entries}) == 1:
            result[name] = replace(entries[0], others=tuple(e.tensor for e in entries[1:]))
    return result


def output_axes(model: Model, weights: Sequence[Weight]) -> dict[str, int | None]:
    """The axis of each tensor's output channels (one quantization step each): the layer's
    output rows where its layer input is known, the gate rows (axis 1) of LSTM / GRU / RNN
    weights, else axis 0 (the rows of an embedding table); None for vectors."""
    entries = layer_inputs(model, weights)
    recurrent = {name for node in _all_nodes(model) if node.op_type in ("LSTM", "GRU", "RNN")
                 for name in node.input[1:3]}
    axes: dict[str, int | None] = {}
    for w in weights:
        if w.name in entries:
            axes[w.name] = entries[w.name].row_axis
        elif len(w.shape) == 3 and w.name in recurrent:
            axes[w.name] = 1
        else:
            axes[w.name] = 0 if len(w.shape) >= 2 else None
    return axes


def layer_biases(model: Model, weights: Sequence[Weight]) -> dict[str, Weight]:
    """The bias each weight's layer adds to its output rows, where one can absorb a change of
    the output mean (`algo.layout.output_shift`): Conv's B, Gemm's C, or the constant of the
    one Add that takes a 2-D MatMul's output. A weight used by several such nodes (an unrolled
    recurrent layer) qualifies when they all add the same bias. The bias must be a main-graph
    float tensor of one value per output row, used by those nodes alone and not itself among
    `weights`."""
    entries = layer_inputs(model, weights)
    slots = tensor_slots(model.proto)
    main = model.proto.graph
    taken = {w.name for w in weights}
    uses: dict[str, list[onnx.NodeProto]] = {}
    for node in _all_nodes(model):
        for name in node.input:
            uses.setdefault(name, []).append(node)
    found: dict[str, Weight] = {}
    for w in weights:
        entry = entries.get(w.name)
        if entry is None:
            continue
        rows = w.shape[entry.row_axis]
        candidates = {_bias_of(node, w, uses) for node in uses.get(w.name, ())}
        bias = candidates.pop() if len(candidates) == 1 else None
        slot = slots.get(bias) if bias else None
        if slot is None or slot.graph is not main or slot.sparse is not None or \
                bias in taken or len(uses.get(bias, ())) != len(uses[w.name]) or \
                slot.tensor.data_type not in FLOAT_TYPES or \
                [d for d in slot.dims if d != 1] != [rows]:
            continue
        found[w.name] = Weight(bias, slot.dims, onnx.TensorProto.DataType.Name(
            slot.tensor.data_type), (uses[bias][0].op_type,),
            "constant" if slot.node is not None else "initializer", False)
    return found


def _bias_of(node: onnx.NodeProto, w: Weight, uses: dict[str, list[onnx.NodeProto]]
             ) -> str | None:
    """The bias input of a Conv / Gemm, or the other input of the one Add after a MatMul."""
    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[1] == w.name:
        return node.input[2] or None
    if node.op_type == "MatMul" and len(w.shape) == 2 and node.input[1] == w.name:
        after = uses.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type == "Add":
            return next((i for i in after[0].input if i != node.output[0]), None)
    return None


def _all_nodes(model: Model):
    for graph in iter_graphs(model.proto.graph):
        yield from graph.node


def _entry(node: onnx.NodeProto, index: int, name: str, shape: tuple[int, ...],
           attrs: dict) -> LayerInput | None:
    op = node.op_type
    rank = len(shape)
    if node.domain not in ("", "ai.onnx") or rank < 2:
        return None
    if op == "MatMul":
        if index == 1:
            return LayerInput(name, node.input[0], op, rank - 2, rank - 1, -1)
        return LayerInput(name, node.input[1], op, rank - 1, rank - 2, -2)
    if op == "Gemm" and index == 1:
        feature_axis = 0 if attrs.get("transA", 0) else 1
        in_axis, row_axis = (1, 0) if attrs.get("transB", 0) else (0, 1)
        return LayerInput(name, node.input[0], op, in_axis, row_axis, feature_axis)
    if op in ("LSTM", "GRU", "RNN") and index == 1 and rank == 3:
        return LayerInput(name, node.input[0], op, 2, 1, -1)
    if op == "Conv" and index == 1 and rank in (3, 4):
        spatial = rank - 2
        return LayerInput(
            name, node.input[0], op, None, 0, 1,
            kernel=tuple(shape[2:]),
            strides=tuple(attrs.get("strides", [1] * spatial)),
            dilations=tuple(attrs.get("dilations", [1] * spatial)),
            pads=tuple(attrs.get("pads", [0] * 2 * spatial)),
            auto_pad=_text(attrs.get("auto_pad", "NOTSET")),
            groups=int(attrs.get("group", 1)))
    if op == "ConvTranspose" and index == 1:
        return LayerInput(name, node.input[0], op, 0, 1, 1)
    return None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def consumer_outputs(model: Model, weights: Sequence[Weight]) -> dict[str, tuple[str, str]]:
    """(output tensor, op) of the main-graph consumer of each weight, followed through
    layout-only operators; weights used only in subgraphs have no entry."""
    nodes = list(model.proto.graph.node)
    users: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            users.setdefault(name, []).append(node)
    found = {}
    for w in weights:
        tensor, hops = w.name, 0
        while hops < 8 and tensor in users:
            node = users[tensor][0]
            if node.op_type in WEIGHT_INPUTS and node.domain in ("", "ai.onnx"):
                found[w.name] = (node.output[0], node.op_type)
                break
            if node.op_type not in LAYOUT_OPS:
                break
            tensor, hops = node.output[0], hops + 1
    return found


def lookup_indices(model: Model, tables: Sequence[Weight]) -> dict[str, str]:
    """The graph input whose values pick the rows of each lookup table: a main-graph tensor of
    rank 2 or more read only by Gather nodes (as their data, along axis 0) that all take their
    indices straight from one graph input (a token embedding reading `input_ids`). Tables
    whose indices are computed inside the graph are left out."""
    main = model.proto.graph
    graph_inputs = {v.name for v in main.input}
    names = {w.name for w in tables if len(w.shape) >= 2 and not w.in_subgraph}
    reads: dict[str, set[str]] = {}
    refused: set[str] = set()
    for graph in iter_graphs(main):
        for node in graph.node:
            for slot, name in enumerate(node.input):
                if name not in names:
                    continue
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                if graph is not main or node.op_type != "Gather" or slot != 0 or axis != 0 \
                        or node.input[1] not in graph_inputs:
                    refused.add(name)
                else:
                    reads.setdefault(name, set()).add(node.input[1])
    return {name: next(iter(given)) for name, given in sorted(reads.items())
            if name not in refused and len(given) == 1}


def decision_inputs(model: Model) -> dict[str, int]:
    """The scores behind the graph's own discrete decisions: the input (and axis) of every
    main-graph ArgMax whose result another node reads (greedy decoding unrolled into the
    graph). A small change of those scores can flip a decision and change everything
    computed from it. Scores that no node computes (a graph input) cannot change."""
    main = model.proto.graph
    read = {name for node in main.node for name in node.input}
    computed = {name for node in main.node for name in node.output}
    return {node.input[0]: next((a.i for a in node.attribute if a.name == "axis"), 0)
            for node in main.node if node.op_type == "ArgMax" and node.output[0] in read
            and node.input[0] in computed}


# operators between a classifier's last linear layer and the graph output that keep its output
# channels on the output's last axis (a Transpose only when it keeps the last axis last)
_HEAD_PASS = frozenset({"Reshape", "Identity", "Cast", "Add", "Softmax", "LogSoftmax",
                        "Transpose"})


def class_heads(model: Model, weights: Sequence[Weight]) -> dict[str, str]:
    """The classifier heads: each weight of a main-graph Gemm / MatMul whose output channels
    become the last axis of a graph output (through a bias Add, a reshape, a softmax), mapped to
    that output. Whether the channel count matches the output's last axis is for the caller to
    check on real outputs (a Reshape's target is data)."""
    main = model.proto.graph
    entries = layer_inputs(model, weights)
    producer = {name: node for node in main.node for name in node.output}
    graph_inputs = {v.name for v in main.input}
    readers: dict[str, int] = {}
    for node in _all_nodes(model):
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    heads = {}
    for output in main.output:
        tensor, hops = output.name, 0
        while hops < 8 and tensor in producer:
            node = producer[tensor]
            if node.op_type in ("Gemm", "MatMul"):
                found = [n for n in node.input[:2] if n in entries and readers.get(n) == 1]
                if len(found) == 1:
                    heads[found[0]] = output.name
                break
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [])
            if node.op_type not in _HEAD_PASS or node.op_type == "Transpose" and \
                    (not perm or perm[-1] != len(perm) - 1) or \
                    node.op_type in ("Softmax", "LogSoftmax") and \
                    next((a.i for a in node.attribute if a.name == "axis"), -1) != -1:
                break
            computed = [n for n in node.input if n in graph_inputs or
                        n in producer and producer[n].op_type != "Constant"]
            if node.op_type == "Add" and len(computed) != 1:  # a residual sum, not a bias
                break
            tensor, hops = (computed[0] if node.op_type == "Add" else node.input[0]), hops + 1
    return heads


def head_outputs(model: Model) -> set[str]:
    """The graph outputs a classifier head produces (`class_heads` over every weight, however
    small): what `--metric kl` reads as class scores besides [batch, classes] outputs."""
    return set(class_heads(model, find_weights(model, min_params=1)).values())
