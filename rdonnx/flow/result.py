"""The result of a compress run (`CompressResult`: save as `.rdonnx`, dense or sparse ONNX) and
the report that describes it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
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
from rdonnx.flow.config import FORMATS, CompressConfig
from rdonnx.flow.curves import Curves
from rdonnx.flow.target import Realized
from rdonnx.graph.model import Model, check_output, iter_graphs, write_model
from rdonnx.report.records import Evaluation, Report, WeightReport
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
                  quiet: bool, notices: Sequence[str] = ()) -> Report:
    """The report of the chosen candidate: each weight's distortion alone (when configured)
    and the test evaluation (with test data) measured now; search and frontier are the
    caller's. `notices`: those of the run after calibration's. (It takes the whole config:
    the report records it.)"""
    measure = config.measure
    layer = [None] * len(cal.weights)
    if measure.layer_distortion:
        layer = [cal.distortion({w.name: chosen.pruned[w.name]}, measure.channel_axis,
                                measure.metric).value(measure.metric) for w in cal.weights]
    report = _report(cal, config, chosen, curves, allocation, layer, [*cal.notices, *notices])
    if test_data is not None:
        data, name = test_data
        result = measure_outputs(cal.runner.run, [cal.run_with(chosen.values)], data, labels,
                                 "test", quiet, measure.channel_axis)
        report.test = Evaluation.from_distortion(f"test ({name})", measure.metric,
                                                 result.distortions[0],
                                                 result.reference_accuracy, result.accuracies[0])
    return report


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
                                               config.measure.metric, chosen.distortion),
        value_bits=_common(chosen.widths.get(w.name) for w in cal.weights),
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
