"""Baseline pruning (uniform, global; exact values) on the bundled models to dense and sparse ONNX:
sizes, distortion, agreement, accuracy; and the time and peak memory of the README's main job.

Run: .venv/bin/python bench/compress.py   (prints Markdown tables; about a minute on 2 cores)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import rdonnx

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("digits_mlp", "digits_cnn")
RATES = (0.5, 0.2, 0.1)
METHODS = ("uniform", "global")


def quality_table() -> None:
    print("| model | method | rate | dense bytes | sparse bytes | nmse (calib) | top-1 agreement "
          "(test) | test accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            model = ROOT / "models" / f"{name}.onnx"
            print(f"| {name} | original | 1.0 | {model.stat().st_size:,} | - | 0 | 100% | "
                  f"{_accuracy(model)} |")
            for method in METHODS:
                for rate in RATES:
                    result = rdonnx.compress(
                        model, rate=rate, method=method, calib=ROOT / "models/digits_calib.npz",
                        test=ROOT / "models/digits_test.npz", labels="label",
                        config=rdonnx.CompressConfig.of(format="dense"))
                    dense = result.save(Path(tmp) / "d.onnx", "dense", force=True)
                    sparse = result.save(Path(tmp) / "s.onnx", "sparse", force=True)
                    r, t = result.report, result.report.test
                    print(f"| {name} | {method} | {rate} | {dense:,} | {sparse:,} | "
                          f"{r.calibration.nmse:.4f} | {t.top1_agreement:.2%} | "
                          f"{t.accuracy_compressed:.2%} |")


def _accuracy(model: Path) -> str:
    ev = rdonnx.evaluate(model, model, ROOT / "models/digits_test.npz", labels="label")
    return f"{ev.accuracy_original:.2%}"


def cost_table() -> None:
    """Wall time and peak RSS of the README's main job, each in a fresh process."""
    print("\n| model | command | wall s | peak RSS MiB |")
    print("|---|---|---|---|")
    for name in MODELS:
        with tempfile.TemporaryDirectory() as tmp:
            args = ["compress", f"models/{name}.onnx", "--rate", "0.1", "--calib",
                    "models/digits_calib.npz", "--test", "models/digits_test.npz", "--labels",
                    "label", "-o", f"{tmp}/out.rdonnx", "--quiet"]
            code = ("import resource, sys; from rdonnx.cli import main; code = main("
                    f"{args!r}); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); "
                    "sys.exit(code)")
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                                  capture_output=True, text=True)
            wall = time.perf_counter() - start
            peak = int(done.stdout.split()[-1]) / 1024
            print(f"| {name} | `rdonnx compress models/{name}.onnx --rate 0.1 --calib ... "
                  f"--test ...` (rd, .rdonnx) | {wall:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    quality_table()
    cost_table()
