"""Second moments of each weight's layer input, streamed from ONNX Runtime batch by batch.

For a weight W of a linear operator, E[x_j^2] of the input feature j that W multiplies is what
the `activation` criterion (Gao et al.'s output-distortion importance, Wanda's score) needs. The
consumer's data input is exposed as an extra graph output; convolutions are unfolded so every
(input channel, kernel position) gets its own moment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import torch

from .model import Model
from .weights import Weight


@dataclass(frozen=True)
class LayerInput:
    """How one weight meets its layer input: which tensor, and along which axes.

    `in_axis` is the weight axis that indexes input features (None for convolutions, whose
    moments have the weight's [in, *kernel] layout); `row_axis` indexes output rows.
    """

    weight: str
    tensor: str  # the consumer's data input
    op: str
    in_axis: int | None
    row_axis: int
    feature_axis: int = -1  # axis of the activation that holds the features (non-conv)
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # begin..., end... (ONNX order)
    auto_pad: str = "NOTSET"
    groups: int = 1
    others: tuple[str, ...] = ()  # inputs of further consumers of a shared weight, same layout

    @property
    def tensors(self) -> tuple[str, ...]:
        """Every layer input the weight multiplies (one per consumer node)."""
        return (self.tensor, *self.others)


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


def _all_nodes(model: Model):
    from .model import iter_graphs

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


class SecondMoments:
    """Running mean of x^2 per input feature (per channel and kernel position for Conv)."""

    def __init__(self, entry: LayerInput):
        self.entry = entry
        self.mean: torch.Tensor | None = None
        self.count = 0

    def add_batch(self, x: np.ndarray) -> None:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if self.entry.op == "Conv":
            columns = _unfold(t, self.entry)  # [features, positions]
        else:
            t = t.movedim(self.entry.feature_axis, -1)
            columns = t.reshape(-1, t.shape[-1]).T
        squares = columns.double().pow(2)
        n = squares.shape[1]
        batch_mean = squares.mean(dim=1)
        if self.mean is None:
            self.mean, self.count = batch_mean, n
        else:  # running-mean rescaling, as in SparseGPT / Wanda's add_batch
            total = self.count + n
            self.mean = self.mean * (self.count / total) + batch_mean * (n / total)
            self.count = total

    def moments(self, weight_shape: tuple[int, ...]) -> np.ndarray:
        """E[x^2] broadcastable against the weight (shape [1, in, *kernel] for Conv)."""
        assert self.mean is not None, "no batch was added"
        mean = self.mean.numpy()
        e = self.entry
        if e.op == "Conv":
            channels = mean.reshape(-1, *e.kernel)  # [C_in, *kernel]
            per_group = weight_shape[1]
            out_per_group = weight_shape[0] // e.groups
            groups = np.arange(weight_shape[0]) // out_per_group
            index = groups[:, None] * per_group + np.arange(per_group)[None, :]
            return channels[index]  # [out, in/groups, *kernel]
        shape = [1] * len(weight_shape)
        shape[e.in_axis] = weight_shape[e.in_axis]
        return mean.reshape(shape)


def _unfold(x: torch.Tensor, e: LayerInput) -> torch.Tensor:
    """Conv input as im2col columns [C_in * prod(kernel), positions] (1-D conv as 2-D)."""
    if x.dim() == 3:
        x = x.unsqueeze(2)
        kernel, strides, dilations = (1, *e.kernel), (1, *e.strides), (1, *e.dilations)
        pads = (0, e.pads[0], 0, e.pads[1]) if e.pads else (0, 0, 0, 0)
    else:
        kernel, strides, dilations, pads = e.kernel, e.strides, e.dilations, e.pads
    begin, end = list(pads[:2]), list(pads[2:])
    if e.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        for i, size in enumerate(x.shape[2:]):
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin[i], end[i] = (small, large) if e.auto_pad == "SAME_UPPER" else (large, small)
    elif e.auto_pad == "VALID":
        begin, end = [0, 0], [0, 0]
    x = torch.nn.functional.pad(x, (begin[1], end[1], begin[0], end[0]))
    cols = torch.nn.functional.unfold(x, kernel, dilation=dilations, stride=strides)
    return cols.permute(1, 0, 2).reshape(cols.shape[1], -1)
