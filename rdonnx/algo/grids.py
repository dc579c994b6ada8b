"""Uniform quantization grids fitted to real weights.

A grid is one step per output channel (the weight's output axis) or one for the whole tensor.
Steps lie on a log scale with `MANTISSA_BITS` bits of mantissa, `step = (2^M + m) * 2^(e - M)`,
so each is an exact float32 that a decoder rebuilds from one small integer per channel (the
step's index `t = e * 2^M + m`, monotone in the step); the side information is a few bits per
channel, not 32.

Fitting searches each channel's step (its clipping of the largest magnitude) for the least
weighted squared error `sum imp * (w - q * step)^2`, `imp` the layer input's E[x^2] where it is
known. The unclipped step is always a candidate, so clipping never makes a channel worse.
Per-channel steps are kept only when they beat one step for the tensor at equal bits (each
channel's error relative to its own energy; rates exchanged at the high-rate slope).

`rdoq` then rounds each value to the neighbouring level (or to zero) that minimises
`D + lambda R` under the value coder's actual model (a magnitude histogram, one sign bit, the
Bernoulli of the positions), `lambda` the uniform quantizer's own slope at that step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rdonnx.codec.entropy import CodecError, Reader, varint

MANTISSA_BITS = 5  # steps are spaced 2^(1/32)-ish apart: at most 3.1% between neighbours
SEARCH_SPAN = 48  # clipping candidates per channel: step indices t_max .. t_max - 47 (0.35x)
LOST_BITS = 1.0  # bits a survivor one grid leaves small channels short: then no GAIN asked
GAIN = 2.0  # per-channel steps kept at any rate when they halve the error (`choose`)
COARSE = 4  # the search looks at every 4th candidate, then refines around the best
_T_MIN, _T_MAX = -126 * (1 << MANTISSA_BITS), 127 * (1 << MANTISSA_BITS)  # normal floats


def step_of(t: np.ndarray | int) -> np.ndarray:
    """The exact float32 step of each log-scale index `t`."""
    t = np.asarray(t, dtype=np.int64)
    e, m = np.divmod(t, 1 << MANTISSA_BITS)
    mantissa = (m + (1 << MANTISSA_BITS)).astype(np.float32)
    return np.ldexp(mantissa, (e - MANTISSA_BITS).astype(np.int32)).astype(np.float32)


def index_at_least(value: np.ndarray) -> np.ndarray:
    """The smallest index whose step is >= `value` (positive finite float32 values)."""
    v = np.asarray(value, dtype=np.float32)
    frac, e = np.frexp(v)  # v = frac * 2^e, frac in [0.5, 1)
    scaled = frac.astype(np.float64) * (1 << (MANTISSA_BITS + 1))  # in [2^M, 2^(M+1))
    m = np.ceil(scaled).astype(np.int64) - (1 << MANTISSA_BITS)
    t = (e.astype(np.int64) - 1) * (1 << MANTISSA_BITS) + m
    return np.clip(t, _T_MIN, _T_MAX)


@dataclass(frozen=True)
class Grid:
    """float32 steps: one per index along `axis` (on the log scale), or one (axis None; any
    positive float32)."""

    steps: np.ndarray  # float32 [C]
    axis: int | None

    @property
    def index(self) -> np.ndarray:
        """The log-scale indices of the steps (exact for per-channel steps)."""
        return index_at_least(self.steps)

    def broadcast(self, ndim: int) -> np.ndarray:
        """The float32 steps shaped to broadcast against a tensor of `ndim` dimensions."""
        if self.axis is None:
            return self.steps.reshape([1] * ndim)
        return self.steps.reshape([-1 if i == self.axis else 1 for i in range(ndim)])


def _rows(a: np.ndarray, axis: int | None) -> np.ndarray:
    """`a` as [channels, rest] (one row when `axis` is None), float32."""
    a = np.asarray(a, dtype=np.float32)
    if axis is None:
        return a.reshape(1, -1)
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


def _channel_error(rows: np.ndarray, imp: np.ndarray | None, steps: np.ndarray,
                   levels: int) -> np.ndarray:
    """Weighted squared rounding error of each row at its step (float64 per row)."""
    s = steps[:, None]
    err = rows - np.clip(np.rint(rows / s), -levels, levels) * s
    err = err * err
    if imp is not None:
        err = err * imp
    return err.sum(axis=1, dtype=np.float64)


def fit(weight: np.ndarray, bits: int, axis: int | None,
        importance: np.ndarray | None = None) -> tuple[Grid, float]:
    """The per-channel (or per-tensor) steps of least weighted error at `bits`, and that error.

    The error is `sum imp * (w - q * step)^2`; `importance` broadcasts against `weight` (E[x^2]
    of the layer input), None weighs every entry 1. Candidates: the log-scale steps from the one
    that reaches the largest magnitude down to 0.35x of it (every `COARSE`-th, then the
    neighbours of the best); one step per tensor also tries the exact unclipped step
    (largest / levels), so it is never worse than plain rounding. All-zero channels get step 1.
    (Minimising D + lambda R instead, lambda the high-rate slope at the unclipped step, gave
    the joint bits allocation 1.5-3x more output distortion on the digits MLP.)
    """
    levels = 2 ** (bits - 1) - 1
    rows = _rows(weight, axis)
    imp = None if importance is None else _rows(
        np.broadcast_to(np.asarray(importance, np.float32), np.shape(weight)), axis)
    top, live = _unclipped(rows, levels)
    best_t, best_err = top.copy(), _channel_error(rows, imp, step_of(top), levels)

    def consider(offsets) -> None:
        nonlocal best_t, best_err
        for off in offsets:
            t = np.clip(top - off, _T_MIN, _T_MAX)
            err = _channel_error(rows, imp, step_of(t), levels)
            better = err < best_err
            best_t, best_err = np.where(better, t, best_t), np.where(better, err, best_err)

    consider(range(COARSE, SEARCH_SPAN, COARSE))
    centre = top - best_t
    consider(np.clip(centre + delta, 0, SEARCH_SPAN - 1)
             for delta in range(1 - COARSE, COARSE) if delta)
    steps = step_of(np.where(live, best_t, 0))
    if axis is None and live[0]:
        exact = np.float32(np.abs(rows).max() / np.float32(levels))[None]
        err = _channel_error(rows, imp, exact, levels)
        if err[0] <= best_err[0]:
            steps, best_err = exact, err
    return Grid(steps, axis), float(best_err.sum())


def _unclipped(rows: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's smallest step index whose top level reaches its largest magnitude, and
    which rows hold a nonzero (index 0 for the others)."""
    largest = np.abs(rows).max(axis=1) if rows.shape[1] else np.zeros(rows.shape[0], np.float32)
    if not np.all(np.isfinite(largest)):
        raise ValueError("the tensor holds inf or NaN values; use exact values")
    live = largest > 0
    top = np.zeros(rows.shape[0], dtype=np.int64)
    top[live] = index_at_least(largest[live] / np.float32(levels))
    return top, live


