"""Confidence bounds: Clopper-Pearson for agreement, the bootstrap for distortions, and the
per-sample terms the meter keeps for them."""

from __future__ import annotations

import numpy as np
import pytest

from rdonnx.runtime.confidence import (
    NEAR_TIES,
    SampleTerms,
    agreement_lower,
    flip_nmse,
    lower_at,
    samples_for_agreement,
)
from rdonnx.runtime.distortion import DistortionMeter


def test_clopper_pearson_with_no_disagreement_is_alpha_to_the_one_over_n():
    # the example: 64 of 64 cannot show 99%; its 95% lower bound is 95.4%
    assert agreement_lower(64, 64, 0.95) == pytest.approx(0.05 ** (1 / 64))
    assert agreement_lower(64, 64, 0.95) < 0.99
    assert agreement_lower(64, 64, 0.0) == 1.0
    assert agreement_lower(0, 50, 0.95) == 0.0


def test_clopper_pearson_matches_the_binomial_tail():
    from scipy.stats import binom

    k, n = 180, 200
    lower = agreement_lower(k, n, 0.95)
    assert lower < k / n
    # at the lower bound, k or more successes have probability 5%
    assert binom.sf(k - 1, n, lower) == pytest.approx(0.05, rel=1e-6)


@pytest.mark.parametrize("bound, confidence", [(0.99, 0.95), (0.95, 0.95), (0.9, 0.99)])
def test_samples_for_agreement_is_the_fewest_that_can_show_it(bound, confidence):
    n = samples_for_agreement(bound, confidence)
    assert agreement_lower(n, n, confidence) >= bound
    assert agreement_lower(n - 1, n - 1, confidence) < bound
    assert samples_for_agreement(1.0, confidence) is None  # never at any sample count


def test_bootstrap_upper_bound_is_seeded_and_above_the_value():
    rng = np.random.default_rng(1)
    terms = SampleTerms(rng.random((80, 2)), 1 + rng.random((80, 2)), (1, 1))
    value = terms.value()
    assert value == pytest.approx(float((terms.num.sum(0) / terms.den.sum(0)).sum()))
    upper = terms.upper(0.95)
    assert upper > value
    assert terms.upper(0.95) == upper  # same data, same bound
    assert terms.upper(0.99) >= upper
    assert terms.upper(0.0) == value
    # errors that are the same on every sample leave nothing to resample
    flat = SampleTerms(np.full((30, 1), 0.5), np.ones((30, 1)), (1,))
    assert flat.upper(0.95) == pytest.approx(0.5)


def test_a_lower_distortion_is_lower_at_a_confidence_only_when_the_samples_agree():
    """Paired bootstrap: 10% less on every sample is lower at 95%; less in total because of
    one sample of eight (more on the seven others) is lower only at confidence 0."""
    rng = np.random.default_rng(3)
    den = 1 + rng.random((8, 1))
    b = SampleTerms(0.5 * den * (1 + rng.random((8, 1))), den, (1,))
    steady = SampleTerms(0.9 * b.num, den, (1,))
    assert lower_at(steady, b, 0.95) and not lower_at(b, steady, 0.0)
    num = b.num * 1.05
    num[0] = 0.0  # one sample carries the whole gain
    one = SampleTerms(num, den, (1,))
    assert one.value() < b.value()
    assert lower_at(one, b, 0.0) and not lower_at(one, b, 0.95)
    assert not lower_at(b, b, 0.0)  # equal is not lower


@pytest.mark.parametrize("metric", ["nmse", "nmse-channel", "cosine", "kl"])
def test_meter_terms_reproduce_its_figure(metric):
    rng = np.random.default_rng(2)
    meter = DistortionMeter(1, None, terms=metric)
    for batch in (7, 5, 9):
        ref = [rng.standard_normal((batch, 6)).astype(np.float32),
               rng.standard_normal((batch, 3, 4)).astype(np.float32)]
        cand = [r + 0.1 * rng.standard_normal(r.shape).astype(np.float32) for r in ref]
        meter.add(ref, cand)
    d = meter.result()
    assert d.terms is not None and d.terms.samples == 21
    assert d.terms.value() == pytest.approx(d.value(metric), rel=1e-9)
    assert d.upper(metric, 0.95) >= d.value(metric)


def test_nmse_probe_path_keeps_terms_too():
    rng = np.random.default_rng(3)
    meter = DistortionMeter(1, "nmse", terms="nmse")
    for _ in range(4):
        ref = [rng.standard_normal((8, 5)).astype(np.float32)]
        meter.add(ref, [ref[0] * 0.9])
    d = meter.result()
    assert d.terms.samples == 32
    assert d.terms.value() == pytest.approx(d.nmse, rel=1e-9)


def test_flip_nmse_counts_the_margins_the_changes_reach():
    """Changes past every margin flip every decision: per_sample decisions, each flipping
    the sample, cost `cost` apiece; no change flips nothing; larger changes never flip less."""
    margins = np.linspace(0.1, 5.0, 50)
    assert flip_nmse(margins, np.zeros(20), per_sample=4) == 0.0
    assert flip_nmse(margins, np.full(20, 9.0), per_sample=4, cost=0.5) == pytest.approx(2.0)
    half = flip_nmse(margins, np.full(20, 2.5), per_sample=1)
    assert half == pytest.approx(2.0 * np.mean(margins <= 2.5))
    sizes = [flip_nmse(margins, np.full(5, c), 1) for c in (0.01, 0.05, 0.3, 1.0, 3.0)]
    assert sizes == sorted(sizes) and sizes[0] > 0


def test_flip_nmse_extends_the_closest_margins_to_zero_linearly():
    """Below the NEAR_TIES-th smallest margin the probability of a tie follows the line through
    zero and it: changes smaller than every margin in the sample still flip some decisions
    elsewhere (g2p: no held-out word as close to a tie as those that flip in the test split)."""
    margins = np.r_[np.arange(1, NEAR_TIES + 1) * 0.2, np.full(95, 4.0)]  # k-th smallest: 1.0
    n = margins.size
    got = flip_nmse(margins, np.array([0.05, -0.1]), per_sample=3, cost=1.0)
    assert got == pytest.approx(3 * np.mean([NEAR_TIES / n * 0.05, NEAR_TIES / n * 0.1]))
