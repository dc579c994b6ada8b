"""R-D allocation against the baselines, on the bundled models and the benchmark transformer.

For each model and in-layer criterion, curves are calibrated once and reused at every rate;
every method is measured on the calibration data (output distortion) and the test data
(accuracy). Also: calibration time, probes per second against plain forward passes, and peak
memory for two calibration-set sizes; and, on the three-weight MLP, the best distortion any
per-layer allocation reaches (exhaustive search). Prints Markdown tables, writes
docs/rd_<model>.png.

Run: .venv/bin/python bench/rd.py     (a few minutes on 2 cores; --optimum: the search alone)
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import rdonnx
from rdonnx.allocate.allocators import SOLVERS, Allocation, predicted
from rdonnx.flow.calibration import calibrate_model
from rdonnx.flow.config import CompressConfig
from rdonnx.flow.pipeline import make_realizer, measure_all_curves
from rdonnx.report.plot import plot_methods

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
        config = CompressConfig.of(criterion=criterion, layer_distortion=False, format="dense")
        start = time.perf_counter()
        cal = calibrate_model(path, config, CALIB)
        curves = _curves(cal, config)
        seconds = time.perf_counter() - start
        probes = len(cal.weights) * (len(curves.grid) - 1)
        timing[criterion] = (seconds, _probe_seconds(cal, config) / probes,
                             _forward_seconds(cal))
        if criterion == "magnitude":
            timing["solvers"] = _solvers(cal, curves)
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


def _solvers(cal, curves) -> list[tuple[float, str, float, float, float]]:
    """Lagrangian vs DP on the same curves: predicted distortion, achieved rate, time."""
    allocation = Allocation({n: s.values for n, s in cal.scores.items()},
                            {n: curves.curve(n) for n in curves.distortion})
    out = []
    for rate in RATES:
        for name, solver in SOLVERS.items():
            start = time.perf_counter()
            keep = solver(allocation, rate)
            seconds = time.perf_counter() - start
            out.append((rate, name, predicted(allocation, keep), seconds,
                        sum(keep.values()) / sum(w.size for w in cal.weights)))
    return out


def _forward_seconds(cal) -> float:
    """One plain forward pass over all calibration batches (best of 5)."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for feed, _ in cal.replay:
            cal.runner.run(feed)
        best = min(best, time.perf_counter() - start)
    return best


def _curves(cal, config):
    return measure_all_curves(make_realizer(cal, config), config.measure,
                              config.curve_settings())


