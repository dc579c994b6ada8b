"""The Python API: `compress`, `inspect` and `evaluate`. The CLI is a thin layer over these."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from . import __version__
from .allocate import ALLOCATORS, global_normalized
from .data import Batches, DataOptions, input_specs, make_batches
from .distortion import METRICS
from .errors import UsageError
from .measure import measure
from .model import Model, iter_graphs, load_model, simplify, write_model
from .prune import magnitude_scores, prune
from .report import Evaluation, Report, WeightReport, table
from .runtime import Runner
from .weights import DEFAULT_MIN_PARAMS, Weight, find_weights, read_weights

ModelSource = str | os.PathLike | onnx.ModelProto | bytes
DataSource = str | os.PathLike | Mapping[str, np.ndarray] | None
FORMATS = ("dense", "sparse")
CONFIG_VERSION = 1


@dataclass(frozen=True)
class CompressConfig:
    """Every setting of a compress run; serialised into the report."""

    rate: float
    method: str = "uniform"
    normalize: bool = False  # global: magnitudes divided by each tensor's RMS
    metric: str = "nmse"
    min_params: int = DEFAULT_MIN_PARAMS
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    simplify: bool = True
    device: str = "auto"
    layer_distortion: bool = True  # measure each weight pruned alone
    data: DataOptions = field(default_factory=DataOptions)
    version: int = CONFIG_VERSION

    def check(self) -> None:
        if not 0 < self.rate <= 1:
            raise UsageError(f"--rate must be in (0, 1] (the fraction of prunable weights kept), "
                             f"got {self.rate}")
        if self.method not in ALLOCATORS:
            raise UsageError(f"unknown method {self.method!r}; choose one of "
                             f"{', '.join(ALLOCATORS)}")
        if self.metric not in METRICS:
            raise UsageError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")


@dataclass
class CompressResult:
    """The pruned weights of a model and the report of what they cost."""

    source: Model
    weights: dict[str, np.ndarray]
    report: Report

    @property
    def model(self) -> onnx.ModelProto:
        """The pruned model as one in-memory protobuf (dense; for models under 2 GB)."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            write_model(self.source, path, self.weights)
            if (Path(tmp) / "model.onnx.data").exists():
                raise UsageError("the model is over 2 GB: use save() to write it with external "
                                 "data")
            return onnx.load(str(path))

    def save(self, path: str | os.PathLike, format: str = "dense", force: bool = False) -> int:
        """Write the pruned model (`dense`, or `sparse` initializers where smaller)."""
        if format not in FORMATS:
            raise UsageError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
        path = Path(path)
        source = self.source.path
        if source is not None and path.exists() and path.resolve() == source.resolve():
            raise UsageError(f"output {path} is the input model; choose another -o")
        if path.exists() and not force:
            raise UsageError(f"output {path} exists; pass --force to replace it")
        if path.is_dir():
            raise UsageError(f"output {path} is a folder; give a file name")
        sparse = frozenset(self.weights) if format == "sparse" else frozenset()
        size = write_model(self.source, path, self.weights, sparse)
        self.report.output, self.report.output_format, self.report.output_bytes = \
            str(path), format, size
        return size


def _prepare(model: ModelSource, config: CompressConfig) -> tuple[Model, list[Weight], list[str]]:
    """Load (and simplify when that exposes more prunable weights); find the weights."""
    loaded = load_model(model)
    notices: list[str] = []
    weights = find_weights(loaded, config.min_params, config.include, config.exclude)
    if config.simplify:
        simplified, notice = simplify(loaded)
        if notice:
            notices.append(notice)
        elif simplified is not loaded:
            more = find_weights(simplified, config.min_params, config.include, config.exclude)
            if sum(w.size for w in more) > sum(w.size for w in weights):
                loaded, weights = simplified, more
                notices.append("simplified with onnxsim: constant folding exposed more weights")
    if not weights:
        raise UsageError("no prunable weight found (float tensors of at least --min-params "
                         f"{config.min_params} elements feeding Conv, ConvTranspose, Gemm, "
                         "MatMul, LSTM, GRU or RNN); lower --min-params or --include NAME")
    return loaded, weights, notices


