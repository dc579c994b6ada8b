"""The compress pipeline: load -> find weights -> calibrate -> allocate -> prune -> measure."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from . import __version__, hsic, pqi
from .allocate import ALLOCATORS, SOLVERS, Allocation, predicted
from .artifact import save_artifact
from .calibrate import Curves, check_grid, measure_value_curves
from .calibration import (
    Calibration,
    DataSource,
    ModelSource,
    calibrate_model,
    check_curves,
    make_data,
    measure_all_curves,
)
from .coding import coding_report, stream_bits
from .config import FORMATS, CompressConfig
from .errors import UsageError
from .joint import JOINT_VALUE_BITS, allocate_joint, cost_range, options_for, with_wide_widths
from .measure import measure
from .model import Model, check_output, iter_graphs, write_model
from .quantize import Quantized
from .report import Evaluation, RatePoint, Report, WeightReport
from .target import Realized, meet_budget, meet_target

if TYPE_CHECKING:
    from .surp import Coded

JOINT_BITS = (4, 5, 6, 8)  # value widths tried when a bound picks the smallest artifact


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
            write_model(self.source, path, self.weights)
            if (Path(tmp) / "model.onnx.data").exists():
                raise UsageError("the model is over 2 GB: use save() to write it with external "
                                 "data")
            return onnx.load(str(path))

    def save(self, path: str | os.PathLike, format: str | None = None,
             force: bool = False) -> int:
        """Write the result: `rdonnx` (entropy-coded), `dense`, or `sparse` ONNX.

        The format defaults to the one the result was compressed for.
        """
        format = format or self.report.settings.get("format", "rdonnx")
        if format not in FORMATS:
            raise UsageError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
        path = Path(path)
        check_output(path, self.source.path, force)
        if format == "rdonnx":
            size = self._save_artifact(path)
        else:
            sparse = frozenset(self.weights) if format == "sparse" else frozenset()
            size = write_model(self.source, path, self.weights, sparse)
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


def compress(model: ModelSource, config: CompressConfig, calib: DataSource = None,
             test: DataSource = None, labels: str | None = None,
             curves: Curves | str | os.PathLike | None = None, quiet: bool = True,
             frontier: Sequence[float] = ()) -> CompressResult:
    """Prune `model` to the configured target and measure what that costs.

    `frontier` lists other rates at which the same method is measured too (for plots).
    """
    config = gao_settings(config)
    config.check()
    if labels and test is None:
        raise UsageError("labels need test data (--test DATA --labels KEY)")
    cal = calibrate_model(model, config, calib, quiet)
    test_data = make_data(cal.model, test, config.data, labels) if test is not None else None
    if config.method == "surp":
        from .surp import compress_surp

        return compress_surp(cal, config, test_data, labels, quiet)
    need_curves = (config.method == "rd" or config.max_distortion is not None) and \
        config.pattern is None
    if curves is not None:
        curves = curves if isinstance(curves, Curves) else Curves.load(curves)
        check_curves(curves, cal)
    elif need_curves:
        curves = measure_all_curves(cal, config, quiet)
    allocation = Allocation({n: s.values for n, s in cal.scores.items()},
                            {n: curves.curve(n) for n in curves.distortion} if curves else {},
                            config.normalize)
    if config.method in ("pqi", "hsic"):  # weight-only bounds, or activation importances
        allocation = (pqi if config.method == "pqi" else hsic).prepare(cal, config, allocation)
    allocator = SOLVERS[config.solver] if config.method == "rd" else \
        ALLOCATORS["uniform" if config.method == "gao" else config.method]
    chosen, steps, curves = _choose(cal, config, allocation, allocator, curves, quiet)
    lowest = min(check_grid(config.grid)) if curves is not None else 0.0
    points = []
    for rate in (r for r in frontier if r >= lowest):
        d = cal.realize(rate, allocator(allocation, rate), config).distortion
        points.append(RatePoint(rate, d.value(config.metric), d.top1_agreement))
    report = finish_report(cal, config, chosen, curves, allocation, test_data, labels, quiet)
    report.search, report.frontier = steps, points
    return CompressResult(cal.model, chosen.values, chosen.quantized, report, curves,
                          chosen.pruned)


def finish_report(cal: Calibration, config: CompressConfig, chosen: Realized,
                  curves: Curves | None, allocation: Allocation,
                  test_data: tuple[object, str] | None, labels: str | None,
                  quiet: bool) -> Report:
    """The report of the chosen candidate: each weight's distortion alone (when configured)
    and the test evaluation (with test data) measured now; search and frontier are the
    caller's."""
    layer = [None] * len(cal.weights)
    if config.layer_distortion:
        layer = [cal.distortion({w.name: chosen.pruned[w.name]}, config, config.metric)
                 .value(config.metric) for w in cal.weights]
    report = _report(cal, config, chosen, curves, allocation, layer)
    if test_data is not None:
        data, name = test_data
        result = measure(cal.runner.run, [cal.run_with(chosen.values)], data, labels, "test",
                         quiet, config.channel_axis)
        report.test = Evaluation.from_distortion(f"test ({name})", config.metric,
                                                 result.distortions[0],
                                                 result.reference_accuracy, result.accuracies[0])
    return report