def _probe_seconds(cal, config) -> float:
    """The curves' probe loop alone (every weight x grid density over all batches; best of 3,
    steady state like the forward passes it is compared with)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        _curves(cal, config)
        best = min(best, time.perf_counter() - start)
    return best


def _conv_model(path: Path) -> None:
    """A convolutional model with 3x32x32 inputs (12 KiB a sample) for the memory check."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.2, n)
             for n, s in (("w1", (16, 3, 3, 3)), ("w2", (16, 16, 3, 3)), ("w3", (16, 10)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w2"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["c"], ["d"]),
             helper.make_node("Flatten", ["d"], ["e"]),
             helper.make_node("MatMul", ["e", "w3"], ["y"])]
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def memory() -> list[tuple[int, float, float]]:
    """Peak RSS of calibration with 256 and 8192 synthetic samples (fresh processes).

    The replay keeps 16 MiB in memory (--replay-mb 16); 8192 samples are 96 MiB of inputs.
    """
    path = ROOT / "bench" / "out" / "conv32.onnx"
    _conv_model(path)
    out = []
    for samples in (256, 8192):
        cmd = [sys.executable, "-c", (
            "import resource,time,rdonnx;"
            "from rdonnx import CompressConfig, DataOptions;"
            "t=time.perf_counter();"
            f"rdonnx.calibrate(r'{path}', config=CompressConfig.of(data=DataOptions("
            f"samples={samples}, batch_size=64), grid=(1.0, 0.5), replay_mb=16));"
            "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")]
        seconds, peak = subprocess.run(cmd, check=True, capture_output=True, text=True) \
            .stdout.split()[-2:]
        out.append((samples, float(seconds), int(peak) / 1024))
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
    print("\n| model | criterion | calibration s (reference + curves) | one probe ms | "
          "one forward pass ms | probe / forward |")
    print("|---|---|---|---|---|---|")
    for name, per in timings.items():
        for criterion, (seconds, probe, forward) in ((c, v) for c, v in per.items()
                                                     if c != "solvers"):
            print(f"| {name} | {criterion} | {seconds:.2f} | {1000 * probe:.2f} | "
                  f"{1000 * forward:.2f} | {probe / forward:.2f}x |")
    print("\n(a probe = one pruned variant run over all 256 calibration samples, a forward pass "
          "= the same samples through the original model)")
    print("\n| model | rate | solver | predicted nmse | rate met | solve ms |")
    print("|---|---|---|---|---|---|")
    for name, per in timings.items():
        for rate, solver, value, seconds, achieved in per["solvers"]:
            print(f"| {name} | {rate} | {solver} | {value:.4g} | {achieved:.4f} | "
                  f"{1000 * seconds:.2f} |")
    print("\n| model | calibration samples | calibrate s | peak RSS MiB |")
    print("|---|---|---|---|")
    for samples, seconds, peak in memory():
        print(f"| conv32 (3x32x32 inputs, --replay-mb 16) | {samples} | {seconds:.1f} | "
              f"{peak:.0f} |")
    optimum(ROOT / "models" / "digits_mlp.onnx")
    print(f"\nbench peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def optimum(path: Path, rates=(0.5, 0.3, 0.2)) -> None:
    """Exhaustive search over the per-weight densities of a three-weight model (first weight in
    steps of 64 kept entries, last in steps of 16, the middle one taking the rest of the rate):
    the lowest measured distortion any per-layer allocation reaches, against rd and LAMP."""
    print("\n| model | criterion | rate | best measured allocation: nmse (densities) | rd | lamp "
          "| rd / optimum | optimum / lamp |")
    print("|---|---|---|---|---|---|---|---|")
    for criterion in CRITERIA:
        config = CompressConfig.of(criterion=criterion, layer_distortion=False, format="dense")
        cal = calibrate_model(path, config, CALIB)
        curves, realizer = _curves(cal, config), make_realizer(cal, config)
        first, middle, last = cal.weights
        total = first.size + middle.size + last.size
        for rate in rates:
            kept, best = int(round(rate * total)), None
            for k3 in range(0, last.size + 1, 16):
                for k1 in range(0, first.size + 1, 64):
                    k2 = kept - k1 - k3
                    if not 0 <= k2 <= middle.size:
                        continue
                    keep = {first.name: k1, middle.name: k2, last.name: k3}
                    values = {w.name: realizer.compress_weight(w, keep[w.name])[0]
                              for w in cal.weights}
                    nmse = realizer.distortion(values).nmse
                    if best is None or nmse < best[0]:
                        best = (nmse, k1 / first.size, k2 / middle.size, k3 / last.size)
            rd_, lamp = (rdonnx.compress(path, rate=rate, method=m, calib=CALIB, curves=curves,
                                         config=config).report.calibration.nmse
                         for m in ("rd", "lamp"))
            print(f"| {path.stem} | {criterion} | {rate} | {best[0]:.4g} ({best[1]:.3f} / "
                  f"{best[2]:.3f} / {best[3]:.3f}) | {rd_:.4g} | {lamp:.4g} | "
                  f"{rd_ / best[0]:.2f} | {best[0] / lamp:.2f} |")


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
    if sys.argv[1:] == ["--optimum"]:  # the exhaustive search alone
        optimum(ROOT / "models" / "digits_mlp.onnx")
    else:
        main()
