"""How far a figure measured on a sample can be trusted: one-sided confidence bounds.

Top-1 agreement is a share of k agreeing samples out of n: its lower bound is Clopper-Pearson's
(exact, from the binomial distribution). A distortion is a ratio of sums over samples (nmse,
per-channel nmse, KL, cosine distance): its upper bound is a bootstrap percentile over samples
(`SampleTerms`), seeded, so the same data gives the same bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def agreement_lower(agree: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower bound of a share `agree`/`n` at `confidence` (0: the
    share itself)."""
    if n <= 0:
        return 0.0
    if confidence <= 0:
        return agree / n
    if agree <= 0:
        return 0.0
    from scipy.stats import beta  # lazy: scipy.stats takes a while to import

    return float(beta.ppf(1.0 - confidence, agree, n - agree + 1))


def samples_for_agreement(bound: float, confidence: float) -> int | None:
    """The fewest samples whose lower bound can reach `bound` (all of them agreeing), or None
    when no number of samples can (a bound of 1 at a confidence above 0)."""
    if confidence <= 0 or bound <= 0:
        return 1
    if bound >= 1:
        return None
    # with no disagreement the lower bound is (1 - confidence)^(1/n)
    n = math.ceil(math.log(1.0 - confidence) / math.log(bound))
    while n > 1 and (1.0 - confidence) ** (1.0 / (n - 1)) >= bound:
        n -= 1
    while (1.0 - confidence) ** (1.0 / n) < bound:
        n += 1
    return n


@dataclass(frozen=True)
class SampleTerms:
    """A distortion as per-sample sums: value = sum over outputs (`groups`, columns per
    output) of the mean over the output's columns of sum_i num[i, j] / sum_i den[i, j].

    nmse: one column per output (error energy over reference energy); nmse-channel: one column
    per channel (`floor`: silent channels are compared with the mean channel, as the meter
    does); KL and cosine: one column, den counts rows."""

    num: np.ndarray  # [samples, columns], float64
    den: np.ndarray  # [samples, columns]
    groups: tuple[int, ...]
    floor: bool = False

    @property
    def samples(self) -> int:
        return int(self.num.shape[0])

    def value(self, weights: np.ndarray | None = None) -> np.ndarray | float:
        """The distortion (weights None), or one per row of `weights` [resamples, samples]."""
        if weights is None:
            num, den = self.num.sum(axis=0)[None], self.den.sum(axis=0)[None]
        else:
            num, den = weights @ self.num, weights @ self.den
        total = np.zeros(num.shape[0])
        start = 0
        for width in self.groups:
            n, d = num[:, start:start + width], den[:, start:start + width]
            if self.floor:
                floor = np.maximum(d.mean(axis=1, keepdims=True), 1e-30) * 1e-6
                ratio = n / np.maximum(d, floor)
            else:
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = np.where(d > 0, n / np.where(d > 0, d, 1.0),
                                     np.where(n == 0, 0.0, np.inf))
            total += ratio.mean(axis=1)
            start += width
        return float(total[0]) if weights is None else total

    def upper(self, confidence: float) -> float:
        """One-sided bootstrap upper bound at `confidence` (the value itself at 0 or with
        fewer than 2 samples)."""
        point = self.value()
        if confidence <= 0 or self.samples < 2:
            return point
        values = self.value(resamples(self.samples))
        return max(point, float(np.quantile(values, confidence, method="higher")))


def resamples(n: int) -> np.ndarray:
    """Bootstrap weights [BOOTSTRAP_RESAMPLES, n] over n samples (seeded)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=BOOTSTRAP_RESAMPLES).astype(np.float64)


def lower_at(a: SampleTerms, b: SampleTerms, confidence: float) -> bool:
    """Whether distortion `a` is below `b` at `confidence`, both measured on the same samples:
    the one-sided paired bootstrap upper bound of a - b (the same resamples for both) is below
    0. At confidence 0 or with fewer than 2 samples: whether a's value is below b's."""
    if a.value() >= b.value():
        return False
    if confidence <= 0 or a.samples < 2:
        return True
    if a.samples != b.samples:
        raise ValueError(f"paired terms over {a.samples} and {b.samples} samples")
    weights = resamples(a.samples)
    return float(np.quantile(a.value(weights) - b.value(weights), confidence,
                             method="higher")) < 0


def concat_terms(parts: list[tuple[list[np.ndarray], list[np.ndarray]]], groups: tuple[int, ...],
                 floor: bool) -> SampleTerms | None:
    """Terms from per-batch (num, den) column lists; None when the column counts differ
    between batches (an output whose channel count changes)."""
    if not parts:
        return None
    nums = [np.concatenate(n, axis=1) for n, _ in parts]
    dens = [np.concatenate(d, axis=1) for _, d in parts]
    if len({a.shape[1] for a in nums}) != 1 or sum(groups) != nums[0].shape[1]:
        return None
    return SampleTerms(np.concatenate(nums), np.concatenate(dens), groups, floor)


def decision_change(ref: np.ndarray, new: np.ndarray, axis: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per decision along `axis`: the original's margin (its top score less its runner-up),
    the change of that difference in `new`, and whether `new` decides otherwise."""
    order = np.argsort(ref, axis=axis)
    top, second = np.take(order, [-1], axis=axis), np.take(order, [-2], axis=axis)

    def gap(scores: np.ndarray) -> np.ndarray:
        return np.take_along_axis(scores, top, axis=axis).astype(np.float64) - \
            np.take_along_axis(scores, second, axis=axis)

    margin = gap(ref)
    return margin, gap(new) - margin, np.expand_dims(np.argmax(new, axis=axis), axis) != top


NEAR_TIES = 5  # the closest margins the density of ties near zero is read from
FLIP_COST = 2.0  # a flipped sample's nmse over its mean share, before any is observed


def flip_nmse(margins: np.ndarray, changes: np.ndarray, per_sample: float,
              cost: float = FLIP_COST) -> float:
    """The nmse that decisions flipped by a candidate add on data like the sample's, beyond
    what the sample shows: a decision whose margin m (the original's top score less its
    runner-up) is smaller than the candidate's change of that margin flips, and a sample with a
    flipped decision costs `cost` times a sample's mean share of the output energy (2 when
    its outputs after the flip no longer correlate with the original's).

    The flip probability of a decision is the mean over the measured changes d of P(m < |d|),
    P read from the margins of every decision seen (`margins`) and, below the `NEAR_TIES`-th
    smallest, from the line through zero and it (a smooth density near zero; a sample of
    64 words holds no tie as close as the 0.002 logits that flip one of 2,000). `changes`: the
    margin changes of decisions that did not flip; `per_sample`: decisions per sample."""
    m = np.sort(np.asarray(margins, np.float64).ravel())
    d = np.abs(np.asarray(changes, np.float64).ravel())
    if not m.size or not d.size:
        return 0.0
    k = min(NEAR_TIES, m.size)
    seen = np.searchsorted(m, d, side="right") / m.size
    line = k / m.size * d / max(m[k - 1], 1e-30)
    return float(cost * per_sample * np.mean(np.maximum(seen, np.minimum(line, k / m.size))))
