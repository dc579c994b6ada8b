"""Rows of a lookup table that the calibration data never reads, and classes of a classifier
head that it never brings near the top: coded coarser, their cost predicted.

An embedding table read by token ids is measured only through the rows the fit part reads
(567 of MiniLM's 30,522 with 48 sentences); another row's error reaches the output only when
real data reads it. Row r's error costs about p_r (its share of the reads) times its error
energy, so at high rate the least total error for the bits has steps in ratio
sqrt(p_read / p_unread) between a row the fit part reads and one it never reads: the unread
rows are coded `coarser` bits below the table's width (their own per-row steps, levels within
the width's range, coded in a stream of their own: format `quantized-classes`).

The unread rows' share of the table's error is estimated three ways, and the largest is used:
Good-Turing on the fit part (reads of rows read once / all reads), the share of the held-out
part's reads that hit them, and their share of the held-out distortion when the table alone is
quantized (only the read rows, then only the unread ones, at `PROBE_BITS`): reads the model
ignores (padding tokens, masked out of MiniLM's mean pooling) count in the first two and not in
the third (MiniLM: 11.3% and 12.6% of reads, 39% of the distortion). The
table's output distortion at width b is predicted `(1 - share) Q(b) + share Q(b - coarser)`
from its measured curve Q (the fit part reads no unread row, so Q measures the read rows), and
the held-out part checks every candidate: tables are split only when there is one.

A classifier head under `--metric kl` is the same case: a class whose log-probability stays
more than `COMPETE_GAP` below the top class on every fit frame carries under exp(-10) of each
frame's probability, so its logit's error hardly moves the KL until real data brings it near the
top. Such a class is "read" by a frame that brings it within the gap (the OCR model's 8,210
classes: 24 fit lines bring 341 within 10 nats), and the same estimates apply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

MAX_COARSER = 3  # bits: MiniLM's unread rows 2 or 3 bits coarser gave the same test R-D gain
MIN_BITS = 2  # the unread rows' least width
PROBE_BITS = 6  # the width the table's two classes are measured at
COMPETE_GAP = 10.0  # nats below a frame's top class: a class further down competes on no frame
TABLE_ROWS = "are never read by the fit part"


@dataclass(frozen=True)
class UnreadRows:
    """A lookup table's rows that the fit part never reads (or a classifier head's classes it
    never brings near the top), and how they are coded."""

    unread: np.ndarray  # bool per row
    good_turing: float  # their share of reads, estimated on the fit part
    held_out: float  # their share of the held-out part's reads
    distortion: float  # their share of the held-out distortion, all rows at one width
    coarser: int  # bits below the table's width
    never: str = TABLE_ROWS  # what the fit part never does with them (the report's words)

    @property
    def share(self) -> float:
        """Their share of the table's error on real data: the largest estimate."""
        return max(self.good_turing, self.held_out, self.distortion)

    def bits(self, width: int) -> int:
        """The unread rows' width when the table is coded at `width`."""
        return max(MIN_BITS, min(width, width - self.coarser))

    def predicted(self, curve: Mapping[int, float], width: int) -> float:
        """The table's output distortion at `width` from `curve` (width -> distortion
        measured on the read rows)."""
        return (1.0 - self.share) * at_width(curve, width) + \
            self.share * at_width(curve, self.bits(width))

    def describe(self, name: str) -> str:
        return (f"{name}: {int(self.unread.sum()):,} of {self.unread.size:,} rows {self.never}; "
                f"coded {self.coarser} bit(s) below the tensor's width "
                f"(their share of reads: {self.good_turing:.1%} estimated on the fit part "
                f"(Good-Turing), {self.held_out:.1%} on the held-out part; of its held-out "
                f"distortion at {PROBE_BITS} bits: {self.distortion:.1%}); the fit part's "
                "figures do not see them, the held-out part's do")


def at_width(curve: Mapping[int, float], width: int) -> float:
    """`curve` at `width`; between or beyond its widths, from the nearest narrower one (else
    the nearest wider one) at the high-rate slope, 4x less distortion a bit."""
    if width in curve:
        return curve[width]
    narrower = [b for b in curve if b < width]
    near = max(narrower) if narrower else min(curve)
    return curve[near] * 4.0 ** (near - width)


def plan(fit_reads: np.ndarray, held_reads: np.ndarray,
         measure: Callable[[np.ndarray], float] | None = None,
         never: str = TABLE_ROWS) -> UnreadRows | None:
    """How to code a table from the reads of each row by the fit and the held-out parts
    (counts per row) and `measure`, the held-out distortion with the rows marked (bool per
    row) quantized at `PROBE_BITS`; None when every row or no row is read by the fit part, or
    the unread rows are worth as many bits as the read ones."""
    reads = float(fit_reads.sum())
    unread = fit_reads == 0
    if reads <= 0 or not unread.any() or unread.all():
        return None
    good_turing = float(np.count_nonzero(fit_reads == 1)) / reads
    held_total = float(held_reads.sum())
    held_out = float(held_reads[unread].sum()) / held_total if held_total else 0.0
    distortion = 0.0
    if measure is not None:
        of_unread, of_read = measure(unread), measure(~unread)
        distortion = of_unread / (of_unread + of_read) if of_unread + of_read > 0 else 0.0
    rows = UnreadRows(unread, good_turing, held_out, distortion, MAX_COARSER, never)
    share = rows.share
    if share >= 1.0:
        return None
    if share > 0.0:
        per_read = (1.0 - share) / np.count_nonzero(~unread)
        per_unread = share / np.count_nonzero(unread)
        rows = replace(rows, coarser=min(MAX_COARSER, max(
            0, round(0.5 * math.log2(per_read / per_unread)))))
    return rows if rows.coarser else None
