"""SuRP successive refinement of one global pool of prunable weights: the pool, the coded
stream and its prefixes.

The pool is the prunable weights in graph order, each divided by its L2 norm and flattened
into one vector; `rdonnx.codec.surp` codes it as an embedded stream. A prefix of the stream
decodes to a sparser, coarser model: compress stops at the target, `truncate` cuts further.
The stream's place in an `.rdonnx` file is `rdonnx.artifact.format`; the method itself
(`--method surp`, `rdonnx truncate`) is `rdonnx.flow.methods.surp`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from rdonnx.codec import surp as codec
from rdonnx.errors import UsageError

BOUND_SEARCH_STEPS = 24  # bisection steps of `shortest_meeting`


@dataclass(frozen=True)
class PoolTensor:
    name: str
    shape: tuple[int, ...]
    data_type: int  # onnx TensorProto element type
    norm: float  # L2 norm of the original tensor (float64)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Pool:
    """The tensors of the SuRP pool, in pool order."""

    tensors: tuple[PoolTensor, ...]

    @property
    def n(self) -> int:
        return sum(t.size for t in self.tensors)

    @staticmethod
    def of(arrays: dict[str, np.ndarray], names: list[str]) -> tuple[Pool, np.ndarray,
                                                                    np.ndarray]:
        """The pool of `names` (in this order): tensors, magnitudes u, negative signs."""
        tensors, parts = [], []
        for name in names:
            a = np.asarray(arrays[name]).astype(np.float64).ravel()
            norm = float(np.sqrt(np.dot(a, a)))
            tensors.append(PoolTensor(name, tuple(np.shape(arrays[name])),
                                      onnx.helper.np_dtype_to_tensor_dtype(
                                          np.asarray(arrays[name]).dtype), norm))
            parts.append(a / norm if norm > 0 else a)
        w = np.concatenate(parts) if parts else np.zeros(0)
        return Pool(tuple(tensors)), np.abs(w), w < 0

    def values(self, uhat: np.ndarray, negative: np.ndarray) -> dict[str, np.ndarray]:
        """Each tensor as the decoder rebuilds it: sign * u-hat * norm, float64 -> float32 ->
        the tensor's type."""
        out, start = {}, 0
        for t in self.tensors:
            part = uhat[start:start + t.size] * t.norm
            part = np.where(negative[start:start + t.size], -part, part)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            out[t.name] = part.astype(np.float32).astype(dtype).reshape(t.shape)
            start += t.size
        return out


@dataclass
class Coded:
    """A SuRP pool and its stream (what the artifact stores)."""

    pool: Pool
    stream: codec.Stream
    source: dict[str, str] | None = None  # path and sha256 of the source model

    def nnz(self, uhat: np.ndarray) -> dict[str, int]:
        out, start = {}, 0
        for t in self.pool.tensors:
            out[t.name] = int(np.count_nonzero(uhat[start:start + t.size]))
            start += t.size
        return out

    def manifest(self) -> dict[str, Any]:
        """The manifest's `surp` object (the container adds the `stream` section)."""
        side = self.stream.side
        return {"n": side.n, "s": side.s, "alpha": side.alpha,
                "sum_u": side.sum_u, "seed": side.seed, "steps": self.stream.steps,
                "nnz": self.stream.nnz, "bits": self.stream.bits,
                "side_bits": side_bits(self.pool, self.stream),
                "tensors": [{"name": t.name, "norm": t.norm} for t in self.pool.tensors],
                "chunks": [[c.steps, c.length, c.nnz] for c in self.stream.table],
                "source": self.source}

    @staticmethod
    def from_manifest(meta: dict[str, Any], shapes: dict[str, tuple[tuple[int, ...], int]],
                      payload: bytes) -> Coded:
        """Parse the manifest's `surp` object (raises ValueError / KeyError / TypeError)."""
        tensors = tuple(PoolTensor(str(t["name"]), *shapes[str(t["name"])], float(t["norm"]))
                        for t in meta["tensors"])
        pool = Pool(tensors)
        side = codec.Side(int(meta["n"]), float(meta["s"]), float(meta["alpha"]),
                          float(meta["sum_u"]), int(meta["seed"]))
        if side.n != pool.n or side.n < 3 or not all(
                math.isfinite(v) and v >= 0 for v in (side.s, side.alpha, side.sum_u)) or \
                not all(math.isfinite(t.norm) and t.norm >= 0 for t in tensors):
            raise ValueError("SuRP side information is inconsistent")
        table = [codec.ChunkInfo(int(s), int(length), int(z)) for s, length, z in meta["chunks"]]
        if sum(c.length for c in table) != len(payload) or \
                any(c.steps <= 0 or c.length <= 0 or c.nnz > side.n for c in table):
            raise ValueError("SuRP chunk table does not match the stream")
        chunks, at = [], 0
        for c in table:
            chunks.append(payload[at:at + c.length])
            at += c.length
        return Coded(pool, codec.Stream(side, chunks, table), meta.get("source"))


