"""How well the estimate of unseen decision flips predicts the test split: g2p (greedy decoding
unrolled into its graph), uniform magnitude masks at fixed rates, exact values. Per rate: the
held-out nmse, the flip term the bound check adds (`Distortion.flips`), the test split's nmse
and its share of samples with a changed decision.

    .venv/bin/python bench/flips.py [--model g2p] [--rates 0.999,0.998,0.995,0.99,0.98,0.95]

Needs the zoo (`python -m bench.zoo.fetch`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.zoo.common import Prepared, cache_dir, load_inputs  # noqa: E402
from rdonnx import CompressConfig  # noqa: E402
from rdonnx.flow.calibration import calibrate_model  # noqa: E402


def masked(originals: dict[str, np.ndarray], rate: float) -> dict[str, np.ndarray]:
    """Each weight with its smallest magnitudes zeroed, `rate` of it kept."""
    out = {}
    for name, w in originals.items():
        keep = max(int(round(rate * w.size)), 1)
        threshold = np.sort(np.abs(w).ravel())[::-1][keep - 1]
        out[name] = np.where(np.abs(w) >= threshold, w, 0).astype(w.dtype)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="g2p")
    parser.add_argument("--rates", default="0.999,0.998,0.995,0.99,0.98,0.95")
    args = parser.parse_args()
    prep = Prepared(cache_dir() / args.model)
    config = CompressConfig.of(max_distortion=1e-3, values="exact", format="dense",
                               layer_distortion=False, seed=0)
    cal = calibrate_model(str(prep.onnx), config, str(prep.inputs("calib")))
    if not cal.decisions:
        sys.exit(f"{args.model}: the graph takes no decisions of its own (no ArgMax read on)")
    test = load_inputs(prep.inputs("test"))
    n = len(next(iter(test.values())))

    def outputs(values) -> np.ndarray:
        run = cal.run_with(values)
        return np.concatenate([run({k: v[i:i + 256] for k, v in test.items()})[0]
                               for i in range(0, n, 256)])

    ref = outputs(cal.originals)
    print(f"{args.model}: {len(cal.decisions)} decisions per sample, {cal.check.samples} "
          f"held-out samples, {n} test samples")
    print("| rate | held-out nmse | flip term | test nmse | test samples with a changed "
          "decision |")
    print("|---|---|---|---|---|")
    for rate in map(float, args.rates.split(",")):
        values = masked(cal.originals, rate)
        d = cal.distortion(values, 1, terms="nmse")
        y = outputs(values)
        changed = (np.argmax(y, -1) != np.argmax(ref, -1)).reshape(n, -1).any(axis=1).mean()
        test_nmse = float(((y - ref) ** 2).sum() / (ref ** 2).sum())
        print(f"| {rate:g} | {d.nmse:.3g} | {d.flips:.3g} | {test_nmse:.3g} | {changed:.2%} |",
              flush=True)


if __name__ == "__main__":
    main()
