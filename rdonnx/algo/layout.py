"""How a weight meets its layer input (`LayerInput`), and second moments of the input features,
accumulated batch by batch.

For a weight W of a linear operator, E[x_j^2] of the input feature j that W multiplies is what
the `activation` criterion (Gao et al.'s output-distortion importance, Wanda's score) needs.
Convolutions are unfolded (im2col, `unfold`) so every (input channel, kernel position) gets its
own moment. Finding each weight's layer input in a graph is `rdonnx.graph.layers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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


class SecondMoments:
    """Running means of x^2 and of x per input feature (per channel and kernel position for
    Conv)."""

    def __init__(self, entry: LayerInput):
        self.entry = entry
        self.mean: torch.Tensor | None = None  # E[x^2]
        self.first: torch.Tensor | None = None  # E[x]
        self.count = 0

    def add_batch(self, x: np.ndarray) -> None:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if self.entry.op == "Conv":
            columns = unfold(t, self.entry)  # [features, positions]
        else:
            t = t.movedim(self.entry.feature_axis, -1)
            columns = t.reshape(-1, t.shape[-1]).T
        columns = columns.double()
        n = columns.shape[1]
        batch_mean, batch_first = columns.pow(2).mean(dim=1), columns.mean(dim=1)
        if self.mean is None:
            self.mean, self.first, self.count = batch_mean, batch_first, n
        else:  # running-mean rescaling, as in SparseGPT / Wanda's add_batch
            total = self.count + n
            self.mean = self.mean * (self.count / total) + batch_mean * (n / total)
            self.first = self.first * (self.count / total) + batch_first * (n / total)
            self.count = total

    def moments(self, weight_shape: tuple[int, ...]) -> np.ndarray:
        """E[x^2] broadcastable against the weight (shape [out, in/groups, *kernel] for Conv,
        the input axis alone otherwise)."""
        return self._against(self.mean, weight_shape)

    def means(self, weight_shape: tuple[int, ...]) -> np.ndarray:
        """E[x] of each input feature, laid out as `moments`."""
        return self._against(self.first, weight_shape)

    def _against(self, stat: torch.Tensor | None, weight_shape: tuple[int, ...]) -> np.ndarray:
        if stat is None:
            raise RuntimeError(f"{self.entry.weight}: no batch was added")
        values = stat.numpy()
        e = self.entry
        if e.op == "Conv":
            channels = values.reshape(-1, *e.kernel)  # [C_in, *kernel]
            per_group = weight_shape[1]
            out_per_group = weight_shape[0] // e.groups
            groups = np.arange(weight_shape[0]) // out_per_group
            index = groups[:, None] * per_group + np.arange(per_group)[None, :]
            return channels[index]  # [out, in/groups, *kernel]
        shape = [1] * len(weight_shape)
        shape[e.in_axis] = weight_shape[e.in_axis]
        return values.reshape(shape)


def output_shift(delta: np.ndarray, means: np.ndarray, row_axis: int) -> np.ndarray:
    """E[y' - y] per output row when a weight changes by `delta` (float64 [rows]): the change
    of a linear layer's output mean, `sum_j delta[row, j] * E[x_j]` (`means` as
    `SecondMoments.means` lays it out). Subtracted from the layer's bias, it is the bias
    correction of Nagel et al. (data-free quantization, ICCV 2019) with measured means."""
    product = np.asarray(delta, np.float64) * np.broadcast_to(np.asarray(means, np.float64),
                                                              np.shape(delta))
    return np.moveaxis(product, row_axis, 0).reshape(np.shape(delta)[row_axis], -1).sum(axis=1)


def unfold(x: torch.Tensor, e: LayerInput) -> torch.Tensor:
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
