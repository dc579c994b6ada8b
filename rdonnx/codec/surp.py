"""SuRP successive refinement (Isik, No, Weissman): an embedded index stream over one pool.

The pool is a vector of magnitudes `u` (n entries) with signs. Encoder and decoder run the same
float64 schedule (`thr = mu * s`, `mu *= (n - 1) / n`, refreshes `mu = (alpha / s) * mean(R)`
with `mean(R) = (sum_u - sum_uhat) / n`); each step refines one coordinate `m`, drawn uniformly
from `E = {i: R[i] > thr}`, by one quantum `thr`. The choice is sent as `k`: step `t` has a
keyed pseudo-random permutation `pi_t` of [0, n) (a 4-round Feistel network with
cycle-walking), `k = min over i in E of pi_t^-1(i)` and the decoder reads `m = pi_t(k)`, so
`k` is (almost) geometric with p = |E| / n and costs about log2(n / |E|) bits.

The encoder finds k in batches of steps (one vectorised permutation pass for up to 256 steps,
see `Encoder`): by inverting pi_t on E when |E|^2 <= 2n, else by scanning pi_t(0), pi_t(1), ...
for the first member, so a step costs about min(|E|, n / |E|) permutation evaluations and no
O(n) pass. The picks are exactly those of the step-by-step rule.

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

from rdonnx.codec.entropy import CodecError, Reader, varint

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
_BATCH_CELLS = 1 << 20  # permutation evaluations per batch of picks
_BATCH_STEPS = 256  # steps per batch of picks at most
_BATCH_SHARE = 8  # and at most |E| / 8 (each step may take its pick out of E)
_SCAN_WIDTH = 1.0  # forward scan rounds of width _SCAN_WIDTH * n / |E| positions
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
    header = b"".join([varint(len(k)), varint(len(signs)), varint(len(kc)),
                       *map(varint, kc.tolist()), varint(len(rc)),
                       *map(varint, rc.tolist())])
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
    rd = Reader(buf)
    steps = rd.varint(max_steps, "SuRP step count")
    nsigns = rd.varint(steps, "SuRP sign count")
    hists = []
    for what, limit_b in (("index", n.bit_length() + 1), ("refresh", 13)):
        nb = rd.varint(limit_b, f"SuRP {what} buckets")
        counts = rd.varints(nb, steps, f"SuRP {what} bucket counts")
        if nb == 0 or counts.sum() != steps or (steps and counts[-1] == 0):
            raise CodecError(f"SuRP {what} histogram does not match the step count")
        hists.append(counts)
    words = rd.words()
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
    """Runs SuRP on magnitudes `u` (float64) with signs `negative`; step by step, resumable.

    Picks are computed in batches: for the next B steps (no refresh in between) every set
    `E_t` lies in `E'' = E now + {i outside E: R[i] > thr * decay^(B+1)}` (residuals outside E
    do not change), so one vectorised pass gives each step's `min over E'' of pi_t^-1`. That
    is step t's pick whenever the element it names is still in `E_t` (checked per step);
    otherwise the step is recomputed on `E_t` alone. The result is exactly the step-by-step
    rule."""

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
        index = np.int32 if n < 2**31 else np.int64
        # numpy arrays, each with a memoryview for fast scalar access in the step loop
        self.res = self.u.copy()
        self.uhat = np.zeros(n)
        self.member = np.zeros(n, dtype=bool)  # in E
        self.cand = np.zeros(n, dtype=bool)  # in E or staged (in the current batch's E'')
        self.where = np.zeros(n, dtype=index)  # position in `e` of a member
        self.e = np.zeros(n, dtype=index)  # E = e[:size], in no particular order
        self.size = 0
        self._res, self._uhat, self._member, self._cand, self._where, self._e = (
            memoryview(a) for a in (self.res, self.uhat, self.member, self.cand, self.where,
                                    self.e))
        self._negative = memoryview(np.ascontiguousarray(self.negative, dtype=bool))
        self.order = np.argsort(-self.u, kind="stable")
        self.neg_sorted = -self.u[self.order]
        self._neg_sorted = memoryview(self.neg_sorted)
        self.ptr = 0  # order[:ptr] has been admitted once (later: through the heap)
        self.stage_ptr = 0  # order[ptr:stage_ptr] is staged
        self.heap: list[tuple[float, int]] = []  # (-R[i], i) of former members
        self.staged: list[tuple[float, int]] = []  # former members popped for the batch
        self.staged_at = 0
        self.batch_start = self.batch_end = 0
        self.batch_k: list[int] = []
        self.batch_m: list[int] = []
        self.fallbacks = 0  # steps whose batched pick had left E (recomputed)
        self.inv: np.ndarray | None = None  # the inverse path's batch [steps, |E''|]
        self.inv_elems = self.e[:0]
        self._admit(self.sched.thr)

    @property
    def steps(self) -> int:
        return len(self.k)

    @property
    def nnz(self) -> int:
        return self.nnz_at[-1] if self.nnz_at else 0

    def _add(self, i: int) -> None:
        if not self._cand[i]:
            self.batch_end = 0  # outside the batch's E'': recompute it
            self._cand[i] = True
        self._where[i] = self.size
        self._e[self.size] = i
        self._member[i] = True
        self.size += 1

    def _remove(self, i: int) -> None:
        j = self._where[i]
        self.size -= 1
        last = self._e[self.size]
        self._e[j] = last
        self._where[last] = j
        self._member[i] = False
        self._cand[i] = False

    def _admit(self, thr: float) -> None:
        if self.ptr < self.u.size and self._neg_sorted[self.ptr] < -thr:
            end = int(np.searchsorted(self.neg_sorted, -thr, side="left"))
            block = self.order[self.ptr:end]
            if end > self.stage_ptr:
                self.batch_end = 0
                self.stage_ptr = end
            self.e[self.size:self.size + block.size] = block
            self.where[block] = np.arange(self.size, self.size + block.size)
            self.member[block] = True
            self.cand[block] = True
            self.size += block.size
            self.ptr = end
        staged = self.staged
        while self.staged_at < len(staged) and -staged[self.staged_at][0] > thr:
            self._add(staged[self.staged_at][1])
            self.staged_at += 1
        heap = self.heap
        while heap and -heap[0][0] > thr:
            self._add(heapq.heappop(heap)[1])

    def _stage(self, bound: float) -> np.ndarray:
        """Mark every non-member with R > bound as a candidate; returns E'' (members first)."""
        n = self.u.size
        end = max(self.ptr, int(np.searchsorted(self.neg_sorted, -bound, side="left")))
        if end > self.stage_ptr:
            self.cand[self.order[self.stage_ptr:end]] = True
        elif end < self.stage_ptr:
            self.cand[self.order[end:self.stage_ptr]] = False
        self.stage_ptr = min(end, n)
        keep = [e for e in self.staged[self.staged_at:] if -e[0] > bound]
        for e in self.staged[self.staged_at:]:
            if -e[0] <= bound:
                self._cand[e[1]] = False
                heapq.heappush(self.heap, e)
        while self.heap and -self.heap[0][0] > bound:
            e = heapq.heappop(self.heap)
            self._cand[e[1]] = True
            keep.append(e)
        keep.sort()
        self.staged, self.staged_at = keep, 0
        parts = [self.e[:self.size], self.order[self.ptr:self.stage_ptr]]
        if keep:
            parts.append(np.array([i for _, i in keep], dtype=self.e.dtype))
        return np.concatenate(parts)

    def _candidates(self, t: int, count: int, elems: np.ndarray, mask: np.ndarray,
                    start: int = 0) -> tuple[list[int], list[int]]:
        """For steps t..t+count-1: k = min over `elems` of pi^-1 (at least `start`) and the
        element it names. `mask` marks exactly `elems`. The inverse path keeps its matrix
        (`self.inv`) for `_repick`."""
        n, size = self.u.size, elems.size
        keys = step_keys(self.side.seed, np.arange(t, t + count))
        if start == 0 and size * size <= _INVERSE_FACTOR * n:
            inv = permute(np.broadcast_to(elems, (count, size)), keys, self.domain, True)
            j = inv.argmin(axis=1)
            self.inv, self.inv_elems = inv, elems
            return inv[np.arange(count), j].tolist(), elems[j].tolist()
        self.inv = None
        width = min(n, max(32, int(_SCAN_WIDTH * n / size) + 1))
        k = np.zeros(count, dtype=np.int64)
        m = np.zeros(count, dtype=np.int64)
        rows = np.arange(count)
        while rows.size:
            if start >= n:
                raise AssertionError("E is not empty but no candidate hit it")
            w = min(width, n - start)
            vals = permute(np.broadcast_to(np.arange(start, start + w), (rows.size, w)),
                           keys[rows], self.domain)
            hits = mask[vals]
            found = hits.any(axis=1)
            j = hits.argmax(axis=1)[found]
            k[rows[found]] = start + j
            m[rows[found]] = vals[found, j]
            rows = rows[~found]
            start += w
            if rows.size < 16:
                width *= 2
        return k.tolist(), m.tolist()

    def _plan(self, t: int) -> None:
        """Batched picks for the steps from t on (until the next refresh at most)."""
        n, size = self.u.size, self.size
        count = min(_BATCH_STEPS, max(1, size // _BATCH_SHARE))
        bound = self.sched.thr * self.side.decay ** (count + 1) * (1 - 1e-9)
        elems = self._stage(bound)
        big = elems.size
        cells = big if big * big <= _INVERSE_FACTOR * n else int(_SCAN_WIDTH * n / big) + 1
        count = max(1, min(count, _BATCH_CELLS // max(cells, 1)))
        self.batch_k, self.batch_m = self._candidates(t, count, elems, self.cand)
        self.batch_start, self.batch_end = t, t + count

    def _pick(self, t: int) -> tuple[int, int]:
        if not self.batch_start <= t < self.batch_end:
            self._plan(t)
        j = t - self.batch_start
        m = self.batch_m[j]
        if self._member[m]:
            return self.batch_k[j], m
        self.fallbacks += 1  # the batched pick left E: the next member in this permutation
        if self.inv is not None:
            row = np.where(self.member[self.inv_elems], self.inv[j], n := self.u.size)
            i = int(row.argmin())
            if row[i] < n:
                return int(row[i]), int(self.inv_elems[i])
        k, m = self._candidates(t, 1, self.e[:self.size], self.member, self.batch_k[j] + 1)
        return k[0], m[0]

    def run(self, steps: int | None = None, nnz: int | None = None) -> None:
        """Advance until `steps` steps or `nnz` nonzeros (whichever comes first), or until
        nothing is left to send (`exhausted`)."""
        sched, side = self.sched, self.side
        s, decay = side.s, side.decay
        res, uhat, negative = self._res, self._uhat, self._negative
        ks, rs, signs, nnz_at = self.k, self.r, self.signs, self.nnz_at
        heap, pick, admit = self.heap, self._pick, self._admit
        t, nz = self.steps, self.nnz
        max_steps = math.inf if steps is None else steps
        max_nnz = math.inf if nnz is None else nnz
        while not self.exhausted and t < max_steps and nz < max_nnz:
            refreshes = 0
            while not self.size:
                if refreshes >= MAX_REFRESHES or side.sum_u - sched.sum_uhat <= 0:
                    self.exhausted = True
                    return
                sched.refresh()
                refreshes += 1
                self.batch_end = 0
                admit(sched.mu * s)
            k, m = pick(t)
            thr = sched.mu * s  # Schedule.advance, inlined
            sched.sum_uhat += thr
            sched.mu *= decay
            if uhat[m] == 0:
                signs.append(int(negative[m]))
                nz += 1
            uhat[m] += thr
            res[m] -= thr
            ks.append(k)
            rs.append(refreshes)
            nnz_at.append(nz)
            t += 1
            thr = sched.mu * s
            if not res[m] > thr:
                self._remove(m)
                heapq.heappush(heap, (-res[m], m))
            admit(thr)

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
