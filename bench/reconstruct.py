"""Survivor reconstruction (OBS / SparseGPT, GPTQ) against plain pruning and rounding.

Part 1: bundled models and the benchmark transformer, rates 0.7 / 0.5 / 0.3, uniform and rd
allocation, without / with reconstruction (same masks; per layer, and sequential: aimed at the
original outputs) and SparseGPT's own selection (criterion obs, per layer and sequential):
output distortion on the calibration data, test accuracy, time.
Part 1b: every allocator with --sequential, rates 0.3 / 0.2 / 0.1 (--allocation: this alone).
Part 2: values at 8 / 6 / 4 bits (rd, rate 0.5): plain rounding against error-compensated
(per layer and sequential).
Part 3: the smallest .rdonnx keeping test accuracy within 0.2 points (plain, --reconstruct,
--sequential).
Part 4: streaming: peak memory of reconstruction with 256 and 8192 calibration samples.
Part 5: a 25M-parameter model: reconstruction time against the R-D calibration alone.

Run: .venv/bin/python bench/reconstruct.py    (about 20 minutes on 2 cores; --values: part 2 alone;
--scale: parts 4 and 5 alone)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import rdonnx
from rdonnx.flow.config import CompressConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import codec  # noqa: E402
import rd  # noqa: E402

CALIB, TEST = ROOT / "models" / "digits_calib.npz", ROOT / "models" / "digits_test.npz"
GRID = (1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05)


def _run(path: Path, **settings) -> tuple[rdonnx.CompressResult, float]:
    config = CompressConfig.of(layer_distortion=False, grid=GRID, **settings)
    start = time.perf_counter()
    result = rdonnx.compress(path, calib=CALIB, test=TEST, labels="label", config=config)
    return result, time.perf_counter() - start


def masks(models: dict[str, Path]) -> None:
    print("| model | rate | allocation | nmse plain | nmse reconstructed (x less) | "
          "nmse sequential (x less) | nmse obs | nmse obs sequential | "
          "accuracy plain / reconstructed / sequential / obs / obs sequential | "
          "s plain / reconstructed / sequential / obs / obs sequential |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, path in models.items():
        for rate in (0.7, 0.5, 0.3):
            for method in ("uniform", "rd"):
                runs = [_run(path, rate=rate, method=method, format="dense", **extra)
                        for extra in ({}, {"reconstruct": True}, {"sequential": True},
                                      {"criterion": "obs"},
                                      {"criterion": "obs", "sequential": True})]
                nmse = [r.report.calibration.nmse for r, _ in runs]
                acc = " / ".join(f"{r.report.test.accuracy_compressed:.2%}" for r, _ in runs)
                secs = " / ".join(f"{s:.1f}" for _, s in runs)
                cut = [nmse[0] / max(v, 1e-12) for v in nmse]
                print(f"| {name} | {rate} | {method} | {nmse[0]:.4g} | {nmse[1]:.4g} "
                      f"({cut[1]:.1f}) | {nmse[2]:.4g} ({cut[2]:.1f}) | {nmse[3]:.4g} | "
                      f"{nmse[4]:.4g} | {acc} | {secs} |")


def allocation(models: dict[str, Path]) -> None:
    """Every allocator under --sequential (rd's curves then aim the next layer too)."""
    print("\n| model | rate | uniform | global | lamp | rd |")
    print("|---|---|---|---|---|---|")
    for name, path in models.items():
        for rate in (0.3, 0.2, 0.1):
            cells = []
            for method in ("uniform", "global", "lamp", "rd"):
                r = _run(path, rate=rate, method=method, format="dense", sequential=True)[0]
                cells.append(f"{r.report.calibration.nmse:.4g} / "
                             f"{r.report.test.accuracy_compressed:.2%}")
            print(f"| {name} | {rate} | {' | '.join(cells)} |")


def values(models: dict[str, Path]) -> None:
    print("\n| model | value bits | nmse rounded | nmse error-compensated | nmse error-compensated "
          "sequential | test nmse rounded / error-compensated / sequential | "
          "test accuracy rounded / error-compensated / sequential | "
          "test top-1 agreement rounded / error-compensated / sequential |")
    print("|---|---|---|---|---|---|---|---|")
    for name, path in models.items():
        for bits in (8, 6, 4):
            runs = [_run(path, rate=0.5, value_bits=bits, **extra)[0]
                    for extra in ({}, {"reconstruct": True}, {"sequential": True})]
            nmse = " | ".join(f"{r.report.calibration.nmse:.4g}" for r in runs)
            test = " / ".join(f"{r.report.test.nmse:.4g}" for r in runs)
            acc = " / ".join(f"{r.report.test.accuracy_compressed:.2%}" for r in runs)
            agree = " / ".join(f"{r.report.test.top1_agreement:.2%}" for r in runs)
            print(f"| {name} | {bits} | {nmse} | {test} | {acc} | {agree} |")


def streaming() -> None:
    print("\n| model | calibration samples | compress --reconstruct s | peak RSS MiB |")
    print("|---|---|---|---|")
    path = ROOT / "bench" / "out" / "conv32.onnx"
    rd._conv_model(path)
    for samples in (256, 8192):
        code = ("import resource, time, rdonnx\n"
                "from rdonnx.flow.config import CompressConfig\n"
                "from rdonnx.choices import DataOptions\n"
                "t = time.perf_counter()\n"
                f"rdonnx.compress(r'{path}', rate=0.5, config=CompressConfig.of(method='uniform', "
                f"reconstruct=True, format='dense', layer_distortion=False, replay_mb=16, "
                f"data=DataOptions(samples={samples}, batch_size=64)))\n"
                "print(time.perf_counter() - t, "
                "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                             text=True).stdout.split()
        print(f"| conv32 (3x32x32 inputs) | {samples} | {float(out[-2]):.1f} | "
              f"{int(out[-1]) / 1024:.0f} |")


def large() -> None:
    """25M parameters: R-D calibration (curves) alone against reconstruction alone."""
    from rdonnx.runtime.data import DataOptions

    print("\n| model | step | seconds |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m25.onnx"
        codec.synthetic_model(path, params=25_000_000)
        data = DataOptions(samples=64, batch_size=16)
        start = time.perf_counter()
        rdonnx.calibrate(path, config=CompressConfig.of(data=data, grid=GRID))
        curves = time.perf_counter() - start
        print(f"| synthetic 25M (5 MatMul) | R-D calibration, {len(GRID)}-point grid | "
              f"{curves:.1f} |")
        for flag in ("reconstruct", "sequential"):
            start = time.perf_counter()
            rdonnx.compress(path, rate=0.5, config=CompressConfig.of(
                method="uniform", format="dense", layer_distortion=False, data=data,
                **{flag: True}))
            rebuilt = time.perf_counter() - start
            print(f"| synthetic 25M (5 MatMul) | compress --{flag} (uniform 0.5) | "
                  f"{rebuilt:.1f} ({rebuilt / curves:.2f}x) |")


if __name__ == "__main__":
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    model_paths = rd.models()
    if sys.argv[1:] == ["--values"]:  # part 2 alone
        values(model_paths)
        sys.exit()
    if sys.argv[1:] == ["--allocation"]:  # part 1b alone
        allocation(model_paths)
        sys.exit()
    if sys.argv[1:] == ["--scale"]:  # memory and time on larger models alone
        streaming()
        large()
        sys.exit()
    masks(model_paths)
    allocation(model_paths)
    values(model_paths)
    codec.smallest(model_paths, (0.002, 0.005, 0.01, 0.02),
                   {"plain": {}, "--reconstruct": {"reconstruct": True},
                    "--sequential": {"sequential": True}}, grid=GRID)
    streaming()
    large()