def round_to(weight: np.ndarray, grid: Grid, bits: int) -> np.ndarray:
    """Integer levels of `weight` on `grid` (int32; zeros stay zero)."""
    levels = 2 ** (bits - 1) - 1
    w = np.asarray(weight, dtype=np.float32)
    return np.clip(np.rint(w / grid.broadcast(w.ndim)), -levels, levels).astype(np.int32)


def fit_split(weight: np.ndarray, bits: int, axis: int, coarse: np.ndarray, coarse_bits: int,
              importance: np.ndarray | None = None) -> tuple[Grid, np.ndarray]:
    """Per-channel steps along `axis` fitted at `bits`, those of the channels in `coarse`
    (bool per channel) at `coarse_bits` (<= `bits`) instead, and the levels: every level lies
    within `bits`'s range, so the tensor is coded as one at `bits`."""
    w = np.asarray(weight, dtype=np.float32)
    steps = np.ones(w.shape[axis], np.float32)
    q = np.zeros(w.shape, np.int32)
    for rows, width in ((np.flatnonzero(~coarse), bits), (np.flatnonzero(coarse), coarse_bits)):
        if not rows.size:
            continue
        part = np.take(w, rows, axis)
        imp = importance if importance is None or np.shape(importance)[axis] == 1 else \
            np.take(importance, rows, axis)
        grid = fit(part, width, axis, imp)[0]
        steps[rows] = grid.steps
        index = [slice(None)] * w.ndim
        index[axis] = rows
        q[tuple(index)] = round_to(part, grid, width)
    return Grid(steps, axis), q


def steps_bits(grid: Grid) -> int:
    """Bits an artifact spends on the grid's steps: none for one step (the manifest holds it),
    the coded log-scale indices when every step lies on the log scale, else 32 a step."""
    if grid.axis is None:
        return 0
    if np.array_equal(step_of(grid.index), grid.steps):
        return side_bits(grid)
    return 32 * grid.steps.size


def side_bits(grid: Grid) -> int:
    """Coded size of the grid's step indices in bits (see `encode_steps`)."""
    return 8 * len(encode_steps(grid.index))


