"""`--method pqi`: PQ index bounds per weight or per output row (`rdonnx.algo.pqi`) handed to the
allocator; per-row bounds also reorder the in-layer ranking.
"""

from __future__ import annotations

from dataclasses import replace

from rdonnx.algo.pqi import PQIOptions, neuron_scores, row_bounds
from rdonnx.algo.prune import Ranking
from rdonnx.allocate.allocators import Allocation
from rdonnx.flow.calibration import Calibration
from rdonnx.graph.layers import layer_inputs


def prepare(cal: Calibration, options: PQIOptions, allocation: Allocation
            ) -> tuple[Calibration, Allocation]:
    """`allocation` with the PQI bounds of every weight, and the calibration with neuron
    granularity's rankings: `neuron_scores` (weights whose output rows are unknown stay per
    layer). Returns new values; `cal` and `allocation` are left as they were."""
    rows = {n: e.row_axis for n, e in layer_inputs(cal.model, cal.weights).items()} \
        if options.granularity == "neuron" else {}
    bounds, scores, rankings, notices = {}, dict(cal.scores), dict(cal.rankings), []
    for w in cal.weights:
        axis = rows.get(w.name)
        bounds[w.name] = row_bounds(cal.originals[w.name], options, options.mode, axis)
        if axis is not None:
            scores[w.name] = neuron_scores(scores[w.name], bounds[w.name], axis)
            rankings[w.name] = Ranking(scores[w.name])
    if options.granularity == "neuron" and len(rows) < len(cal.weights):
        notices.append(f"pqi: {len(cal.weights) - len(rows)} weight(s) without a known "
                       "output-row layout use layer granularity")
    cal = replace(cal, scores=scores, rankings=rankings, notices=(*cal.notices, *notices))
    return cal, replace(allocation, bounds=bounds)
