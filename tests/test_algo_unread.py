"""Rows of a lookup table the fit part never reads (`rdonnx.algo.unread`)."""

import numpy as np
import pytest

from rdonnx.algo.unread import MAX_COARSER, at_width, plan


def test_every_row_read_or_none_read_is_left_alone():
    assert plan(np.array([3, 1, 2, 5]), np.array([1, 1, 0, 0])) is None
    assert plan(np.zeros(4, np.int64), np.array([1, 1, 0, 0])) is None


def test_the_share_is_the_larger_of_good_turing_and_the_held_out_reads():
    fit = np.r_[10, 1, 1, 8, np.zeros(36, np.int64)]  # 2 of 20 reads hit rows read once
    held = np.zeros(40, np.int64)
    held[[0, 4]] = 5  # half the held-out reads hit an unread row
    rows = plan(fit, held)
    assert rows.unread.tolist() == [False] * 4 + [True] * 36
    assert rows.good_turing == pytest.approx(0.1)
    assert rows.held_out == pytest.approx(0.5)
    assert rows.share == pytest.approx(0.5)
    held[4] = 0
    assert plan(fit, held).share == pytest.approx(0.1)


def test_coarser_follows_the_reads_per_row():
    """Steps in ratio sqrt(reads per read row / reads per unread row), in whole bits, capped:
    unread rows read as often as read ones are coded alike."""
    fit = np.r_[np.full(10, 20), np.zeros(10, np.int64)]
    assert plan(fit, np.r_[np.ones(10), np.ones(10)]) is None  # as often: alike
    # held-out: 1/17 of the reads over 10 unread rows against 16/17 over 10: 4x the step
    assert plan(fit, np.r_[np.full(10, 16), np.ones(10)]).coarser == 2
    rare = plan(np.r_[np.full(10, 20), np.zeros(10_000, np.int64)],
                np.r_[np.full(10, 3), np.zeros(10_000, np.int64)])
    assert rare.coarser == MAX_COARSER and rare.share == 0.0


def test_the_unread_rows_width_and_the_predicted_distortion():
    rows = plan(np.r_[np.full(4, 9), np.zeros(1000, np.int64)], np.r_[np.full(4, 3),
                                                                      np.ones(4), np.zeros(996)])
    assert rows.coarser == 3 and rows.share == pytest.approx(0.25)
    assert rows.bits(8) == 5 and rows.bits(4) == 2 and rows.bits(2) == 2
    curve = {2: 1.0, 3: 0.3, 4: 0.08, 5: 0.02, 8: 0.0003}
    assert rows.predicted(curve, 8) == pytest.approx(0.75 * 0.0003 + 0.25 * 0.02)
    assert rows.predicted(curve, 3) == pytest.approx(0.75 * 0.3 + 0.25 * 1.0)


def test_widths_between_or_beyond_the_curve_follow_the_high_rate_slope():
    curve = {4: 0.08, 8: 0.0003}
    assert at_width(curve, 4) == 0.08
    assert at_width(curve, 6) == pytest.approx(0.08 / 16)  # from the narrower one
    assert at_width(curve, 10) == pytest.approx(0.0003 / 16)
    assert at_width(curve, 2) == pytest.approx(0.08 * 16)  # none narrower: the wider one


def test_the_share_of_the_distortion_counts_reads_the_model_ignores_out():
    """Reads of a row the model ignores (padding) count as reads, not as distortion: the
    held-out distortion of the unread rows quantized alone against the read rows' sets the
    share when it is the larger."""
    fit = np.r_[1000, 5, 5, np.zeros(40, np.int64)]  # row 0: padding, read everywhere
    held = np.r_[300, 2, 2, np.ones(4), np.zeros(36, np.int64)]
    by_reads = plan(fit, held)
    measured = plan(fit, held, lambda marked: 3.0 if marked[-1] else 1.0)  # unread: 3 of 4
    assert by_reads.share == pytest.approx(4 / 308) and by_reads.distortion == 0.0
    assert measured.distortion == pytest.approx(0.75) and measured.share == pytest.approx(0.75)
    assert measured.coarser < by_reads.coarser