def choose(weight: np.ndarray, bits: int, axis: int | None,
           importance: np.ndarray | None = None) -> Grid:
    """Per-channel steps along `axis`, or one step for the tensor, at `bits`.

    Each output channel counts by its error relative to its own energy (a channel 100x smaller
    than the others before a normalisation matters as much). A per-channel grid costs side bits
    S over the n survivors and, where channels differ in range, finer levels for the small
    channels: their entropy R grows by dR. With errors charged at the high-rate slope (4x less
    error per bit a survivor), per-channel steps win when they are better at equal bits,
    `relative_error_channels * 4^((S + dR) / n) < relative_error_tensor`, or when, charged for
    S alone, they still leave at most 1 / `GAIN` of the tensor grid's error: at a given width
    they then deliver the error that width promises, which one grid does not (g2p's GRU
    matrices: 2.9-3.3x less error for 0.7-0.9 bits of dR; with the equal-bits test alone they
    kept one grid and g2p's word agreement at 8 bits was 97.7%, not 98.7%), or without that
    gain when one grid leaves the small channels more than `LOST_BITS` short (outlier
    channels: 4.4 bits in a sentence encoder's FFN). Below that gain
    one grid at equal rate is as good and its levels cost less (the digits CNN at rate 0.1:
    1.5-1.7x for 0.68 bits; per-channel there raised its coded bits per weight by 4.6%).
    """
    tensor, _ = fit(weight, bits, None, importance)
    if axis is None or np.ndim(weight) == 0 or np.shape(weight)[axis] < 2:
        return tensor
    channels, _ = fit(weight, bits, axis, importance)
    survivors = max(int(np.count_nonzero(weight)), 1)
    cost = {}
    for grid in (tensor, channels):
        q = round_to(weight, grid, bits)
        cost[grid.axis] = (_relative_error(weight, q, grid, axis, importance), level_bits(q))
    (error_c, bits_c), (error_t, bits_t) = cost[axis], cost[None]
    side = side_bits(channels) / survivors
    finer = (bits_c - bits_t) / survivors
    wins = error_c * 4.0 ** (side + finer) < error_t or \
        (GAIN * error_c if finer <= LOST_BITS else error_c) * 4.0 ** side <= error_t
    return channels if wins else tensor


def _relative_error(weight: np.ndarray, q: np.ndarray, grid: Grid, axis: int,
                    importance: np.ndarray | None) -> float:
    """Sum over the channels along `axis` of their weighted error / their weighted energy."""
    w = np.asarray(weight, dtype=np.float64)
    err = (w - q * grid.broadcast(w.ndim).astype(np.float64)) ** 2
    energy = w * w
    if importance is not None:
        imp = np.broadcast_to(np.asarray(importance, np.float64), w.shape)
        err, energy = err * imp, energy * imp
    err, energy = _rows(err, axis).sum(axis=1), _rows(energy, axis).sum(axis=1)
    live = energy > 0
    return float(np.sum(err[live] / energy[live]))


def level_bits(q: np.ndarray, classes: np.ndarray | None = None, axis: int | None = None
               ) -> float:
    """Empirical entropy of the nonzero levels' magnitudes plus their signs, in bits; with
    `classes` (bool per index along `axis`), the sum over the two classes of rows, each coded
    with its own histogram."""
    if classes is not None:
        rows = np.moveaxis(np.asarray(q), axis, 0)
        return level_bits(rows[~classes]) + level_bits(rows[classes])
    levels = np.asarray(q)[np.asarray(q) != 0]
    return entropy_bits(np.bincount(np.abs(levels))) + \
        entropy_bits(np.bincount((levels > 0).astype(np.int64)))


def entropy_bits(counts: np.ndarray) -> float:
    """Bits of coding the symbols counted in `counts` with their own histogram."""
    counts = counts[counts > 0].astype(np.float64)
    return float(-(counts * np.log2(counts / counts.sum())).sum()) if counts.size else 0.0


