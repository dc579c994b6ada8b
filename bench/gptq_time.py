"""Seconds of reconstruction's parts on a model (rate 1, --reconstruct, nothing held out):

- per named weight, its error-compensated quantization (GPTQ's grid search);
- with `--hessians`, the original-input Hessians of every reconstructed layer, one layer at a
  time (one run of the model per layer and batch, as before session 11) against all together
  (one run per batch), alternating, in one process. `--alone N` times only the first N layers
  one at a time (a large model) and scales that time to all of them (the table says so).

    .venv/bin/python bench/gptq_time.py ~/.cache/rdonnx-zoo/efficientnet/model.onnx \\
        ~/.cache/rdonnx-zoo/efficientnet/calib.npz onnx::Conv_1062 fc.weight [--bits 8]
    .venv/bin/python bench/gptq_time.py MODEL CALIB --hessians [--alone 12 --no-simplify]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rdonnx.flow.calibration import Calibration, calibrate_model  # noqa: E402
from rdonnx.flow.config import CompressConfig  # noqa: E402
from rdonnx.flow.hessians import Hessians  # noqa: E402
from rdonnx.flow.pipeline import make_realizer  # noqa: E402


def hessian_times(cal: Calibration, names: list[str], alone: int | None, repeat: int) -> None:
    """The table of Hessians one layer at a time against together."""
    timed = names[:alone] if alone else names
    print(f"{len(names)} reconstructed weights, {cal.replay.samples} samples in "
          f"{len(cal.replay)} batches")
    scaled = "" if len(timed) == len(names) else f" ({len(timed)} timed, scaled)"
    print(f"| one at a time s{scaled} | together s | speedup | load |")
    print("|---|---|---|---|")
    for _ in range(repeat):
        load = os.getloadavg()[0]
        start = time.perf_counter()
        hessians = Hessians(cal)
        for name in timed:
            hessians.hessian(name)
        one = (time.perf_counter() - start) * len(names) / len(timed)
        start = time.perf_counter()
        Hessians(cal).hessian(names[0], together=lambda: names)
        together = time.perf_counter() - start
        print(f"| {one:.1f} | {together:.1f} | {one / together:.1f}x | "
              f"{load:.1f}-{os.getloadavg()[0]:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("calib")
    parser.add_argument("weights", nargs="*")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--hessians", action="store_true")
    parser.add_argument("--alone", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-simplify", action="store_true")
    args = parser.parse_args()
    config = CompressConfig.of(reconstruct=True, value_bits=args.bits, holdout=0.0,
                               samples=args.samples, simplify=not args.no_simplify)
    cal = calibrate_model(args.model, config, args.calib)
    realizer = make_realizer(cal, config)
    if args.hessians:
        hessian_times(cal, [w.name for w in cal.weights if realizer.reconstructs(w.name)],
                      args.alone, args.repeat)
    if args.weights:
        print("| weight | shape | s |")
        print("|---|---|---|")
    for name in args.weights:
        weight = next(w for w in cal.weights if w.name == name)
        realizer.hessians.hessian(name, None)  # accumulated before the clock starts
        start = time.perf_counter()
        realizer.compress_weight(weight, weight.size, args.bits)
        print(f"| {name} | {'x'.join(map(str, cal.originals[name].shape))} | "
              f"{time.perf_counter() - start:.1f} |", flush=True)


if __name__ == "__main__":
    main()
