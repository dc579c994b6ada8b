"""Classifier rows that never compete: how far the OCR model's file shrinks, at its task metric,
when the output classes that calibration never brings near the top are coded coarser.

The OCR model's last Gemm (8,210 classes x 1,024) is 62% of its weights. A class whose logit
stays more than T below the winning one on every calibration frame decides nothing unless its
error exceeds T; nmse counts its error like any other. Per T and coarse width: the rdonnx file
at `--rate 1 --value-bits 6` with that weight's cold rows re-coded at the coarse width (their
own per-row steps and value stream: format `quantized-classes`), its size and the test split's
string agreement, against the plain file. An experiment for issue 12, not a method rdonnx runs.

    .venv/bin/python bench/cold_rows.py [--bits 6] [--cases 10:2,10:3,5:3]

Needs the zoo (`python -m bench.zoo.fetch`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

import rdonnx  # noqa: E402
from bench.zoo.common import Prepared, cache_dir, load_inputs  # noqa: E402
from bench.zoo.models.ddddocr_ocr import ADAPTER  # noqa: E402
from bench.zoo_values import zoo_bench  # noqa: E402
from rdonnx import CompressConfig  # noqa: E402
from rdonnx.algo import grids  # noqa: E402
from rdonnx.algo.quantize import Quantized  # noqa: E402

WEIGHT = "135"  # the classifier's Gemm weight [classes, features] (transB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=6)
    parser.add_argument("--cases", default="10:2,10:3,5:3", help="T:coarse-bits pairs")
    parser.add_argument("--calib-samples", type=int, default=ADAPTER.calib_samples,
                        help="calibration lines (the cold classes are found on them too)")
    args = parser.parse_args()
    prep = Prepared(cache_dir() / "ocr")
    calib = {k: v[:args.calib_samples] for k, v in load_inputs(prep.inputs("calib")).items()}
    ad = replace(ADAPTER, calib_samples=args.calib_samples)
    scorer = zoo_bench().Scorer(ad, prep)
    result = rdonnx.compress(str(prep.onnx), rate=1.0, calib=calib,
                             config=CompressConfig.of(value_bits=args.bits, format="rdonnx",
                                                      layer_distortion=False, seed=0))
    logits = scorer.ref["calib"][0].reshape(-1, scorer.ref["calib"][0].shape[-1])
    gap = (logits - logits.max(axis=1, keepdims=True)).max(axis=0)  # per class, <= 0
    table = result.weights[WEIGHT]
    exact = next(numpy_helper.to_array(t) for t in onnx.load(str(prep.onnx)).graph.initializer
                 if t.name == WEIGHT)  # re-quantized from the original values
    print(f"ocr: {len(gap)} classes, {int((gap >= 0).sum())} win a calibration frame, "
          f"{args.calib_samples} calibration lines, {args.bits}-bit values")
    print("| cold rows (never within T of the top) | their width | bytes | test strings |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain.rdonnx"
        result.save(plain)
        score = scorer.score_file(plain)["string_agreement"]
        print(f"| none | {args.bits} | {plain.stat().st_size:,} | {score:.1%} |", flush=True)
        for case in args.cases.split(","):
            t, coarse = (float(case.split(":")[0]), int(case.split(":")[1]))
            cold = gap < -t
            grid, q = grids.fit_split(exact, args.bits, 0, cold, coarse)
            levels = Quantized(q, grid.steps, axis=0, classes=cold)
            variant = replace(result, weights={**result.weights,
                                               WEIGHT: levels.values(table.dtype)},
                              quantized={**result.quantized, WEIGHT: levels})
            path = Path(tmp) / f"cold-{t:g}-{coarse}.rdonnx"
            variant.save(path)
            score = scorer.score_file(path)["string_agreement"]
            print(f"| {int(cold.sum()):,} (T = {t:g} logits) | {coarse} | "
                  f"{path.stat().st_size:,} | {score:.1%} |", flush=True)


if __name__ == "__main__":
    main()