def rdoq(weight: np.ndarray, q: np.ndarray, grid: Grid, bits: int,
         importance: np.ndarray | None = None, passes: int = 2) -> np.ndarray:
    """Rate-distortion-optimised rounding of the survivors of `q` (levels of `weight` on
    `grid`): each may move to the level on the other side of its value, or to zero, when that
    lowers `imp * (w - level * step)^2 + lambda * bits(level)`.

    `bits(level)` is the coder's cost under the current magnitude histogram, one sign bit, and
    the positions' Bernoulli (a zero is a pruned position); `lambda = ln 2 / 6 * step^2 *
    mean(imp)`, the uniform quantizer's high-rate slope dD/dR at that step. Pruned entries
    stay pruned. Returns new levels (int32); it never raises the summed cost it measures.
    """
    levels = 2 ** (bits - 1) - 1
    w = np.asarray(weight, dtype=np.float32)
    steps = grid.broadcast(w.ndim)
    q = np.asarray(q, dtype=np.int32)
    live = q != 0
    if not live.any():
        return q.copy()
    x = np.abs(w / steps)[live].astype(np.float64)
    scale = np.broadcast_to(steps, w.shape)[live].astype(np.float64) ** 2
    imp = np.ones_like(x) if importance is None else np.broadcast_to(
        np.asarray(importance, np.float64), w.shape)[live]
    lam = math.log(2) / 6.0 * scale * float(np.mean(imp))
    low = np.clip(np.floor(x), 0, levels)
    high = np.clip(low + 1, 1, levels)
    mag = np.abs(q[live]).astype(np.int64)
    total = q.size
    for _ in range(passes):
        counts = np.bincount(mag, minlength=levels + 1).astype(np.float64)
        nonzero = counts[1:].sum()
        value_bits = np.full(levels + 1, 0.0)
        value_bits[1:] = -np.log2((counts[1:] + 0.5) / (nonzero + 0.5 * levels)) + 1.0
        density = (nonzero + 0.5) / (total + 1.0)
        kept_bits = -math.log2(density) + value_bits
        zero_bits = -math.log2(1.0 - density) if density < 1.0 else 0.0
        cost = np.where(np.arange(levels + 1) == 0, zero_bits, kept_bits)
        candidates = np.stack([mag.astype(np.float64), low, high, np.zeros_like(x)])
        costs = imp * scale * (x - candidates) ** 2 + lam * cost[candidates.astype(np.int64)]
        mag = candidates[np.argmin(costs, axis=0), np.arange(x.size)].astype(np.int64)
    out = np.zeros_like(q)
    out[live] = (np.sign(w[live]) * mag).astype(np.int32)
    return out


def encode_steps(index: np.ndarray) -> bytes:
    """The step indices as bytes: u8 mode | varint count | zigzag varint of the first index |
    mode 0: one byte per index (index - smallest, when they span at most 255) | mode 1: zigzag
    varints of the differences between neighbours. The smaller form is written. (Varints are
    the codec's canonical LEB128, `rdonnx.codec.entropy.varint`.)"""
    t = np.asarray(index, dtype=np.int64).reshape(-1)
    head = varint(t.size) + varint(_zigzag(int(t[0]) if t.size else 0))
    deltas = b"".join(varint(_zigzag(int(d))) for d in np.diff(t))
    if t.size and int(t.max() - t.min()) <= 255:
        low = int(t.min())
        raw = varint(_zigzag(low)) + (t - low).astype(np.uint8).tobytes()
        if len(raw) <= len(deltas):
            return bytes([0]) + head + raw
    return bytes([1]) + head + deltas


def decode_steps(payload: bytes, count: int) -> np.ndarray:
    """Step indices from `encode_steps` (int64 [count]); ValueError (`CodecError`) on any
    inconsistency."""
    if not payload:
        raise CodecError("empty steps")
    reader = Reader(payload)
    mode = reader.byte("the steps' mode")
    if reader.varint(1 << 62, "the steps' count") != count:
        raise CodecError(f"the steps hold a count other than {count}")
    limit = 2 * max(-_T_MIN, _T_MAX) + 1
    first = _unzigzag(reader.varint(limit, "the first step"))
    if mode == 0:
        low = _unzigzag(reader.varint(limit, "the smallest step"))
        if reader.remaining() != count:
            raise CodecError(f"{reader.remaining()} step bytes for {count} steps")
        t = low + np.frombuffer(reader.take(count, "steps"), dtype=np.uint8).astype(np.int64)
        if count and t[0] != first:
            raise CodecError("the steps' first index does not match")
    elif mode == 1:
        deltas = reader.varints(max(count - 1, 0), 2 * limit, "step differences")
        if reader.remaining():
            raise CodecError("bytes after the last step")
        signed = np.where(deltas % 2 == 0, deltas // 2, -(deltas + 1) // 2)
        t = first + np.concatenate([np.zeros(min(count, 1), np.int64), np.cumsum(signed)])
    else:
        raise CodecError(f"unknown steps mode {mode}")
    if count and (t.min() < _T_MIN or t.max() > _T_MAX):
        raise CodecError("a step index outside the float32 range")
    return t


def _zigzag(v: int) -> int:
    return 2 * v if v >= 0 else -2 * v - 1


def _unzigzag(v: int) -> int:
    return v // 2 if v % 2 == 0 else -(v + 1) // 2