def _choose(cal: Calibration, config: CompressConfig, allocation: Allocation,
            allocator: Callable, curves: Curves | None,
            quiet: bool) -> tuple[Realized, list[RatePoint], Curves | None]:
    """The realized candidate for the target, the probes measured on the way, and the curves
    (with value curves added when the joint allocation needed them)."""
    prunable = {w.name for w in cal.weights}
    sizes = {w.name: w.size for w in cal.weights}

    def coded_bits(r: Realized) -> float:
        return sum(stream_bits(r.quantized.get(n), r.values[n]) for n in prunable)

    def search(run_config: CompressConfig) -> tuple[Realized, list[RatePoint]]:
        def realize(rate: float) -> Realized:
            return cal.realize(rate, allocator(allocation, rate), run_config)

        return meet_target(run_config, realize, allocation, allocator,
                           min(check_grid(config.grid)), curves is not None, coded_bits)

    if config.n_m is not None:  # the pattern fixes every supported weight's density
        keep = {w.name: int(np.count_nonzero(cal.pattern_mask(w.name, config.n_m)))
                if cal.supports(w.name) else w.size for w in cal.weights}
        return cal.realize(sum(keep.values()) / sum(sizes.values()), keep, config), [], curves
    free_bits = config.quantized and config.value_bits is None
    if config.rate is None and free_bits and config.method == "rd":
        curves = _with_value_curves(cal, config, curves, quiet)
        options = {w.name: options_for(cal.originals[w.name], cal.rankings[w.name],
                                       curves.grid, curves.distortion[w.name],
                                       with_wide_widths(curves.values[w.name]),
                                       lambda a, b, n=w.name: cal.quantize(n, a, b, config))
                   for w in cal.weights}

        def realize_budget(budget: float) -> Realized:
            choice = allocate_joint(options, budget)
            keep = {n: int(round(o.density * sizes[n])) for n, o in choice.items()}
            r = cal.realize(sum(keep.values()) / sum(sizes.values()), keep, config,
                            {n: o.bits for n, o in choice.items()})
            r.coded_bits = coded_bits(r)
            return r

        try:
            return (*meet_budget(config, realize_budget, cost_range(options),
                                 sum(sizes.values())), curves)
        except UsageError:
            if config.bits_per_weight is not None:
                raise
            return (*_exact_values(cal, search, config), curves)
    bound = config.max_distortion is not None or config.min_agreement is not None
    if bound and free_bits:  # other allocators: one value width for all, the smallest file
        candidates = []
        for bits in JOINT_BITS:
            try:
                candidates.append(search(replace(config, value_bits=bits)))
            except UsageError:  # this width cannot meet the bound at any rate
                continue
        if not candidates:
            return (*_exact_values(cal, search, config), curves)
        chosen, steps = min(candidates, key=lambda c: coded_bits(c[0]))
        chosen.coded_bits = coded_bits(chosen)
        return chosen, steps, curves
    return (*search(config), curves)


