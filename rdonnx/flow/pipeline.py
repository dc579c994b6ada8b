"""The compress pipeline: load -> find weights -> calibrate -> allocate -> prune -> measure."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from rdonnx.allocate.allocators import ALLOCATORS, SOLVERS, Allocation
from rdonnx.allocate.joint import (
    JOINT_VALUE_BITS,
    allocate_joint,
    cost_range,
    options_for,
    with_wide_widths,
)
from rdonnx.artifact.sizes import stream_bits
from rdonnx.errors import UsageError
from rdonnx.flow.calibration import (
    Calibration,
    DataSource,
    Focus,
    ModelSource,
    calibrate_model,
    check_curves,
    make_data,
    measure_all_curves,
)
from rdonnx.flow.config import CompressConfig, Target
from rdonnx.flow.curves import Curves, check_grid, measure_value_curves
from rdonnx.flow.methods.registry import METHODS
from rdonnx.flow.result import CompressResult, finish_report
from rdonnx.flow.target import Realized, meet_budget, meet_target, predicted_rate
from rdonnx.progress import Stages
from rdonnx.report.records import RatePoint

JOINT_BITS = (4, 5, 6, 8)  # value widths tried when a bound picks the smallest artifact


def compress(model: ModelSource, config: CompressConfig, calib: DataSource = None,
             test: DataSource = None, labels: str | None = None,
             curves: Curves | str | os.PathLike | None = None, quiet: bool = True,
             frontier: Sequence[float] = ()) -> CompressResult:
    """Prune `model` to the configured target and measure what that costs.

    `frontier` lists other rates at which the same method is measured too (for plots).
    """
    method = METHODS[config.method] if config.method in METHODS else None
    if method is not None and method.settings is not None:
        config = method.settings(config)
    config.check()  # unknown methods are refused here
    if labels and test is None:
        raise UsageError("labels need test data (--test DATA --labels KEY)")
    stages = Stages()
    with stages.stage("reference"):
        cal = calibrate_model(model, config, calib, quiet, consumers=method.consumers)
    test_data = make_data(cal.model, test, config.data, labels) if test is not None else None
    if method.run is not None:
        return method.run(cal, config, test_data, labels, quiet)
    target = config.target
    scores = {n: s.values for n, s in cal.scores.items()}
    allocator = SOLVERS[config.solver] if method.allocator == "rd" else \
        ALLOCATORS[method.allocator]
    if curves is not None:
        curves = curves if isinstance(curves, Curves) else Curves.load(curves)
        check_curves(curves, cal)
    elif needs_curves(method.curves, target):
        with stages.stage("curves"):
            curves = measure_all_curves(cal, config, quiet,
                                        _focus(scores, allocator, config, target, frontier))
    if target.kind == "rate" and target.value >= 1:
        allocator = ALLOCATORS["uniform"]  # every weight kept whole: nothing to allocate
    allocation = Allocation(scores, {n: curves.curve(n) for n in curves.distortion}
                            if curves else {}, config.normalize)
    with stages.stage("allocate and measure"):
        if method.prepare is not None:
            cal, allocation = method.prepare(cal, config, allocation)
        chosen, steps, curves = _choose(cal, config, allocation, allocator, curves, quiet,
                                        joint=method.allocator == "rd", stages=stages)
    lowest = min(check_grid(config.grid)) if curves is not None else 0.0
    points = []
    with stages.stage("frontier"):
        for rate in (r for r in frontier if r >= lowest):
            d = cal.realize(rate, allocator(allocation, rate), config).distortion
            points.append(RatePoint(rate, d.value(config.metric), d.top1_agreement))
    with stages.stage("report"):
        report = finish_report(cal, config, chosen, curves, allocation, test_data, labels,
                               quiet)
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


def _focus(scores: dict[str, np.ndarray], allocator: Callable, config: CompressConfig,
           target: Target, frontier: Sequence[float]) -> Focus | None:
    """Where the adaptive grid must be exact: the allocations at the target rate, or at the
    rate the curves predict for a distortion bound, and at the `frontier` rates (None: other
    targets measure the whole grid)."""
    if target.kind not in ("rate", "distortion"):
        return None
    low = min(check_grid(config.grid))

    def focus(curves: Curves) -> list[dict[str, int]]:
        allocation = Allocation(scores, {n: curves.curve(n) for n in curves.distortion},
                                config.normalize)
        rate = target.value if target.kind == "rate" else \
            predicted_rate(allocation, allocator, target.value, low)
        return [allocator(allocation, r) for r in (rate, *(f for f in frontier if f >= low))]

    return focus


def _choose(cal: Calibration, config: CompressConfig, allocation: Allocation,
            allocator: Callable, curves: Curves | None, quiet: bool,
            joint: bool, stages: Stages | None = None
            ) -> tuple[Realized, list[RatePoint], Curves | None]:
    """The realized candidate for the target, the probes measured on the way, and the curves
    (with value curves added when the joint allocation needed them). `joint`: a bound or bits
    target with free value widths allocates density and value bits together (rd)."""
    prunable = {w.name for w in cal.weights}
    sizes = {w.name: w.size for w in cal.weights}

    def coded_bits(r: Realized) -> float:
        return sum(stream_bits(r.quantized.get(n), r.values[n]) for n in prunable)

    def search(run_config: CompressConfig) -> tuple[Realized, list[RatePoint]]:
        def realize(rate: float) -> Realized:
            return cal.realize(rate, allocator(allocation, rate), run_config)

        return meet_target(run_config.target, run_config.metric, realize, allocation, allocator,
                           min(check_grid(config.grid)), curves is not None, coded_bits)

    target = config.target
    if target.kind == "pattern":  # the pattern fixes every supported weight's density
        keep = {w.name: int(np.count_nonzero(cal.pattern_mask(w.name, config.n_m)))
                if cal.supports(w.name) else w.size for w in cal.weights}
        return cal.realize(sum(keep.values()) / sum(sizes.values()), keep, config), [], curves
    free_bits = config.quantized and config.value_bits is None
    if target.kind != "rate" and free_bits and joint:
        with (stages or Stages()).stage("value curves"):
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
            return (*meet_budget(config.target, config.metric, realize_budget,
                                 cost_range(options), sum(sizes.values())), curves)
        except UsageError:
            if target.kind == "bits":
                raise
            return (*_exact_values(cal, search, config), curves)
    if target.bound and free_bits:  # other allocators: one value width for all, the smallest file
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


def _with_value_curves(cal: Calibration, config: CompressConfig, curves: Curves,
                       quiet: bool) -> Curves:
    """`curves` with Q_l(b) for every joint value width (measured now if missing)."""
    if curves.values_quantizer == config.quantizer and \
            all(set(JOINT_VALUE_BITS) <= set(curves.values.get(w.name, {})) for w in cal.weights):
        return curves
    measured = measure_value_curves(cal.prober, cal.weights,
                                    cal.value_variant(config), JOINT_VALUE_BITS, config.metric,
                                    config.channel_axis, quiet)
    return replace(curves, values=measured, values_quantizer=config.quantizer)


