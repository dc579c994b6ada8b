"""`--method hsic` (ITPruner): collect the consumers' outputs on the calibration samples, score the
layers by linear CKA (`rdonnx.algo.hsic`) and hand the importances and costs to the allocator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from rdonnx.algo.hsic import importance, macs, similarity
from rdonnx.allocate.allocators import Allocation
from rdonnx.flow.calibration import Calibration
from rdonnx.flow.methods.options import HSICOptions
from rdonnx.graph.layers import consumer_outputs


def collect(cal: Calibration, tensors: Sequence[str], samples: int
            ) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    """The named intermediate tensors on the first `samples` replayed calibration samples, one
    row per sample ([samples, -1]), and each tensor's shape on the first batch. Tensors whose
    first axis is not the batch (sequence-first layouts, batch x tokens folded into one axis:
    the sample of a row is unknown) are left out. The calibration session exposes them
    (`calibrate_model` asks for `consumer_outputs` with --method hsic)."""
    parts: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    shapes: dict[str, tuple[int, ...]] = {}
    seen = 0
    for feed, _ in cal.replay:
        batch = len(next(iter(feed.values())))
        values = dict(zip(tensors, cal.runner.run(feed, outputs=list(tensors))))
        for t in tensors:
            value = np.asarray(values[t])
            shapes.setdefault(t, value.shape)
            if parts[t] is not None and value.ndim and value.shape[0] == batch:
                parts[t].append(value.reshape(batch, -1))
            else:
                parts[t] = None
        seen += batch
        if seen >= samples:
            break
    return {t: np.concatenate(p)[:samples] for t, p in parts.items() if p}, shapes


def prepare(cal: Calibration, options: HSICOptions, allocation: Allocation
            ) -> tuple[Calibration, Allocation]:
    """`allocation` with each weight's importance alpha and budget cost (params or MACs), and
    the calibration with this method's notices. Returns new values; `cal` and `allocation`
    are left as they were."""
    notices = []
    found = consumer_outputs(cal.model, cal.weights)
    tensors = sorted({t for t, _ in found.values()})
    acts, shapes = collect(cal, tensors, options.samples) if tensors else ({}, {})
    seen = [w for w in cal.weights if w.name in found and found[w.name][0] in acts]
    if len(seen) >= 2:
        alpha = importance(similarity([acts[found[w.name][0]] for w in seen]),
                           options.beta)
    else:  # no pair to compare: every layer equally important, the budget still shapes widths
        notices.append("hsic: fewer than two layer outputs are observable, so every layer "
                           "gets the same importance")
        alpha, seen = np.ones(1), []
    alphas = dict(zip((w.name for w in seen), alpha.tolist()))
    neutral = float(np.median(alpha))
    costs: dict[str, float] = {}
    for w in cal.weights:
        if options.budget == "flops" and w.name in found:
            tensor, op = found[w.name]
            costs[w.name] = macs(w.size, shapes[tensor], op)
        else:
            costs[w.name] = float(w.size)
    if options.budget == "flops":
        notices.append(f"hsic: --rate counts multiply-accumulates per sample "
                           f"({sum(costs.values()):,.0f} in the prunable layers)")
    if seen and len(seen) < len(cal.weights):
        notices.append(f"hsic: {len(cal.weights) - len(seen)} weight(s) without an "
                           "observable output get the median importance")
    return replace(cal, notices=(*cal.notices, *notices)), replace(
        allocation, importance={w.name: alphas.get(w.name, neutral) for w in cal.weights},
        costs=costs)