def _exact_values(cal: Calibration, search: Callable, config: CompressConfig
                  ) -> tuple[Realized, list[RatePoint]]:
    """The smallest rate that meets the bound with exact values (at worst every weight kept:
    the original model, losslessly coded), when no quantized candidate does."""
    cal.notices.append("no quantized candidate meets the bound (value widths up to 16 bits): "
                       "values are kept exact, losslessly coded")
    return search(replace(config, values="exact"))


def _report(cal: Calibration, config: CompressConfig, chosen: Realized, curves: Curves | None,
            allocation: Allocation, layer: list[float | None]) -> Report:
    """The report of the chosen candidate (search, frontier and test are added by the caller)."""
    keep = chosen.keep
    weights = [WeightReport(
        w.name, w.op, list(w.shape), w.dtype, w.size, keep[w.name],
        keep[w.name] / w.size if w.size else 1.0, d,
        "obs" if cal.reconstructs(w.name, config) and config.criterion == "obs"
        else cal.scores[w.name].criterion,
        list(curves.distortion[w.name]) if curves else None,
        value_bits=chosen.widths.get(w.name))
        for w, d in zip(cal.weights, layer)]
    total = sum(w.size for w in cal.weights)
    return Report(
        model=str(cal.model.path.name) if cal.model.path else "<in-memory model>",
        method=config.method, criterion=config.criterion, rate=sum(keep.values()) / total,
        device=cal.runner.device.provider,
        simplified=any("simplified with onnxsim" in n for n in cal.notices),
        params_total=total, params_kept=sum(keep.values()),
        input_bytes=_source_bytes(cal.model),
        calibration=Evaluation.from_distortion(f"calibration ({cal.data_name})", config.metric,
                                               chosen.distortion),
        value_bits=_common(chosen.widths.get(w.name) for w in cal.weights),
        predicted_distortion=predicted(allocation, keep) if curves else None,
        grid=list(curves.grid) if curves else None, weights=weights,
        settings=config.as_dict(), rdonnx_version=__version__, notices=cal.notices)


def gao_settings(config: CompressConfig) -> CompressConfig:
    """Gao et al.'s setting for `--method gao`: one density in every layer (the uniform
    allocator), entries scored by w^2 * E[x^2] (the activation criterion) and, when values
    are quantized, the activation-weighted k-means quantizer. Other methods: unchanged."""
    if config.method != "gao":
        return config
    return replace(config, criterion="activation",
                   quantizer="kmeans" if config.quantized else config.quantizer)


def _common(values) -> int | None:
    """The one value all items share, else None (None too when they are all None)."""
    unique = set(values)
    return unique.pop() if len(unique) == 1 else None


def _with_value_curves(cal: Calibration, config: CompressConfig, curves: Curves,
                       quiet: bool) -> Curves:
    """`curves` with Q_l(b) for every joint value width (measured now if missing)."""
    if curves.values_quantizer == config.quantizer and \
            all(set(JOINT_VALUE_BITS) <= set(curves.values.get(w.name, {})) for w in cal.weights):
        return curves
    measured = measure_value_curves(cal.runner, cal.replay, cal.weights,
                                    cal.value_variant(config), JOINT_VALUE_BITS, config.metric,
                                    config.channel_axis, quiet)
    return replace(curves, values=measured, values_quantizer=config.quantizer)


def _source_bytes(model: Model) -> int:
    """Bytes of the model file plus its external data files (in memory: serialized size)."""
    if model.path is None:
        return model.proto.ByteSize()
    locations = {e.value for g in iter_graphs(model.proto.graph) for t in g.initializer
                 for e in t.external_data if e.key == "location"}
    files = [model.path] + [model.path.parent / loc for loc in sorted(locations)]
    return sum(f.stat().st_size for f in files if f.exists())
