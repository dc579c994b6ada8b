"""Baseline pruning on the bundled models: sizes, distortion, agreement, accuracy; time, memory.

Run: .venv/bin/python bench/compress.py   (prints Markdown tables; about a minute on 2 cores)
"""

from __future__ import annotations

import resource
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
                        test=ROOT / "models/digits_test.npz", labels="label")
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
    print("\n| model | command | wall s | peak RSS MiB |")
    print("|---|---|---|---|")
    for name in MODELS:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(ROOT / "cli.py"), "compress", f"models/{name}.onnx",
                   "--rate", "0.1", "--calib", "models/digits_calib.npz", "--test",
                   "models/digits_test.npz", "--labels", "label", "-o", f"{tmp}/out.onnx",
                   "--quiet"]
            start = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
            wall = time.perf_counter() - start
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            print(f"| {name} | `rdonnx compress models/{name}.onnx --rate 0.1 --calib ... "
                  f"--test ...` | {wall:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    quality_table()
    cost_table()