def _batches(model: Model, source: DataSource, options: DataOptions,
             labels: str | None = None) -> tuple[Batches, str]:
    name = "synthetic" if source is None else (
        "arrays" if isinstance(source, Mapping) else Path(source).name)
    extra = (labels,) if labels else ()
    batches = make_batches(source, input_specs(model), options, extra)
    if labels and isinstance(source, (str, os.PathLike)):
        first = next(iter(batches))
        if labels not in first:
            raise UsageError(f"labels key {labels!r} not found in {source}; keys: "
                             f"{sorted(first)}")
    return batches, name


def compress(model: ModelSource, *, rate: float, calib: DataSource = None,
             method: str = "uniform", test: DataSource = None, labels: str | None = None,
             config: CompressConfig | None = None, quiet: bool = True) -> CompressResult:
    """Prune `model` to keep `rate` of its prunable weights and measure what that costs.

    Args:
        model: a path, an `onnx.ModelProto` or serialized bytes.
        rate: fraction of prunable weights kept, in (0, 1].
        calib: calibration data (an `.npz` path, a folder of `.npz` feeds, arrays by input
            name); None makes synthetic inputs from the input specs.
        method: allocator, "uniform" or "global".
        test: optional labelled data; with `labels` (its label key) accuracy is reported.
        config: every other setting; `rate` and `method` override its fields.
        quiet: no progress bars.
    """
    config = replace(config or CompressConfig(rate=rate), rate=rate, method=method)
    config.check()
    loaded, weights, notices = _prepare(model, config)
    batches, calib_name = _batches(loaded, calib, config.data)
    test_batches = _batches(loaded, test, config.data, labels) if test is not None else None

    originals = read_weights(loaded, weights)
    scores = {name: magnitude_scores(w) for name, w in originals.items()}
    allocator = global_normalized if config.method == "global" and config.normalize \
        else ALLOCATORS[config.method]
    keep = allocator(scores, config.rate)
    pruned = {w.name: prune(originals[w.name], keep[w.name], scores[w.name]) for w in weights}

    runner = Runner(loaded, weights, config.device)
    if runner.device.notice:
        notices.append(runner.device.notice)

    def variant(replacements: dict[str, np.ndarray]):
        return lambda feed: runner.run(feed, replacements)

    candidates = [variant(pruned)]
    if config.layer_distortion:
        candidates += [variant({w.name: pruned[w.name]}) for w in weights]
    calib_result = measure(variant({}), candidates, batches, None, "calibration", quiet)
    calibration = Evaluation.from_distortion(f"calibration ({calib_name})", config.metric,
                                             _distortion(calib_result.distortions[0], config))
    test_eval = None
    if test_batches is not None:
        data, name = test_batches
        result = measure(variant({}), [variant(pruned)], data, labels, "test", quiet)
        test_eval = Evaluation.from_distortion(f"test ({name})", config.metric,
                                               _distortion(result.distortions[0], config),
                                               result.reference_accuracy, result.accuracies[0])
    layer = calib_result.distortions[1:] if config.layer_distortion else [None] * len(weights)
    report = Report(
        model=str(loaded.path.name) if loaded.path else "<in-memory model>",
        method=config.method, rate=config.rate, device=runner.device.provider,
        simplified="simplified with onnxsim" in " ".join(notices),
        params_total=sum(w.size for w in weights), params_kept=sum(keep.values()),
        input_bytes=_source_bytes(loaded), calibration=calibration,
        weights=[WeightReport(w.name, w.op, list(w.shape), w.dtype, w.size, keep[w.name],
                              keep[w.name] / w.size if w.size else 1.0,
                              d.value(config.metric) if d is not None else None)
                 for w, d in zip(weights, layer)],
        settings=_settings(config), rdonnx_version=__version__, test=test_eval, notices=notices)
    return CompressResult(loaded, pruned, report)


