"""Calibration: record reference outputs and layer-input moments, measure per-weight R-D curves.

A curve D_l(d) is the output distortion of the whole model when only weight l is pruned to
density d with the in-layer criterion. One session serves the whole sweep: each pruned variant
is uploaded once and fed in place of the weight for every replayed batch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rdonnx import strictjson
from rdonnx.algo.layout import LayerInput, SecondMoments
from rdonnx.algo.prune import Scores, activation, magnitude
from rdonnx.allocate.allocators import Curve
from rdonnx.choices import DEFAULT_CHANNEL_AXIS, DEFAULT_GRID, DEFAULT_QUANTIZER, check_grid
from rdonnx.errors import UsageError
from rdonnx.graph.model import Model
from rdonnx.graph.weights import Weight
from rdonnx.progress import progress_bar
from rdonnx.runtime.data import Batches
from rdonnx.runtime.measure import DEFAULT_REPLAY_MB, Replay
from rdonnx.runtime.probe import Prober
from rdonnx.runtime.session import Runner

CURVES_FORMAT = "rdonnx-curves"
CURVES_VERSION = 1


@dataclass(frozen=True)
class Fingerprint:
    """What curves were measured on: digests of the model, the data and the settings."""

    model: str
    data: str
    settings: str

    def mismatch(self, other: Fingerprint) -> list[str]:
        return [part for part in ("model", "data", "settings")
                if getattr(self, part) != getattr(other, part)]


@dataclass(frozen=True)
class Curves:
    """Per-weight R-D curves on a density grid, with the fingerprint of what they measured."""

    grid: tuple[float, ...]
    distortion: dict[str, tuple[float, ...]]
    params: dict[str, int]
    settings: dict
    fingerprint: Fingerprint
    values: dict[str, dict[int, float]] = field(default_factory=dict)  # Q(b): whole weight
    values_quantizer: str = DEFAULT_QUANTIZER  # the quantizer `values` were measured with (and
    # the weights whose rows it split: `algo.unread`)
    measured: dict[str, tuple[int, ...]] = field(default_factory=dict)  # adaptive grid: the
    # grid points measured per weight (the others interpolated); empty: every point measured

    def curve(self, name: str) -> Curve:
        return Curve(self.grid, self.distortion[name])

    def to_json(self) -> str:
        return strictjson.dumps({
            "format": CURVES_FORMAT, "version": CURVES_VERSION,
            "fingerprint": self.fingerprint.__dict__, "settings": self.settings,
            "grid": list(self.grid), "values_quantizer": self.values_quantizer,
            "weights": {n: {"params": self.params[n], "distortion": list(d),
                            "quantized": {str(b): v for b, v in self.values.get(n, {}).items()},
                            **({"measured": list(self.measured[n])} if n in self.measured
                               else {})}
                        for n, d in self.distortion.items()}}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> Curves:
        try:
            data = json.loads(Path(path).read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("format") != CURVES_FORMAT or data.get("version") != CURVES_VERSION:
                raise ValueError("not an rdonnx curves file of version 1")
            weights = data["weights"]
            return cls(tuple(data["grid"]),
                       {n: tuple(w["distortion"]) for n, w in weights.items()},
                       {n: int(w["params"]) for n, w in weights.items()},
                       data["settings"], Fingerprint(**data["fingerprint"]),
                       {n: {int(b): float(v) for b, v in w.get("quantized", {}).items()}
                        for n, w in weights.items() if w.get("quantized")},
                       str(data.get("values_quantizer", "uniform")),
                       {n: tuple(int(i) for i in w["measured"]) for n, w in weights.items()
                        if "measured" in w})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"cannot read curves {path}: {exc}; run rdonnx calibrate") from None


def digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:32]


def model_digest(model: Model, originals: Mapping[str, np.ndarray]) -> str:
    """Digest of the graph and of every prunable weight's values (external data included)."""
    return digest(model.proto.SerializeToString(deterministic=True),
                  *(n.encode() + np.ascontiguousarray(a).tobytes()
                    for n, a in sorted(originals.items())))


def record(runner: Runner, batches: Batches, inputs: Mapping[str, LayerInput],
           quiet: bool = True, replay_bytes: int = DEFAULT_REPLAY_MB * 2**20,
           cuts: Sequence[str] = ()) -> tuple[Replay, dict[str, SecondMoments], str]:
    """One pass over the data: reference outputs, layer-input moments, the tensors `cuts`
    (where downstream-only probes start; the runner must output them) and the data digest."""
    replay = Replay(replay_bytes)
    moments = {name: SecondMoments(entry) for name, entry in inputs.items()}
    h = hashlib.sha256()
    with progress_bar(len(batches), "reference", quiet) as bar:
        for feed in batches:
            names = runner.output_names + runner.extra_outputs
            values = dict(zip(names, runner.run(feed, outputs=names)))
            values.update(feed)
            for acc in moments.values():
                for tensor in acc.entry.tensors:  # every consumer of a shared weight
                    acc.add_batch(values[tensor])
            replay.append(feed, [values[n] for n in runner.output_names],
                          {n: values[n] for n in cuts})
            for key in sorted(feed):
                array = np.ascontiguousarray(feed[key])
                h.update(f"{key}:{array.dtype}:{array.shape}".encode())
                h.update(array.tobytes())
            bar.update(1)
    return replay, moments, h.hexdigest()[:32]


def exposed_tensors(model: Model, inputs: Mapping[str, LayerInput]) -> list[str]:
    """Layer inputs that must be added as graph outputs (not already inputs or outputs)."""
    given = {v.name for v in model.proto.graph.input} | {v.name for v in model.proto.graph.output}
    return sorted({t for e in inputs.values() for t in e.tensors} - given)


