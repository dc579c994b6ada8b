"""Value quantizers on real weights: one grid per tensor against per-channel grids, and what
RD-optimised rounding saves at equal weight error.

For every float weight of at least --min-params elements in the given ONNX files (the zoo's
models: `python -m bench.zoo.fetch` first), at --bits:
- max|w| / rms(w), and the relative weight error ||w - w_q||^2 / ||w||^2 of plain rounding on
  one unclipped grid per tensor (what rdonnx did before per-channel grids), of the fitted grid
  per tensor and per output channel (`grids.fit`), and which one `grids.choose` takes;
- coded bits per weight (positions + values, the real coder) of plain rounding and of RDOQ at
  a ladder of grids (the fitted per-tensor step x 2^(k/4)), and the bits RDOQ saves at the
  weight error of plain rounding (interpolated in log-error).

    .venv/bin/python bench/quantizer.py ~/.cache/rdonnx-zoo/{minilm,crepe,ocr}/model.onnx
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from rdonnx.algo import grids
from rdonnx.algo.quantize import quantize
from rdonnx.codec import encode_integers
from rdonnx.graph.layers import output_axes
from rdonnx.graph.model import load_model
from rdonnx.graph.weights import find_codable, find_weights, read_weights


def coded_bits(q: np.ndarray) -> float:
    positions, values = encode_integers(q)
    return (len(positions.payload) + len(values.payload)) * 8 / q.size


def relative(w: np.ndarray, v: np.ndarray) -> float:
    return float(np.sum((w - v) ** 2) / max(np.sum(w.astype(np.float64) ** 2), 1e-30))


def rdoq_saving(w: np.ndarray, bits: int) -> tuple[float, float, float]:
    """(plain bits, RDOQ bits at plain's error, plain error) on the fitted per-tensor grid."""
    base = grids.fit(w, bits, None)[0].steps[0]
    curves = {"plain": [], "rdoq": []}
    for k in range(-4, 5):
        grid = grids.Grid(np.float32([base * 2.0 ** (k / 4)]), None)
        q = grids.round_to(w, grid, bits)
        for name, levels in (("plain", q), ("rdoq", grids.rdoq(w, q, grid, bits))):
            curves[name].append((relative(w, levels * grid.steps[0]), coded_bits(levels)))
    plain_error, plain_bits = curves["plain"][4]
    errors, rates = zip(*sorted(curves["rdoq"]))
    at = float(np.interp(np.log(plain_error), np.log(errors), rates))
    return plain_bits, at, plain_error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--min-params", type=int, default=65536)
    parser.add_argument("--top", type=int, default=6, help="weights per model (largest outlier "
                        "ratio first)")
    args = parser.parse_args()
    print("| model | weight | shape | max/rms | plain/tensor | fitted/tensor | fitted/channel "
          "| chosen | bpw plain | bpw RDOQ at equal error | saved |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in args.models:
        model = load_model(path)
        weights = find_weights(model, args.min_params)
        weights += find_codable(model, weights, args.min_params)
        arrays, axes = read_weights(model, weights), output_axes(model, weights)
        ratio = {n: float(np.abs(a).max() / np.sqrt(np.mean(a.astype(np.float64) ** 2)))
                 for n, a in arrays.items()}
        for name in sorted(arrays, key=lambda n: -ratio[n])[:args.top]:
            w, axis = arrays[name].astype(np.float32), axes[name]
            plain = relative(w, quantize(w, args.bits).values(np.float32))
            tensor, _ = grids.fit(w, args.bits, None)
            errors = {"tensor": relative(w, grids.round_to(w, tensor, args.bits) * tensor.steps[0])}
            if axis is not None:
                channel, _ = grids.fit(w, args.bits, axis)
                errors["channel"] = relative(w, grids.round_to(w, channel, args.bits) *
                                             channel.broadcast(w.ndim))
            chosen = grids.choose(w, args.bits, axis)
            bits, at, _ = rdoq_saving(w, args.bits)
            print(f"| {path.parent.name} | {name[:40]} | {'x'.join(map(str, w.shape))} | "
                  f"{ratio[name]:.1f} | {plain:.2e} | {errors['tensor']:.2e} | "
                  f"{errors.get('channel', float('nan')):.2e} | "
                  f"{'channel' if chosen.axis is not None else 'tensor'} | {bits:.3f} | "
                  f"{at:.3f} | {100 * (1 - at / bits):.1f}% |", flush=True)


if __name__ == "__main__":
    main()
