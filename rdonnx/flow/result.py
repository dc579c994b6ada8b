"""The result of a compress run (`CompressResult`: save as `.rdonnx`, dense or sparse ONNX) and
the report that describes it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from rdonnx.algo.quantize import Quantized
from rdonnx.allocate.allocators import Allocation, predicted
from rdonnx.artifact.io import save_artifact
from rdonnx.artifact.sizes import coding_report
from rdonnx.artifact.surp_stream import Coded
from rdonnx.errors import UsageError
from rdonnx.flow.calibration import Calibration
from rdonnx.flow.config import FORMATS, CompressConfig, Measurement
from rdonnx.flow.curves import Curves
from rdonnx.flow.target import Check, Realized
from rdonnx.graph.model import Model, check_output, iter_graphs, write_model
from rdonnx.progress import progress_bar
from rdonnx.report.records import BoundCheck, Evaluation, Report, WeightReport
from rdonnx.runtime.measure import measure as measure_outputs
from rdonnx.runtime.session import max_runtime_ir_version
from rdonnx.version import __version__


@dataclass
class CompressResult:
    """The compressed weights of a model and the report of what they cost."""

    source: Model
    weights: dict[str, np.ndarray]  # every replaced tensor, exactly as measured
    quantized: dict[str, Quantized]  # integer levels + steps (empty: exact values)
    report: Report
    curves: Curves | None = None
    pruned: dict[str, np.ndarray] = field(default_factory=dict)  # exact values, for baselines
    surp: Coded | None = None  # --method surp: the coded pool and stream

    @property
    def model(self) -> onnx.ModelProto:
        """The compressed model as one dense in-memory protobuf (models under 2 GB)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            write_model(self.source, path, self.weights, ir_version=max_runtime_ir_version())
            if (Path(tmp) / "model.onnx.data").exists():
                raise UsageError("the model is over 2 GB: use save() to write it with external "
                                 "data")
            return onnx.load(str(path))

    def save(self, path: str | os.PathLike, format: str | None = None,
             force: bool = False) -> int:
        """Write the result: `rdonnx` (entropy-coded), `dense`, or `sparse` ONNX.

        The format defaults to the one the result was compressed for.
        """
        format = format or CompressConfig.from_dict(self.report.settings).coding.format
        if format not in FORMATS:
            raise UsageError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
        path = Path(path)
        check_output(path, self.source.path, force)
        if format == "rdonnx":
            size = self._save_artifact(path)
        else:
            sparse = frozenset(self.weights) if format == "sparse" else frozenset()
            size = write_model(self.source, path, self.weights, sparse,
                               ir_version=max_runtime_ir_version())
        self.report.output, self.report.output_format, self.report.output_bytes = \
            str(path), format, size
        return size

    def _save_artifact(self, path: Path) -> int:
        prunable = {w.name for w in self.report.weights}
        exact = {n: v for n, v in self.weights.items() if n not in self.quantized}
        metrics = {"distortion": self.report.calibration.distortion,
                   "metric": self.report.calibration.metric,
                   "top1_agreement": self.report.calibration.top1_agreement,
                   "rate": self.report.rate, "value_bits": self.report.value_bits}
        size, entries = save_artifact(self.source, path, self.quantized, exact,
                                      self.report.settings, metrics, self.surp)
        self.report.coding = coding_report(self.source, self.pruned or self.weights, entries,
                                           prunable, size, self.report.input_bytes)
        bits = {e.name: (e.bits["positions"] + e.bits["values"]) / max(e.size, 1)
                for e in entries}
        for w in self.report.weights:
            w.bits_per_weight = bits.get(w.name)
        return size


