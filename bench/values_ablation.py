"""Where 8-bit values lose a zoo model's task metric: every weight quantized, one weight at a
time, and reference perturbations, each scored with the model's task metric on the test split.

Rows (all weights are those `rdonnx compress` quantizes: prunable weights and codable tensors of
at least 256 elements):
- `fp16`: every weight rounded to float16 (a perturbation the metric should not see);
- `absmax`: per-output-channel steps max|w| / levels, plain rounding (the textbook quantizer);
- `choose`: `grids.choose` (what `--rate 1 --value-bits B` does without layer-input moments);
- `noise`: Gaussian noise with the `absmax` error's energy in each tensor;
- `only W`: `absmax` on weight W alone (`--ablate`: the K worst are listed).
The test split's fragility is shown by the metric against the original's confidence when the
model's first output is class scores.

    .venv/bin/python bench/values_ablation.py efficientnet [--bits 8] [--ablate 12]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.zoo.common import Prepared, cache_dir  # noqa: E402
from bench.zoo.models import adapter  # noqa: E402
from bench.zoo_values import zoo_bench  # noqa: E402
from rdonnx.algo import grids  # noqa: E402
from rdonnx.graph.layers import output_axes  # noqa: E402
from rdonnx.graph.model import load_model  # noqa: E402
from rdonnx.graph.weights import find_codable, find_weights, read_weights  # noqa: E402


def absmax(w: np.ndarray, axis: int | None, bits: int) -> np.ndarray:
    """Plain rounding on per-channel (or per-tensor) unclipped steps, float32."""
    levels = 2 ** (bits - 1) - 1
    rows = np.abs(w).reshape(1, -1) if axis is None else \
        np.moveaxis(np.abs(w), axis, 0).reshape(w.shape[axis], -1)
    grid = grids.Grid(np.maximum(rows.max(axis=1) / levels, 1e-30).astype(np.float32), axis)
    return (grids.round_to(w, grid, bits) * grid.broadcast(w.ndim)).astype(np.float32)


def chosen(w: np.ndarray, axis: int | None, bits: int) -> tuple[np.ndarray, bool]:
    grid = grids.choose(w, bits, axis)
    return (grids.round_to(w, grid, bits) * grid.broadcast(w.ndim)).astype(np.float32), \
        grid.axis is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--ablate", type=int, default=0, help="list the K weights whose "
                        "quantization alone costs the most (one test-split run per weight)")
    parser.add_argument("--cache", default=None)
    args = parser.parse_args()
    import onnxruntime as ort

    zoo = zoo_bench()
    ad, prep = adapter(args.model), Prepared(cache_dir(args.cache) / args.model)
    scorer = zoo.Scorer(ad, prep)
    proto = onnx.load(str(prep.onnx))
    model = load_model(prep.onnx)
    found = find_weights(model)
    found += find_codable(model, found)
    arrays, axes = read_weights(model, found), output_axes(model, found)
    names = [w.name for w in found if arrays[w.name].dtype == np.float32]

    def score(values: dict[str, np.ndarray]) -> dict[str, float]:
        return scorer.score(_session(proto, values, ort), "test")

    def show(label: str, metrics: dict[str, float]) -> None:
        print(f"| {label} | {metrics[ad.primary]:.4f} |", flush=True)

    print(f"{args.model}: {len(names)} tensors, {sum(arrays[n].size for n in names):,} values, "
          f"{args.bits}-bit; {ad.primary} on the test split")
    print("| quantized | metric |\n|---|---|")
    plain = {n: absmax(arrays[n], axes[n], args.bits) for n in names}
    show("fp16 (all)", score({n: arrays[n].astype(np.float16).astype(np.float32)
                              for n in names}))
    show("absmax per channel (all)", score(plain))
    picked = {n: chosen(arrays[n], axes[n], args.bits) for n in names}
    tensors = [n for n in names if axes[n] is not None and not picked[n][1]]
    show(f"grids.choose (all; {len(tensors)} of {sum(axes[n] is not None for n in names)} "
         "with an axis took one step)", score({n: picked[n][0] for n in names}))
    rng = np.random.default_rng(0)
    show("Gaussian noise of absmax's error energy (all)", score(
        {n: (arrays[n] + rng.standard_normal(arrays[n].shape).astype(np.float32) *
             np.float32(np.std(arrays[n] - plain[n]))) for n in names}))
    ref = scorer.ref["test"][0]
    if ad.primary == "top1_agreement":
        out = zoo.run_outputs(_session(proto, plain, ort), scorer.feeds["test"], ad.batch)[0]
        p = np.exp(ref - ref.max(1, keepdims=True))
        top = (p / p.sum(1, keepdims=True)).max(1)
        same = out.argmax(1) == ref.argmax(1)
        print("\n| original top softmax | samples | top-1 agreement (absmax) |\n|---|---|---|")
        for lo, hi in ((0, .1), (.1, .2), (.2, .4), (.4, .7), (.7, 1.01)):
            s = (top >= lo) & (top < hi)
            print(f"| [{lo}, {min(hi, 1)}) | {int(s.sum())} | "
                  f"{same[s].mean() if s.any() else float('nan'):.3f} |")
    if args.ablate:
        rows = [(score({n: plain[n]})[ad.primary], n) for n in names]
        print(f"\n| only this weight (absmax) | shape | {ad.primary} |\n|---|---|---|")
        for metric, n in sorted(rows)[:args.ablate]:
            print(f"| {n} | {'x'.join(map(str, arrays[n].shape))} | {metric:.4f} |")


def _session(proto: onnx.ModelProto, values: dict[str, np.ndarray], ort):
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    for init in p.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name], init.name))
    return ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"])


if __name__ == "__main__":
    main()
