"""The compress pipeline: load -> find weights -> calibrate -> allocate -> prune -> measure."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np

from rdonnx.allocate.allocators import ALLOCATORS, SOLVERS, Allocation
from rdonnx.allocate.joint import (
    JOINT_VALUE_BITS,
    Option,
    allocate_joint,
    cost_range,
    estimate_bits,
    options_for,
    with_wide_widths,
)
from rdonnx.artifact.sizes import stream_bits
from rdonnx.errors import UsageError
from rdonnx.flow.calibration import (
    Calibration,
    DataSource,
    ModelSource,
    calibrate_model,
    check_curves,
    make_data,
)
from rdonnx.flow.config import Coding, CompressConfig, Measurement, Target
from rdonnx.flow.curves import (
    Curves,
    check_grid,
    coarse_indices,
    interpolated,
    measure_curves,
    measure_value_curves,
    refinement,
)
from rdonnx.flow.hessians import Hessians
from rdonnx.flow.methods.options import GlobalOptions
from rdonnx.flow.methods.registry import METHODS
from rdonnx.flow.realize import Realizer, pattern_mask
from rdonnx.flow.result import CompressResult, finish_report
from rdonnx.flow.score import Scorer, load_callable
from rdonnx.flow.target import (
    Check,
    Realized,
    check_supported,
    meet_budget,
    meet_target,
    predicted_rate,
)
from rdonnx.graph.weights import Weight
from rdonnx.progress import Stages
from rdonnx.report.records import RatePoint
from rdonnx.runtime.distortion import is_class_scores
from rdonnx.runtime.probe import Prober

JOINT_BITS = (4, 5, 6, 8, 10, 12, 16)  # value widths tried when a bound picks the smallest file
ADAPTIVE_MIN_POINTS = 9  # grids with fewer points are measured whole
ADAPTIVE_STRIDE = 3  # the adaptive grid's first pass: every third point (and the last)
ADAPTIVE_ROUNDS = 4  # refinements at most (each measures the points around the allocation)
Focus = Callable[[Curves], list[Mapping[str, int]]]  # kept counts where curves must be exact


def compress(model: ModelSource, config: CompressConfig, calib: DataSource = None,
             test: DataSource = None, labels: str | None = None,
             curves: Curves | str | os.PathLike | None = None, quiet: bool = True,
             frontier: Sequence[float] = (), verify: DataSource = None) -> CompressResult:
    """Prune `model` to the configured target and measure what that costs.

    `frontier` lists other rates at which the same method is measured too (for plots).
    `verify`: held-out data for every bound check (instead of a part of `calib`).
    """
    method = METHODS[config.method] if config.method in METHODS else None
    if method is not None and method.settings is not None:
        config = method.settings(config)
    config.check()  # unknown methods are refused here
    if labels and test is None:
        raise UsageError("labels need test data (--test DATA --labels KEY)")
    target = config.target
    function = load_callable(config.verify.eval) if config.verify.eval else None
    if method.run is not None and target.kind in ("score", "drop"):
        raise UsageError(f"--method {config.method} does not search on --eval scores; use "
                         "--max-distortion or another method")
    stages = Stages()
    with stages.stage("reference"):
        cal = calibrate_model(model, config, calib, quiet, consumers=method.consumers,
                              verify=verify)
    checked = cal.checked
    if any(is_class_scores(o) for o in next(iter(checked))[1]):  # else: refused when measured
        check_supported(target, config.verify.confidence, checked.samples)
    test_data = make_data(cal.model, test, config.data, labels) if test is not None else None
    if method.run is not None:
        return method.run(cal, config, test_data, labels, quiet)
    realizer = make_realizer(cal, config)
    check = Check(config.measure.metric, config.verify.confidence)
    if function is not None:
        scorer = Scorer(function, config.verify.eval, cal.model, [f for f, _ in checked],
                        cal.runner.device.provider)
        check = Check(config.measure.metric, config.verify.confidence,
                      lambda r: scorer(r.values), scorer(cal.originals)[0])
    options = config.method_options
    normalize = isinstance(options, GlobalOptions) and options.normalize
    scores = {n: s.values for n, s in cal.scores.items()}
    allocator = SOLVERS[options.solver] if method.allocator == "rd" else \
        ALLOCATORS[method.allocator]
    if curves is not None:
        curves = curves if isinstance(curves, Curves) else Curves.load(curves)
        check_curves(curves, cal)
    elif needs_curves(method.curves, target):
        with stages.stage("curves"):
            curves = measure_all_curves(
                realizer, config.measure, config.curve_settings(), quiet,
                _focus(scores, allocator, normalize, config.measure, target, frontier))
    if target.kind == "rate" and target.value >= 1:
        allocator = ALLOCATORS["uniform"]  # every weight kept whole: nothing to allocate
    allocation = Allocation(scores, {n: curves.curve(n) for n in curves.distortion}
                            if curves else {}, normalize)
    with stages.stage("allocate and measure"):
        if method.prepare is not None:
            cal, allocation = method.prepare(cal, options, allocation)
            realizer = realizer.on(cal)
        chosen, steps, curves = _choose(realizer, config, allocation, allocator, curves, quiet,
                                        check, joint=method.allocator == "rd", stages=stages)
    metric = config.measure.metric
    lowest = min(check_grid(config.measure.grid)) if curves is not None else 0.0
    points = []
    with stages.stage("frontier"):
        for rate in (r for r in frontier if r >= lowest):
            d = realizer.realize(rate, allocator(allocation, rate)).distortion
            points.append(RatePoint(rate, d.value(metric), d.top1_agreement))
    with stages.stage("report"):
        report = finish_report(cal, config, chosen, curves, allocation, test_data, labels,
                               quiet, realizer.notices, check, realizer.reconstruction)
    report.search, report.frontier = steps, points
    report.timings = {name: round(seconds, 3) for name, seconds in stages.seconds.items()}
    return CompressResult(cal.model, chosen.values, chosen.quantized, report, curves,
                          chosen.pruned)


def needs_curves(rd: bool, target: Target) -> bool:
    """Whether a run measures R-D curves: only a method that allocates with them (`rd`), and
    only when something is pruned (not at `--rate 1`, not for a `--pattern`). Other methods
    search a bound by measuring candidates and need none."""
    if target.kind == "pattern" or target.kind == "rate" and target.value >= 1:
        return False
    return rd


def _focus(scores: dict[str, np.ndarray], allocator: Callable, normalize: bool,
           measure: Measurement, target: Target, frontier: Sequence[float]) -> Focus | None:
    """Where the adaptive grid must be exact: the allocations at the target rate, or at the
    rate the curves predict for a distortion bound, and at the `frontier` rates (None: other
    targets measure the whole grid)."""
    if target.kind not in ("rate", "distortion"):
        return None
    low = min(check_grid(measure.grid))

    def focus(curves: Curves) -> list[dict[str, int]]:
        allocation = Allocation(scores, {n: curves.curve(n) for n in curves.distortion},
                                normalize)
        rate = target.value if target.kind == "rate" else \
            predicted_rate(allocation, allocator, target.value, low)
        return [allocator(allocation, r) for r in (rate, *(f for f in frontier if f >= low))]

    return focus


def make_realizer(cal: Calibration, config: CompressConfig) -> Realizer:
    """The realizer of a run: the option groups it prunes, codes and measures with (and, for
    a distortion bound checked at a confidence level, the metric whose per-sample sums its
    measurements keep)."""
    terms = config.measure.metric if config.verify.confidence > 0 and \
        config.target.max_distortion is not None else None
    return Realizer(cal, Hessians(cal), config.prune, config.coding, config.measure,
                    config.target.n_m, terms=terms, confidence=config.verify.confidence)


def calibrate(model: ModelSource, config: CompressConfig, calib: DataSource = None,
              quiet: bool = True, verify: DataSource = None) -> Curves:
    """Measure the per-weight R-D curves of `model` (`rdonnx calibrate`) on the fit part of
    the data (split as compress splits it)."""
    cal = calibrate_model(model, config, calib, quiet, verify=verify)
    return measure_all_curves(make_realizer(cal, config), config.measure,
                              config.curve_settings(), quiet)


def measure_all_curves(realizer: Realizer, measure: Measurement, settings: dict,
                       quiet: bool = True, focus: Focus | None = None) -> Curves:
    """Per-weight R-D curves on the grid of `measure` (`settings`: what they depend on,
    `CompressConfig.curve_settings`): every point, or (`focus` given, `measure.adaptive` and
    a grid of at least `ADAPTIVE_MIN_POINTS`) the adaptive grid: every `ADAPTIVE_STRIDE`-th
    point first, then, until the allocations `focus` returns land between measured points
    only, the points around each weight's chosen density. Points not measured are
    interpolated (`interpolated`) and listed in `Curves.measured`."""
    cal = realizer.cal
    grid = check_grid(measure.grid)
    prober = cal.prober or Prober(cal.runner, cal.replay, notices=realizer.notices)
    variant = realizer.variant()
    sizes = {w.name: w.size for w in cal.weights}
    if focus is None or not measure.adaptive or len(grid) < ADAPTIVE_MIN_POINTS:
        measured = measure_curves(prober, cal.weights, variant, grid, measure.metric,
                                  measure.channel_axis, quiet)
        return Curves(grid, measured, sizes, settings, cal.fingerprint)
    wanted = {w.name: coarse_indices(grid, ADAPTIVE_STRIDE) for w in cal.weights}
    points: dict[str, dict[int, float]] = {w.name: {} for w in cal.weights}
    for _ in range(ADAPTIVE_ROUNDS + 1):
        found = measure_curves(prober, cal.weights, variant, grid, measure.metric,
                               measure.channel_axis, quiet, wanted)
        for name, values in found.items():
            points[name].update(values)
        curves = Curves(grid, {n: interpolated(grid, p) for n, p in points.items()}, sizes,
                        settings, cal.fingerprint,
                        measured={n: tuple(sorted(p)) for n, p in points.items()})
        wanted = {}
        for keep in focus(curves):
            for name, kept in keep.items():
                more = refinement(grid, list(points[name]), kept / max(sizes[name], 1))
                wanted.setdefault(name, set()).update(more)
        wanted = {n: sorted(v) for n, v in wanted.items() if v}
        if not wanted:
            break
    return curves


def _choose(realizer: Realizer, config: CompressConfig, allocation: Allocation,
            allocator: Callable, curves: Curves | None, quiet: bool, check: Check,
            joint: bool, stages: Stages | None = None
            ) -> tuple[Realized, list[RatePoint], Curves | None]:
    """The realized candidate for the target, the probes measured on the way, and the curves
    (with value curves added when the joint allocation needed them). `joint`: a bound or bits
    target with free value widths allocates density and value bits together (rd). (It
    dispatches on the target and the coding, so it takes the whole config.)"""
    cal = realizer.cal
    prunable = {w.name for w in cal.weights}
    sizes = {w.name: w.size for w in cal.weights}
    target, coding = config.target, config.coding
    lowest = min(check_grid(config.measure.grid))

    def coded_bits(r: Realized) -> float:
        return sum(stream_bits(r.quantized.get(n), r.values[n]) for n in prunable)

    def search(values: Coding) -> tuple[Realized, list[RatePoint]]:
        run = realizer.with_coding(values)

        def realize(rate: float) -> Realized:
            return run.realize(rate, allocator(allocation, rate))

        return meet_target(target, check, realize, allocation, allocator, lowest,
                           curves is not None, coded_bits)

    if target.kind == "pattern":  # the pattern fixes every supported weight's density
        keep = {w.name: int(np.count_nonzero(pattern_mask(cal, w.name, target.n_m)))
                if cal.supports(w.name) else w.size for w in cal.weights}
        return realizer.realize(sum(keep.values()) / sum(sizes.values()), keep), [], curves
    free_bits = coding.quantized and coding.value_bits is None
    if target.kind != "rate" and free_bits and joint:
        with (stages or Stages()).stage("value curves"):
            curves = _with_value_curves(realizer, curves, quiet)
        options = {w.name: options_for(cal.originals[w.name], cal.rankings[w.name],
                                       curves.grid, curves.distortion[w.name],
                                       _value_curve(cal, w.name, curves.values[w.name]),
                                       lambda a, b, rows, n=w.name: realizer.quantize(n, a, b,
                                                                                      rows),
                                       cal.axes.get(w.name))
                   for w in cal.weights}
        if target.kind != "bits":  # the bits budget counts the prunable weights only
            with (stages or Stages()).stage("value curves"):
                options.update(_extra_options(realizer, quiet))

        realized: dict[tuple, Realized] = {}  # budgets apart often give the same choice

        def realize_budget(budget: float) -> Realized:
            choice = allocate_joint(options, budget)
            key = tuple((n, o.density, o.bits) for n, o in sorted(choice.items()))
            if key not in realized:
                keep = {n: int(round(o.density * sizes[n])) for n, o in choice.items()
                        if n in prunable}
                r = realizer.realize(sum(keep.values()) / sum(sizes.values()), keep,
                                     {n: o.bits for n, o in choice.items()})
                r.coded_bits = coded_bits(r)
                realized[key] = r
            return realized[key]

        try:
            return (*meet_budget(target, check, realize_budget, cost_range(options),
                                 sum(sizes.values())), curves)
        except UsageError:
            if target.kind == "bits":
                raise
            realizer.notices.append("no joint density / value-width allocation meets the "
                                    "bound; one value width for all tensors instead")
    if target.bound and free_bits:  # one value width for all (other allocators, or the joint
        # allocation missed: its predicted distortions add up differently), the smallest file
        candidates = []
        for bits in JOINT_BITS:
            try:
                candidates.append(search(replace(coding, value_bits=bits)))
            except UsageError:  # this width cannot meet the bound at any rate
                continue
        if not candidates:
            return (*_exact_values(realizer, search, coding), curves)
        chosen, steps = min(candidates, key=lambda c: coded_bits(c[0]))
        chosen.coded_bits = coded_bits(chosen)
        return chosen, steps, curves
    return (*search(coding), curves)


def _exact_values(realizer: Realizer, search: Callable, coding: Coding
                  ) -> tuple[Realized, list[RatePoint]]:
    """The smallest rate that meets the bound with exact values (at worst every weight kept:
    the original model, losslessly coded), when no quantized candidate does."""
    realizer.notices.append("no quantized candidate meets the bound (value widths up to 16 "
                            "bits): values are kept exact, losslessly coded")
    return search(replace(coding, values="exact"))


def _extra_options(realizer: Realizer, quiet: bool) -> dict[str, list[Option]]:
    """Width options (nothing pruned) of the coded matrices that are not pruned (embedding
    tables...), from their measured Q(b), so that a bound chooses their widths with the pruned
    weights' (fixed at 8 bits, g2p's two embedding tables alone give output nmse 0.047)."""
    cal = realizer.cal
    matrices = cal.extra_matrices

    def variant(w: Weight, bits: int) -> dict[str, np.ndarray]:
        array = cal.extra[w.name]
        return {w.name: realizer.quantize(w.name, array, bits).values(array.dtype)}

    measured = measure_value_curves(cal.prober, matrices, variant, JOINT_VALUE_BITS,
                                    realizer.measure.metric, realizer.measure.channel_axis, quiet)
    everything = {w.name: np.ones(cal.extra[w.name].shape, dtype=bool) for w in matrices}
    return {w.name: [Option(1.0, bits, estimate_bits(cal.extra[w.name], everything[w.name], bits,
                                                     lambda a, b, rows, n=w.name:
                                                     realizer.quantize(n, a, b, rows),
                                                     cal.axes.get(w.name)), q)
                     for bits, q in _value_curve(cal, w.name, measured[w.name]).items()]
            for w in matrices}


def _value_curve(cal: Calibration, name: str, measured: dict[int, float]) -> dict[int, float]:
    """Q(b) of a whole tensor from its measured value curve: predicted from the rows the fit
    part reads where rows it never reads are coded coarser (`algo.unread`)."""
    q = with_wide_widths(measured)
    unread = cal.unread.get(name)
    return q if unread is None else {b: unread.predicted(q, b) for b in q}


def _with_value_curves(realizer: Realizer, curves: Curves, quiet: bool) -> Curves:
    """`curves` with Q_l(b) for every joint value width (measured now if missing)."""
    cal, quantizer = realizer.cal, realizer.coding.quantizer
    prunable = {w.name for w in cal.weights}
    split = sorted(n for n in cal.unread if n in prunable)
    if split:  # the curves of those weights were measured with their classes split
        quantizer += f" (coarse rows: {', '.join(split)})"
    if curves.values_quantizer == quantizer and \
            all(set(JOINT_VALUE_BITS) <= set(curves.values.get(w.name, {})) for w in cal.weights):
        return curves
    measured = measure_value_curves(cal.prober, cal.weights,
                                    realizer.value_variant(), JOINT_VALUE_BITS,
                                    realizer.measure.metric, realizer.measure.channel_axis, quiet)
    return replace(curves, values=measured, values_quantizer=quantizer)
