"""Seconds to accumulate the original-input Hessians of every reconstructed weight of a model:
one weight at a time (one run of the model per weight and batch, as before) against all of
them together (one run per batch), alternating, in one process.

    .venv/bin/python bench/hessian_time.py ~/.cache/rdonnx-zoo/efficientnet/model.onnx \\
        ~/.cache/rdonnx-zoo/efficientnet/calib.npz [--samples 32] [--alone 15]

`--alone N` times only the first N weights one at a time (a large model) and scales that
time to all of them (the table says so).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rdonnx.flow.calibration import calibrate_model  # noqa: E402
from rdonnx.flow.config import CompressConfig  # noqa: E402
from rdonnx.flow.hessians import Hessians  # noqa: E402
from rdonnx.flow.pipeline import make_realizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("calib")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--alone", type=int, default=None,
                        help="time this many weights one at a time (default: all)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-simplify", action="store_true")
    args = parser.parse_args()
    config = CompressConfig.of(reconstruct=True, rate=0.5, method="uniform", holdout=0.0,
                               samples=args.samples, simplify=not args.no_simplify)
    cal = calibrate_model(args.model, config, args.calib)
    realizer = make_realizer(cal, config)
    names = [w.name for w in cal.weights if realizer.reconstructs(w.name)]
    alone = names[:args.alone] if args.alone else names
    rows = []
    for _ in range(args.repeat):
        load = os.getloadavg()[0]
        start = time.perf_counter()
        hessians = Hessians(cal)
        for name in alone:
            hessians.hessian(name)
        one = (time.perf_counter() - start) * len(names) / len(alone)
        start = time.perf_counter()
        Hessians(cal).hessian(names[0], together=names)
        rows.append((one, time.perf_counter() - start, load, os.getloadavg()[0]))
    scaled = "" if len(alone) == len(names) else f" ({len(alone)} timed, scaled)"
    print(f"{Path(args.model).parent.name}: {len(names)} reconstructed weights, "
          f"{cal.replay.samples} samples in {len(cal.replay)} batches")
    print(f"| one at a time s{scaled} | together s | speedup | load |")
    print("|---|---|---|---|")
    for one, together, before, after in rows:
        print(f"| {one:.1f} | {together:.1f} | {one / together:.1f}x | {before:.1f}-{after:.1f} |")


if __name__ == "__main__":
    main()
