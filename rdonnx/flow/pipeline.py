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
    ModelSource,
    calibrate_model,
    check_curves,
    make_data,
)
from rdonnx.flow.config import Coding, CompressConfig, Measurement
from rdonnx.flow.curves import Curves, check_grid, measure_curves, measure_value_curves
from rdonnx.flow.hessians import Hessians
from rdonnx.flow.methods.options import GlobalOptions
from rdonnx.flow.methods.registry import METHODS
from rdonnx.flow.realize import Realizer, pattern_mask
from rdonnx.flow.result import CompressResult, finish_report
from rdonnx.flow.target import Realized, meet_budget, meet_target
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
    cal = calibrate_model(model, config, calib, quiet, consumers=method.consumers)
    test_data = make_data(cal.model, test, config.data, labels) if test is not None else None
    if method.run is not None:
        return method.run(cal, config, test_data, labels, quiet)
    realizer = make_realizer(cal, config)
    target = config.target
    need_curves = (method.curves or target.kind == "distortion") and target.kind != "pattern"
    if curves is not None:
        curves = curves if isinstance(curves, Curves) else Curves.load(curves)
        check_curves(curves, cal)
    elif need_curves:
        curves = measure_all_curves(realizer, config.measure, config.curve_settings(), quiet)
    options = config.method_options
    allocation = Allocation({n: s.values for n, s in cal.scores.items()},
                            {n: curves.curve(n) for n in curves.distortion} if curves else {},
                            isinstance(options, GlobalOptions) and options.normalize)
    if method.prepare is not None:
        cal, allocation = method.prepare(cal, options, allocation)
        realizer = realizer.on(cal)
    allocator = SOLVERS[options.solver] if method.allocator == "rd" else \
        ALLOCATORS[method.allocator]
    chosen, steps, curves = _choose(realizer, config, allocation, allocator, curves, quiet,
                                    joint=method.allocator == "rd")
    metric = config.measure.metric
    lowest = min(check_grid(config.measure.grid)) if curves is not None else 0.0
    points = []
    for rate in (r for r in frontier if r >= lowest):
        d = realizer.realize(rate, allocator(allocation, rate)).distortion
        points.append(RatePoint(rate, d.value(metric), d.top1_agreement))
    report = finish_report(cal, config, chosen, curves, allocation, test_data, labels, quiet,
                           realizer.notices)
    report.search, report.frontier = steps, points
    return CompressResult(cal.model, chosen.values, chosen.quantized, report, curves,
                          chosen.pruned)


def make_realizer(cal: Calibration, config: CompressConfig) -> Realizer:
    """The realizer of a run: the option groups it prunes, codes and measures with."""
    return Realizer(cal, Hessians(cal), config.prune, config.coding, config.measure,
                    config.target.n_m)


def calibrate(model: ModelSource, config: CompressConfig, calib: DataSource = None,
              quiet: bool = True) -> Curves:
    """Measure the per-weight R-D curves of `model` (`rdonnx calibrate`)."""
    cal = calibrate_model(model, config, calib, quiet)
    return measure_all_curves(make_realizer(cal, config), config.measure,
                              config.curve_settings(), quiet)


def measure_all_curves(realizer: Realizer, measure: Measurement, settings: dict,
                       quiet: bool = True) -> Curves:
    """Per-weight R-D curves on the grid of `measure` (`settings`: what they depend on,
    `CompressConfig.curve_settings`)."""
    cal = realizer.cal
    grid = check_grid(measure.grid)
    measured = measure_curves(cal.runner, cal.replay, cal.weights, realizer.variant(), grid,
                              measure.metric, measure.channel_axis, quiet)
    return Curves(grid, measured, {w.name: w.size for w in cal.weights}, settings,
                  cal.fingerprint)


def _choose(realizer: Realizer, config: CompressConfig, allocation: Allocation,
            allocator: Callable, curves: Curves | None, quiet: bool,
            joint: bool) -> tuple[Realized, list[RatePoint], Curves | None]:
    """The realized candidate for the target, the probes measured on the way, and the curves
    (with value curves added when the joint allocation needed them). `joint`: a bound or bits
    target with free value widths allocates density and value bits together (rd). (It
    dispatches on the target and the coding, so it takes the whole config.)"""
    cal = realizer.cal
    prunable = {w.name for w in cal.weights}
    sizes = {w.name: w.size for w in cal.weights}
    target, metric, coding = config.target, config.measure.metric, config.coding
    lowest = min(check_grid(config.measure.grid))

    def coded_bits(r: Realized) -> float:
        return sum(stream_bits(r.quantized.get(n), r.values[n]) for n in prunable)

    def search(values: Coding) -> tuple[Realized, list[RatePoint]]:
        run = realizer.with_coding(values)

        def realize(rate: float) -> Realized:
            return run.realize(rate, allocator(allocation, rate))

        return meet_target(target, metric, realize, allocation, allocator, lowest,
                           curves is not None, coded_bits)

    if target.kind == "pattern":  # the pattern fixes every supported weight's density
        keep = {w.name: int(np.count_nonzero(pattern_mask(cal, w.name, target.n_m)))
                if cal.supports(w.name) else w.size for w in cal.weights}
        return realizer.realize(sum(keep.values()) / sum(sizes.values()), keep), [], curves
    free_bits = coding.quantized and coding.value_bits is None
    if target.kind != "rate" and free_bits and joint:
        curves = _with_value_curves(realizer, curves, quiet)
        options = {w.name: options_for(cal.originals[w.name], cal.rankings[w.name],
                                       curves.grid, curves.distortion[w.name],
                                       with_wide_widths(curves.values[w.name]),
                                       lambda a, b, n=w.name: realizer.quantize(n, a, b))
                   for w in cal.weights}

        def realize_budget(budget: float) -> Realized:
            choice = allocate_joint(options, budget)
            keep = {n: int(round(o.density * sizes[n])) for n, o in choice.items()}
            r = realizer.realize(sum(keep.values()) / sum(sizes.values()), keep,
                                 {n: o.bits for n, o in choice.items()})
            r.coded_bits = coded_bits(r)
            return r

        try:
            return (*meet_budget(target, metric, realize_budget, cost_range(options),
                                 sum(sizes.values())), curves)
        except UsageError:
            if target.kind == "bits":
                raise
            return (*_exact_values(realizer, search, coding), curves)
    if target.bound and free_bits:  # other allocators: one value width for all, the smallest file
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


def _with_value_curves(realizer: Realizer, curves: Curves, quiet: bool) -> Curves:
    """`curves` with Q_l(b) for every joint value width (measured now if missing)."""
    cal, quantizer = realizer.cal, realizer.coding.quantizer
    if curves.values_quantizer == quantizer and \
            all(set(JOINT_VALUE_BITS) <= set(curves.values.get(w.name, {})) for w in cal.weights):
        return curves
    measured = measure_value_curves(cal.runner, cal.replay, cal.weights,
                                    realizer.value_variant(), JOINT_VALUE_BITS,
                                    realizer.measure.metric, realizer.measure.channel_axis, quiet)
    return replace(curves, values=measured, values_quantizer=quantizer)
