"""The compress pipeline: load -> find weights -> calibrate -> allocate -> prune -> measure."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import __version__
from .allocate import ALLOCATORS, SOLVERS, Allocation, predicted
from .calibrate import (
    Curves,
    Fingerprint,
    check_grid,
    digest,
    exposed_tensors,
    layer_inputs,
    measure_curves,
    model_digest,
    record,
    scores_for,
)
from .config import CompressConfig
from .data import Batches, DataOptions, input_specs, make_batches, open_npz
from .distortion import Distortion, is_class_scores
from .errors import UsageError
from .measure import Replay, measure
from .model import Model, iter_graphs, load_model, simplify, write_model
from .prune import Ranking, Scores
from .report import Evaluation, RatePoint, Report, WeightReport
from .runtime import Runner
from .weights import Weight, find_weights, read_weights

ModelSource = str | os.PathLike | onnx.ModelProto | bytes
DataSource = str | os.PathLike | Mapping[str, np.ndarray] | None
FORMATS = ("dense", "sparse")
SEARCH_STEPS = 8


@dataclass
class CompressResult:
    """The pruned weights of a model and the report of what they cost."""

    source: Model
    weights: dict[str, np.ndarray]
    report: Report
    curves: Curves | None = None

    @property
    def model(self) -> onnx.ModelProto:
        """The pruned model as one in-memory protobuf (dense; for models under 2 GB)."""
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
        if path.is_dir():
            raise UsageError(f"output {path} is a folder; give a file name")
        if path.exists() and not force:
            raise UsageError(f"output {path} exists; pass --force to replace it")
        sparse = frozenset(self.weights) if format == "sparse" else frozenset()
        size = write_model(self.source, path, self.weights, sparse)
        self.report.output, self.report.output_format, self.report.output_bytes = \
            str(path), format, size
        return size


@dataclass
class Calibration:
    """Everything measured once on the calibration data, reused by every probe."""

    model: Model
    weights: list[Weight]
    originals: dict[str, np.ndarray]
    runner: Runner
    replay: Replay
    scores: dict[str, Scores]
    rankings: dict[str, Ranking]
    fingerprint: Fingerprint
    data_name: str
    notices: list[str] = field(default_factory=list)

    def run_with(self, pruned: Mapping[str, np.ndarray]) -> Callable:
        values = {n: self.runner.weight_value(n, a) for n, a in pruned.items()}
        return lambda feed: self.runner.run(feed, values)

    def distortion(self, pruned: Mapping[str, np.ndarray], config: CompressConfig) -> Distortion:
        return self.replay.distortion(self.run_with(pruned), config.channel_axis)

    def prune(self, keep: Mapping[str, int]) -> dict[str, np.ndarray]:
        return {w.name: self.rankings[w.name].apply(self.originals[w.name], keep[w.name])
                for w in self.weights}


def load_and_find(model: ModelSource, config: CompressConfig) -> tuple[Model, list[Weight],
                                                                        list[str]]:
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


def make_data(model: Model, source: DataSource, options: DataOptions,
              labels: str | None = None) -> tuple[Batches, str]:
    """Batches for `model` and a short name of where they come from."""
    name = "synthetic" if source is None else (
        "arrays" if isinstance(source, Mapping) else Path(source).name)
    if labels and source is not None:
        if isinstance(source, Mapping):
            keys = set(source)
        elif Path(source).is_file():
            keys = set(open_npz(Path(source)))
        else:
            keys = {k for f in Path(source).glob("*.npz") for k in open_npz(f)}
        if labels not in keys:
            raise UsageError(f"labels key {labels!r} not found in {source}; keys: "
                             f"{sorted(keys)}")
    batches = make_batches(source, input_specs(model), options, (labels,) if labels else ())
    return batches, name


def calibrate_model(model: ModelSource, config: CompressConfig, calib: DataSource,
                    quiet: bool = True) -> Calibration:
    """Load, find weights, run the reference pass (outputs, layer-input moments) once."""
    loaded, weights, notices = load_and_find(model, config)
    batches, data_name = make_data(loaded, calib, config.data)
    originals = read_weights(loaded, weights)
    inputs = layer_inputs(loaded, weights) if config.criterion == "activation" else {}
    runner = Runner(loaded, weights, config.device, exposed_tensors(loaded, inputs))
    if runner.device.notice:
        notices.append(runner.device.notice)
    replay, moments, data_digest = record(runner, batches, inputs, quiet)
    if config.metric == "kl" and not any(is_class_scores(o) for o in next(iter(replay))[1]):
        raise UsageError("--metric kl needs an output of class scores [batch, classes]; "
                         "use --metric nmse, nmse-channel or cosine")
    scores = scores_for(weights, originals, config.criterion, inputs, moments)
    fingerprint = Fingerprint(model_digest(loaded, originals), data_digest,
                              digest(repr(sorted(config.curve_settings().items()))))
    return Calibration(loaded, weights, originals, runner, replay, scores,
                       {n: Ranking(s) for n, s in scores.items()}, fingerprint, data_name,
                       notices)


def measure_all_curves(cal: Calibration, config: CompressConfig, quiet: bool = True) -> Curves:
    """Per-weight R-D curves on the configured grid."""
    grid = check_grid(config.grid)
    measured = measure_curves(cal.runner, cal.replay, cal.weights, cal.originals, cal.rankings,
                              grid, config.metric, config.channel_axis, quiet)
    return Curves(grid, measured, {w.name: w.size for w in cal.weights},
                  config.curve_settings(), cal.fingerprint)


def check_curves(curves: Curves, cal: Calibration) -> None:
    """Refuse curves measured on another model, other data or other settings."""
    differ = curves.fingerprint.mismatch(cal.fingerprint)
    if differ:
        raise UsageError(f"the curves do not match this run ({', '.join(differ)} differ); "
                         "rerun rdonnx calibrate with the same model, data and settings")


def compress(model: ModelSource, config: CompressConfig, calib: DataSource = None,
             test: DataSource = None, labels: str | None = None,
             curves: Curves | str | os.PathLike | None = None, quiet: bool = True,
             frontier: Sequence[float] = ()) -> CompressResult:
    """Prune `model` to the configured target and measure what that costs.

    `frontier` lists other rates at which the same method is measured too (for plots).
    """
    config.check()
    if labels and test is None:
        raise UsageError("labels need test data (--test DATA --labels KEY)")
    cal = calibrate_model(model, config, calib, quiet)
    test_data = make_data(cal.model, test, config.data, labels) if test is not None else None
    need_curves = config.method == "rd" or config.max_distortion is not None
    if curves is not None:
        curves = curves if isinstance(curves, Curves) else Curves.load(curves)
        check_curves(curves, cal)
    elif need_curves:
        curves = measure_all_curves(cal, config, quiet)
    allocation = Allocation({n: s.values for n, s in cal.scores.items()},
                            {n: curves.curve(n) for n in curves.distortion} if curves else {},
                            config.normalize)
    allocator = SOLVERS[config.solver] if config.method == "rd" else ALLOCATORS[config.method]
    keep, pruned, final, steps = _meet_target(cal, config, allocation, allocator, curves)
    points = []
    for rate in frontier:
        d = cal.distortion(cal.prune(allocator(allocation, rate)), config)
        points.append(RatePoint(rate, d.value(config.metric), d.top1_agreement))
    layer = [None] * len(cal.weights)
    if config.layer_distortion:
        layer = [cal.distortion({w.name: pruned[w.name]}, config).value(config.metric)
                 for w in cal.weights]
    test_eval = None
    if test_data is not None:
        data, name = test_data
        result = measure(cal.runner.run, [cal.run_with(pruned)], data, labels, "test", quiet,
                         config.channel_axis)
        test_eval = Evaluation.from_distortion(f"test ({name})", config.metric,
                                               result.distortions[0], result.reference_accuracy,
                                               result.accuracies[0])
    weights = [WeightReport(
        w.name, w.op, list(w.shape), w.dtype, w.size, keep[w.name],
        keep[w.name] / w.size if w.size else 1.0, d, cal.scores[w.name].criterion,
        list(curves.distortion[w.name]) if curves else None)
        for w, d in zip(cal.weights, layer)]
    report = Report(
        model=str(cal.model.path.name) if cal.model.path else "<in-memory model>",
        method=config.method, criterion=config.criterion, rate=sum(keep.values()) / sum(
            w.size for w in cal.weights), device=cal.runner.device.provider,
        simplified=any("simplified with onnxsim" in n for n in cal.notices),
        params_total=sum(w.size for w in cal.weights), params_kept=sum(keep.values()),
        input_bytes=_source_bytes(cal.model),
        calibration=Evaluation.from_distortion(f"calibration ({cal.data_name})", config.metric,
                                               final),
        predicted_distortion=predicted(allocation, keep) if curves else None,
        grid=list(curves.grid) if curves else None, search=steps, frontier=points,
        weights=weights,
        settings=config.as_dict(), rdonnx_version=__version__, test=test_eval,
        notices=cal.notices)
    return CompressResult(cal.model, pruned, report, curves)


def _meet_target(cal: Calibration, config: CompressConfig, allocation: Allocation,
                 allocator: Callable, curves: Curves | None):
    """Allocate at the rate, or search the smallest rate whose measurement meets the bound."""

    def at(rate: float):
        keep = allocator(allocation, rate)
        pruned = cal.prune(keep)
        return keep, pruned, cal.distortion(pruned, config)

    if config.rate is not None:
        return (*at(config.rate), [])
    if config.max_distortion is not None:
        bound = config.max_distortion

        def ok(d: Distortion) -> bool:
            return d.value(config.metric) <= bound
    else:
        bound = config.min_agreement

        def ok(d: Distortion) -> bool:
            if d.top1_agreement is None:
                raise UsageError("--min-agreement needs an output of class scores "
                                 "[batch, classes]; use --max-distortion")
            return d.top1_agreement >= bound
    low = min(check_grid(config.grid))
    guess = _predicted_rate(allocation, allocator, bound, low) \
        if curves is not None and config.max_distortion is not None else 0.5
    steps: list[RatePoint] = []
    results: dict[float, tuple] = {}

    def probe(rate: float) -> bool:
        rate = float(f"{rate:.6g}")
        if rate not in results:
            results[rate] = at(rate)
            d = results[rate][2]
            steps.append(RatePoint(rate, d.value(config.metric), d.top1_agreement,
                                    ok(d)))
        return ok(results[rate][2])

    hi = min(max(guess, low), 1.0)
    while not probe(hi) and hi < 1.0:
        hi = min(1.0, hi * 1.5)
    lo = hi
    while lo > low and probe(lo):
        hi, lo = lo, max(low, lo / 1.5)
    if not probe(lo):  # lo misses, hi meets the bound: bisect between them
        for _ in range(SEARCH_STEPS):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if probe(mid) else (mid, hi)
    best = min((r for r, res in results.items() if ok(res[2])), default=None)
    if best is None:
        raise UsageError("no rate meets the bound, not even keeping every weight")
    return (*results[best], sorted(steps, key=lambda s: s.rate))


def _predicted_rate(allocation: Allocation, allocator: Callable, bound: float,
                    low: float) -> float:
    """The smallest rate whose curve-predicted distortion is within `bound` (bisection)."""
    lo, hi = low, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if predicted(allocation, allocator(allocation, mid)) <= bound:
            hi = mid
        else:
            lo = mid
    return hi


def _source_bytes(model: Model) -> int:
    """Bytes of the model file plus its external data files (in memory: serialized size)."""
    if model.path is None:
        return model.proto.ByteSize()
    locations = {e.value for g in iter_graphs(model.proto.graph) for t in g.initializer
                 for e in t.external_data if e.key == "location"}
    files = [model.path] + [model.path.parent / loc for loc in sorted(locations)]
    return sum(f.stat().st_size for f in files if f.exists())
