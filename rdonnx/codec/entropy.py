"""Entropy coding of pruned, quantized weight tensors with constriction's ANS coder.

A pruned, quantized tensor `q` is coded as two self-describing byte streams:

* positions: the mask `q != 0`. Models: one Bernoulli for the whole tensor ("iid"), or the
  tensor viewed as a matrix `[shape[0], prod(shape[1:])]` with its rows ("rows"), its
  columns ("columns") or both ("rows+columns") grouped into classes of similar density; the
  positions of one block (row class x column class) share one Bernoulli whose probability is
  the block's exact density. The encoder estimates every candidate, encodes those near the
  best estimate (all of them for tensors up to 65536 elements) and keeps the smallest.
  Masks with N:M structured sparsity (the C-order flattening split into consecutive groups
  of M elements, each with exactly N kept; detected for M = 4, 8, 16) also get the "n:m"
  model: one symbol per group, the rank of its kept set among the C(M, N) possible ones,
  coded Uniform(C(M, N)) or Categorical(exact pattern histogram, stored as side info).
* values: `q[q != 0]` in C order. Signs with one Bernoulli; magnitudes with one Categorical
  over tokens whose probabilities are the exact token histogram (stored as side info). A
  token is either a magnitude or, for wide alphabets, a (bit length, leading bits) bucket
  followed by uniformly coded low bits.

Every symbol group is coded with one scalar model in one constriction call (no per-symbol
parameters). Decoders validate every header field against the payload and the requested
shape/count before allocating and raise `CodecError` on any inconsistency.

Layout (varint = canonical unsigned LEB128; ANS words = the rest of the payload, uint32
little-endian, from constriction's stack `AnsCoder`, decoded in the order listed):

positions: u8 0x11 | u8 model (0 iid, 1 rows, 2 columns, 3 rows+columns, 4 n:m) | varint n |
    [rows: varint Kr, Kr varints rows per class] | [columns: varint Kc, Kc varints columns
    per class] | Kr*Kc varints kept count per block (row-major; Kr = 1 / Kc = 1 for an axis
    not modelled) | ANS: row class ids (Categorical), column class ids (Categorical), then
    each block with 0 < k < size: its elements of X[rperm][:, cperm] in C order, Bernoulli
    (k / size); X = mask viewed as [shape[0], n / shape[0]] ([1, n] for iid), rperm / cperm
    the stable argsorts of the class ids.
    Model 4 instead: u8 0x11 | u8 4 | varint n | varint M (2..32) | varint N (1..M-1) |
    u8 table mode t (0 none, 1 raw, 2 zstd) | [t > 0: P = C(M, N) pattern counts: P
    varints, or varint L + a zstd frame of L bytes holding them] | ANS: n / M pattern
    indices (t = 0: Uniform(P), or for P > 2**24 all high parts idx >> 16 Uniform(((P - 1)
    >> 16) + 1) then all low parts idx & 0xFFFF Uniform(2**16), then a terminator 1,
    Uniform(2); t > 0: Categorical(counts), if > 1 pattern used). See `_nm_lut` for the
    pattern index.
    Model 5 ("gaps"): u8 0x11 | u8 5 | varint n | varint k (kept count, 0 < k < n) | a values
    payload (below) of the k gaps g_i = index_i - index_(i-1) (index_0 = -1 before the
    first), all positive. Chosen for tensors over 65536 elements at density <= 0.25 when it
    is within 0.1% + 128 bytes of the smallest model: k symbols instead of n decode several
    times faster.
values: u8 0x21 | u8 mode (bits 0-4 precision s, bit 5 zstd table, bit 6 raw signs) |
    varint count | varint positives | varint alphabet A | token counts: A varints, or varint
    L + a zstd frame of L bytes holding them | [raw signs: ceil(count / 8) bytes, the signs as
    bits (1 = positive, numpy packbits order), when mixed signs cost at most 64 bits more this
    way than coded] | ANS: tokens (Categorical(counts), if > 1 token used), low bits grouped
    by width nb = 1..23 (Uniform(2**nb)), signs (Bernoulli(positives / count), 1 = positive,
    if mixed and not raw). See `_tokens` for the token mapping.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import constriction
import numpy as np
import zstandard

__all__ = [
    "CodecError", "CodedStream", "decode_integers", "decode_kept", "decode_positions",
    "decode_values", "encode_integers", "encode_positions", "encode_values", "kept_as_indices",
    "kept_count", "kept_indices",
]

_AnsCoder = constriction.stream.stack.AnsCoder
_models = constriction.stream.model

POSITIONS_TAG = 0x11  # high nibble 1 = positions stream, low nibble = format version 1
VALUES_TAG = 0x21  # high nibble 2 = values stream, low nibble = format version 1

POSITION_MODELS = ("iid", "rows", "columns", "rows+columns", "n:m", "gaps")
MAX_CLASSES = 64  # decoder limit on row / column classes
NM_MAX_GROUP = 32  # largest group size M of the "n:m" positions model
NM_MAX_TABLE = 1 << 16  # most patterns C(M, N) for which "n:m" may store a pattern histogram
MAX_MAGNITUDE = (1 << 24) - 1
MAX_ALPHABET = 1 << 19  # decoder limit on the value token alphabet
ALPHABET_SLACK = 4096  # the token alphabet may exceed the value count by at most 4 x + this

_K_SINGLE = 32  # most classes the encoder uses for "rows" / "columns"
_K_JOINT = 16  # most classes per axis the encoder uses for "rows+columns"
_FINE_SINGLE = 256  # density chunks the class search works on (single axis)
_FINE_JOINT = 64  # density chunks per axis for the joint search
_EXACT_ALL = 1 << 16  # tensors up to this size: encode every candidate to compare exact sizes
_NM_GROUPS = (4, 8, 16)  # group sizes M the encoder tries for the "n:m" model
_NM_LUT_MAX = 16  # "n:m" pattern index by lookup tables up to this M, by arithmetic above
_UNIFORM_MAX = 1 << 24  # largest constriction Uniform (default 24-bit precision)
_ANS_FLUSH_BITS = 32.0  # estimated ANS overhead (final state words)
_RAW_SIGN_SLACK = 64.0  # signs go raw when that costs at most this many bits more than ANS
_GAPS_MAX_DENSITY = 0.25  # "gaps" is tried up to this density (above, it saves no time)
_GAPS_SLACK = (1.001, 128)  # "gaps" is taken when at most 0.1% + 128 bytes over the smallest
_HISTOGRAM_CHECK = 1 << 16  # decoded token histograms are checked in full up to this count
_DECODE_ERRORS = (ValueError, KeyError, IndexError, OverflowError, TypeError,
                  zstandard.ZstdError)


class CodecError(ValueError):
    """A payload is corrupted, truncated or inconsistent with the requested shape/count."""


@dataclass(frozen=True)
class CodedStream:
    """One coded stream and its size accounting.

    Attributes:
        payload: Self-describing bytes: tag byte, model choice and parameters, ANS words.
        bits: `8 * len(payload)`.
        side_bits: Bits of the payload that are headers / model parameters, not ANS words.
        iid_entropy_bits: Empirical i.i.d. entropy of the coded content (no side info).
        model: "iid", "rows", "columns", "rows+columns" or "n:m" for positions;
            "categorical" or "categorical+escape" for values.
    """

    payload: bytes
    bits: int
    side_bits: int
    iid_entropy_bits: float
    model: str


# ----------------------------------------------------------------------------- helpers


def varint(value: int) -> bytes:
    """LEB128 encoding of one non-negative integer."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _varints(values: np.ndarray) -> bytes:
    """LEB128 encoding of an array of non-negative integers (< 2**63), vectorised."""
    v = np.asarray(values, dtype=np.uint64).ravel()
    if v.size == 0:
        return b""
    nbytes = np.ones(v.size, dtype=np.int64)
    for k in range(1, 10):
        nbytes += v >= np.uint64(1 << (7 * k))
    starts = np.cumsum(nbytes) - nbytes
    out = np.empty(int(nbytes.sum()), dtype=np.uint8)
    for j in range(int(nbytes.max())):
        sel = nbytes > j
        byte = ((v[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)).astype(np.uint8)
        more = (nbytes[sel] - 1 > j).astype(np.uint8) << 7
        out[starts[sel] + j] = byte | more
    return out.tobytes()


def _varint_len(values: np.ndarray) -> int:
    """Total LEB128 size in bytes of an array of non-negative integers."""
    v = np.asarray(values, dtype=np.uint64).ravel()
    total = v.size
    for k in range(1, 10):
        total += int(np.count_nonzero(v >= np.uint64(1 << (7 * k))))
    return total


class Reader:
    """Bounds-checked reader over a payload; every failure raises CodecError."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def byte(self, what: str) -> int:
        if self.pos >= len(self.buf):
            raise CodecError(f"truncated payload: missing {what}")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def varint(self, limit: int, what: str) -> int:
        """One canonical LEB128 integer in [0, limit]."""
        value = 0
        for i in range(10):
            b = self.byte(what)
            value |= (b & 0x7F) << (7 * i)
            if b < 0x80:
                if b == 0 and i > 0:
                    raise CodecError(f"non-canonical varint in {what}")
                break
        else:
            raise CodecError(f"varint too long in {what}")
        if value > limit:
            raise CodecError(f"{what} out of range ({value} > {limit})")
        return value

    def varints(self, count: int, limit: int, what: str) -> np.ndarray:
        """`count` canonical LEB128 integers, each in [0, limit], as int64."""
        values, used = _parse_varints(self.buf, self.pos, count, limit, what)
        self.pos += used
        return values

    def take(self, n: int, what: str) -> bytes:
        if n > self.remaining():
            raise CodecError(f"truncated payload: {what}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def words(self) -> np.ndarray:
        """The rest of the payload as little-endian uint32 ANS words."""
        rest = self.remaining()
        if rest % 4:
            raise CodecError("ANS data is not a whole number of 32-bit words")
        words = np.frombuffer(self.buf, dtype="<u4", count=rest // 4, offset=self.pos)
        self.pos = len(self.buf)
        return words.astype(np.uint32)


def _parse_varints(buf: bytes, pos: int, count: int, limit: int, what: str
                   ) -> tuple[np.ndarray, int]:
    """Vectorised LEB128 parse of `count` values from buf[pos:]; returns (values, bytes used)."""
    if count == 0:
        return np.zeros(0, dtype=np.int64), 0
    avail = len(buf) - pos
    if avail <= 0:
        raise CodecError(f"truncated payload: missing {what}")
    region = np.frombuffer(buf, dtype=np.uint8, count=min(avail, 9 * count), offset=pos)
    ends = np.flatnonzero(region < 0x80)
    if ends.size < count:
        raise CodecError(f"truncated payload: {what}")
    ends = ends[:count]
    lens = np.diff(ends, prepend=-1)
    if int(lens.max()) > 9:
        raise CodecError(f"varint too long in {what}")
    if np.any(region[ends[lens > 1]] == 0):
        raise CodecError(f"non-canonical varint in {what}")
    used = int(ends[-1]) + 1
    starts = ends - lens + 1
    shift = (np.arange(used, dtype=np.int64) - np.repeat(starts, lens)) * 7
    parts = (region[:used] & 0x7F).astype(np.uint64) << shift.astype(np.uint64)
    values = np.add.reduceat(parts, starts)
    if int(values.max()) > limit:
        raise CodecError(f"{what} out of range")
    return values.astype(np.int64), used


def _nh(n: object, k: object) -> np.ndarray:
    """n * H(k / n) in bits (binary entropy), vectorised; 0 where k == 0 or k == n."""
    n = np.asarray(n, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(k > 0, k * np.log2(n / k), 0.0)
        b = np.where(n - k > 0, (n - k) * np.log2(n / (n - k)), 0.0)
    return np.nan_to_num(a + b, nan=0.0, posinf=0.0)


def _hist_bits(counts: np.ndarray) -> float:
    """Empirical entropy in bits of a sample with these symbol counts (count * H)."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    total = c.sum()
    if total <= 0:
        return 0.0
    return float(np.sum(c * np.log2(total / c)))


def _bernoulli(ones: int, size: int) -> object:
    """Scalar Bernoulli whose p is the exact density `ones / size` (float64 division)."""
    return _models.Bernoulli(ones / size, perfect=False)


def _categorical(counts: np.ndarray) -> object:
    """Categorical with probabilities proportional to integer counts (as float64)."""
    return _models.Categorical(np.asarray(counts, dtype=np.float64), perfect=False)


def _words_bytes(coder: object) -> bytes:
    return coder.get_compressed().astype("<u4").tobytes()


def _info_bits(counts: np.ndarray) -> float:
    """Information in bits of a sample with these symbol counts under its own histogram,
    leaving out symbol 0 (see `_open_coder`)."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    rest = c[1:][c[1:] > 0]
    return float(np.sum(rest * np.log2(total / rest))) if total > 0 else 0.0


def _open_coder(words: np.ndarray, needed: bool, min_bits: float = 0.0,
                nonempty: bool = False) -> object:
    """ANS decoder over `words`; `min_bits` is a lower bound on the information the header
    implies, checked before any symbol is decoded.

    An encoding of symbols whose histogram is fixed by the header takes about their empirical
    entropy (cross-entropy >= entropy), except that the symbols the encoder pushes first
    (decoded last) cost nothing while they are each model's symbol 0 (cdf 0 keeps the
    initial state at 0). Callers therefore pass the information of the symbols other than
    symbol 0; words holding less than half of it (minus 64 bits; the factor absorbs the
    probability quantization) are rejected, so a tiny payload cannot claim a huge tensor.
    Without `nonempty`, an empty word list is valid (all symbols free: it decodes zeros).
    """
    if 32 * words.size < 0.5 * min_bits - 64:
        raise CodecError("ANS data shorter than the header's symbol counts require")
    if not needed:
        if words.size:
            raise CodecError("unexpected trailing data")
        return None
    if words.size == 0:
        if nonempty:
            raise CodecError("missing ANS data")
        return _AnsCoder(words)
    if words[-1] == 0:
        raise CodecError("invalid ANS data (ends in a zero word)")
    return _AnsCoder(words)


def _finish_coder(coder: object) -> None:
    if coder is not None and not coder.is_empty():
        raise CodecError("trailing ANS data after the last symbol")


def _check_shape(shape: object) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"invalid shape {shape!r}") from exc
    if any(d < 0 for d in dims):
        raise CodecError(f"invalid shape {shape!r}")
    return dims


def _as_bytes(payload: object) -> bytes:
    try:
        return bytes(payload)
    except TypeError as exc:
        raise CodecError("payload must be bytes-like") from exc


# ----------------------------------------------------------------------------- positions


@dataclass(frozen=True)
class _Plan:
    """A candidate position model: class per row / column (None: one class).

    For model 4 ("n:m"), `nm` is (N, M, with pattern table?) and `nm_idx` the pattern index of
    every group.
    """

    model: int
    row_cls: np.ndarray | None
    col_cls: np.ndarray | None
    est_bits: float
    nm: tuple[int, int, bool] | None = None
    nm_idx: np.ndarray | None = None


def _chunks(unit_ones: np.ndarray, length: int, max_chunks: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Split units (rows or columns), sorted by density, into at most ~max_chunks runs.

    Returns (chunk index of every unit, units per chunk). Units that are empty or full get
    chunks of their own; otherwise chunks are equal-count runs (or runs of equal density).
    """
    u = unit_ones.size
    order = np.argsort(unit_ones, kind="stable")
    sk = unit_ones[order]
    change = np.flatnonzero(np.diff(sk)) + 1
    if change.size + 1 <= max_chunks:
        cuts = change
    else:
        cuts = np.rint(np.linspace(0, u, max_chunks + 1)).astype(np.int64)
        cuts = np.concatenate([cuts, np.searchsorted(sk, [1, length])])
    bounds = np.unique(np.concatenate([[0, u], cuts]).astype(np.int64))
    bounds = bounds[(bounds >= 0) & (bounds <= u)]
    sizes = np.diff(bounds)
    chunk_sorted = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes)
    chunk = np.empty(u, dtype=np.int64)
    chunk[order] = chunk_sorted
    return chunk, sizes


