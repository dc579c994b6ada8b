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
    measure_all_curves,
)
from rdonnx.flow.config import CompressConfig
from rdonnx.flow.curves import Curves, check_grid, measure_value_curves
from rdonnx.flow.methods.registry import METHODS
from rdonnx.flow.result import CompressResult, finish_report
from rdonnx.flow.score import Scorer, load_callable
from rdonnx.flow.target import Check, Realized, check_supported, meet_budget, meet_target
from rdonnx.report.records import RatePoint
from rdonnx.runtime.distortion import is_class_scores

JOINT_BITS = (4, 5, 6, 8)  # value widths tried when a bound picks the smallest artifact


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
    cal = calibrate_model(model, config, calib, quiet, consumers=method.consumers,
                          verify=verify)
    checked = cal.check if cal.check is not None else cal.replay
    if any(is_class_scores(o) for o in next(iter(checked))[1]):  # else: refused when measured
        check_supported(target, config.verify.confidence, checked.samples)
    test_data = make_data(cal.model, test, config.data, labels) if test is not None else None
    check = Check(config.metric, config.verify.confidence)
    if function is not None:
        scorer = Scorer(function, config.verify.eval, cal.model, [f for f, _ in checked],
                        cal.runner.device.provider)
        check = Check(config.metric, config.verify.confidence,
                      lambda r: scorer(r.values), scorer(cal.originals)[0])
    if method.run is not None:
        return method.run(cal, config, test_data, labels, quiet)
    need_curves = (method.curves or target.kind == "distortion") and target.kind != "pattern"
    if curves is not None:
        curves = curves if isinstance(curves, Curves) else Curves.load(curves)
        check_curves(curves, cal)
    elif need_curves:
        curves = measure_all_curves(cal, config, quiet)
    allocation = Allocation({n: s.values for n, s in cal.scores.items()},
                            {n: curves.curve(n) for n in curves.distortion} if curves else {},
                            config.normalize)
    if method.prepare is not None:
        cal, allocation = method.prepare(cal, config, allocation)
    allocator = SOLVERS[config.solver] if method.allocator == "rd" else \
        ALLOCATORS[method.allocator]
    chosen, steps, curves = _choose(cal, config, allocation, allocator, curves, quiet,
                                    check, joint=method.allocator == "rd")
    lowest = min(check_grid(config.grid)) if curves is not None else 0.0
    points = []
    for rate in (r for r in frontier if r >= lowest):
        d = cal.realize(rate, allocator(allocation, rate), config).distortion
        points.append(RatePoint(rate, d.value(config.metric), d.top1_agreement))
    report = finish_report(cal, config, chosen, curves, allocation, test_data, labels, quiet,
                           check)
    report.search, report.frontier = steps, points
    return CompressResult(cal.model, chosen.values, chosen.quantized, report, curves,
                          chosen.pruned)


def _choose(cal: Calibration, config: CompressConfig, allocation: Allocation,
            allocator: Callable, curves: Curves | None, quiet: bool, check: Check,
            joint: bool) -> tuple[Realized, list[RatePoint], Curves | None]:
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

        return meet_target(run_config.target, check, realize, allocation, allocator,
                           min(check_grid(config.grid)), curves is not None, coded_bits)

    target = config.target
    if target.kind == "pattern":  # the pattern fixes every supported weight's density
        keep = {w.name: int(np.count_nonzero(cal.pattern_mask(w.name, config.n_m)))
                if cal.supports(w.name) else w.size for w in cal.weights}
        return cal.realize(sum(keep.values()) / sum(sizes.values()), keep, config), [], curves
    free_bits = config.quantized and config.value_bits is None
    if target.kind != "rate" and free_bits and joint:
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
            return (*meet_budget(config.target, check, realize_budget,
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
    measured = measure_value_curves(cal.runner, cal.replay, cal.weights,
                                    cal.value_variant(config), JOINT_VALUE_BITS, config.metric,
                                    config.channel_axis, quiet)
    return replace(curves, values=measured, values_quantizer=config.quantizer)