def scores_for(weights: Sequence[Weight], originals: Mapping[str, np.ndarray], criterion: str,
               inputs: Mapping[str, LayerInput],
               moments: Mapping[str, SecondMoments]) -> dict[str, Scores]:
    """In-layer scores per weight; `activation` falls back to magnitude where no input is seen."""
    scores = {}
    for w in weights:
        array = originals[w.name]
        if criterion == "activation" and w.name in moments:
            scores[w.name] = activation(array, moments[w.name].moments(array.shape),
                                        inputs[w.name].row_axis)
        else:
            scores[w.name] = magnitude(array)
    return scores


Variant = Callable[[Weight, int], Mapping[str, np.ndarray]]


def measure_points(prober: Prober, weights: Sequence[Weight], variant: Variant,
                   points: Mapping[str, Sequence[int]], metric: str,
                   channel_axis: int = DEFAULT_CHANNEL_AXIS, description: str = "R-D curves",
                   quiet: bool = True) -> dict[str, dict[int, float]]:
    """The distortion of each `variant(weight, p)` for every weight and each p in
    `points[weight.name]` (changing only that weight; see `Prober.sweep`)."""
    groups = [[((w.name, p), lambda w=w, p=p: variant(w, p)) for p in points[w.name]]
              for w in weights if points.get(w.name)]
    total = sum(len(g) for g in groups)
    with progress_bar(total, description, quiet) as bar:
        measured = prober.sweep(groups, metric, channel_axis, bar.update)
    result: dict[str, dict[int, float]] = {w.name: {} for w in weights}
    for (name, p), distortion in measured.items():
        result[name][p] = distortion.value(metric)
    return result


def measure_curves(prober: Prober, weights: Sequence[Weight], variant: Variant,
                   grid: Sequence[float], metric: str,
                   channel_axis: int = DEFAULT_CHANNEL_AXIS, quiet: bool = True,
                   indices: Mapping[str, Sequence[int]] | None = None,
                   ) -> dict[str, dict[int, float]] | dict[str, tuple[float, ...]]:
    """D_l(d) for every weight l and grid density d (prune only l, replay all batches).

    `variant(weight, keep)` gives the weights that realise pruning one weight (with the
    in-layer criterion, reconstructed or not, and any weight updated to compensate); each
    variant is uploaded once and replayed over every batch. With `indices` only those grid
    points are measured and {weight: {index: D}} is returned; otherwise the whole curves."""
    wanted = indices if indices is not None else \
        {w.name: list(range(len(grid))) for w in weights}
    wanted = {w.name: list(wanted.get(w.name, ())) for w in weights}
    measured = measure_points(prober, weights,
                              lambda w, i: variant(w, int(round(grid[i] * w.size))),
                              {n: [i for i in v if grid[i] < 1] for n, v in wanted.items()},
                              metric, channel_axis, "R-D curves", quiet)
    for w in weights:  # density 1 changes nothing
        measured[w.name].update({i: 0.0 for i in wanted[w.name] if grid[i] >= 1})
    if indices is not None:
        return measured
    return {w.name: tuple(measured[w.name][i] for i in range(len(grid))) for w in weights}


def measure_value_curves(prober: Prober, weights: Sequence[Weight], variant: Variant,
                         widths: Sequence[int], metric: str,
                         channel_axis: int = DEFAULT_CHANNEL_AXIS,
                         quiet: bool = True) -> dict[str, dict[int, float]]:
    """Q_l(b): the distortion of quantizing only weight l, unpruned, to b bits (`variant(w, b)`
    gives the weights that realise it, as for `measure_curves`)."""
    return measure_points(prober, weights, variant, {w.name: list(widths) for w in weights},
                          metric, channel_axis, "value curves", quiet)


def coarse_indices(grid: Sequence[float], stride: int) -> list[int]:
    """Every `stride`-th grid point, the first and the last (the adaptive grid's first pass)."""
    return sorted(set(range(0, len(grid), stride)) | {0, len(grid) - 1})


def interpolated(grid: Sequence[float], measured: Mapping[int, float]) -> tuple[float, ...]:
    """A curve on the whole grid: measured points, the others linear in density between their
    measured neighbours (so the lower convex hull is that of the measured points)."""
    known = sorted(measured)
    values = []
    for i, d in enumerate(grid):
        if i in measured:
            values.append(measured[i])
            continue
        left = max(k for k in known if k < i)
        right = min(k for k in known if k > i)
        t = (grid[left] - d) / (grid[left] - grid[right])
        values.append(measured[left] + t * (measured[right] - measured[left]))
    return tuple(values)


def refinement(grid: Sequence[float], measured: Sequence[int], density: float) -> list[int]:
    """Unmeasured grid points around `density` (grid descending): those between the measured
    points that bracket it, on both sides when it falls on a measured point."""
    known = sorted(measured)
    above = [k for k in known if grid[k] >= density]
    below = [k for k in known if grid[k] <= density]
    left = above[-1] if above else known[0]
    right = below[0] if below else known[-1]
    if left == right:  # on a measured point: the gaps on both sides
        left = max([k for k in known if k < left], default=left)
        right = min([k for k in known if k > right], default=right)
    return [i for i in range(left + 1, right) if i not in measured]


__all__ = ["Curves", "DEFAULT_GRID", "Fingerprint", "check_grid", "coarse_indices", "digest",
           "exposed_tensors", "interpolated", "measure_curves", "measure_points",
           "measure_value_curves", "model_digest", "record", "refinement", "scores_for"]
