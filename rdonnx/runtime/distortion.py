"""Output distortion (normalised MSE, KL, cosine) and task metrics, accumulated batch by batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rdonnx.choices import DEFAULT_CHANNEL_AXIS, METRICS
from rdonnx.errors import UsageError
from rdonnx.runtime.confidence import SampleTerms, agreement_lower, concat_terms


@dataclass(frozen=True)
class Distortion:
    """How far a candidate's outputs are from the reference's, over a whole data set."""

    nmse: float | None  # sum over outputs of ||y - y'||^2 / ||y||^2
    nmse_channel: float | None  # sum over outputs of the mean over channels of per-channel nmse
    cosine: float | None  # sum over outputs of the mean per-sample cosine distance 1-cos(y, y')
    kl: float | None  # mean KL(p_ref || p_cand) over the rows of [batch, classes] outputs, and
    # of every float output of rank >= 3 along its last axis when KL is the metric (None: none)
    top1_agreement: float | None  # share of samples whose argmax class is unchanged
    samples: int
    top1_samples: int = 0  # rows whose argmax was compared
    terms: SampleTerms | None = field(default=None, compare=False, repr=False)  # per sample
    flips: float = 0.0  # nmse that decision flips the samples did not show add (estimated,
    # `confidence.flip_nmse`; counted in the nmse's upper bound)

    def value(self, metric: str) -> float:
        """The figure named by `metric` (one of `METRICS`)."""
        value = getattr(self, metric.replace("-", "_"))
        if value is None:
            raise ValueError(f"metric {metric!r} was not measured or needs an output of class "
                             "scores")
        return float(value)

    def upper(self, metric: str, confidence: float) -> float:
        """One-sided upper confidence bound of `metric` (bootstrap over samples; the value
        itself without per-sample terms or at confidence 0)."""
        tail = self.flips if metric == "nmse" else 0.0
        if self.terms is None or confidence <= 0:
            return self.value(metric) + tail
        return self.terms.upper(confidence) + tail

    def agreement_lower(self, confidence: float) -> float | None:
        """One-sided Clopper-Pearson lower bound of the top-1 agreement (None: no class
        scores)."""
        if self.top1_agreement is None:
            return None
        n = self.top1_samples
        return agreement_lower(int(round(self.top1_agreement * n)), n, confidence)


def is_class_scores(array: np.ndarray) -> bool:
    """A float [batch, classes] output with at least two classes."""
    return array.dtype.kind == "f" and array.ndim == 2 and array.shape[1] >= 2


def has_class_axis(array: np.ndarray) -> bool:
    """A float output of rank >= 2 read as class scores along its last axis by `--metric kl`
    ([batch, classes], or [..., positions, classes] of a sequence model)."""
    return array.dtype.kind == "f" and array.ndim >= 2 and array.shape[-1] >= 2


def log_probs(scores: np.ndarray) -> np.ndarray:
    """Log-probabilities along the last axis: of rows that already are probabilities, else
    log-softmax of logits."""
    scores = scores.astype(np.float64)
    if scores.min() >= 0 and np.allclose(scores.sum(axis=-1), 1.0, atol=1e-3):
        return np.log(np.clip(scores, 1e-12, None))
    shifted = scores - scores.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _accumulate(total: np.ndarray | float, batch: np.ndarray) -> np.ndarray:
    """Add per-channel sums; if the channel count changes between batches, keep one channel."""
    total = np.atleast_1d(np.asarray(total, dtype=np.float64))
    if total.shape == batch.shape or total.size == 1 and np.all(total == 0):
        return total + batch
    return np.array([total.sum() + batch.sum()])


def energy_of(outputs) -> list[float]:
    """Sum of squares (float64) of each float output, in order."""
    energies = []
    for o in outputs:
        o = np.asarray(o)
        if o.dtype.kind == "f":
            r64 = o.astype(np.float64).ravel()
            energies.append(float(r64 @ r64))
    return energies


@dataclass(frozen=True)
class SquaredError:
    """A candidate output known only through its summed squared difference from the reference
    (nmse probes through a linear tail)."""

    value: float


_BULK_ELEMENTS = 1 << 20  # output elements of pending batches summed at once (nmse alone)
# nmse alone is summed a chunk at a time (float64: `_BULK_ELEMENTS`), no 200 MB float64 copy
# of an LM's 25M logits a batch; probes (`fast`) sum float32 outputs' squared differences in
# float32 within chunks of `_CHUNK`, the chunks in float64: relative 2e-7 of the float64 sum
# there, and 8-20x faster
_CHUNK = 1 << 16


class DistortionMeter:
    """Streams reference / candidate outputs and returns one `Distortion` for all of them."""

    def __init__(self, channel_axis: int = DEFAULT_CHANNEL_AXIS, only: str | None = None,
                 terms: str | None = None, fast: bool = False, sequences: bool = False
                 ) -> None:
        """`only` names the one metric to compute (probes); None computes all of them.
        `terms`: a metric whose per-sample sums are kept too (for its confidence bound).
        `fast` (probes): nmse of float32 outputs summed in float32 chunks (`_CHUNK`).
        `sequences`: KL also over float outputs of rank >= 3, per row along the last axis (a
        sequence model's positions x classes: where KL is the metric asked for, so that no
        encoder's features are softmaxed for nothing); implied by `only` or `terms` "kl"."""
        self.fast = fast
        self.sequences = sequences or "kl" in (only, terms)
        self.channel_axis = channel_axis
        self.wants = set(METRICS) | {"top1"} if only is None else {only}
        self.term_metric = terms
        self._terms: list[tuple[list[np.ndarray], list[np.ndarray]]] = []
        self._term_groups: tuple[int, ...] | None = None
        self._err: list[float] = []
        self._ref: list[float] = []
        self._chan_err: list[np.ndarray | float] = []
        self._chan_ref: list[np.ndarray | float] = []
        self._cos: list[float] = []
        self._kl = 0.0
        self._kl_rows = 0
        self._agree = 0
        self._top1_rows = 0
        self._samples = 0
        self._feed_rows: int | None = None  # samples counted from the feeds (`add(rows=)`)
        self._pending: list[tuple] = []  # nmse alone: batches whose errors are summed together
        self._pending_size = 0  # output elements of one pending batch (the first one's)

    def add(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray],
            reference_energy: Sequence[float] | None = None, rows: int | None = None) -> None:
        """Add one batch of outputs (same order and shapes in both lists); `reference_energy`
        (sum of squares of each float reference output, from `energy`) saves recomputing it;
        `rows`: the samples the batch's feed holds (axis 0 of the inputs). With `rows`, an
        output whose axis 0 is not the batch (time steps of a sequence model) makes the whole
        batch one sample, and samples are counted from the feeds."""
        if rows is not None:
            self._feed_rows = (self._feed_rows or 0) + rows
        if self.term_metric is not None:
            self._add_terms([np.asarray(r) for r in reference], [np.asarray(c) for c in candidate],
                            rows)
        if self.wants == {"nmse"}:  # the probes' hot path: batches are summed in bulk
            self._pending.append((reference, candidate, reference_energy))
            if not self._pending_size:  # batches are about the size of the first one
                self._pending_size = max(sum(np.size(r) for r in reference), 1)
            if len(self._pending) * self._pending_size >= _BULK_ELEMENTS:
                self._flush()
            return
        if any(isinstance(c, SquaredError) for c in candidate):
            raise ValueError("an output known by its squared error measures nmse alone")
        self._add_float_pairs([(np.asarray(reference[i]), np.asarray(candidate[i]))
                               for i in self._floats(reference)])

    def _floats(self, reference: Sequence[np.ndarray]) -> list[int]:
        """Positions of the float outputs; the accumulators are sized on first use."""
        floats = [i for i, r in enumerate(reference) if np.asarray(r).dtype.kind == "f"]
        if not self._err:
            self._err, self._ref, self._cos = ([0.0] * len(floats) for _ in range(3))
            self._chan_err, self._chan_ref = ([0.0] * len(floats) for _ in range(2))
        return floats

    def _flush(self) -> None:
        """Squared errors of the pending batches: per output, all of them concatenated (per-batch
        numpy calls dominate on small models) and summed a chunk at a time."""
        if not self._pending:
            return
        pending, self._pending, self._pending_size = self._pending, [], 0
        floats = self._floats(pending[0][0])
        for k, i in enumerate(floats):
            refs = [np.asarray(r[i]) for r, _, _ in pending]
            known = [c[i].value for _, c, _ in pending if isinstance(c[i], SquaredError)]
            pairs = [(np.asarray(r[i]), np.asarray(c[i])) for r, c, _ in pending
                     if not isinstance(c[i], SquaredError)]
            err = float(sum(known))
            if pairs:
                r, c = (pairs[0][0].ravel(), pairs[0][1].ravel()) if len(pairs) == 1 else \
                    (np.concatenate([a.ravel() for a, _ in pairs]),
                     np.concatenate([b.ravel() for _, b in pairs]))
                wide = not self.fast or r.dtype != np.float32
                chunk = _BULK_ELEMENTS if wide else _CHUNK
                for start in range(0, r.size, chunk):
                    a, b = c[start:start + chunk], r[start:start + chunk]
                    d = np.subtract(a, b, dtype=np.float64) if wide else a - b
                    err += float(np.dot(d, d))
            self._err[k] += err
            if all(e is not None for _, _, e in pending):
                self._ref[k] += sum(e[k] for _, _, e in pending)
            else:
                self._ref[k] += sum(energy_of([a])[0] for a in refs)
            if k == 0:
                self._samples += sum(a.shape[0] if a.ndim else 1 for a in refs)
        if not floats:
            self._samples += len(pending)

    def _add_float_pairs(self, float_pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
        batch = 1
        class_output_seen = False
        for i, (r, c) in enumerate(float_pairs):
            r64, c64 = r.astype(np.float64), c.astype(np.float64)
            batch = r64.shape[0] if r64.ndim else 1
            if "nmse" in self.wants or "nmse-channel" in self.wants:
                diff2 = (r64 - c64) ** 2
                ref2 = r64**2
                self._err[i] += float(np.sum(diff2))
                self._ref[i] += float(np.sum(ref2))
            if "nmse-channel" in self.wants:
                self._chan_err[i] = _accumulate(self._chan_err[i], self._per_channel(diff2))
                self._chan_ref[i] = _accumulate(self._chan_ref[i], self._per_channel(ref2))
            if "cosine" in self.wants:
                rows_r = r64.reshape(batch, -1)
                rows_c = c64.reshape(rows_r.shape)
                norms = np.linalg.norm(rows_r, axis=1) * np.linalg.norm(rows_c, axis=1)
                dots = np.sum(rows_r * rows_c, axis=1)
                cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0),
                               np.where(np.all(rows_r == rows_c, axis=1), 1.0, 0.0))
                self._cos[i] += float(np.sum(1.0 - cos))
            if "kl" in self.wants and self._kl_rows_of(r):
                log_p, log_q = log_probs(r64), log_probs(c64)
                self._kl += float(np.sum(np.exp(log_p) * (log_p - log_q)))
                self._kl_rows += r.size // r.shape[-1]
            if is_class_scores(r):
                if "top1" in self.wants and not class_output_seen:  # first class-score output
                    self._agree += int(np.sum(r.argmax(axis=1) == c.argmax(axis=1)))
                    self._top1_rows += r.shape[0]
                    class_output_seen = True
        self._samples += batch

    def _kl_rows_of(self, array: np.ndarray) -> bool:
        """Whether KL reads `array`'s rows as class scores."""
        return has_class_axis(array) if self.sequences else is_class_scores(array)

    def _per_channel(self, squares: np.ndarray) -> np.ndarray:
        """Sums over every axis but the channel axis (one channel for lower-rank outputs)."""
        if squares.ndim <= self.channel_axis:
            return np.array([squares.sum()])
        return np.moveaxis(squares, self.channel_axis, 0).reshape(
            squares.shape[self.channel_axis], -1).sum(axis=1)

    def _add_terms(self, reference: list[np.ndarray], candidate: list[np.ndarray],
                   feed_rows: int | None = None) -> None:
        """Per-sample sums of one batch for `term_metric`: a sample is a row along axis 0 when
        every float output has the same number of rows (the feed's, when it is given), else
        the whole batch is one."""
        floats = [i for i, r in enumerate(reference) if r.dtype.kind == "f"]
        rows = {reference[i].shape[0] if reference[i].ndim else 1 for i in floats}
        n = rows.pop() if len(rows) == 1 else 1
        if feed_rows is not None and n != feed_rows:
            n = 1
        metric = self.term_metric
        nums: list[np.ndarray] = []
        dens: list[np.ndarray] = []
        groups: list[int] = []
        kl_num, kl_den = np.zeros((n, 1)), np.zeros((n, 1))
        for i in floats:
            r = reference[i].astype(np.float64).reshape(n, -1) if reference[i].ndim else \
                reference[i].astype(np.float64).reshape(1, -1)
            c = candidate[i].astype(np.float64).reshape(r.shape)
            if metric == "nmse":
                nums.append(((c - r) ** 2).sum(axis=1, keepdims=True))
                dens.append((r ** 2).sum(axis=1, keepdims=True))
                groups.append(1)
            elif metric == "nmse-channel":
                full_r = reference[i].astype(np.float64)
                full_c = candidate[i].astype(np.float64)
                err = self._rows_per_channel((full_c - full_r) ** 2, n)
                nums.append(err)
                dens.append(self._rows_per_channel(full_r ** 2, n))
                groups.append(err.shape[1])
            elif metric == "cosine":
                batch = reference[i].shape[0] if reference[i].ndim else 1
                rr = reference[i].astype(np.float64).reshape(batch, -1)
                cc = candidate[i].astype(np.float64).reshape(rr.shape)
                norms = np.linalg.norm(rr, axis=1) * np.linalg.norm(cc, axis=1)
                cos = np.where(norms > 0, (rr * cc).sum(axis=1) / np.where(norms > 0, norms, 1),
                               np.where(np.all(rr == cc, axis=1), 1.0, 0.0))
                per = (1.0 - cos).reshape(n, -1)
                nums.append(per.sum(axis=1, keepdims=True))
                dens.append(np.full((n, 1), float(per.shape[1])))
                groups.append(1)
            elif metric == "kl" and self._kl_rows_of(reference[i]):
                log_p = log_probs(reference[i].astype(np.float64))
                log_q = log_probs(candidate[i].astype(np.float64))
                per = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1).reshape(n, -1)
                kl_num += per.sum(axis=1, keepdims=True)
                kl_den += per.shape[1]
        if metric == "kl":
            nums, dens, groups = [kl_num], [kl_den], [1]
        if self._term_groups is None:
            self._term_groups = tuple(groups)
        elif self._term_groups != tuple(groups):  # outputs change shape: no per-sample terms
            self.term_metric = None
            self._terms = []
            return
        self._terms.append((nums, dens))

    def _rows_per_channel(self, squares: np.ndarray, n: int) -> np.ndarray:
        """[n, channels] sums (n rows, or the whole batch as one row when n is 1)."""
        if n == 1 or squares.ndim <= self.channel_axis or self.channel_axis == 0:
            return self._per_channel(squares)[None, :] if n == 1 else \
                squares.reshape(n, -1).sum(axis=1, keepdims=True)
        moved = np.moveaxis(squares, self.channel_axis, 1)
        return moved.reshape(n, moved.shape[1], -1).sum(axis=2)

    def result(self) -> Distortion:
        self._flush()
        if not self._err:
            raise UsageError("the model has no float output to measure distortion on")
        nmse = sum(e / r if r > 0 else (0.0 if e == 0 else float("inf"))
                   for e, r in zip(self._err, self._ref)) if "nmse" in self.wants else None
        samples = max(self._samples, 1)
        per_channel = 0.0
        for err, ref in zip(self._chan_err, self._chan_ref) if "nmse-channel" in self.wants \
                else ():
            err, ref = np.atleast_1d(err), np.atleast_1d(ref)
            floor = max(float(ref.mean()), 1e-30) * 1e-6  # silent channels: relative to the rest
            per_channel += float(np.mean(err / np.maximum(ref, floor)))
        return Distortion(
            nmse=nmse,
            nmse_channel=per_channel if "nmse-channel" in self.wants else None,
            cosine=float(sum(c / samples for c in self._cos)) if "cosine" in self.wants else None,
            kl=self._kl / self._kl_rows if self._kl_rows else None,
            top1_agreement=self._agree / self._top1_rows if self._top1_rows else None,
            samples=self._samples if self._feed_rows is None else self._feed_rows,
            top1_samples=self._top1_rows,
            terms=concat_terms(self._terms, self._term_groups or (), self.term_metric ==
                               "nmse-channel") if self.term_metric else None)


class AccuracyMeter:
    """Top-1 accuracy of the first class-score output against integer labels."""

    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def add(self, outputs: Sequence[np.ndarray], labels: np.ndarray) -> None:
        scores = next((o for o in outputs if is_class_scores(np.asarray(o))), None)
        if scores is None:
            raise ValueError("accuracy needs an output of class scores [batch, classes]")
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != scores.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {scores.shape[0]} samples")
        self.correct += int(np.sum(scores.argmax(axis=1) == labels))
        self.total += labels.shape[0]

    def result(self) -> float | None:
        return self.correct / self.total if self.total else None
