"""rdonnx.runtime.distortion: NMSE, per-channel NMSE, cosine, KL, top-1 agreement, accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rdonnx.errors import UsageError
from rdonnx.runtime.distortion import METRICS, AccuracyMeter, DistortionMeter, is_class_scores


def _measure(*batches, **kwargs):
    meter = DistortionMeter(**kwargs)
    for reference, candidate in batches:
        meter.add(reference, candidate)
    return meter.result()


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_nmse_hand_computed():
    r = np.array([[1.0, 2.0], [2.0, 0.0]], np.float32)
    c = np.array([[1.0, 1.0], [2.0, 1.0]], np.float32)
    d = _measure(([r], [c]))
    assert d.nmse == pytest.approx(2.0 / 9.0)  # (0 + 1 + 0 + 1) / (1 + 4 + 4 + 0)
    assert d.value("nmse") == pytest.approx(2.0 / 9.0)
    assert d.samples == 2


def test_nmse_is_ratio_of_sums_over_batches_and_sum_over_outputs():
    r1, c1 = np.array([[3.0, 4.0]]), np.array([[3.0, 5.0]])  # err 1, ref 25
    r2, c2 = np.array([[0.0, 1.0]]), np.array([[0.0, 0.0]])  # err 1, ref 1
    o_r, o_c = np.array([[2.0]]), np.array([[1.0]])  # second output: err 1, ref 4
    d = _measure(([r1, o_r], [c1, o_c]), ([r2, o_r], [c2, o_c]))
    assert d.nmse == pytest.approx(2 / 26 + 2 / 8)
    assert d.samples == 2


def test_integer_outputs_are_ignored_and_needed_float_output():
    ints = np.array([[1, 2]], np.int64)
    d = _measure(([ints, np.ones((1, 3))], [ints + 5, 2 * np.ones((1, 3))]))
    assert d.nmse == pytest.approx(1.0)
    meter = DistortionMeter()
    meter.add([ints], [ints])
    with pytest.raises(UsageError, match="no float output"):
        meter.result()


def test_identical_outputs_have_zero_distortion():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 5)).astype(np.float32)
    feature = rng.standard_normal((6, 3, 4, 4)).astype(np.float32)
    d = _measure(([logits, feature], [logits.copy(), feature.copy()]))
    assert d.nmse == 0.0
    assert d.nmse_channel == 0.0
    assert d.cosine == pytest.approx(0.0, abs=1e-12)
    assert d.kl == pytest.approx(0.0, abs=1e-12)
    assert d.top1_agreement == 1.0
    assert d.samples == 6
    for metric in METRICS:
        assert d.value(metric) == pytest.approx(0.0, abs=1e-12)


def test_zero_reference_with_error_is_infinite_nmse():
    d = _measure(([np.zeros((2, 2))], [np.ones((2, 2))]))
    assert math.isinf(d.nmse)
    assert _measure(([np.zeros((2, 2))], [np.zeros((2, 2))])).nmse == 0.0


def test_kl_of_logits_matches_manual_computation():
    rng = np.random.default_rng(1)
    r = rng.standard_normal((4, 3)) * 2
    c = r + rng.standard_normal((4, 3)) * 0.5
    p, q = _softmax(r), _softmax(c)
    manual = float(np.mean(np.sum(p * np.log(p / q), axis=1)))
    d = _measure(([r[:3]], [c[:3]]), ([r[3:]], [c[3:]]))  # mean over rows across batches
    assert manual > 0.01
    assert d.kl == pytest.approx(manual, rel=1e-9)
    assert d.value("kl") == pytest.approx(manual, rel=1e-9)


def test_kl_of_a_sequence_output_is_over_its_last_axis():
    """[positions, batch, classes] (a CTC recognizer's frames): KL per frame over the classes,
    the mean over every frame, when KL is asked for (`terms` or `sequences`); the per-sample
    terms (one a batch here) average to it."""
    rng = np.random.default_rng(2)
    r = rng.standard_normal((5, 1, 7)) * 3
    c = r + rng.standard_normal((5, 1, 7)) * 0.3
    p, q = _softmax(r.reshape(-1, 7)), _softmax(c.reshape(-1, 7))
    manual = float(np.mean(np.sum(p * np.log(p / q), axis=1)))
    meter = DistortionMeter(terms="kl")
    for _ in range(2):  # two batches of one sample
        meter.add([r], [c], rows=1)
    d = meter.result()
    assert manual > 1e-3
    assert d.kl == pytest.approx(manual, rel=1e-9)
    assert d.upper("kl", 0.0) == pytest.approx(manual, rel=1e-9)
    assert d.top1_agreement is None  # top-1 stays with [batch, classes] outputs
    # every metric at once, KL not asked for: an output of rank 3 is not softmaxed for nothing
    assert _measure(([r], [c])).kl is None
    assert _measure(([r], [c]), sequences=True).kl == pytest.approx(manual, rel=1e-9)


def test_probabilities_are_not_softmaxed_again():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    q = np.array([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    manual = float(np.mean(np.sum(p * np.log(p / q), axis=1)))
    softmaxed = float(np.mean(np.sum(_softmax(p) * np.log(_softmax(p) / _softmax(q)), axis=1)))
    d = _measure(([p.astype(np.float32)], [q.astype(np.float32)]))
    assert d.kl == pytest.approx(manual, rel=1e-5)
    assert d.kl != pytest.approx(softmaxed, rel=1e-2)


def test_top1_agreement_counts_changed_argmax():
    r = np.array([[3, 1], [1, 3], [3, 1], [1, 3]], np.float32)
    c = np.array([[3, 1], [1, 3], [1, 3], [1, 3]], np.float32)
    d = _measure(([r[:2]], [c[:2]]), ([r[2:]], [c[2:]]))
    assert d.top1_agreement == pytest.approx(0.75)
    assert d.samples == 4


def test_no_class_scores_means_no_kl_or_top1():
    r = np.ones((4, 1), np.float32)  # one column: not class scores
    d = _measure(([r], [r * 2]))
    assert d.kl is None and d.top1_agreement is None
    with pytest.raises(ValueError, match="class scores"):
        d.value("kl")
    assert not is_class_scores(r)
    assert is_class_scores(np.ones((4, 2), np.float16))
    assert not is_class_scores(np.ones((4, 2), np.int64))
    assert not is_class_scores(np.ones((4, 2, 2), np.float32))


def test_cosine_distance_is_mean_per_sample():
    r = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    c = np.array([[0.0, 1.0], [2.0, 2.0], [0.0, 0.0], [1.0, 0.0]])
    # orthogonal: 1, parallel: 0, both zero: 0, zero vs nonzero: 1
    d = _measure(([r], [c]))
    assert d.cosine == pytest.approx(2 / 4)
    assert d.value("cosine") == pytest.approx(0.5)


def test_cosine_flattens_each_sample():
    r = np.array([[[1.0, 0.0], [0.0, 0.0]]])
    c = np.array([[[1.0, 0.0], [1.0, 0.0]]])
    d = _measure(([r], [c]))
    assert d.cosine == pytest.approx(1 - 1 / math.sqrt(2))


def test_nmse_channel_hand_computed():
    # [batch 2, channels 2, 2]: channel 0 err 1 / ref 4, channel 1 err 4 / ref 16
    r = np.array([[[1.0, 1.0], [2.0, 2.0]], [[1.0, 1.0], [2.0, 2.0]]])
    c = r.copy()
    c[0, 0, 0] = 2.0  # channel 0: +1
    c[1, 1, 1] = 4.0  # channel 1: +4
    d = _measure(([r], [c]))
    assert d.nmse_channel == pytest.approx((1 / 4 + 4 / 16) / 2)
    assert d.value("nmse-channel") == pytest.approx(0.25)
    assert d.nmse == pytest.approx(5 / 20)


def test_nmse_channel_weights_quiet_channels_equally():
    r = np.array([[100.0, 1.0]] * 3)
    c = np.array([[101.0, 2.0]] * 3)  # the same absolute error on both channels
    d = _measure(([r], [c]))
    assert d.nmse_channel == pytest.approx((1 / 10000 + 1) / 2)
    assert d.nmse < d.nmse_channel


def test_nmse_channel_with_changing_channel_count_across_batches():
    """Folder feeds may differ in shape, so axis 1 (e.g. sequence length) may change."""
    rng = np.random.default_rng(2)
    meter = DistortionMeter()
    for length in (3, 5):
        r = rng.standard_normal((1, length, 4))
        meter.add([r], [r * 1.1])
    d = meter.result()
    assert d.nmse == pytest.approx(0.01)
    assert math.isfinite(d.nmse_channel)


def test_accuracy_meter():
    meter = AccuracyMeter()
    assert meter.result() is None
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], np.float32)
    meter.add([np.zeros((3,), np.int64), scores], np.array([1, 1, 1]))  # first class output
    meter.add([np.zeros((1,), np.int64), scores[:1]], np.array([[1]]))  # labels reshaped
    assert meter.correct == 3 and meter.total == 4
    assert meter.result() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="labels"):
        meter.add([scores], np.array([0, 1]))
    with pytest.raises(ValueError, match="class scores"):
        meter.add([np.ones((3, 1), np.float32)], np.array([0, 0, 0]))


@pytest.mark.parametrize("bulk", [1 << 20, 50])
def test_nmse_alone_sums_batches_in_bulk_as_the_full_meter_does(monkeypatch, bulk):
    """The probes' path (only nmse) holds batches and sums them at once, flushing whenever
    `bulk` output elements are pending: the figure equals the batch-by-batch one."""
    monkeypatch.setattr("rdonnx.runtime.distortion._BULK_ELEMENTS", bulk)
    rng = np.random.default_rng(3)
    fast, full = DistortionMeter(only="nmse"), DistortionMeter()
    for rows in (4, 7, 1, 9, 3):
        ref = [rng.standard_normal((rows, 5)).astype(np.float32), np.arange(rows),
               rng.standard_normal((rows, 2, 3)).astype(np.float32)]
        cand = [ref[0] + 0.1 * rng.standard_normal((rows, 5)).astype(np.float32), ref[1],
                ref[2] * 0.5]
        fast.add(ref, cand)
        full.add(ref, cand)
    a, b = fast.result(), full.result()
    assert a.nmse == pytest.approx(b.nmse, rel=1e-12)
    assert a.nmse > 0.25  # the second output alone contributes 0.25
    assert a.samples == b.samples == 24


def test_probe_sums_in_float32_chunks_stay_within_a_millionth(monkeypatch):
    """`fast` (the probes): float32 squared differences summed per chunk, chunks in float64;
    on 3M outputs over many chunks the figure is the float64 one to 1e-6."""
    monkeypatch.setattr("rdonnx.runtime.distortion._CHUNK", 1 << 12)
    rng = np.random.default_rng(4)
    ref = rng.standard_normal((3, 1000, 1000)).astype(np.float32)
    cand = ref + 1e-3 * rng.standard_normal(ref.shape).astype(np.float32)
    quick, exact = DistortionMeter(only="nmse", fast=True), DistortionMeter(only="nmse")
    quick.add([ref], [cand])
    exact.add([ref], [cand])
    expected = float(np.sum((cand.astype(np.float64) - ref) ** 2) / np.sum(ref.astype(
        np.float64) ** 2))
    assert exact.result().nmse == pytest.approx(expected, rel=1e-12)
    assert quick.result().nmse == pytest.approx(expected, rel=1e-6)
    assert quick.result().nmse != exact.result().nmse  # it did sum in float32


def test_a_time_major_output_counts_the_feeds_samples_not_its_time_steps():
    """A sequence model's output [T, batch, C] (CTC): with the feed's rows given, each batch
    is one sample for the confidence bound and the count, not T of them."""
    rng = np.random.default_rng(0)
    meter = DistortionMeter(terms="nmse")
    for _ in range(3):
        ref = rng.standard_normal((24, 1, 5)).astype(np.float32)
        meter.add([ref], [ref + 0.1], rows=1)
    d = meter.result()
    assert d.samples == 3
    assert d.terms.num.shape[0] == 3
    rowwise = DistortionMeter(terms="nmse")  # axis 0 is the batch: a sample per row
    rowwise.add([ref[:, 0]], [ref[:, 0] + 0.1], rows=24)
    assert rowwise.result().terms.num.shape[0] == 24
