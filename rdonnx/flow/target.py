"""Meet a target: a rate, or the smallest rate whose *measured* result meets a bound."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rdonnx.algo.quantize import Quantized
from rdonnx.allocate.allocators import Allocation, predicted
from rdonnx.errors import UsageError
from rdonnx.flow.config import Target
from rdonnx.report.records import RatePoint
from rdonnx.runtime.confidence import agreement_lower, samples_for_agreement
from rdonnx.runtime.distortion import Distortion

SEARCH_STEPS = 8


@dataclass
class Realized:
    """One candidate: kept counts, final values (pruned, then quantized) and their cost."""

    rate: float
    keep: dict[str, int]
    pruned: dict[str, np.ndarray]  # pruning alone
    values: dict[str, np.ndarray]  # every replaced tensor as the artifact holds it
    quantized: dict[str, Quantized]  # empty when values are exact
    widths: dict[str, int]  # value bits per quantized tensor (empty when exact)
    distortion: Distortion
    coded_bits: float | None = None  # positions + values bits of the prunable weights
    score: float | None = None  # the task score (--eval), when a score target asks for it
    score_samples: int | None = None  # the samples a share-of-samples score rests on


Realize = Callable[[float], Realized]


@dataclass(frozen=True)
class Check:
    """How a bound is checked: the distortion metric, the confidence of the one-sided bound
    (0: the figure as measured) and, for score targets, the task metric."""

    metric: str
    confidence: float = 0.0
    score: Callable[[Realized], tuple[float, int | None]] | None = None  # --eval: score and
    # the samples a share-of-samples score rests on
    reference_score: float | None = None  # the original model's

    def limit(self, target: Target, r: Realized) -> float | None:
        """The figure a bound is checked against: the distortion's upper confidence bound,
        the agreement's lower one, or the score (None for rate and bits targets)."""
        if target.kind == "distortion":
            return r.distortion.upper(self.metric, self.confidence)
        if target.kind == "agreement":
            if r.distortion.top1_agreement is None:
                raise UsageError("--min-agreement needs an output of class scores [batch, "
                                 "classes]; use --max-distortion")
            return r.distortion.agreement_lower(self.confidence)
        if target.kind in ("score", "drop"):
            if r.score is None:
                r.score, r.score_samples = self.score(r)
            if r.score_samples is None:
                return r.score
            n = r.score_samples
            return agreement_lower(int(round(r.score * n)), n, self.confidence)
        return None


def meets(target: Target, check: Check, r: Realized, params: int) -> bool:
    """Whether a measured candidate meets a bound or a bits budget."""
    if target.kind == "bits":
        return r.coded_bits / params <= target.value
    limit = check.limit(target, r)
    if target.kind == "distortion":
        return limit <= target.value
    if target.kind == "drop":
        return check.reference_score - limit <= target.value
    return limit >= target.value


def point(target: Target, check: Check, r: Realized, params: int, ok: bool) -> RatePoint:
    """A search probe as the report lists it."""
    return RatePoint(r.rate, r.distortion.value(check.metric), r.distortion.top1_agreement, ok,
                     None if r.coded_bits is None else r.coded_bits / params,
                     samples=r.distortion.samples, limit=check.limit(target, r)
                     if target.bound else None, score=r.score)


def meet_target(target: Target, check: Check, realize: Realize, allocation: Allocation,
                allocator: Callable, low: float, has_curves: bool,
                coded_bits: Callable[[Realized], float]) -> tuple[Realized, list[RatePoint]]:
    """The realized candidate for `target` (a rate, a bound or a bits budget) and the probes
    measured on the way."""
    if target.kind == "rate":
        return realize(target.value), []
    points: list[RatePoint] = []
    seen: dict[float, Realized] = {}
    params = sum(s.size for s in allocation.scores.values())

    def ok(r: Realized) -> bool:
        return meets(target, check, r, params)

    def probe(rate: float) -> bool:
        rate = float(f"{min(max(rate, low), 1.0):.6g}")
        if rate not in seen:
            r = realize(rate)
            if target.kind == "bits":
                r.coded_bits = coded_bits(r)
            seen[rate] = r
            points.append(point(target, check, r, params, ok(r)))
        return ok(seen[rate])

    if target.kind == "bits":  # bits grow with the rate: the largest rate within
        lo, hi = _bracket(probe, 0.1, low, grow=False)
        best = max((r for r, v in seen.items() if ok(v)), default=None)
    else:  # distortion falls as the rate grows: the smallest rate that meets the bound
        guess = predicted_rate(allocation, allocator, target.value, low) \
            if has_curves and target.kind == "distortion" else 0.5
        lo, hi = _bracket(probe, guess, low, grow=True)
        best = min((r for r, v in seen.items() if ok(v)), default=None)
    if best is None:
        full = seen.get(1.0)
        shown = ""
        if full is not None and full.score_samples is not None:
            shown = (f" (the score is a share of {full.score_samples} samples: at "
                     f"--confidence {check.confidence:g} they show at most "
                     f"{check.limit(target, full):.4g}; give more data or lower it)")
        raise UsageError("no rate meets the target, not even keeping every weight" + shown
                         if target.kind != "bits" else
                         "no rate fits the --bits-per-weight budget; raise it")
    result = seen[best]
    return result, sorted(points, key=lambda p: p.rate)


