"""Values only: `--rate 1 --value-bits B --method uniform` (no curves) on zoo models, scored
with each model's task metric on the test and calibration splits, with the artifact's size.

    .venv/bin/python bench/zoo_values.py efficientnet,minilm,g2p 8 [--rdoq] [--reconstruct]

(`--reconstruct`: GPTQ's error feedback, kept where it measures lower on the held-out part.)

Needs the zoo (`python -m bench.zoo.fetch`); the scoring is bench/zoo.py's.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import rdonnx  # noqa: E402
from bench.zoo.common import Prepared, cache_dir  # noqa: E402
from bench.zoo.models import adapter  # noqa: E402


def zoo_bench():
    spec = importlib.util.spec_from_file_location("zoo_bench", ROOT / "bench" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo_bench"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models")
    parser.add_argument("bits", type=int)
    parser.add_argument("--rdoq", action="store_true")
    parser.add_argument("--reconstruct", action="store_true")
    parser.add_argument("--cache", default=None)
    args = parser.parse_args()
    zoo = zoo_bench()
    print("| model | bits | bytes | ratio | bits/weight | test | calib | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        ad, prep = adapter(name), Prepared(cache_dir(args.cache) / name)
        scorer = zoo.Scorer(ad, prep)
        start = time.time()
        config = rdonnx.CompressConfig.of(value_bits=args.bits, layer_distortion=False,
                                       method="uniform", rdoq=args.rdoq,
                                       reconstruct=args.reconstruct)
        result = rdonnx.compress(str(prep.onnx), rate=1.0, calib=str(prep.inputs("calib")),
                                 config=config)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.rdonnx"
            size = result.save(path)
            test, calib = scorer.score_file(path, "test"), scorer.score_file(path, "calib")
        original = zoo.file_bytes(prep.onnx)
        flags = (" rdoq" if args.rdoq else "") + (" reconstruct" if args.reconstruct else "")
        print(f"| {name} | {args.bits}{flags} | {size:,} | "
              f"{original / size:.2f} | {8 * size / zoo.prunable_weights(prep.onnx):.2f} | "
              f"{ad.primary} {test[ad.primary]:.4f} | {calib[ad.primary]:.4f} | "
              f"{time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
