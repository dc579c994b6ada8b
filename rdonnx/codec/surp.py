"""SuRP successive refinement (Isik, No, Weissman): an embedded index stream over one pool.

The pool is a vector of magnitudes `u` (n entries) with signs. Encoder and decoder run the same
float64 schedule (`thr = mu * s`, `mu *= (n - 1) / n`, refreshes `mu = (alpha / s) * mean(R)`
with `mean(R) = (sum_u - sum_uhat) / n`); each step refines one coordinate `m`, drawn uniformly
from `E = {i: R[i] > thr}`, by one quantum `thr`. The choice is sent as `k`: step `t` has a
keyed pseudo-random permutation `pi_t` of [0, n) (a 4-round Feistel network with
cycle-walking), `k = min over i in E of pi_t^-1(i)` and the decoder reads `m = pi_t(k)`, so
`k` is (almost) geometric with p = |E| / n and costs about log2(n / |E|) bits.

The step sequence is cut into chunks coded independently (ANS, constriction), so any prefix
of whole chunks is a valid stream and truncating inside a chunk re-encodes only its head.
Chunk payload (docs/FORMAT.md): varints steps, signs, then the k and r bucket histograms, then
ANS words. See `Encoder`, `decode`, `truncate`.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import constriction
import numpy as np

from .entropy import CodecError

_AnsCoder = constriction.stream.stack.AnsCoder
_models = constriction.stream.model

REFRESH_PERIOD = 20  # every 20th refresh: alpha *= ALPHA_DECAY
ALPHA_DECAY = 0.9
MAX_REFRESHES = 4096  # consecutive refreshes before the encoder gives up (nothing left to send)
CHUNK_STEPS = 4096
MAX_BUCKETS = 64
_M64 = (1 << 64) - 1
_MUL = np.uint64(0x9E3779B97F4A7C15)
_ROUNDS = 4
_INVERSE_FACTOR = 2  # |E|^2 <= this * n: invert the permutation on E, else scan positions
_BATCH_CELLS = 1 << 21  # candidate positions computed at once by the forward scan
_BLOCK = 1 << 15  # elements per numpy pass of the Feistel rounds (stays in cache)


# ----------------------------------------------------------------------- shared randomness


def _splitmix(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def step_keys(seed: int, steps: np.ndarray) -> np.ndarray:
    """Round keys [len(steps), 4] of the permutations of these steps."""
    base = _splitmix(np.array([seed & _M64], dtype=np.uint64))[0]
    t = np.asarray(steps, dtype=np.uint64)[:, None] * np.uint64(_ROUNDS) + \
        np.arange(_ROUNDS, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        return _splitmix(t ^ base)


@dataclass(frozen=True)
class _Domain:
    n: int
    high: int  # bits of the left half
    low: int  # bits of the right half

    @staticmethod
    def of(n: int) -> _Domain:
        b = max(2, (n - 1).bit_length())
        return _Domain(n, b // 2, b - b // 2)



def _rounds(x: np.ndarray, keys, lo: int, hi: int, inverse: bool) -> np.ndarray:
    """The four Feistel rounds on x (uint64, any shape); `keys[r]` broadcasts against x."""
    left = x >> np.uint64(lo)
    right = x & np.uint64((1 << lo) - 1)
    tmp = np.empty_like(left)
    shl, shr = np.uint64(64 - hi), np.uint64(64 - lo)
    for r in ((3, 2, 1, 0) if inverse else (0, 1, 2, 3)):
        if r % 2 == 0:
            np.bitwise_xor(right, keys[r], out=tmp)
            np.multiply(tmp, _MUL, out=tmp)
            np.right_shift(tmp, shl, out=tmp)
            np.bitwise_xor(left, tmp, out=left)
        else:
            np.bitwise_xor(left, keys[r], out=tmp)
            np.multiply(tmp, _MUL, out=tmp)
            np.right_shift(tmp, shr, out=tmp)
            np.bitwise_xor(right, tmp, out=right)
    np.left_shift(left, np.uint64(lo), out=left)
    np.bitwise_or(left, right, out=left)
    return left

def _apply(x: np.ndarray, kt: np.ndarray, lo: int, hi: int, inverse: bool) -> np.ndarray:
    """One Feistel pass over x [R, C] with round keys kt [4, R] (one permutation per row), in
    cache-sized blocks."""
    R, C = x.shape
    if R == 1:
        k = [np.uint64(v) for v in kt[:, 0].tolist()]
        if C <= _BLOCK:
            return _rounds(x, k, lo, hi, inverse)
        out = np.empty_like(x)
        for a in range(0, C, _BLOCK):
            out[0, a:a + _BLOCK] = _rounds(x[0, a:a + _BLOCK], k, lo, hi, inverse)
        return out
    step = max(1, _BLOCK // C)
    if step >= R:
        return _rounds(x, kt[:, :, None], lo, hi, inverse)
    out = np.empty_like(x)
    for a in range(0, R, step):
        out[a:a + step] = _rounds(x[a:a + step], kt[:, a:a + step, None], lo, hi, inverse)
    return out

def permute(x: np.ndarray, keys: np.ndarray, d: _Domain, inverse: bool = False) -> np.ndarray:
    """pi(x) (or pi^-1(x)) on [0, n), elementwise.

    `x` is 1-D with `keys` [4] (one permutation) or [len(x), 4] (one per entry), or 2-D
    [rows, cols] with `keys` [rows, 4] (one permutation per row)."""
    x = np.asarray(x)
    keys = np.asarray(keys, dtype=np.uint64)
    if keys.ndim == 1:
        keys = keys[None, :]
    rows = keys.shape[0]
    x2 = x.astype(np.uint64).reshape(rows if (x.ndim == 2 or rows > 1) else 1, -1)
    cols = x2.shape[1]
    kt = np.ascontiguousarray(keys.T)
    out = _apply(x2, kt, d.low, d.high, inverse).reshape(-1)
    n = np.uint64(d.n)
    walk = np.flatnonzero(out >= n)
    while walk.size:  # cycle-walking: the domain 2^b holds [0, n)
        if rows == 1:
            sub = _apply(out[walk][None, :], kt, d.low, d.high, inverse).reshape(-1)
        else:
            sub = _apply(out[walk][:, None], kt.take(walk // cols, axis=1), d.low, d.high,
                         inverse).reshape(-1)
        out[walk] = sub
        walk = walk[sub >= n]
    return out.astype(np.int64).reshape(x.shape)


# ----------------------------------------------------------------------- the stream


@dataclass(frozen=True)
class ChunkInfo:
    """One chunk of the stream: steps, payload bytes, nonzeros after it."""

    steps: int
    length: int
    nnz: int


@dataclass
class Side:
    """What the decoder needs besides the chunks (all of it goes into the manifest)."""

    n: int
    s: float
    alpha: float
    sum_u: float
    seed: int

    @property
    def decay(self) -> float:
        return (self.n - 1) / self.n


@dataclass
class Stream:
    """A SuRP stream: side information and independently coded chunks."""

    side: Side
    chunks: list[bytes]
    table: list[ChunkInfo]

    @property
    def steps(self) -> int:
        return sum(c.steps for c in self.table)

    @property
    def nnz(self) -> int:
        return self.table[-1].nnz if self.table else 0

    @property
    def bits(self) -> int:
        """Coded bits of every chunk (indices, refresh counts, signs, chunk headers)."""
        return 8 * sum(c.length for c in self.table)

    def payload(self) -> bytes:
        return b"".join(self.chunks)


@dataclass
class Symbols:
    """Everything the chunks carry, in step order."""

    k: np.ndarray  # int64 [steps]: position of the pick in its permutation
    r: np.ndarray  # int64 [steps]: refreshes before the step
    signs: np.ndarray  # uint8 [new nonzeros]: 1 = negative, in order of first pick


# ----------------------------------------------------------------------- chunk coding


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(buf: bytes, pos: int, limit: int, what: str) -> tuple[int, int]:
    value = 0
    for i in range(10):
        if pos >= len(buf):
            raise CodecError(f"truncated SuRP chunk: missing {what}")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << (7 * i)
        if b < 0x80:
            if b == 0 and i > 0:
                raise CodecError(f"non-canonical varint in {what}")
            break
    else:
        raise CodecError(f"varint too long in {what}")
    if value > limit:
        raise CodecError(f"SuRP {what} out of range ({value} > {limit})")
    return value, pos


def _buckets(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """v + 1 = 2^b + offset: bucket b (its bit length - 1) and the b-bit offset."""
    v1 = v.astype(np.int64) + 1
    b = np.floor(np.log2(v1.astype(np.float64))).astype(np.int64)
    b -= (np.left_shift(1, b) > v1)  # guard against log2 rounding
    b += (np.left_shift(1, b + 1) <= v1)
    return b, v1 - np.left_shift(1, b)


def _raw_parts(widths: np.ndarray, offsets: np.ndarray):
    """(values, Uniform size) groups of the offsets, in decode order: widths ascending, each
    split into a low 16-bit part and the high rest."""
    for w in range(1, MAX_BUCKETS):
        sel = widths == w
        if not sel.any():
            continue
        o = offsets[sel]
        low = min(w, 16)
        yield sel, 0, low, o & ((1 << low) - 1)
        if w > 16:
            yield sel, low, w - 16, o >> 16


def encode_chunk(k: np.ndarray, r: np.ndarray, signs: np.ndarray) -> bytes:
    """One chunk: header varints, then ANS words (symbols pushed in reverse decode order)."""
    kb, ko = _buckets(k)
    rb, ro = _buckets(r)
    kc = np.bincount(kb, minlength=1)
    rc = np.bincount(rb, minlength=1)
    header = b"".join([_varint(len(k)), _varint(len(signs)), _varint(len(kc)),
                       *map(_varint, kc.tolist()), _varint(len(rc)),
                       *map(_varint, rc.tolist())])
    pushes = []  # (symbols, model) in decode order
    for b, counts in ((kb, kc), (rb, rc)):
        if np.count_nonzero(counts) > 1:
            pushes.append((b.astype(np.int32),
                           _models.Categorical(counts.astype(np.float64), perfect=False)))
    for widths, offsets in ((kb, ko), (rb, ro)):
        for _, _, bits, part in _raw_parts(widths, offsets):
            pushes.append((part.astype(np.int32), _models.Uniform(1 << bits)))
    if len(signs):
        pushes.append((signs.astype(np.int32), _models.Uniform(2)))
    coder = _AnsCoder()
    for symbols, model in reversed(pushes):
        coder.encode_reverse(symbols, model)
    words = coder.get_compressed().astype("<u4").tobytes() if pushes else b""
    return header + words


def decode_chunk(buf: bytes, max_steps: int, n: int) -> tuple[np.ndarray, np.ndarray,
                                                               np.ndarray]:
    """(k, r, signs) of one chunk; raises CodecError on any inconsistency."""
    steps, pos = _read_varint(buf, 0, max_steps, "step count")
    nsigns, pos = _read_varint(buf, pos, steps, "sign count")
    hists = []
    for what, limit_b in (("index", n.bit_length() + 1), ("refresh", 13)):
        nb, pos = _read_varint(buf, pos, limit_b, f"{what} buckets")
        counts = []
        for _ in range(nb):
            c, pos = _read_varint(buf, pos, steps, f"{what} bucket count")
            counts.append(c)
        counts = np.array(counts, dtype=np.int64)
        if nb == 0 or counts.sum() != steps or (steps and counts[-1] == 0):
            raise CodecError(f"SuRP {what} histogram does not match the step count")
        hists.append(counts)
    rest = len(buf) - pos
    if rest % 4:
        raise CodecError("SuRP ANS data is not a whole number of 32-bit words")
    words = np.frombuffer(buf, dtype="<u4", count=rest // 4, offset=pos).astype(np.uint32)
    if words.size and words[-1] == 0:
        raise CodecError("invalid SuRP ANS data (ends in a zero word)")
    coder = _AnsCoder(words)
    try:
        values = []
        for counts in hists:
            if np.count_nonzero(counts) > 1:
                b = coder.decode(_models.Categorical(counts.astype(np.float64), perfect=False),
                                 steps).astype(np.int64)
                if not np.array_equal(np.bincount(b, minlength=len(counts)), counts):
                    raise CodecError("SuRP bucket histogram mismatch (damaged chunk)")
            else:
                b = np.full(steps, int(np.flatnonzero(counts)[0]) if steps else 0, np.int64)
            values.append(b)
        offsets = []
        for b in values:
            off = np.zeros(steps, dtype=np.int64)
            for sel, shift, bits, _ in _raw_parts(b, np.zeros(steps, dtype=np.int64)):
                part = coder.decode(_models.Uniform(1 << bits), int(sel.sum())).astype(np.int64)
                off[sel] |= part << shift
            offsets.append(off)
        signs = coder.decode(_models.Uniform(2), nsigns).astype(np.uint8) if nsigns else \
            np.zeros(0, dtype=np.uint8)
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise CodecError(f"cannot decode a SuRP chunk: {exc}") from None
    if not coder.is_empty():
        raise CodecError("trailing ANS data after the last symbol of a SuRP chunk")
    k, r = ((np.left_shift(1, b) + o - 1) for b, o in zip(values, offsets))
    if steps and (k.max() >= n or k.min() < 0):
        raise CodecError("SuRP index out of range (damaged chunk)")
    return k, r, signs


# ----------------------------------------------------------------------- the schedule


@dataclass
class Schedule:
    """The float64 state both sides share: mu, alpha, refreshes, the running sum of u-hat."""

    side: Side
    mu: float = 0.0
    alpha: float = 0.0
    refreshes: int = 0
    sum_uhat: float = 0.0

    def __post_init__(self) -> None:
        self.alpha = self.side.alpha
        self.mu = (self.alpha / self.side.s) * (self.side.sum_u / self.side.n)

    @property
    def thr(self) -> float:
        return self.mu * self.side.s

    def refresh(self) -> None:
        self.refreshes += 1
        if self.refreshes % REFRESH_PERIOD == 0:
            self.alpha *= ALPHA_DECAY
        self.mu = (self.alpha / self.side.s) * ((self.side.sum_u - self.sum_uhat) / self.side.n)

    def advance(self) -> float:
        """The quantum of this step; then mu decays."""
        thr = self.mu * self.side.s
        self.sum_uhat += thr
        self.mu *= self.side.decay
        return thr


def default_alpha(n: int) -> float:
    return math.log(n / math.log(n))


# ----------------------------------------------------------------------- encoder


@dataclass
class Snapshot:
    steps: int
    uhat: np.ndarray
    nnz: int
    mu: float
    alpha: float
    refreshes: int
    sum_uhat: float


@dataclass
class Encoder:
    """Runs SuRP on magnitudes `u` (float64) with signs `negative`; step by step, resumable."""

    u: np.ndarray
    negative: np.ndarray
    seed: int = 0
    alpha: float | None = None
    side: Side = field(init=False)
    k: list[int] = field(default_factory=list)
    r: list[int] = field(default_factory=list)
    signs: list[int] = field(default_factory=list)
    nnz_at: list[int] = field(default_factory=list)  # nonzeros after each step
    exhausted: bool = False

    def __post_init__(self) -> None:
        self.u = np.ascontiguousarray(self.u, dtype=np.float64)
        n = self.u.size
        if n < 3:
            raise ValueError("SuRP needs a pool of at least 3 weights")
        s = default_alpha(n)
        self.side = Side(n, s, s if self.alpha is None else float(self.alpha),
                         float(np.sum(self.u)), int(self.seed))
        self.sched = Schedule(self.side)
        self.domain = _Domain.of(n)
        self.res = self.u.copy()
        self.uhat = np.zeros(n)
        self.order = np.argsort(-self.u, kind="stable")
        self.sorted_u = self.u[self.order]
        self.neg_sorted = -self.sorted_u
        self.ptr = 0
        self.heap: list[tuple[float, int]] = []
        self.member = np.zeros(n, dtype=bool)
        self.where = np.full(n, -1, dtype=np.int64)
        self.e: list[int] = []
        self.batch_start = self.batch_end = 0
        self.batch: np.ndarray | None = None
        self._admit()

    @property
    def steps(self) -> int:
        return len(self.k)

    @property
    def nnz(self) -> int:
        return self.nnz_at[-1] if self.nnz_at else 0

    def _add(self, i: int) -> None:
        self.where[i] = len(self.e)
        self.e.append(i)
        self.member[i] = True

    def _remove(self, i: int) -> None:
        j = int(self.where[i])
        last = self.e.pop()
        if last != i:
            self.e[j] = last
            self.where[last] = j
        self.where[i] = -1
        self.member[i] = False

    def _admit(self) -> None:
        thr = self.sched.thr
        if self.ptr < self.u.size and self.sorted_u[self.ptr] > thr:
            end = int(np.searchsorted(self.neg_sorted, -thr, side="left"))
            for i in self.order[self.ptr:end].tolist():
                self._add(i)
            self.ptr = end
        while self.heap and -self.heap[0][0] > thr:
            self._add(heapq.heappop(self.heap)[1])

    def _pick(self, t: int) -> tuple[int, int]:
        n, size = self.u.size, len(self.e)
        if size * size <= _INVERSE_FACTOR * n:
            e = np.array(self.e, dtype=np.int64)
            inv = permute(e, step_keys(self.side.seed, np.array([t]))[0], self.domain, True)
            j = int(np.argmin(inv))
            return int(inv[j]), int(e[j])
        if not self.batch_start <= t < self.batch_end:
            width = min(n, max(32, 2 * n // size))
            count = max(1, min(256, _BATCH_CELLS // width))
            steps = np.arange(t, t + count)
            self.batch = permute(np.broadcast_to(np.arange(width), (count, width)),
                                 step_keys(self.side.seed, steps), self.domain)
            self.batch_start, self.batch_end = t, t + count
        row = self.batch[t - self.batch_start]
        hits = self.member[row]
        if hits.any():
            k = int(np.argmax(hits))
            return k, int(row[k])
        keys = step_keys(self.side.seed, np.array([t]))[0]
        start, width = row.size, row.size
        while start < n:  # rare: extend the scan of this step
            pos = np.arange(start, min(n, start + width))
            cand = permute(pos, keys, self.domain)
            hits = self.member[cand]
            if hits.any():
                j = int(np.argmax(hits))
                return int(pos[j]), int(cand[j])
            start, width = start + width, 2 * width
        raise AssertionError("E is not empty but no candidate hit it")

    def run(self, steps: int | None = None, nnz: int | None = None) -> None:
        """Advance until `steps` steps or `nnz` nonzeros (whichever comes first), or until
        nothing is left to send (`exhausted`)."""
        sched = self.sched
        while not self.exhausted and (steps is None or self.steps < steps) and \
                (nnz is None or self.nnz < nnz):
            refreshes = 0
            while not self.e:
                if refreshes >= MAX_REFRESHES or self.side.sum_u - sched.sum_uhat <= 0:
                    self.exhausted = True
                    return
                sched.refresh()
                refreshes += 1
                self._admit()
            t = self.steps
            k, m = self._pick(t)
            fresh = self.uhat[m] == 0
            thr = sched.advance()
            self.uhat[m] += thr
            self.res[m] -= thr
            self.k.append(k)
            self.r.append(refreshes)
            if fresh:
                self.signs.append(int(self.negative[m]))
            self.nnz_at.append(self.nnz + int(fresh))
            if not self.res[m] > sched.thr:
                self._remove(m)
                heapq.heappush(self.heap, (-float(self.res[m]), m))
            self._admit()

    def snapshot(self) -> Snapshot:
        s = self.sched
        return Snapshot(self.steps, self.uhat.copy(), self.nnz, s.mu, s.alpha, s.refreshes,
                        s.sum_uhat)

    def stream(self, steps: int | None = None, chunk_steps: int = CHUNK_STEPS) -> Stream:
        """The coded stream of the first `steps` steps (all by default)."""
        steps = self.steps if steps is None else min(steps, self.steps)
        k, r = np.array(self.k[:steps], dtype=np.int64), np.array(self.r[:steps], np.int64)
        nnz_at = np.array(self.nnz_at[:steps], dtype=np.int64)
        signs = np.array(self.signs, dtype=np.uint8)
        chunks, table, done = [], [], 0
        for a in range(0, steps, chunk_steps):
            b = min(steps, a + chunk_steps)
            nnz = int(nnz_at[b - 1])
            chunk = encode_chunk(k[a:b], r[a:b], signs[done:nnz])
            chunks.append(chunk)
            table.append(ChunkInfo(b - a, len(chunk), nnz))
            done = nnz
        return Stream(self.side, chunks, table)


# ----------------------------------------------------------------------- decoder


def decode_symbols(stream: Stream) -> Symbols:
    ks, rs, ss = [], [], []
    for chunk, info in zip(stream.chunks, stream.table):
        k, r, signs = decode_chunk(chunk, info.steps, stream.side.n)
        if len(k) != info.steps:
            raise CodecError("SuRP chunk step count differs from the chunk table")
        ks.append(k)
        rs.append(r)
        ss.append(signs)
    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    return Symbols(cat(ks, np.int64), cat(rs, np.int64), cat(ss, np.uint8))


@dataclass
class Decoded:
    """The decoder's state after some steps."""

    steps: int
    uhat: np.ndarray  # float64 [n]
    negative: np.ndarray  # bool [n] (meaningful where uhat != 0)
    nnz: int
    schedule: Schedule
    picks: np.ndarray  # int64 [steps]
    quanta: np.ndarray  # float64 [steps]
    nnz_at: np.ndarray  # int64 [steps]


