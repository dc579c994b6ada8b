"""Seconds of one weight's error-compensated quantization (GPTQ's grid search, rate 1,
--reconstruct, nothing held out) for the named weights of a model.

    .venv/bin/python bench/gptq_time.py ~/.cache/rdonnx-zoo/efficientnet/model.onnx \\
        ~/.cache/rdonnx-zoo/efficientnet/calib.npz onnx::Conv_1062 fc.weight [--bits 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rdonnx.flow.calibration import calibrate_model  # noqa: E402
from rdonnx.flow.config import CompressConfig  # noqa: E402
from rdonnx.flow.pipeline import make_realizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("calib")
    parser.add_argument("weights", nargs="+")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    config = CompressConfig.of(reconstruct=True, value_bits=args.bits, holdout=0.0,
                               samples=args.samples)
    cal = calibrate_model(args.model, config, args.calib)
    realizer = make_realizer(cal, config)
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