def _distortion(d, config: CompressConfig):
    if config.metric == "kl" and d.kl is None:
        raise UsageError("--metric kl needs an output of class scores [batch, classes]; "
                         "use --metric nmse or cosine")
    return d


def _settings(config: CompressConfig) -> dict:
    settings = asdict(config)
    settings["data"] = {k: (dict(v) if isinstance(v, Mapping) else v)
                        for k, v in settings["data"].items()}
    return settings


def _source_bytes(model: Model) -> int:
    """Bytes of the model file plus its external data files (in memory: serialized size)."""
    if model.path is None:
        return model.proto.ByteSize()
    locations = {e.value for g in iter_graphs(model.proto.graph) for t in g.initializer
                 for e in t.external_data if e.key == "location"}
    files = [model.path] + [model.path.parent / loc for loc in sorted(locations)]
    return sum(f.stat().st_size for f in files if f.exists())


@dataclass(frozen=True)
class Inspection:
    """The prunable weights of a model with their current density."""

    model: str
    weights: list[WeightReport]

    @property
    def params_total(self) -> int:
        return sum(w.params for w in self.weights)

    @property
    def params_nonzero(self) -> int:
        return sum(w.kept for w in self.weights)

    def render(self) -> str:
        rows = [(w.name, w.op, "x".join(map(str, w.shape)), w.dtype, str(w.params),
                 f"{w.density:.2%}") for w in self.weights]
        total = self.params_total
        return (table(rows, ("weight", "op", "shape", "dtype", "params", "density")) +
                f"\n\n{len(self.weights)} prunable weights, {total:,} params, "
                f"{self.params_nonzero / max(total, 1):.2%} nonzero")


def inspect(model: ModelSource, *, min_params: int = DEFAULT_MIN_PARAMS,
            include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Inspection:
    """List the prunable weights of `model` (name, op, shape, dtype, params, density)."""
    loaded = load_model(model)
    weights = find_weights(loaded, min_params, include, exclude)
    values = read_weights(loaded, weights)
    rows = []
    for w in weights:
        nonzero = int(np.count_nonzero(values[w.name]))
        rows.append(WeightReport(w.name, w.op, list(w.shape), w.dtype, w.size, nonzero,
                                 nonzero / w.size if w.size else 1.0))
    return Inspection(loaded.path.name if loaded.path else "<in-memory model>", rows)


def evaluate(reference: ModelSource, candidate: ModelSource, data: DataSource, *,
             labels: str | None = None, metric: str = "nmse", device: str = "auto",
             options: DataOptions | None = None, quiet: bool = True) -> Evaluation:
    """Distortion (and accuracy with `labels`) of `candidate` against `reference` on `data`."""
    if metric not in METRICS:
        raise UsageError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    ref_model, cand_model = load_model(reference), load_model(candidate)
    specs = input_specs(ref_model)
    if [(s.name, s.dtype) for s in specs] != [(s.name, s.dtype) for s in
                                               input_specs(cand_model)]:
        raise UsageError("the two models take different inputs; compare models of one network")
    batches, name = _batches(ref_model, data, options or DataOptions(), labels)
    ref_runner = Runner(ref_model, [], device)
    cand_runner = Runner(cand_model, [], ref_runner.device)
    result = measure(ref_runner.run, [cand_runner.run], batches, labels, "evaluating", quiet)
    distortion = result.distortions[0]
    if metric == "kl" and distortion.kl is None:
        raise UsageError("--metric kl needs an output of class scores; use nmse or cosine")
    return Evaluation.from_distortion(name, metric, distortion, result.reference_accuracy,
                                      result.accuracies[0])
