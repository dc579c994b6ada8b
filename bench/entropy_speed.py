"""Speed and size of the entropy coder (rdonnx.codec.entropy) on one CPU core.

For each density, a Laplacian matrix is magnitude-pruned and quantized to 8-bit-ish levels
(q = clip(round(w / step), -127, 127), step = 99.99th percentile of the kept |w| / 127), then
coded with `encode_integers` and decoded with `decode_integers` (positions + values + dense
int32 reconstruction):

* iid: w ~ Laplace, so the mask is an i.i.d. random mask;
* structured: W = diag(r) @ L @ diag(c) with log-normal row and column scales r, c, so rows
  and columns have very different densities after magnitude pruning.

Usage: python bench/entropy_speed.py [--rows 5000] [--cols 5000] [--repeat 3]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from rdonnx.codec import entropy  # noqa: E402


def make_q(kind: str, rows: int, cols: int, density: float, seed: int = 0) -> np.ndarray:
    """Pruned, quantized int32 matrix for one benchmark case."""
    rng = np.random.default_rng(seed)
    w = rng.laplace(size=(rows, cols)).astype(np.float32)
    if kind == "structured":
        w *= rng.lognormal(0.0, 0.7, size=(rows, 1)).astype(np.float32)
        w *= rng.lognormal(0.0, 0.7, size=(1, cols)).astype(np.float32)
    a = np.abs(w).ravel()
    keep = int(round(density * a.size))
    thr = np.partition(a, a.size - keep)[a.size - keep]
    mask = np.abs(w) >= thr
    step = float(np.quantile(a[a >= thr], 0.9999)) / 127.0  # int8-like, clipping outliers
    q = np.where(mask, np.clip(np.round(w / step), -127, 127), 0).astype(np.int32)
    q[mask & (q == 0)] = np.sign(w[mask & (q == 0)]).astype(np.int32)  # kept => nonzero
    return q


def best_time(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--cols", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n = args.rows * args.cols
    print(f"{args.rows}x{args.cols} = {n / 1e6:.1f} M elements, 1 thread, best of {args.repeat}")
    head = (f"{'mask':<10} {'dens':>5} {'pos model':<13} {'enc Me/s':>8} {'dec Me/s':>8} "
            f"{'pos b/e':>8} {'iid H':>8} {'gain':>6} {'val b/nz':>8} {'val H':>8} "
            f"{'tot b/e':>8}")
    print(head)
    print("-" * len(head))
    for kind in ("iid", "structured"):
        for density in (0.5, 0.2, 0.1, 0.05):
            q = make_q(kind, args.rows, args.cols, density)
            t_enc, (pos, val) = best_time(lambda q=q: entropy.encode_integers(q), args.repeat)
            t_dec, out = best_time(
                lambda q=q, p=pos.payload, v=val.payload: entropy.decode_integers(p, v, q.shape),
                args.repeat)
            assert np.array_equal(out, q), "round trip failed"
            nnz = int(np.count_nonzero(q))
            gain = 1.0 - pos.bits / max(pos.iid_entropy_bits, 1.0)
            print(f"{kind:<10} {density:>5.2f} {pos.model:<13} {n / t_enc / 1e6:>8.1f} "
                  f"{n / t_dec / 1e6:>8.1f} {pos.bits / n:>8.4f} {pos.iid_entropy_bits / n:>8.4f} "
                  f"{gain:>6.1%} {val.bits / nnz:>8.4f} {val.iid_entropy_bits / nnz:>8.4f} "
                  f"{(pos.bits + val.bits) / n:>8.4f}")
    print("\npos b/e: coded position bits per element (side info included); iid H: i.i.d. "
          "entropy H(density);\ngain: saving of the coded positions vs the i.i.d. entropy; val "
          "b/nz, val H: coded value bits and\nempirical i.i.d. entropy (sign + magnitude) per "
          "nonzero; tot b/e: both streams per element.")


if __name__ == "__main__":
    main()