def finish_report(cal: Calibration, config: CompressConfig, chosen: Realized,
                  curves: Curves | None, allocation: Allocation,
                  test_data: tuple[object, str] | None, labels: str | None,
                  quiet: bool, notices: Sequence[str] = (), check: Check | None = None,
                  reconstruction: Mapping[tuple[str, int], str] | None = None) -> Report:
    """The report of the chosen candidate: each weight's distortion alone (when configured),
    its figures on the fit and held-out parts, the final check of a bound, and the test
    evaluation (with test data) measured now; search and frontier are the caller's.
    `notices`: those of the run after calibration's; `reconstruction`: what reconstruction
    did per (weight, kept count). (It takes the whole config: the report records it.)"""
    measure = config.measure
    metric, confidence = measure.metric, config.verify.confidence
    check = check or Check(metric, confidence)
    layer: list[float | None] = [None] * len(cal.weights)
    if measure.layer_distortion:
        layer = layer_distortions(cal, measure, chosen.pruned, quiet)
    probed = cal.prober.notices if cal.prober is not None else []
    report = _report(cal, config, chosen, curves, allocation, layer,
                     [*cal.notices, *probed, *notices])
    for w in report.weights:
        w.reconstruction = (reconstruction or {}).get((w.name, w.kept))
    if cal.check is not None:
        report.calibration = Evaluation.from_distortion(
            f"calibration, fit part ({cal.data_name})", metric,
            cal.fit_distortion(chosen.values, measure.channel_axis), confidence=confidence)
        report.holdout = Evaluation.from_distortion(
            f"held-out ({cal.data.holdout if cal.data else cal.data_name})", metric,
            chosen.distortion, confidence=confidence)
    target = config.target
    if target.bound:
        limit = check.limit(target, chosen)
        measured = chosen.score if target.kind in ("score", "drop") else \
            chosen.distortion.value(metric) if target.kind == "distortion" else \
            chosen.distortion.top1_agreement
        met = limit <= target.value if target.kind == "distortion" else \
            check.reference_score - limit <= target.value if target.kind == "drop" else \
            limit >= target.value
        names = {"distortion": "max_distortion", "agreement": "min_agreement",
                 "score": "min_score", "drop": "max_drop"}
        report.check = BoundCheck(
            names[target.kind], float(target.value),
            "held-out" if cal.check is not None else "calibration", chosen.distortion.samples,
            float(measured), float(limit), confidence, bool(met), check.reference_score,
            chosen.distortion.flips if target.kind == "distortion" else 0.0)
    elif check.score is not None:  # a rate with --eval: the score of the result too
        report.score, report.reference_score = check.score(chosen)[0], check.reference_score
    if test_data is not None:
        data, name = test_data
        result = measure_outputs(cal.runner.run, [cal.run_with(chosen.values)], data, labels,
                                 "test", quiet, measure.channel_axis, metric == "kl")
        d = result.distortions[0]
        report.test = Evaluation.from_distortion(
            f"test ({name})", metric, d, result.reference_accuracy, result.accuracies[0],
            confidence, d.samples if result.reference_accuracy is not None else None)
    return report


def layer_distortions(cal: Calibration, measure: Measurement,
                      pruned: dict[str, np.ndarray], quiet: bool = True) -> list[float]:
    """The distortion of each weight pruned alone as chosen (0 without a probe where it is
    unchanged), in graph order."""
    metric, axis = measure.metric, measure.channel_axis
    changed = [w.name for w in cal.weights
               if not np.array_equal(pruned[w.name], cal.originals[w.name])]
    groups = [[(name, lambda name=name: {name: pruned[name]})] for name in changed]
    with progress_bar(len(groups), "layer distortion", quiet) as bar:
        found = cal.prober.sweep(groups, metric, axis, bar.update) \
            if cal.prober is not None else \
            {n: cal.distortion({n: pruned[n]}, axis, metric) for n in changed}
    return [found[w.name].value(metric) if w.name in found else 0.0 for w in cal.weights]


def _report(cal: Calibration, config: CompressConfig, chosen: Realized, curves: Curves | None,
            allocation: Allocation, layer: list[float | None], notices: list[str]) -> Report:
    """The report of the chosen candidate (search, frontier and test are added by the caller)."""
    keep = chosen.keep
    obs_selected = config.prune.reconstructs and config.prune.criterion == "obs"
    weights = [WeightReport(
        w.name, w.op, list(w.shape), w.dtype, w.size, keep[w.name],
        keep[w.name] / w.size if w.size else 1.0, d,
        "obs" if obs_selected and cal.supports(w.name) else cal.scores[w.name].criterion,
        list(curves.distortion[w.name]) if curves else None,
        value_bits=chosen.widths.get(w.name))
        for w, d in zip(cal.weights, layer)]
    total = sum(w.size for w in cal.weights)
    return Report(
        model=str(cal.model.path.name) if cal.model.path else "<in-memory model>",
        method=config.method, criterion=config.prune.criterion,
        rate=sum(keep.values()) / total, device=cal.runner.device.provider,
        simplified=any("simplified with onnxsim" in n for n in notices),
        params_total=total, params_kept=sum(keep.values()),
        input_bytes=_source_bytes(cal.model),
        calibration=Evaluation.from_distortion(f"calibration ({cal.data_name})",
                                               config.measure.metric, chosen.distortion,
                                               confidence=config.verify.confidence),
        data=cal.data,
        value_bits=_common(chosen.widths.get(w.name) for w in cal.weights),
        unpruned_bits={n: b for n, b in chosen.widths.items() if n not in keep},
        predicted_distortion=predicted(allocation, keep) if curves else None,
        grid=list(curves.grid) if curves else None, weights=weights,
        settings=config.as_dict(), rdonnx_version=__version__, notices=notices)


def _common(values) -> int | None:
    """The one value all items share, else None (None too when they are all None)."""
    unique = set(values)
    return unique.pop() if len(unique) == 1 else None


def _source_bytes(model: Model) -> int:
    """Bytes of the model file plus its external data files (in memory: serialized size)."""
    if model.path is None:
        return model.proto.ByteSize()
    locations = {e.value for g in iter_graphs(model.proto.graph) for t in g.initializer
                 for e in t.external_data if e.key == "location"}
    files = [model.path] + [model.path.parent / loc for loc in sorted(locations)]
    return sum(f.stat().st_size for f in files if f.exists())
