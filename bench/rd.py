"""R-D allocation against the baselines, on the bundled models and the benchmark transformer.

For each model and in-layer criterion, curves are calibrated once and reused at every rate;
every method is measured on the calibration data (output distortion) and the test data
(accuracy). Also: calibration time, probes per second against plain forward passes, and peak
memory for two calibration-set sizes. Prints Markdown tables, writes docs/rd_<model>.png.

Run: .venv/bin/python bench/rd.py     (a few minutes on 2 cores)
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import rdonnx
from rdonnx.config import CompressConfig
from rdonnx.pipeline import calibrate_model, measure_all_curves
from rdonnx.plot import plot_methods

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import transformer  # noqa: E402

RATES = (0.5, 0.3, 0.2, 0.1, 0.05)
METHODS = ("uniform", "global", "lamp", "rd")
CRITERIA = ("magnitude", "activation")
CALIB = ROOT / "models" / "digits_calib.npz"
TEST = ROOT / "models" / "digits_test.npz"


def models() -> dict[str, Path]:
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    path = out / "digits_transformer.onnx"
    if not path.exists():
        transformer.build(path)
    return {"digits_mlp": ROOT / "models" / "digits_mlp.onnx",
            "digits_cnn": ROOT / "models" / "digits_cnn.onnx",
            "digits_transformer": path}


def quality(name: str, path: Path) -> dict:
    """Distortion and accuracy of every method and criterion at every rate."""
    rows, series, timing = [], {}, {}
    for criterion in CRITERIA:
        config = CompressConfig(criterion=criterion, layer_distortion=False)
        start = time.perf_counter()
        cal = calibrate_model(path, config, CALIB)
        curves = measure_all_curves(cal, config)
        seconds = time.perf_counter() - start
        probes = len(cal.weights) * (len(curves.grid) - 1) * len(cal.replay)
        forward = _forward_seconds(cal)
        timing[criterion] = (seconds, probes / seconds_of_probes(cal, curves, config),
                             len(cal.replay) / forward)
        for method in METHODS:
            for rate in RATES:
                result = rdonnx.compress(path, rate=rate, method=method, calib=CALIB, test=TEST,
                                         labels="label", curves=curves, config=config)
                r = result.report
                rows.append((method, criterion, rate, r.calibration.nmse, r.test.top1_agreement,
                             r.test.accuracy_compressed, r.test.accuracy_original))
                series.setdefault(f"{method} / {criterion}", []).append(
                    (rate, max(r.calibration.nmse, 1e-6)))
    plot_methods(series, ROOT / "docs" / f"rd_{name}.png", "nmse on the calibration data",
                 f"{name}: measured output distortion")
    return {"rows": rows, "timing": timing}


def _forward_seconds(cal) -> float:
    """Seconds for one plain forward pass over the replayed batches (best of 5)."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for feed, _ in cal.replay:
            cal.runner.run(feed)
        best = min(best, time.perf_counter() - start)
    return best


def seconds_of_probes(cal, curves, config) -> float:
    """Re-measure the curves' probe loop alone (no reference pass), for probes per second."""
    start = time.perf_counter()
    measure_all_curves(cal, config)
    return time.perf_counter() - start


def memory(path: Path) -> list[tuple[int, float]]:
    """Peak RSS of `rdonnx calibrate` with 256 and 4096 synthetic samples (fresh processes)."""
    out = []
    for samples in (256, 4096):
        cmd = [sys.executable, "-c", (
            "import resource,sys,rdonnx;"
            "from rdonnx.config import CompressConfig;from rdonnx.data import DataOptions;"
            f"rdonnx.calibrate(r'{path}', config=CompressConfig(data=DataOptions("
            f"samples={samples}, batch_size=64), grid=(1.0, 0.5, 0.1)));"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")]
        peak = int(subprocess.run(cmd, check=True, capture_output=True, text=True)
                   .stdout.split()[-1])
        out.append((samples, peak / 1024))
    return out


def main() -> None:
    print("| model | criterion | method | rate | nmse (calib) | top-1 agreement (test) | "
          "test accuracy (original) |")
    print("|---|---|---|---|---|---|---|")
    timings = {}
    for name, path in models().items():
        result = quality(name, path)
        timings[name] = result["timing"]
        for method, criterion, rate, nmse, agree, acc, acc0 in result["rows"]:
            print(f"| {name} | {criterion} | {method} | {rate} | {nmse:.4g} | {agree:.2%} | "
                  f"{acc:.2%} ({acc0:.2%}) |")
        _summary(name, result["rows"])
    print("\n| model | criterion | calibration s (curves) | probes/s | plain forwards/s | "
          "probe cost / forward |")
    print("|---|---|---|---|---|---|")
    for name, per in timings.items():
        for criterion, (seconds, probes, forwards) in per.items():
            print(f"| {name} | {criterion} | {seconds:.2f} | {probes:.0f} | {forwards:.0f} | "
                  f"{forwards / probes:.2f}x |")
    print("\n| model | calibration samples | peak RSS MiB |")
    print("|---|---|---|")
    for name, path in models().items():
        for samples, peak in memory(path):
            print(f"| {name} | {samples} | {peak:.0f} |")
    print(f"\nbench peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def _summary(name: str, rows) -> None:
    """rd's distortion against the best baseline, per rate and criterion (the issue's target)."""
    for criterion in CRITERIA:
        for rate in RATES:
            pick = {m: n for m, c, r, n, *_ in rows if c == criterion and r == rate}
            best = min(pick[m] for m in METHODS if m != "rd")
            print(f"<!-- {name} {criterion} rate {rate}: rd/best-baseline nmse ratio "
                  f"{pick['rd'] / best:.3f} -->")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