def side_bits(pool: Pool, stream: codec.Stream) -> int:
    """Side information outside the chunks: one float64 norm per tensor, n, s, alpha, sum(u),
    seed (the chunk headers are inside `stream.bits`)."""
    return 64 * (len(pool.tensors) + 5)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------- choosing a prefix


@dataclass
class Prefixes:
    """Every prefix of one stream, decoded once: values and bits at any step count."""

    coded: Coded
    symbols: codec.Symbols
    decoded: codec.Decoded

    @staticmethod
    def of(coded: Coded) -> Prefixes:
        symbols = codec.decode_symbols(coded.stream)
        return Prefixes(coded, symbols, codec.replay(coded.stream.side, symbols))

    @property
    def steps(self) -> int:
        return self.decoded.steps

    def nnz(self, steps: int) -> int:
        return int(self.decoded.nnz_at[steps - 1]) if steps else 0

    def bits(self, steps: int) -> int:
        return codec.prefix_bits(self.coded.stream, steps, self.symbols, self.decoded)

    def uhat(self, steps: int) -> np.ndarray:
        uhat = np.zeros(self.coded.pool.n)
        np.add.at(uhat, self.decoded.picks[:steps], self.decoded.quanta[:steps])
        return uhat

    def values(self, steps: int) -> dict[str, np.ndarray]:
        return self.coded.pool.values(self.uhat(steps), self.decoded.negative)

    def steps_for_nnz(self, nnz: int) -> int:
        """The first step count with `nnz` nonzeros (UsageError when the stream is shorter)."""
        if nnz > self.nnz(self.steps):
            raise UsageError(f"the stream holds only {self.nnz(self.steps):,} nonzeros "
                             f"(rate {self.nnz(self.steps) / self.coded.pool.n:.4g}); "
                             f"{nnz:,} were asked for")
        return int(np.searchsorted(self.decoded.nnz_at, nnz, side="left")) + 1 if nnz else 0

    def steps_for_bits(self, budget: float) -> int:
        """The longest prefix whose coded bits are at most `budget` (bits grow with steps)."""
        lo, hi = 0, self.steps
        if self.bits(hi) <= budget:
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.bits(mid) <= budget else (lo, mid)
        return lo

    def truncated(self, steps: int) -> Coded:
        stream = codec.truncate(self.coded.stream, steps, self.symbols, self.decoded)
        return Coded(self.coded.pool, stream, self.coded.source)


def shortest_meeting(prefixes: Prefixes, ok) -> tuple[int, list[tuple[int, Any]]]:
    """The shortest prefix (steps) for which `ok(steps)` holds, by bisection (the quality
    grows with the prefix); returns it and the probes as (steps, result)."""
    probes: list[tuple[int, Any]] = []
    seen: dict[int, bool] = {}

    def probe(steps: int) -> bool:
        if steps not in seen:
            passed, result = ok(steps)
            seen[steps] = passed
            probes.append((steps, result))
        return seen[steps]

    hi = prefixes.steps
    if not probe(hi):
        raise UsageError("even the longest prefix (rate "
                         f"{prefixes.nnz(hi) / prefixes.coded.pool.n:.4g}) does not meet the "
                         "bound; loosen it")
    lo = 0
    for _ in range(BOUND_SEARCH_STEPS):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if probe(mid) else (mid, hi)
    return hi, probes


def encode(arrays: dict[str, np.ndarray], names: list[str], seed: int, *,
           nnz: int | None = None, bits: float | None = None,
           alpha: float | None = None) -> Coded:
    """Run the encoder until `nnz` nonzeros, or until the stream passes `bits` (then cut to
    the longest prefix within `bits`)."""
    pool, u, negative = Pool.of(arrays, names)
    if pool.n < 3:
        raise UsageError("--method surp needs at least 3 prunable weights")
    encoder = codec.Encoder(u, negative, seed=seed, alpha=alpha)
    if nnz is not None:
        encoder.run(nnz=nnz)
        return Coded(pool, encoder.stream())
    step = codec.CHUNK_STEPS * 4
    while not encoder.exhausted and encoder.nnz < pool.n:
        encoder.run(steps=encoder.steps + step)
        stream = encoder.stream()
        if stream.bits > bits:
            break
        step = max(step, encoder.steps // 4)
    coded = Coded(pool, encoder.stream())
    prefixes = Prefixes.of(coded)
    return prefixes.truncated(prefixes.steps_for_bits(bits))


# ----------------------------------------------------------------------- compress


# ----------------------------------------------------------------------- the artifact


# ----------------------------------------------------------------------- truncate