def replay(side: Side, symbols: Symbols, steps: int | None = None) -> Decoded:
    """Apply the first `steps` steps of decoded symbols (all by default)."""
    steps = len(symbols.k) if steps is None else steps
    picks = np.empty(steps, dtype=np.int64)
    for a in range(0, steps, 1 << 20):  # bounded memory for the keys
        b = min(steps, a + (1 << 20))
        picks[a:b] = permute(symbols.k[a:b], step_keys(side.seed, np.arange(a, b)),
                             _Domain.of(side.n))
    sched = Schedule(side)
    quanta = np.empty(steps, dtype=np.float64)
    for t, r in enumerate(symbols.r[:steps].tolist()):
        for _ in range(r):
            sched.refresh()
        quanta[t] = sched.advance()
    uhat = np.zeros(side.n)
    np.add.at(uhat, picks, quanta)  # sequential: the same float sums as the encoder's
    first = np.zeros(side.n, dtype=bool)
    _, order = np.unique(picks, return_index=True)
    new = np.zeros(steps, dtype=bool)
    new[order] = True
    nnz_at = np.cumsum(new)
    nnz = int(nnz_at[-1]) if steps else 0
    if nnz > len(symbols.signs):
        raise CodecError("SuRP stream holds fewer signs than nonzeros")
    negative = first
    negative[picks[new]] = symbols.signs[:nnz].astype(bool)
    return Decoded(steps, uhat, negative, nnz, sched, picks, quanta, nnz_at)


