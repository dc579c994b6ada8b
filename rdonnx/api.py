"""The Python API: `compress`, `inspect` and `evaluate`. The CLI is a thin layer over these."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rdonnx.algo.pqi import INSPECT_PAIRS, pq_index, suggest_rate
from rdonnx.artifact.io import load_any
from rdonnx.errors import UsageError
from rdonnx.flow import pipeline
from rdonnx.flow.calibration import KL_REFUSAL, DataSource, ModelSource, make_data, refuse_kl
from rdonnx.flow.config import DEFAULTS, FORMATS, CompressConfig, Target
from rdonnx.flow.curves import Curves
from rdonnx.flow.result import CompressResult
from rdonnx.graph.weights import DEFAULT_MIN_PARAMS, find_weights, read_weights
from rdonnx.report.records import Evaluation, WeightReport, table
from rdonnx.runtime.data import DataOptions, input_specs
from rdonnx.runtime.distortion import METRICS
from rdonnx.runtime.measure import measure
from rdonnx.runtime.session import Runner

__all__ = ["FORMATS", "CompressConfig", "CompressResult", "Curves", "Inspection", "calibrate",
           "compress", "evaluate", "inspect"]



def compress(model: ModelSource, *, rate: float | None = None, calib: DataSource = None,
             method: str | None = None, criterion: str | None = None,
             max_distortion: float | None = None, min_agreement: float | None = None,
             bits_per_weight: float | None = None,
             test: DataSource = None, labels: str | None = None,
             curves: Curves | str | os.PathLike | None = None,
             config: CompressConfig | None = None, quiet: bool = True,
             frontier: Sequence[float] = (), verify: DataSource = None) -> CompressResult:
    """Prune `model` to a target and measure what that costs on its outputs.

    Args:
        model: a path, an `onnx.ModelProto` or serialized bytes.
        rate: fraction of prunable weights kept, in (0, 1]. Or instead:
        max_distortion: the smallest rate whose measured distortion is at most this;
        min_agreement: the smallest rate whose measured top-1 agreement is at least this;
        bits_per_weight: the largest rate coded in at most this many bits per weight.
        calib: calibration data (an `.npz` path, a folder of `.npz` feeds, arrays by input
            name); None makes synthetic inputs from the input specs.
        method: allocator: "rd" (default), "uniform", "global" or "lamp".
        criterion: in-layer criterion: "magnitude" (default) or "activation".
        test: optional labelled data; with `labels` (its label key) accuracy is reported.
        curves: R-D curves from `calibrate` (a `Curves` or its JSON path) to reuse.
        config: every other setting (`CompressConfig.of(...)`); the arguments above override
            its fields.
        quiet: no progress bars.
        frontier: other rates at which to measure the same method too (for plots).
        verify: held-out data on which every bound is checked (instead of the held-out part
            of `calib`, `config.verify.holdout`).
    """
    config = config or CompressConfig()
    overrides = {k: v for k, v in (("method", method), ("criterion", criterion)) if v is not None}
    targets = {"rate": rate, "max_distortion": max_distortion, "min_agreement": min_agreement,
               "bits_per_weight": bits_per_weight}
    if any(v is not None for v in targets.values()):
        overrides["target"] = Target(**targets, pattern=config.target.pattern)  # still refused
    return pipeline.compress(model, config.updated(**overrides), calib, test, labels, curves,
                             quiet, frontier, verify)


def calibrate(model: ModelSource, *, calib: DataSource = None,
              config: CompressConfig | None = None, quiet: bool = True,
              verify: DataSource = None) -> Curves:
    """Measure per-weight R-D curves once, to reuse with `compress(..., curves=...)` (on the
    fit part of `calib`, split as compress splits it: give both the same holdout / verify)."""
    return pipeline.calibrate(model, config or CompressConfig(), calib, quiet, verify)


@dataclass(frozen=True)
class Inspection:
    """The prunable weights of a model with their current density and PQ indices."""

    model: str
    weights: list[WeightReport]
    pqi: list[tuple[float, ...]] = field(default_factory=list)  # per weight, INSPECT_PAIRS
    pqi_model: tuple[float, ...] = ()  # all prunable weights pooled
    suggested_rate: float | None = None  # the PQI fixed-point density (data-free)

    @property
    def params_total(self) -> int:
        return sum(w.params for w in self.weights)

    @property
    def params_nonzero(self) -> int:
        return sum(w.kept for w in self.weights)

    def render(self) -> str:
        pairs = [f"PQI({p:g},{q:g})" for p, q in INSPECT_PAIRS]
        rows = [(w.name, w.op, "x".join(map(str, w.shape)), w.dtype, str(w.params),
                 f"{w.density:.2%}", *(f"{v:.4f}" for v in pqi))
                for w, pqi in zip(self.weights, self.pqi or [()] * len(self.weights))]
        total = self.params_total
        text = (table(rows, ("weight", "op", "shape", "dtype", "params", "density",
                             *(pairs if self.pqi else ()))) +
                f"\n\n{len(self.weights)} prunable weights, {total:,} params, "
                f"{self.params_nonzero / max(total, 1):.2%} nonzero")
        if self.pqi_model:
            text += "\nmodel " + ", ".join(f"{name} {v:.4f}"
                                           for name, v in zip(pairs, self.pqi_model))
        if self.suggested_rate is not None:
            text += (f"\nsuggested --rate {self.suggested_rate:.4f} (PQI fixed point, data-free;"
                     " check it with a measured --max-distortion)")
        return text


def inspect(model: ModelSource, *, min_params: int = DEFAULT_MIN_PARAMS,
            include: Sequence[str] = (), exclude: Sequence[str] = (),
            suggest: bool = False) -> Inspection:
    """List the prunable weights of `model` (name, op, shape, dtype, params, density, PQ
    indices); `suggest` adds the PQI fixed-point density as a suggested rate."""
    loaded = load_any(model)
    weights = find_weights(loaded, min_params, include, exclude)
    values = read_weights(loaded, weights)
    rows = []
    for w in weights:
        nonzero = int(np.count_nonzero(values[w.name]))
        rows.append(WeightReport(w.name, w.op, list(w.shape), w.dtype, w.size, nonzero,
                                 nonzero / w.size if w.size else 1.0))
    pqi = [tuple(pq_index(values[w.name], p, q) for p, q in INSPECT_PAIRS) for w in weights]
    pooled = np.concatenate([values[w.name].reshape(-1) for w in weights]) if weights else \
        np.zeros(0, np.float32)
    return Inspection(loaded.path.name if loaded.path else "<in-memory model>", rows, pqi,
                      tuple(pq_index(pooled, p, q) for p, q in INSPECT_PAIRS),
                      suggest_rate(values) if suggest and weights else None)


def evaluate(reference: ModelSource, candidate: ModelSource, data: DataSource, *,
             labels: str | None = None, metric: str = DEFAULTS.measure.metric,
             device: str = DEFAULTS.measure.device,
             options: DataOptions | None = None, quiet: bool = True) -> Evaluation:
    """Distortion (and accuracy with `labels`) of `candidate` against `reference` on `data`."""
    if metric not in METRICS:
        raise UsageError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    ref_model, cand_model = load_any(reference), load_any(candidate)
    specs = input_specs(ref_model)
    if [(s.name, s.dtype) for s in specs] != [(s.name, s.dtype) for s in
                                               input_specs(cand_model)]:
        raise UsageError("the two models take different inputs; compare models of one network")
    batches, name = make_data(ref_model, data, options or DataOptions(), labels)
    ref_runner = Runner(ref_model, [], device)
    cand_runner = Runner(cand_model, [], ref_runner.device)
    result = measure(ref_runner.run, [cand_runner.run], batches, labels, "evaluating", quiet,
                     sequences=metric == "kl")
    distortion = result.distortions[0]
    if metric == "kl" and distortion.kl is None:
        raise UsageError(KL_REFUSAL)
    if metric == "kl":  # an output [batch, classes] is the one that gives the top-1 figure
        refuse_kl(ref_model, distortion.top1_agreement is not None)
    return Evaluation.from_distortion(name, metric, distortion, result.reference_accuracy,
                                      result.accuracies[0], labelled=distortion.samples
                                      if result.reference_accuracy is not None else None)