def check_supported(target: Target, confidence: float, n: int) -> None:
    """Refuse an agreement bound that `n` held-out samples cannot show at the `confidence`
    level even with no disagreement at all."""
    if target.kind != "agreement" or confidence <= 0:
        return
    check = Check("", confidence)
    need = samples_for_agreement(float(target.value), check.confidence)
    if need is None:
        raise UsageError(f"--min-agreement {target.value:g} cannot be shown at --confidence "
                         f"{check.confidence:g} with any number of samples; lower the bound or "
                         "give --confidence none")
    if n < need:
        best = agreement_lower(n, n, check.confidence)
        raise UsageError(f"--min-agreement {target.value:g} cannot be shown on {n} held-out "
                         f"samples: even with no disagreement their {check.confidence:.0%} "
                         f"lower confidence bound is {best:.2%}; it needs at least {need} "
                         "(more --calib data, --verify DATA, or a lower --confidence)")


def _bracket(probe: Callable[[float], bool], guess: float, low: float,
             grow: bool) -> tuple[float, float]:
    """Find a passing and a failing rate around `guess`, then bisect between them.

    With `grow`, rates at or above the threshold pass; otherwise rates at or below it pass.
    """
    passing = guess
    if grow:
        while not probe(passing) and passing < 1.0:
            passing = min(1.0, passing * 1.5)
        failing = passing
        while failing > low and probe(failing):
            passing, failing = failing, max(low, failing / 1.5)
    else:
        while not probe(passing) and passing > low:
            passing = max(low, passing / 1.5)
        failing = passing
        while failing < 1.0 and probe(failing):
            passing, failing = failing, min(1.0, failing * 1.5)
    if probe(failing) != probe(passing):
        for _ in range(SEARCH_STEPS):
            mid = (passing + failing) / 2
            passing, failing = (mid, failing) if probe(mid) else (passing, mid)
    return passing, failing


def predicted_rate(allocation: Allocation, allocator: Callable, bound: float,
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


def meet_budget(target: Target, check: Check, realize: Callable[[float], Realized],
                budgets: tuple[float, float], params: int) -> tuple[Realized, list[RatePoint]]:
    """Joint density / value-bits allocation: the budget (estimated bits) that meets the target.

    `--bits-per-weight`: the largest budget whose *coded* size fits (estimates are corrected
    with the real coder); a bound: the smallest budget whose measurement meets it.
    """
    points: list[RatePoint] = []
    seen: dict[float, Realized] = {}

    def ok(r: Realized) -> bool:
        return meets(target, check, r, params)

    def probe(budget: float) -> bool:
        key = float(f"{budget:.6g}")  # (rounding the budget itself could undercut the lowest)
        if key not in seen:
            r = realize(budget)
            seen[key] = r
            points.append(point(target, check, r, params, ok(r)))
        return ok(seen[key])

    low, high = budgets
    if target.kind == "bits":
        bits = target.value * params
        budget = min(max(bits, low), high)
        for _ in range(6):  # estimates are i.i.d. entropies: steer them by the real coder
            fits = probe(budget)
            coded = seen[float(f"{budget:.6g}")].coded_bits
            if fits and (coded >= 0.99 * bits or budget >= high):
                break
            budget = min(high, max(low, budget * bits / coded * (1.0 if fits else 0.995)))
        best = max((b for b, r in seen.items() if ok(r)), default=None)
    else:
        if not probe(high):
            best = None
        else:
            lo, hi = low, high
            if probe(lo):
                hi = lo
            for _ in range(SEARCH_STEPS + 2 if lo < hi else 0):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if probe(mid) else (mid, hi)
            best = min((b for b, r in seen.items() if ok(r)), default=None)
    if best is None:
        raise UsageError("no density and value width fits the --bits-per-weight budget; raise it"
                         if target.kind == "bits" else
                         "no density and value width meets the bound; loosen it")
    return seen[best], sorted(points, key=lambda p: p.rate)