def _partition(units: np.ndarray, ones: np.ndarray, lens: np.ndarray, kmax: int,
               kmin: int = 1) -> tuple[float, np.ndarray]:
    """Optimal grouping of density-sorted chunks into <= kmax contiguous classes.

    Args:
        units: (M,) units (rows or columns) per chunk, all >= 1.
        ones: (M, G) kept positions per chunk and class of the other axis.
        lens: (G,) number of other-axis units in each of those classes.
        kmax: most classes.
        kmin: fewest classes (when there are at least that many chunks).

    Returns:
        (estimated bits: positions + class ids + per-class side info, class of each chunk).
    """
    m, g = ones.shape
    ucum = np.concatenate([[0], np.cumsum(units)]).astype(np.float64)
    ocum = np.vstack([np.zeros((1, g)), np.cumsum(ones, axis=0)]).astype(np.float64)
    uij = ucum[None, :] - ucum[:, None]
    oij = ocum[None, :, :] - ocum[:, None, :]
    nij = uij[:, :, None] * np.asarray(lens, dtype=np.float64)[None, None, :]
    total = ucum[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        idbits = np.where(uij > 0, uij * np.log2(total / uij), 0.0)
    cost = _nh(nij, oij).sum(axis=2) + idbits + 8.0 * (2 + 3 * g)
    cost[~(uij > 0)] = np.inf
    dp = cost[0].copy()
    best_k, best = 1, (dp[m] if kmin <= 1 or m < 2 else np.inf)
    back = []
    cols = np.arange(m + 1)
    for k in range(2, min(kmax, m) + 1):
        tot = dp[:, None] + cost
        arg = np.argmin(tot, axis=0)
        dp = tot[arg, cols]
        back.append(arg)
        if dp[m] < best - 1e-9:
            best_k, best = k, dp[m]
    bounds = [m]
    j = m
    for k in range(best_k, 1, -1):
        j = int(back[k - 2][j])
        bounds.append(j)
    bounds.append(0)
    bounds = np.array(bounds[::-1], dtype=np.int64)
    cls = np.repeat(np.arange(best_k, dtype=np.int64), np.diff(bounds))
    return float(best), cls


def _id_bits(counts: np.ndarray) -> float:
    return _hist_bits(counts) + 8.0 * _varint_len(counts) if counts.size > 1 else 0.0


def _context_plans(x2: np.ndarray, allowed: set[str]) -> list[_Plan]:
    """Candidate "rows", "columns" and "rows+columns" models for a 2-D bool matrix.

    Without "iid" in `allowed`, every search uses at least two classes per axis it models.
    """
    r, c = x2.shape
    kmin = 1 if "iid" in allowed else 2
    plans: list[_Plan] = []
    rk = np.count_nonzero(x2, axis=1).astype(np.int64) if r >= 2 else None
    ck = np.count_nonzero(x2, axis=0).astype(np.int64) if c >= 2 else None
    header = 8.0 * (2 + len(varint(r * c)))
    if rk is not None:
        chunk, sizes = _chunks(rk, c, _FINE_SINGLE)
        ones = np.bincount(chunk, weights=rk, minlength=sizes.size)[:, None]
        est, cls = _partition(sizes, ones, np.array([c]), _K_SINGLE, kmin)
        if cls.max() >= 1:
            plans.append(_Plan(1, cls[chunk], None, est + header + _ANS_FLUSH_BITS))
    if ck is not None:
        chunk, sizes = _chunks(ck, r, _FINE_SINGLE)
        ones = np.bincount(chunk, weights=ck, minlength=sizes.size)[:, None]
        est, cls = _partition(sizes, ones, np.array([r]), _K_SINGLE, kmin)
        if cls.max() >= 1:
            plans.append(_Plan(2, None, cls[chunk], est + header + _ANS_FLUSH_BITS))
    if rk is not None and ck is not None and "rows+columns" in allowed:
        joint = _joint_plan(x2, rk, ck, kmin)
        if joint is not None:
            plans.append(_Plan(joint[0], joint[1], joint[2], joint[3] + header
                               + _ANS_FLUSH_BITS))
    return plans


def _fine_counts(x2: np.ndarray, r_chunk: np.ndarray, mr: int, c_chunk: np.ndarray, mc: int
                 ) -> np.ndarray:
    """Kept positions per (row chunk, column chunk), shape (mr, mc), in bounded memory."""
    r, c = x2.shape
    dt = np.float32 if c < (1 << 24) else np.float64
    onehot = np.zeros((c, mc), dtype=dt)
    onehot[np.arange(c), c_chunk] = 1
    fine = np.zeros((mr, mc), dtype=np.float64)
    step = max(1, (1 << 20) // max(c, mr))
    for r0 in range(0, r, step):
        r1 = min(r, r0 + step)
        per_row = (x2[r0:r1].view(np.uint8).astype(dt) @ onehot).astype(np.float64)
        rows = np.zeros((mr, r1 - r0), dtype=np.float64)
        rows[r_chunk[r0:r1], np.arange(r1 - r0)] = 1
        fine += rows @ per_row
    return np.rint(fine)


def _joint_plan(x2: np.ndarray, rk: np.ndarray, ck: np.ndarray, kmin: int = 1
                ) -> tuple[int, np.ndarray, np.ndarray, float] | None:
    """Alternating search for row and column classes (model "rows+columns").

    Works on density chunks of rows and columns: starting from the best column classes,
    alternately re-optimises row classes given column classes and vice versa (3 rounds),
    keeping the cheapest estimate. Returns (model, row classes, column classes, est bits).
    """
    r, c = x2.shape
    r_chunk, r_sizes = _chunks(rk, c, _FINE_JOINT)
    c_chunk, c_sizes = _chunks(ck, r, _FINE_JOINT)
    if r_sizes.size < 2 or c_sizes.size < 2:
        return None
    fine = _fine_counts(x2, r_chunk, r_sizes.size, c_chunk, c_sizes.size)
    # start from the best column classes alone
    _, c_cls = _partition(c_sizes, fine.sum(axis=0)[:, None], np.array([r]), _K_JOINT,
                          kmin)
    best = None
    r_cls = None
    for _ in range(3):
        kc = int(c_cls.max()) + 1
        c_group = np.zeros((c_sizes.size, kc))
        c_group[np.arange(c_sizes.size), c_cls] = 1
        c_lens = np.bincount(c_cls, weights=c_sizes, minlength=kc)
        est, r_cls = _partition(r_sizes, fine @ c_group, c_lens, _K_JOINT, kmin)
        est += _id_bits(c_lens)
        if best is None or est < best[0] - 1e-9:
            best = (est, r_cls, c_cls)
        kr = int(r_cls.max()) + 1
        r_group = np.zeros((r_sizes.size, kr))
        r_group[np.arange(r_sizes.size), r_cls] = 1
        r_lens = np.bincount(r_cls, weights=r_sizes, minlength=kr)
        est, c_cls = _partition(c_sizes, fine.T @ r_group, r_lens, _K_JOINT, kmin)
        est += _id_bits(r_lens)
        if est < best[0] - 1e-9:
            best = (est, r_cls, c_cls)
    est, r_cls, c_cls = best
    if r_cls.max() < 1 or c_cls.max() < 1:
        return None
    return 3, r_cls[r_chunk], c_cls[c_chunk], est


def _encode_plan(x2: np.ndarray, n: int, plan: _Plan) -> tuple[bytes, int]:
    """Payload for one plan; returns (payload, header bytes)."""
    r, c = x2.shape
    p = x2
    head = bytearray([POSITIONS_TAG, plan.model])
    head += varint(n)
    if plan.row_cls is not None:
        rcnt = np.bincount(plan.row_cls)
        p = p[np.argsort(plan.row_cls, kind="stable")]
        head += varint(rcnt.size) + _varints(rcnt)
    else:
        rcnt = np.array([r])
    if plan.col_cls is not None:
        ccnt = np.bincount(plan.col_cls)
        p = np.take(p, np.argsort(plan.col_cls, kind="stable"), axis=1)
        head += varint(ccnt.size) + _varints(ccnt)
    else:
        ccnt = np.array([c])
    rb = np.concatenate([[0], np.cumsum(rcnt)]).tolist()
    cb = np.concatenate([[0], np.cumsum(ccnt)]).tolist()
    blocks = [(rb[i], rb[i + 1], cb[j], cb[j + 1])
              for i in range(rcnt.size) for j in range(ccnt.size)]
    ones = [int(np.count_nonzero(p[r0:r1, c0:c1])) for r0, r1, c0, c1 in blocks]
    head += _varints(np.array(ones, dtype=np.int64))
    coder = _AnsCoder()
    for (r0, r1, c0, c1), k in zip(reversed(blocks), reversed(ones), strict=True):
        size = (r1 - r0) * (c1 - c0)
        if 0 < k < size:
            sym = np.ascontiguousarray(p[r0:r1, c0:c1], dtype=np.int32).ravel()
            coder.encode_reverse(sym, _bernoulli(k, size))
    if plan.col_cls is not None:
        coder.encode_reverse(plan.col_cls.astype(np.int32), _categorical(ccnt))
    if plan.row_cls is not None:
        coder.encode_reverse(plan.row_cls.astype(np.int32), _categorical(rcnt))
    return bytes(head) + _words_bytes(coder), len(head)


# "n:m": a group's pattern is its set of kept offsets {j : 0 <= j < M}; its code is the M-bit
# integer sum(2**(M - 1 - j)) (first element = most significant bit) and its index the rank
# of that set among all N-subsets of range(M) in lexicographic order of the sorted offsets,
# which is the position of the code in the descending list of M-bit codes with N ones.


@functools.lru_cache(maxsize=64)
def _nm_lut(m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes by pattern index, index of every M-bit code or -1) for M <= _NM_LUT_MAX."""
    codes = np.arange(1 << m, dtype=np.int64)
    ones = np.zeros(codes.size, dtype=np.int64)
    for j in range(m):
        ones += (codes >> j) & 1
    by_index = codes[ones == k][::-1].copy()
    index_of = np.full(codes.size, -1, dtype=np.int32)
    index_of[by_index] = np.arange(by_index.size, dtype=np.int32)
    by_index.flags.writeable = False
    index_of.flags.writeable = False
    return by_index, index_of


@functools.lru_cache(maxsize=1)
def _binomials() -> np.ndarray:
    """C(a, b) for 0 <= a, b <= NM_MAX_GROUP as int64 (0 for b > a)."""
    t = np.array([[math.comb(a, b) for b in range(NM_MAX_GROUP + 1)]
                  for a in range(NM_MAX_GROUP + 1)], dtype=np.int64)
    t.flags.writeable = False
    return t


def _nm_rank(codes: np.ndarray, m: int, k: int) -> np.ndarray:
    """Pattern index of M-bit codes with k ones, by arithmetic (combinatorial number system).

    Scanning offsets j = 0..M-1, an offset not kept while `need` ones remain skips the
    C(M - 1 - j, need - 1) patterns with the same prefix that keep it.
    """
    cb = _binomials()
    rank = np.zeros(codes.shape, dtype=np.int64)
    need = np.full(codes.shape, k, dtype=np.int64)
    for j in range(m):
        a = m - 1 - j
        bit = (codes >> a) & 1
        skip = (bit == 0) & (need > 0)
        rank += np.where(skip, cb[a][np.maximum(need - 1, 0)], 0)
        need -= bit
    return rank


def _nm_unrank(idx: np.ndarray, m: int, k: int) -> np.ndarray:
    """Inverse of `_nm_rank`: M-bit codes with k ones from pattern indices < C(M, k)."""
    cb = _binomials()
    r = idx.astype(np.int64)
    need = np.full(r.shape, k, dtype=np.int64)
    code = np.zeros(r.shape, dtype=np.int64)
    for j in range(m):
        a = m - 1 - j
        with_j = np.where(need > 0, cb[a][np.maximum(need - 1, 0)], 0)
        take = (need > 0) & (r < with_j)
        code |= take.astype(np.int64) << a
        r -= np.where(take, 0, with_j)
        need -= take
    return code


def _nm_codes(groups: np.ndarray, m: int) -> np.ndarray:
    """M-bit codes (first element = MSB) of the rows of a C-contiguous (G, M) bool array."""
    g = groups.shape[0]
    if m % 8 == 0 or 8 % m == 0:  # whole groups per byte or whole bytes per group
        packed = np.packbits(groups.reshape(-1))
        if m >= 8:
            by = packed.reshape(g, m // 8)
            code = by[:, 0].astype(np.int64)
            for b in range(1, m // 8):
                code = (code << 8) | by[:, b]
            return code
        shifts = np.arange(8 - m, -1, -m, dtype=np.uint8)
        return ((packed[:, None] >> shifts) & ((1 << m) - 1)).reshape(-1)[:g].astype(np.int64)
    packed = np.packbits(groups, axis=1).astype(np.int64)
    code = np.zeros(g, dtype=np.int64)
    for b in range(packed.shape[1]):
        code = (code << 8) | packed[:, b]
    return code >> (8 * packed.shape[1] - m)


def _nm_groups(codes: np.ndarray, m: int) -> np.ndarray:
    """Inverse of `_nm_codes`: (G, M) bool array from M-bit codes."""
    g = codes.size
    c = codes.astype(np.int64)
    if m % 8 == 0 or 8 % m == 0:
        if m >= 8:
            by = np.empty((g, m // 8), dtype=np.uint8)
            for b in range(m // 8):
                by[:, b] = (c >> (m - 8 - 8 * b)) & 0xFF
        else:
            per = 8 // m
            c = np.concatenate([c, np.zeros(-g % per, dtype=np.int64)]).reshape(-1, per)
            by = np.zeros(c.shape[0], dtype=np.int64)
            for j in range(per):
                by = (by << m) | c[:, j]
            by = by.astype(np.uint8)
        return np.unpackbits(by.reshape(-1), count=g * m).astype(bool).reshape(g, m)
    nb = (m + 7) // 8
    c = c << (8 * nb - m)
    by = np.empty((g, nb), dtype=np.uint8)
    for b in range(nb):
        by[:, b] = (c >> (8 * (nb - 1 - b))) & 0xFF
    return np.unpackbits(by, axis=1, count=m).astype(bool)


def _nm_plans(flat: np.ndarray, n: int, nnz: int) -> list[_Plan]:
    """"n:m" candidates (uniform and, if allowed, histogram) for every group size M in
    `_NM_GROUPS` such that M divides n and every group has the first group's count N."""
    plans: list[_Plan] = []
    for m in _NM_GROUPS:
        if n % m or not 2 <= m <= NM_MAX_GROUP:
            continue
        k = int(np.count_nonzero(flat[:m]))
        if not 0 < k < m or nnz * m != k * n:
            continue
        groups = flat.reshape(-1, m)
        if m <= _NM_LUT_MAX:
            idx = _nm_lut(m, k)[1][_nm_codes(groups, m)]
            if int(idx.min()) < 0:  # a group without exactly k kept
                continue
        else:
            if np.any(groups.view(np.uint8).sum(axis=1, dtype=np.uint8) != k):
                continue
            idx = _nm_rank(_nm_codes(groups, m), m, k)
        g, p = n // m, math.comb(m, k)
        head = 8.0 * (2 + len(varint(n)) + 3)
        plans.append(_Plan(4, None, None, head + g * math.log2(p) + _ANS_FLUSH_BITS,
                           (k, m, False), idx))
        if p <= NM_MAX_TABLE:
            counts = np.bincount(idx, minlength=p)
            est = head + _hist_bits(counts) + 8.0 * _table_size_estimate(counts)
            est += _ANS_FLUSH_BITS * (np.count_nonzero(counts) > 1)
            plans.append(_Plan(4, None, None, est, (k, m, True), idx))
    return plans


def _encode_nm(n: int, plan: _Plan) -> tuple[bytes, int]:
    """Payload for an "n:m" plan; returns (payload, header bytes)."""
    k, m, table = plan.nm
    idx = plan.nm_idx
    p = math.comb(m, k)
    head = bytearray([POSITIONS_TAG, 4]) + varint(n) + varint(m) + varint(k)
    coder = _AnsCoder()
    if table:
        counts = np.bincount(idx, minlength=p)
        zstd_table, table_bytes = _table_payload(counts)
        head += bytes([2 if zstd_table else 1]) + table_bytes
        if np.count_nonzero(counts) > 1:
            coder.encode_reverse(idx.astype(np.int32), _categorical(counts))
    else:
        head.append(0)
        coder.encode_reverse(np.ones(1, dtype=np.int32), _models.Uniform(2))  # terminator
        if p <= _UNIFORM_MAX:
            coder.encode_reverse(idx.astype(np.int32), _models.Uniform(p))
        else:
            coder.encode_reverse((idx & 0xFFFF).astype(np.int32), _models.Uniform(1 << 16))
            coder.encode_reverse((idx >> 16).astype(np.int32),
                                 _models.Uniform(((p - 1) >> 16) + 1))
    return bytes(head) + _words_bytes(coder), len(head)


def encode_positions(mask: np.ndarray, *, models: tuple[str, ...] | None = None
                     ) -> CodedStream:
    """Entropy-code a keep-mask.

    Args:
        mask: Boolean array of any shape (True = kept); non-bool arrays are read as `!= 0`.
        models: Candidate models to consider (default: all of `POSITION_MODELS`). Without
            "iid" the context models are forced to use >= 2 classes per modelled axis; "iid"
            remains the fallback when none of them applies (rank < 2, density 0 or 1, no
            N:M structure).

    Returns:
        The smallest of the candidate models ("iid"; for rank >= 2 also "rows", "columns",
        "rows+columns" over the `[shape[0], prod(shape[1:])]` view; "n:m" when every
        consecutive group of M = 4, 8 or 16 elements of the C-order flattening keeps the
        same number N, 0 < N < M), side info included.
    """
    allowed = set(POSITION_MODELS if models is None else models)
    if not allowed <= set(POSITION_MODELS):
        raise ValueError(f"unknown position models {sorted(allowed - set(POSITION_MODELS))}")
    m = np.asarray(mask)
    x = np.ascontiguousarray(m if m.dtype == np.bool_ else m != 0)
    n = int(x.size)
    nnz = int(np.count_nonzero(x))
    iid_bits = float(_nh(n, nnz))
    iid_est = 8.0 * (2 + len(varint(n)) + len(varint(nnz))) + iid_bits + _ANS_FLUSH_BITS
    plans = [_Plan(0, None, None, iid_est)]
    x2 = x.reshape(x.shape[0], n // x.shape[0]) if x.ndim >= 2 and n else x.reshape(1, n)
    others: list[_Plan] = []
    if x.ndim >= 2 and 0 < nnz < n and allowed & {"rows", "columns", "rows+columns"}:
        others = [p for p in _context_plans(x2, allowed) if POSITION_MODELS[p.model] in allowed]
    if "n:m" in allowed and 0 < nnz < n:
        others += _nm_plans(x.reshape(-1), n, nnz)
    if others:
        plans = others if "iid" not in allowed else plans + others
    if len(plans) > 1 and n > _EXACT_ALL:  # large: exact sizes only for near-best estimates
        best_est = min(p.est_bits for p in plans)
        slack = max(256.0, 0.002 * best_est)
        plans = [p for p in plans if p.est_bits <= best_est + slack]
    best = None
    for plan in plans:
        if plan.model == 4:
            payload, head = _encode_nm(n, plan)
        else:
            flat = plan.model == 0
            payload, head = _encode_plan(x.reshape(1, -1) if flat else x2, n, plan)
        if best is None or len(payload) < len(best[0]):
            best = (payload, head, plan.model)
    if "gaps" in allowed and n > _EXACT_ALL and 0 < nnz <= _GAPS_MAX_DENSITY * n:
        payload, head = _encode_gaps(x.reshape(-1), n, nnz)
        if len(payload) <= _GAPS_SLACK[0] * len(best[0]) + _GAPS_SLACK[1]:
            best = (payload, head, 5)
    payload, head, model = best
    return CodedStream(payload=payload, bits=8 * len(payload), side_bits=8 * head,
                       iid_entropy_bits=iid_bits, model=POSITION_MODELS[model])


def _encode_gaps(flat: np.ndarray, n: int, nnz: int) -> tuple[bytes, int]:
    """Model 5: the distances between consecutive kept entries, coded as values."""
    gaps = np.diff(np.flatnonzero(flat), prepend=-1)
    coded = encode_values(gaps)
    head = bytes([POSITIONS_TAG, 5]) + varint(n) + varint(nnz)
    return head + coded.payload, len(head) + coded.side_bits // 8


def decode_positions(payload: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Decode a positions payload.

    Args:
        payload: Bytes from `encode_positions`.
        shape: The mask's shape (must match the coded element count and class layout).

    Returns:
        Boolean array of `shape`.

    Raises:
        CodecError: Corrupted/truncated payload or a shape that does not match it.
    """
    return _positions(payload, shape, as_index=False)


def _positions(payload: bytes, shape: tuple[int, ...], as_index: bool) -> np.ndarray:
    """`_decode_positions` with every decoding failure raised as CodecError."""
    dims = _check_shape(shape)
    buf = _as_bytes(payload)
    try:
        return _decode_positions(buf, dims, as_index)
    except CodecError:
        raise
    except _DECODE_ERRORS as exc:
        raise CodecError(f"corrupted positions payload: {exc}") from None


def decode_kept(payload: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """The kept entries of a positions payload as a selector of the flattened tensor: the
    ascending int64 indices when at most 3/4 of the entries are kept, else the flat bool mask
    (`kept_as_indices` decides; each is the faster one to scatter through).

    Raises:
        CodecError: Corrupted/truncated payload or a shape that does not match it.
    """
    kept = _positions(payload, shape, as_index=True)
    n = math.prod(_check_shape(shape))
    if kept.dtype == np.int64:
        if kept_as_indices(n, kept.size):
            return kept
        mask = np.zeros(n, dtype=bool)
        mask[kept] = True
        return mask
    mask = kept.reshape(-1)
    return np.flatnonzero(mask) if kept_as_indices(n, kept_count(mask)) else mask


def kept_as_indices(n: int, k: int) -> bool:
    """Whether `decode_kept` gives the indices (else the mask) of k kept among n entries:
    scattering through a random mask costs a mispredicted branch per entry, through indices
    a memory access per kept entry."""
    return 4 * k <= 3 * n


def kept_indices(selector: np.ndarray) -> np.ndarray:
    """The flat indices (int64, ascending) of a `decode_kept` selector."""
    return np.flatnonzero(selector) if selector.dtype == np.bool_ else selector


def kept_count(selector: np.ndarray) -> int:
    """The number of kept entries of a `decode_kept` selector."""
    return int(np.count_nonzero(selector)) if selector.dtype == np.bool_ else selector.size


def _decode_positions(buf: bytes, dims: tuple[int, ...], as_index: bool = False) -> np.ndarray:
    """The mask (or, for "gaps" with `as_index`, the kept flat indices)."""
    n = math.prod(dims)
    rd = Reader(buf)
    if rd.byte("tag") != POSITIONS_TAG:
        raise CodecError("not a positions payload (bad tag byte)")
    model = rd.byte("model")
    if model >= len(POSITION_MODELS):
        raise CodecError(f"unknown positions model {model}")
    stored_n = rd.varint(1 << 62, "element count")
    if stored_n != n:
        raise CodecError(f"payload codes {stored_n} elements, shape {dims} has {n}")
    if model == 4:
        return _decode_nm(rd, dims, n)
    if model == 5:
        k = rd.varint(n, "kept count")
        if not 0 < k < n:
            raise CodecError("gaps model needs 0 < kept count < element count")
        gaps = _decode_values(rd.take(rd.remaining(), "gaps"), k, signed=False)
        kept = gaps.astype(np.int64)
        kept[0] -= 1  # index_0 = -1
        np.cumsum(kept, out=kept)  # gaps are >= 1: the indices ascend
        if int(kept[-1]) >= n:
            raise CodecError("decoded gaps do not fit the tensor")
        if as_index:
            return kept
        flat = np.zeros(n, dtype=bool)
        flat[kept] = True
        return flat.reshape(dims)
    if model != 0 and (len(dims) < 2 or n == 0):
        raise CodecError("context model on a tensor of rank < 2 or without elements")
    r, c = (1, n) if model == 0 else (dims[0], n // dims[0])
    rcnt = np.array([r], dtype=np.int64)
    ccnt = np.array([c], dtype=np.int64)
    if model in (1, 3):
        rcnt = _read_classes(rd, r, "row", "rows", "shape[0]")
    if model in (2, 3):
        ccnt = _read_classes(rd, c, "column", "columns", "prod(shape[1:])")
    ones = rd.varints(rcnt.size * ccnt.size, n, "ones per block")
    sizes = (rcnt[:, None] * ccnt[None, :]).ravel()
    if np.any(ones > sizes):
        raise CodecError("block count exceeds block size")
    coded = (ones > 0) & (ones < sizes)
    with np.errstate(divide="ignore", invalid="ignore"):
        kept_bits = np.where(coded, ones * np.log2(sizes / np.maximum(ones, 1)), 0.0)
    min_bits = float(np.sum(kept_bits))
    min_bits += _info_bits(rcnt) * (rcnt.size > 1) + _info_bits(ccnt) * (ccnt.size > 1)
    coder = _open_coder(rd.words(), bool(coded.any()) or model != 0, min_bits)

    if model == 0:  # fast path: one block
        k = int(ones[0])
        if k == 0:
            return np.zeros(dims, dtype=bool)
        if k == n:
            return np.ones(dims, dtype=bool)
        sym = coder.decode(_bernoulli(k, n), n)
        if int(np.count_nonzero(sym)) != k:
            raise CodecError("decoded kept count does not match the header")
        _finish_coder(coder)
        return sym.astype(bool).reshape(dims)

    rperm = cperm = None
    if rcnt.size > 1:
        row_cls = coder.decode(_categorical(rcnt), r)
        if not np.array_equal(np.bincount(row_cls, minlength=rcnt.size), rcnt):
            raise CodecError("decoded row classes do not match the header")
        rperm = np.argsort(row_cls, kind="stable")
    if ccnt.size > 1:
        col_cls = coder.decode(_categorical(ccnt), c)
        if not np.array_equal(np.bincount(col_cls, minlength=ccnt.size), ccnt):
            raise CodecError("decoded column classes do not match the header")
        cperm = np.argsort(col_cls, kind="stable")
    p = np.empty((r, c), dtype=bool)
    rb = np.concatenate([[0], np.cumsum(rcnt)]).tolist()
    cb = np.concatenate([[0], np.cumsum(ccnt)]).tolist()
    b = 0
    for i in range(rcnt.size):
        for j in range(ccnt.size):
            r0, r1, c0, c1 = rb[i], rb[i + 1], cb[j], cb[j + 1]
            k, size = int(ones[b]), int(sizes[b])
            b += 1
            if k == 0:
                p[r0:r1, c0:c1] = False
            elif k == size:
                p[r0:r1, c0:c1] = True
            else:
                sym = coder.decode(_bernoulli(k, size), size)
                if int(np.count_nonzero(sym)) != k:
                    raise CodecError("decoded kept count does not match the header")
                p[r0:r1, c0:c1] = sym.reshape(r1 - r0, c1 - c0)
    _finish_coder(coder)
    if rperm is not None:
        inv = np.empty(r, dtype=np.int64)
        inv[rperm] = np.arange(r)
        p = np.take(p, inv, axis=0)
    if cperm is not None:
        inv = np.empty(c, dtype=np.int64)
        inv[cperm] = np.arange(c)
        p = np.take(p, inv, axis=1)
    return p.reshape(dims)


def _read_classes(rd: Reader, units: int, unit: str, plural: str, total: str) -> np.ndarray:
    """A class header: varint K in [2, min(64, units)], then K nonzero unit counts summing to
    `units`."""
    k = rd.varint(min(MAX_CLASSES, units), f"{unit} class count")
    if k < 2:
        raise CodecError(f"{unit} class count < 2")
    counts = rd.varints(k, units, f"{plural} per class")
    if np.any(counts == 0) or int(counts.sum()) != units:
        raise CodecError(f"{plural} per class do not add up to {total}")
    return counts


def _decode_nm(rd: Reader, dims: tuple[int, ...], n: int) -> np.ndarray:
    """The rest of a model-4 ("n:m") positions payload after the element count."""
    if n == 0:
        raise CodecError("n:m model on a tensor without elements")
    m = rd.varint(NM_MAX_GROUP, "n:m group size M")
    if m < 2:
        raise CodecError("n:m group size M < 2")
    k = rd.varint(m - 1, "n:m kept per group N")
    if k < 1:
        raise CodecError("n:m kept per group N < 1")
    if n % m:
        raise CodecError(f"n:m group size {m} does not divide the element count {n}")
    g, p = n // m, math.comb(m, k)
    mode = rd.byte("n:m table mode")
    if mode > 2:
        raise CodecError(f"invalid n:m table mode {mode}")
    counts = None
    if mode:
        if p > NM_MAX_TABLE:
            raise CodecError(f"n:m pattern table of {p} entries exceeds {NM_MAX_TABLE}")
        counts = _read_counts(rd, mode == 2, p, g, "pattern counts")
        if int(counts.sum()) != g:
            raise CodecError("pattern counts do not add up to the group count")
        need = int(np.count_nonzero(counts)) > 1
        min_bits = _info_bits(counts)
    else:
        need = True
        min_bits = g * math.log2(p)  # the terminator leaves no pattern free
    coder = _open_coder(rd.words(), need, min_bits, nonempty=counts is None)
    if counts is None:
        if p <= _UNIFORM_MAX:
            idx = coder.decode(_models.Uniform(p), g)
        else:
            hi = coder.decode(_models.Uniform(((p - 1) >> 16) + 1), g).astype(np.int64)
            idx = (hi << 16) | coder.decode(_models.Uniform(1 << 16), g)
            if int(idx.max()) >= p:
                raise CodecError("n:m pattern index out of range")
        if int(coder.decode(_models.Uniform(2), 1)[0]) != 1:
            raise CodecError("n:m terminator missing (truncated or corrupted ANS data)")
    elif need:
        idx = coder.decode(_categorical(counts), g)
        if not np.array_equal(np.bincount(idx, minlength=p), counts):
            raise CodecError("decoded patterns do not match the pattern counts")
    else:
        idx = np.full(g, int(np.flatnonzero(counts)[0]), dtype=np.int64)
    _finish_coder(coder)
    codes = _nm_lut(m, k)[0][idx] if m <= _NM_LUT_MAX else _nm_unrank(idx, m, k)
    return _nm_groups(codes, m).reshape(dims)


def _read_counts(rd: Reader, zstd_table: bool, size: int, limit: int, what: str
                 ) -> np.ndarray:
    """A table of `size` counts (each <= limit): varints, or varint L + zstd frame of them."""
    if not zstd_table:
        return rd.varints(size, limit, what)
    zlen = rd.varint(rd.remaining(), f"{what} frame length")
    frame = rd.take(zlen, f"{what} frame")
    cap = 9 * size
    declared = zstandard.get_frame_parameters(frame).content_size
    if declared == zstandard.CONTENTSIZE_UNKNOWN or declared > cap:
        raise CodecError(f"{what} frame size invalid")
    raw = zstandard.ZstdDecompressor().decompress(frame, max_output_size=cap)
    table, used = _parse_varints(raw, 0, size, limit, what)
    if used != len(raw):
        raise CodecError(f"trailing bytes in the {what} frame")
    return table


# ----------------------------------------------------------------------------- values


def _alphabet_limit(s: int, count: int) -> int:
    """Largest token alphabet allowed for precision `s` and `count` values."""
    full = (1 << (s + 1)) - 1 + (23 - s) * (1 << s)
    return min(full, MAX_ALPHABET, 4 * count + ALPHABET_SLACK)


def _bit_length(m: np.ndarray) -> np.ndarray:
    """Bit length of positive integers < 2**53, vectorised (exact via frexp)."""
    return np.frexp(m.astype(np.float64))[1].astype(np.int64)


def _tokens(mag: np.ndarray, s: int, blen: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """(token, number of raw low bits) for magnitudes >= 1 at precision s.

    Magnitudes m < 2**(s+1) are tokens m - 1; larger ones, of bit length b, are the token
    2**(s+1) - 1 + (b - s - 2) * 2**s + (leading s+1 bits - 2**s) followed by b - 1 - s raw
    low bits. Tokens increase with m. `blen` optionally gives the bit lengths of `mag`.
    """
    mag = mag.astype(np.int64)
    direct = (1 << (s + 1)) - 1
    tok = mag - 1
    nbits = np.zeros(mag.shape, dtype=np.int64)
    esc = mag > direct
    if esc.any():
        me = mag[esc]
        b = _bit_length(me) if blen is None else blen[esc]
        nb = b - 1 - s
        top = me >> nb
        tok[esc] = direct + (b - s - 2) * (1 << s) + (top - (1 << s))
        nbits[esc] = nb
    return tok, nbits


def _table_size_estimate(table: np.ndarray) -> int:
    """Approximate size in bytes of `_table_payload(table)` (fast zstd level)."""
    if table.size < 16 or table.size > 65536:
        return _varint_len(table)
    raw = _varints(table)
    z = zstandard.ZstdCompressor(level=3, write_checksum=False).compress(raw)
    return min(len(raw), len(z) + len(varint(len(z))))


def _table_payload(table: np.ndarray) -> tuple[bool, bytes]:
    """(zstd?, bytes) for the token count table: raw LEB128 or a zstd frame of it."""
    raw = _varints(table)
    if table.size >= 16:
        z = zstandard.ZstdCompressor(level=19, write_content_size=True,
                                     write_checksum=False).compress(raw)
        zz = varint(len(z)) + z
        if len(zz) < len(raw):
            return True, zz
    return False, raw


def _choose_precision(uniq: np.ndarray, ucnt: np.ndarray, count: int) -> tuple[int, int]:
    """Precision s (and alphabet size) minimising the estimated values size.

    The token histogram of the largest feasible s is built once; each step s -> s - 1 merges
    adjacent token pairs from token 2**s - 1 on (every bit length >= s + 1 loses one leading
    bit), and every escaped value gains one raw bit. Ties favour the larger s.
    """
    mmax = int(uniq[-1])
    ublen = _bit_length(uniq)
    hb = np.bincount(ublen, weights=ucnt, minlength=26)  # values per bit length

    def alphabet(s: int) -> int:
        return int(_tokens(np.array([mmax]), s)[0][0]) + 1  # tokens increase with magnitude

    s = 23
    while alphabet(s) > _alphabet_limit(s, count):
        s -= 1  # s = 0 always fits (at most 24 tokens)
    tok, _ = _tokens(uniq, s, ublen)
    hist = np.bincount(tok, weights=ucnt).astype(np.int64)
    best = None
    while True:
        a = alphabet(s)
        table = hist[:a]
        raw = float(np.dot(hb, np.maximum(np.arange(hb.size) - 1 - s, 0)))
        est = _hist_bits(table) + raw + 8.0 * _table_size_estimate(table)
        if best is None or est < best[0] - 1e-9:
            best = (est, s, a)
        if s == 0:
            break
        start = (1 << s) - 1
        tail = hist[start:]
        if tail.size % 2:
            tail = np.append(tail, 0)
        hist = np.concatenate([hist[:start], tail.reshape(-1, 2).sum(axis=1)])
        s -= 1
    return best[1], best[2]


def encode_values(values: np.ndarray) -> CodedStream:
    """Entropy-code nonzero signed integers.

    Args:
        values: 1-D integer array, every entry nonzero with |v| < 2**24.

    Returns:
        The coded stream (model "categorical", or "categorical+escape" when wide magnitudes
        are split into a bucket token plus uniformly coded low bits).

    Raises:
        ValueError: Not 1-D integers, a zero, or a magnitude >= 2**24.
    """
    v = np.asarray(values)
    if v.ndim != 1 or v.dtype.kind not in "iu":
        raise ValueError("values must be a 1-D integer array")
    count = int(v.size)
    if count == 0:
        payload = bytes([VALUES_TAG, 23]) + varint(0) + varint(0) + varint(0)
        return CodedStream(payload, 8 * len(payload), 8 * len(payload), 0.0, "categorical")
    if v.dtype.kind == "u" and int(v.max()) > MAX_MAGNITUDE:
        raise ValueError("|value| must be < 2**24")
    v64 = v.astype(np.int64)
    if int(v64.min()) < -MAX_MAGNITUDE or int(v64.max()) > MAX_MAGNITUDE:
        raise ValueError("|value| must be < 2**24")
    mag = np.abs(v64)
    mmax = int(mag.max())
    if int(mag.min()) == 0:
        raise ValueError("values must be nonzero")
    npos = int(np.count_nonzero(v64 > 0))
    if mmax <= 4 * count + 65536:
        hist = np.bincount(mag)
        uniq = np.flatnonzero(hist)
        ucnt = hist[uniq]
    else:
        uniq, ucnt = np.unique(mag, return_counts=True)
    iid_bits = float(_nh(count, npos)) + _hist_bits(ucnt)

    s, a = _choose_precision(uniq, ucnt, count)
    if mmax <= 4 * count + 65536:  # small alphabet: per-magnitude lookup tables
        lut_tok, lut_nb = _tokens(np.arange(1, mmax + 1, dtype=np.int64), s)
        tok, nbits = lut_tok[mag - 1], lut_nb[mag - 1]
    else:
        tok, nbits = _tokens(mag, s)
    table = np.bincount(tok, minlength=a).astype(np.int64)
    zstd_table, table_bytes = _table_payload(table)

    # balanced signs go as raw bits (numpy unpacks them far faster than ANS decodes them)
    raw_signs = 0 < npos < count and count - float(_nh(count, npos)) <= _RAW_SIGN_SLACK
    head = bytearray([VALUES_TAG, s | (0x20 if zstd_table else 0) | (0x40 if raw_signs else 0)])
    head += varint(count) + varint(npos) + varint(a) + table_bytes
    side = len(head)
    coder = _AnsCoder()
    if raw_signs:
        head += np.packbits(v64 > 0).tobytes()
    elif 0 < npos < count:
        coder.encode_reverse((v64 > 0).astype(np.int32), _bernoulli(npos, count))
    esc = np.flatnonzero(nbits)
    if esc.size:
        nb_esc = nbits[esc]
        low = mag[esc] & ((np.int64(1) << nb_esc) - 1)
        order = np.argsort(nb_esc, kind="stable")
        nb_sorted = nb_esc[order]
        bounds = np.flatnonzero(np.diff(nb_sorted)) + 1
        groups = np.split(order, bounds)
        for grp in reversed(groups):
            nb = int(nb_esc[grp[0]])
            coder.encode_reverse(low[grp].astype(np.int32), _models.Uniform(1 << nb))
    if np.count_nonzero(table) > 1:
        coder.encode_reverse(tok.astype(np.int32), _categorical(table))
    payload = bytes(head) + _words_bytes(coder)
    model = "categorical+escape" if esc.size else "categorical"
    return CodedStream(payload, 8 * len(payload), 8 * side, iid_bits, model)


def decode_values(payload: bytes, count: int) -> np.ndarray:
    """Decode a values payload.

    Args:
        payload: Bytes from `encode_values`.
        count: Number of values coded (the mask's kept count).

    Returns:
        int32 array of length `count`.

    Raises:
        CodecError: Corrupted/truncated payload or a count that does not match it.
    """
    try:
        count = int(count)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"invalid count {count!r}") from exc
    if count < 0:
        raise CodecError(f"invalid count {count}")
    buf = _as_bytes(payload)
    try:
        return _decode_values(buf, count)
    except CodecError:
        raise
    except _DECODE_ERRORS as exc:
        raise CodecError(f"corrupted values payload: {exc}") from None


def _decode_values(buf: bytes, count: int, signed: bool = True) -> np.ndarray:
    """The values (int32); `signed=False` refuses a payload with negative values."""
    rd = Reader(buf)
    if rd.byte("tag") != VALUES_TAG:
        raise CodecError("not a values payload (bad tag byte)")
    mode = rd.byte("mode")
    s, zstd_table = mode & 0x1F, bool(mode & 0x20)
    raw_signs = bool(mode & 0x40)
    if mode & 0x80 or s > 23:
        raise CodecError(f"invalid values mode byte {mode:#x}")
    stored = rd.varint(1 << 62, "value count")
    if stored != count:
        raise CodecError(f"payload codes {stored} values, {count} requested")
    npos = rd.varint(count, "positive count")
    a = rd.varint(_alphabet_limit(s, count), "alphabet size")
    if count == 0:
        if a != 0 or zstd_table or raw_signs or rd.remaining():
            raise CodecError("inconsistent empty values payload")
        return np.zeros(0, dtype=np.int32)
    if a == 0:
        raise CodecError("empty alphabet for a nonempty payload")
    if not signed and npos != count:
        raise CodecError("negative values in a payload of positive ones (gaps)")
    table = _read_counts(rd, zstd_table, a, count, "token counts")
    if int(table.sum()) != count or table[-1] == 0:
        raise CodecError("token counts inconsistent with the value count")
    direct = (1 << (s + 1)) - 1
    nbits_of = np.zeros(a, dtype=np.int64)
    if a > direct:
        nbits_of[direct:] = ((np.arange(direct, a) - direct) >> s) + 1
    used_syms = np.flatnonzero(table)
    need_tokens = used_syms.size > 1
    if raw_signs and not 0 < npos < count:
        raise CodecError("raw sign bits without mixed signs")
    packed = rd.take((count + 7) // 8, "sign bits") if raw_signs else b""
    need_signs = 0 < npos < count and not raw_signs
    widths = np.unique(nbits_of[used_syms])
    widths = widths[widths > 0].tolist()  # low-bit widths of the escaped tokens, ascending
    min_bits = _info_bits(table) * need_tokens
    if need_signs:  # else the low bits may end the stream (free zeros)
        min_bits += float(np.dot(table, nbits_of)) + npos * math.log2(count / npos)
    coder = _open_coder(rd.words(), need_tokens or need_signs or bool(widths), min_bits)

    if need_tokens:
        tok = coder.decode(_categorical(table), count).astype(np.int32, copy=False)
        if not _matches_table(tok, table):
            raise CodecError("decoded tokens do not match the token table")
    else:
        tok = np.full(count, used_syms[0], dtype=np.int32)
    esc = np.flatnonzero(tok >= direct) if widths else None
    if esc is not None and esc.size != int(table[direct:].sum()):
        raise CodecError("decoded tokens do not match the token table")
    mag = np.add(tok, 1, out=tok)  # tokens below `direct` are magnitude - 1
    if esc is not None:
        _escaped_magnitudes(coder, mag, esc, s, widths)
    if need_signs or raw_signs:
        sign = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=count) if raw_signs \
            else coder.decode(_bernoulli(npos, count), count)
        if int(np.count_nonzero(sign)) != npos:
            raise CodecError("decoded sign count does not match the header")
        neg = np.subtract(sign, 1, dtype=np.int8)  # 0 where positive, -1 where negative
        np.bitwise_xor(mag, neg, out=mag)
        np.subtract(mag, neg, out=mag)  # two's complement negation where neg = -1
    elif npos == 0:
        np.negative(mag, out=mag)
    _finish_coder(coder)
    return mag


def _matches_table(tok: np.ndarray, table: np.ndarray) -> bool:
    """Whether decoded tokens fit their count table: the whole histogram for up to
    `_HISTOGRAM_CHECK` tokens; above that (where counting adds 5-10% to decoding) the tokens'
    sum, a checksum of the histogram that damage to a long stream changes all but surely."""
    if tok.size <= _HISTOGRAM_CHECK:
        return np.array_equal(np.bincount(tok, minlength=table.size), table)
    return int(tok.sum(dtype=np.int64)) == int(np.dot(table, np.arange(table.size)))


def _escaped_magnitudes(coder: object, mag: np.ndarray, esc: np.ndarray, s: int,
                        widths: list[int]) -> None:
    """Replace the escaped entries `esc` of `mag` (token + 1 there) by their magnitudes: the
    token's leading bits, then the low bits decoded width by width (`widths` ascending)."""
    u = mag[esc] - (1 << (s + 1))  # bucket offset of the token
    nb = (u >> s) + 1
    top = (u & ((1 << s) - 1)) + (1 << s)
    if len(widths) == 1:
        low = coder.decode(_models.Uniform(1 << widths[0]), esc.size)
    else:
        low = np.zeros(esc.size, dtype=np.int32)  # damage may leave a width not in widths
        for width in widths:
            sel = np.flatnonzero(nb == width)
            low[sel] = coder.decode(_models.Uniform(1 << width), sel.size)
    mag[esc] = (top << nb) | low


# ----------------------------------------------------------------------------- integers


def encode_integers(q: np.ndarray) -> tuple[CodedStream, CodedStream]:
    """Code a dense integer tensor (0 = pruned) as (positions of q != 0, q[q != 0] in C order).

    Args:
        q: Integer array of any shape with |q| < 2**24.

    Returns:
        (positions stream, values stream).
    """
    a = np.asarray(q)
    if a.dtype.kind not in "iu":
        raise ValueError("q must be an integer array")
    mask = a != 0
    return encode_positions(mask), encode_values(a[mask])


def decode_integers(positions: bytes, values: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Decode `encode_integers` output into a dense int32 array of `shape`.

    Raises:
        CodecError: Either payload is corrupted or inconsistent with `shape`.
    """
    kept = decode_kept(positions, shape)
    vals = decode_values(values, kept_count(kept))
    out = np.zeros(math.prod(_check_shape(shape)), dtype=np.int32)
    out[kept] = vals
    return out.reshape(shape)