def decode(stream: Stream, steps: int | None = None) -> Decoded:
    symbols = decode_symbols(stream)
    d = replay(stream.side, symbols, steps)
    done, nnz_at = 0, d.nnz_at
    for info in stream.table:
        done += info.steps
        if done <= d.steps and (nnz_at[done - 1] if done else 0) != info.nnz:
            raise CodecError("SuRP nonzero count differs from the chunk table")
    return d


def truncate(stream: Stream, steps: int, symbols: Symbols | None = None,
             decoded: Decoded | None = None) -> Stream:
    """The stream of the first `steps` steps: whole chunks kept, the cut one's head
    re-encoded."""
    if not 0 <= steps <= stream.steps:
        raise ValueError(f"cannot truncate a stream of {stream.steps} steps to {steps}")
    chunks, table, done = [], [], 0
    for chunk, info in zip(stream.chunks, stream.table):
        if done + info.steps > steps:
            break
        chunks.append(chunk)
        table.append(info)
        done += info.steps
    if done < steps:
        symbols = symbols or decode_symbols(stream)
        decoded = decoded if decoded is not None and decoded.steps >= steps else \
            replay(stream.side, symbols, steps)
        before = table[-1].nnz if table else 0
        nnz = int(decoded.nnz_at[steps - 1])
        chunk = encode_chunk(symbols.k[done:steps], symbols.r[done:steps],
                             symbols.signs[before:nnz])
        chunks.append(chunk)
        table.append(ChunkInfo(steps - done, len(chunk), nnz))
    return Stream(stream.side, chunks, table)


def prefix_bits(stream: Stream, steps: int, symbols: Symbols, decoded: Decoded) -> int:
    """Coded bits of the stream truncated to `steps` (re-encodes one chunk head at most)."""
    return truncate(stream, steps, symbols, decoded).bits
