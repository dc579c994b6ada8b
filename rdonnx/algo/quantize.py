"""Scalar quantization of surviving weight values, per tensor.

`uniform`: a tensor is stored as integers q (0 = pruned) and one float32 step; its value is
q * step computed in float32 and cast to the tensor's dtype, on the encoder and the decoder alike,
so decoding reproduces exactly the weights whose distortion was measured.

`kmeans` (`rdonnx.kmeans`): q holds codebook indices 1..K (0 = pruned) and the value is
codebook[q - 1], a float32 lookup cast to the tensor's dtype, again exactly what a decoder builds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rdonnx.choices import VALUE_BITS


@dataclass(frozen=True)
class Quantized:
    """Integer levels and the float32 step of one tensor, or codebook indices and the codebook."""

    q: np.ndarray  # int32, the tensor's shape: levels, or indices 1..K into `codebook` (0: pruned)
    step: float | np.ndarray  # float32; per index along `axis` when `axis` is set
    codebook: np.ndarray | None = None  # float32 [K], ascending: the k-means centroids
    axis: int | None = None  # the output-row axis of per-row steps (GPTQ's per-channel grid)
    classes: np.ndarray | None = None  # bool per index along `axis`: rows whose levels are
    # coded in a stream of their own (a lookup table's rows coded coarser, `algo.unread`)

    def values(self, dtype: np.dtype) -> np.ndarray:
        """The dequantized tensor in `dtype` (exactly what a decoder reconstructs)."""
        if self.codebook is not None:
            return lookup(self.q, self.codebook, dtype)
        return dequantize(self.q, self.step, dtype, self.axis)


def row_view(steps: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Per-row float32 steps shaped to broadcast against a tensor of `ndim` along `axis`."""
    return np.asarray(steps, dtype=np.float32).reshape(
        [-1 if i == axis else 1 for i in range(ndim)])


def dequantize(q: np.ndarray, step: float | np.ndarray, dtype: np.dtype,
               axis: int | None = None) -> np.ndarray:
    """q * step in float32 (step per index along `axis` when given), cast to `dtype`."""
    s = np.float32(step) if axis is None else row_view(step, q.ndim, axis)
    return np.multiply(q, s, dtype=np.float32).astype(dtype, copy=False)


def lookup(q: np.ndarray, codebook: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """codebook[q - 1] in float32 (0 where q = 0, +0.0), cast to `dtype`; q must be in 0..K."""
    table = np.concatenate([np.zeros(1, np.float32), np.asarray(codebook, np.float32)])
    return table[q].astype(dtype)


def quantize(weight: np.ndarray, bits: int) -> Quantized:
    """Round to 2^(bits-1) - 1 levels each side of zero; the largest magnitude gets the top level.

    Zeros (pruned entries) stay zero; survivors that round to zero become pruned. Non-finite
    values raise ValueError.
    """
    if bits not in VALUE_BITS:
        raise ValueError(f"value bits must be in {VALUE_BITS.start}..{VALUE_BITS.stop - 1}")
    w = np.asarray(weight, dtype=np.float32)
    largest = float(np.max(np.abs(w))) if w.size else 0.0
    if not np.isfinite(largest):
        raise ValueError("the tensor holds inf or NaN values; use exact values")
    if largest == 0.0:
        return Quantized(np.zeros(w.shape, dtype=np.int32), 1.0)
    levels = 2 ** (bits - 1) - 1
    step = float(np.float32(largest / levels))
    q = np.clip(np.rint(w / np.float32(step)), -levels, levels).astype(np.int32)
    return Quantized(q, step)


AUTO_BITS = (2, 3, 4, 5, 6, 7, 8, 10, 12, 16)


@dataclass(frozen=True)
class BitsChoice:
    """Quantized tensors at the chosen bits, their values, and the measured distortion."""

    bits: int
    quantized: dict[str, Quantized]
    values: dict[str, np.ndarray]
    distortion: object  # the `Distortion` measured with these values


def choose_bits(make, measure, limit: float | None, bits: int | None = None
                ) -> BitsChoice | None:
    """The fewest bits of `AUTO_BITS` whose measured distortion is within `limit` (bisection:
    distortion falls as bits grow), or exactly `bits`; None when even the widest misses.

    `make(bits)` returns (values, quantized) dicts for that width; `measure(values)` returns
    (figure, distortion).
    """
    def at(b: int) -> tuple[BitsChoice, bool]:
        values, quantized = make(b)
        figure, distortion = measure(values)
        return BitsChoice(b, quantized, values, distortion), limit is None or figure <= limit

    if bits is not None or limit is None:
        return at(AUTO_BITS[0] if bits is None else bits)[0]
    lo, hi = 0, len(AUTO_BITS) - 1
    best, ok = at(AUTO_BITS[hi])
    if not ok:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        choice, ok = at(AUTO_BITS[mid])
        if ok:
            best, hi = choice, mid
        else:
            lo = mid + 1
    return best
