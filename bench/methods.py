"""Every method side by side: uniform, global, lamp, rd, surp, pqi (per weight and per output
row), hsic, gao.

On the bundled MLP and CNN and the benchmark transformer, at rates 0.5 / 0.2 / 0.1 / 0.05, each
method compresses to an `.rdonnx` artifact with its default settings (magnitude criterion,
values quantized to the fewest bits within the value budget; SuRP's values are its threshold
staircase; gao uses activation scores and activation-weighted k-means). Reported: output
distortion on the calibration data, test accuracy, coded bits per prunable weight (positions +
values) and the whole file per prunable weight, wall time of the whole compress call (curves
included for rd). Prints a Markdown table and writes docs/methods_<model>.png (nmse against
bits per weight).

Run: .venv/bin/python bench/methods.py    (about 15 minutes on 2 cores)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import rdonnx
from rdonnx.flow.config import CompressConfig
from rdonnx.report.plot import plot_methods

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import rd  # noqa: E402

METHODS = ("uniform", "global", "lamp", "rd", "surp", "pqi", "pqi-neuron", "hsic", "gao")
RATES = (0.5, 0.2, 0.1, 0.05)
CALIB, TEST = ROOT / "models" / "digits_calib.npz", ROOT / "models" / "digits_test.npz"


def run(path: Path, method: str, rate: float) -> tuple:
    """One compress call to an .rdonnx file: (nmse, accuracy, coded bits/w, file bits/w, s).

    `pqi-neuron` is `--method pqi --granularity neuron`."""
    method, _, granularity = method.partition("-")
    config = CompressConfig.of(rate=rate, method=method, granularity=granularity or "layer",
                            layer_distortion=False)
    start = time.perf_counter()
    result = rdonnx.compress(path, calib=CALIB, test=TEST, labels="label", config=config)
    with tempfile.TemporaryDirectory() as tmp:
        result.save(Path(tmp) / "out.rdonnx")
    seconds = time.perf_counter() - start
    r = result.report
    return (r.calibration.nmse, r.test.accuracy_compressed, r.test.accuracy_original,
            r.coding.bits_per_weight, r.coding.artifact_bits_per_weight, seconds)


def main() -> None:
    print("| model | method | rate | nmse (calib) | test accuracy (original) | coded bits/w | "
          "file bits/w | s |")
    print("|---|---|---|---|---|---|---|---|")
    results: dict[tuple[str, str, float], tuple] = {}
    for name, path in rd.models().items():
        series: dict[str, list[tuple[float, float]]] = {}
        for method in METHODS:
            for rate in RATES:
                row = results[name, method, rate] = run(path, method, rate)
                nmse, acc, acc0, bits, file_bits, seconds = row
                print(f"| {name} | {method} | {rate} | {nmse:.4g} | {acc:.2%} ({acc0:.2%}) | "
                      f"{bits:.3f} | {file_bits:.3f} | {seconds:.1f} |", flush=True)
                series.setdefault(method, []).append((bits, max(nmse, 1e-6)))
        plot_methods(series, ROOT / "docs" / f"methods_{name}.png",
                     "nmse on the calibration data", f"{name}: every method",
                     xlabel="coded bits per prunable weight")
    models = list(dict.fromkeys(k[0] for k in results))
    for title, cell in (("nmse on the calibration data / test accuracy",
                         lambda r: f"{r[0]:.3g} / {r[1]:.1%}"),
                        ("coded bits per prunable weight", lambda r: f"{r[3]:.2f}")):
        print(f"\n{title}, lowest nmse in bold\n")
        print("| model | rate | " + " | ".join(METHODS) + " |")
        print("|---|---|" + "---|" * len(METHODS))
        for name in models:
            for rate in RATES:
                best = min(METHODS, key=lambda m: results[name, m, rate][0])
                cells = [cell(results[name, m, rate]) for m in METHODS]
                cells = [f"**{c}**" if m == best else c for m, c in zip(METHODS, cells)]
                print(f"| {name} | {rate} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
