"""What calibration data can show: how much the original model's outputs vary over it.

A metric can only tell a good candidate from a broken one when the reference outputs differ
between samples: if the original model gives one class for everything, any model that gives
that class agrees 100%; if its outputs barely move, a model that outputs their mean scores a
small nmse. `describe_outputs` measures both on the recorded reference outputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from rdonnx.runtime.distortion import is_class_scores, log_probs

FLAT_CHANNEL = 1e-6  # a channel whose variance over samples is below this share of the mean
# channel energy is flat


@dataclass
class OutputStats:
    """One float output of the original model over the calibration samples."""

    index: int  # position among the model's outputs
    samples: int  # rows along axis 0
    constant_nmse: float  # nmse of a model that outputs the mean of the reference outputs
    constant_cosine: float  # cosine distance of that model
    channels: int  # along the channel axis (1 when the output has none)
    flat_channels: int  # channels whose variance over samples is ~0
    classes: int | None = None  # class-score outputs [batch, classes]: number of classes
    distinct_top1: int | None = None  # distinct argmax classes over the samples
    top_class: int | None = None  # the most frequent argmax class ...
    top_class_share: float | None = None  # ... and its share of the samples
    entropy: float | None = None  # mean entropy of the class distribution, bits
    max_entropy: float | None = None  # log2(classes)


class _Acc:
    def __init__(self) -> None:
        self.n = 0
        self.sum: np.ndarray | None = None
        self.sq: np.ndarray | None = None
        self.counts: np.ndarray | None = None
        self.entropy = 0.0
        self.ok = True


def describe_outputs(batches: Iterable[tuple[object, Sequence[np.ndarray]]],
                     channel_axis: int = 1) -> list[OutputStats]:
    """Statistics of each float output over (feed, reference outputs) batches (re-iterable:
    two passes). Outputs whose per-sample shape changes between batches are left out."""
    accs: list[_Acc] = []
    for _, outputs in batches:
        if not accs:
            accs = [_Acc() for _ in outputs]
        for acc, out in zip(accs, outputs):
            out = np.asarray(out)
            if out.dtype.kind != "f" or out.ndim == 0 or not acc.ok:
                acc.ok = False
                continue
            x = out.astype(np.float64)
            if acc.sum is not None and acc.sum.shape != x.shape[1:]:
                acc.ok = False
                continue
            acc.sum = x.sum(axis=0) if acc.sum is None else acc.sum + x.sum(axis=0)
            acc.sq = (x ** 2).sum(axis=0) if acc.sq is None else acc.sq + (x ** 2).sum(axis=0)
            acc.n += x.shape[0]
            if is_class_scores(out):
                top = out.argmax(axis=1)
                counts = np.bincount(top, minlength=out.shape[1])
                acc.counts = counts if acc.counts is None else acc.counts + counts
                logp = log_probs(x)
                acc.entropy += float(-(np.exp(logp) * logp).sum() / np.log(2))
    means = [a.sum / a.n if a.ok and a.n else None for a in accs]
    cos = [0.0] * len(accs)
    for _, outputs in batches:  # second pass: cosine distance to the mean output
        for i, (out, mean) in enumerate(zip(outputs, means)):
            if mean is None:
                continue
            rows = np.asarray(out, dtype=np.float64).reshape(np.shape(out)[0], -1)
            m = mean.reshape(-1)
            norms = np.linalg.norm(rows, axis=1) * np.linalg.norm(m)
            cos[i] += float(np.sum(1.0 - np.where(norms > 0, rows @ m / np.where(
                norms > 0, norms, 1.0), 1.0)))
    stats = []
    for i, (acc, mean) in enumerate(zip(accs, means)):
        if mean is None:
            continue
        var = np.maximum(acc.sq / acc.n - mean ** 2, 0.0)  # per element, over samples
        energy = float(acc.sq.sum())
        per_channel_var, per_channel_energy = _channels(var, channel_axis), \
            _channels(acc.sq / acc.n, channel_axis)
        floor = FLAT_CHANNEL * max(float(per_channel_energy.mean()), 1e-30)
        s = OutputStats(i, acc.n, float(var.sum() * acc.n / energy) if energy > 0 else 0.0,
                        cos[i] / acc.n, int(per_channel_var.size),
                        int(np.sum(per_channel_var <= floor)))
        if acc.counts is not None:
            s.classes = int(acc.counts.size)
            s.distinct_top1 = int(np.count_nonzero(acc.counts))
            s.top_class = int(acc.counts.argmax())
            s.top_class_share = float(acc.counts.max() / acc.n)
            s.entropy = acc.entropy / acc.n
            s.max_entropy = float(np.log2(acc.counts.size))
        stats.append(s)
    return stats


def _channels(per_element: np.ndarray, channel_axis: int) -> np.ndarray:
    """Mean over every per-sample axis but the channel axis (axis `channel_axis` - 1 of a
    sample); one channel when the output has none."""
    axis = channel_axis - 1
    if per_element.ndim == 0 or axis < 0 or axis >= per_element.ndim:
        return np.atleast_1d(per_element.mean())
    moved = np.moveaxis(per_element, axis, 0)
    return moved.reshape(moved.shape[0], -1).mean(axis=1)
