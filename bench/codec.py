"""The entropy-coded artifact: sizes, bits per weight, coding speed, open_session time.

Part 1, the bundled models through `rdonnx compress` (rd, 8-bit values) at several rates:
artifact size against the original, dense ONNX + zstd -19 and sparse ONNX of the same pruned
model, bits per prunable weight against the i.i.d. entropy, test accuracy.
Part 2, a synthetic 50M-parameter MatMul model (Laplacian weights, magnitude-pruned, 8-bit):
the codec alone, encode / decode throughput in MB of original fp32 weights per second in one
process and with the automatic worker processes (one per core), and `open_session` (automatic
workers) against `InferenceSession` on the decompressed ONNX (decode and both opens: best of 3).
Part 3, the smallest artifact at unchanged test accuracy (within 0.2 points).
Part 4, the value quantizers: the uniform grid against activation-weighted k-means (rd, rate
0.3, 4 and 3 bits, magnitude and activation criteria).

Run: .venv/bin/python bench/codec.py    (about 10 minutes on 2 cores; --quick skips part 2;
--synthetic runs part 2 alone, --quantizers part 4 alone)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import zstandard
from onnx import TensorProto, helper, numpy_helper

import rdonnx
from rdonnx.algo.prune import prune
from rdonnx.algo.quantize import quantize
from rdonnx.artifact.format import read_artifact
from rdonnx.artifact.parallel import decode_all, worker_count
from rdonnx.flow.config import CompressConfig
from rdonnx.graph.model import load_model, write_model

ROOT = Path(__file__).resolve().parent.parent
CALIB, TEST = ROOT / "models" / "digits_calib.npz", ROOT / "models" / "digits_test.npz"
RATES = (0.5, 0.2, 0.1, 0.05)


def bundled() -> None:
    print("| model | rate | values | .rdonnx B | original B | dense+zstd-19 B | sparse B | "
          "x original | x zstd-19 | x sparse | bits/weight | iid bits/weight | test acc |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("digits_mlp", "digits_cnn"):
            model = ROOT / "models" / f"{name}.onnx"
            for rate in RATES:
                config = CompressConfig.of(value_bits=8, layer_distortion=False)
                result = rdonnx.compress(model, rate=rate, calib=CALIB, test=TEST,
                                         labels="label", config=config)
                result.save(Path(tmp) / "a.rdonnx", force=True)
                c, t = result.report.coding, result.report.test
                print(f"| {name} | {rate} | 8-bit | {c.artifact_bytes:,} | "
                      f"{result.report.input_bytes:,} | {c.dense_zstd19_bytes:,} | "
                      f"{c.sparse_bytes:,} | {c.smaller_than_original:.1f} | "
                      f"{c.smaller_than_dense_zstd19:.2f} | {c.smaller_than_sparse:.2f} | "
                      f"{c.bits_per_weight:.3f} | {c.iid_entropy_bits_per_weight:.3f} | "
                      f"{t.accuracy_compressed:.2%} ({t.accuracy_original:.2%}) |")


def synthetic_model(path: Path, params: int = 50_000_000) -> None:
    """MatMul chain of 5000x2000 Laplacian weights (5 layers = 50M parameters)."""
    rng = np.random.default_rng(0)
    width, height = 2000, params // 5 // 2000
    nodes, inits, prev = [], [], "x"
    for i in range(5):
        w = rng.laplace(0, 0.02, size=(width if i % 2 == 0 else height,
                                       height if i % 2 == 0 else width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"y{i}"]))
        prev = f"y{i}"
    out_dim = height if 5 % 2 == 1 else width
    graph = helper.make_graph(
        nodes, "synthetic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, out_dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def best_of_each(runs: int, *calls) -> list[float]:
    """The shortest wall time of each call over `runs` rounds of all of them in turn (steady
    state, as speed benchmarks report; a busy spell on the machine favours none of them)."""
    best = [float("inf")] * len(calls)
    for _ in range(runs):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def synthetic() -> None:
    """Codec throughput (one process, then automatic workers) and open_session time on 50M
    parameters."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    workers = worker_count(None)
    print(f"\n| 50M-param model | rate | bits/weight | iid bits/weight | encode MB/s | decode "
          f"MB/s | decode MB/s, {workers} processes | .rdonnx MB | dense+zstd-19 MB | x zstd-19 "
          f"| open_session s | InferenceSession(decompressed) s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.onnx"
        synthetic_model(path)
        model = load_model(path)
        weights = {t.name: numpy_helper.to_array(t) for t in model.proto.graph.initializer}
        megabytes = sum(w.nbytes for w in weights.values()) / 1e6
        for rate in RATES:
            quantized = {n: quantize(prune(w, int(round(rate * w.size))), 8)
                         for n, w in weights.items()}
            values = {n: q.values(np.float32) for n, q in quantized.items()}
            from rdonnx.artifact.io import save_artifact

            art = Path(tmp) / "s.rdonnx"
            start = time.perf_counter()
            _, entries = save_artifact(model, art, quantized, {}, {}, {})
            encode = time.perf_counter() - start
            artifact = read_artifact(art)
            decode, parallel = best_of_each(3, lambda a=artifact: decode_all(a, workers=1),
                                            lambda a=artifact: decode_all(a, workers=workers))
            bits = sum(e.bits["positions"] + e.bits["values"] for e in entries)
            iid = sum(e.bits["iid_entropy"] for e in entries)
            n = sum(w.size for w in weights.values())
            dense = Path(tmp) / "dense.onnx"
            write_model(model, dense, {n: prune(w, int(round(rate * w.size)))
                                       for n, w in weights.items()})
            zstd = len(zstandard.ZstdCompressor(level=19, threads=2).compress(dense.read_bytes()))
            decompressed = Path(tmp) / "decompressed.onnx"
            rdonnx.decompress(art, decompressed, force=True)
            import onnxruntime as ort

            open_s, plain_s = best_of_each(
                3, lambda a=art: rdonnx.open_session(a),
                lambda d=str(decompressed): ort.InferenceSession(
                    d, providers=["CPUExecutionProvider"]))
            size = art.stat().st_size
            print(f"| synthetic | {rate} | {bits / n:.3f} | {iid / n:.3f} | "
                  f"{megabytes / encode:.0f} | {megabytes / decode:.0f} | "
                  f"{megabytes / parallel:.0f} | {size / 1e6:.2f} | {zstd / 1e6:.2f} | "
                  f"{zstd / size:.2f} | {open_s:.2f} | {plain_s:.2f} | {open_s / plain_s:.2f} |")
            del values


def smallest(models: dict[str, Path], bounds: tuple[float, ...],
             variants: dict[str, dict], **settings) -> None:
    """--max-distortion searches (density and value bits chosen together), per settings
    variant, and the test accuracy they keep."""
    print("\n| model | settings | --max-distortion | rate | values | .rdonnx B | x original | "
          "test accuracy (original) | within 0.2 points |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            for label, extra in variants.items():
                for bound in bounds:
                    config = CompressConfig.of(layer_distortion=False, **settings, **extra)
                    result = rdonnx.compress(model, max_distortion=bound, calib=CALIB,
                                             test=TEST, labels="label", config=config)
                    result.save(Path(tmp) / "a.rdonnx", force=True)
                    r = result.report
                    kept = r.test.accuracy_compressed >= r.test.accuracy_original - 0.002
                    print(f"| {name} | {label} | {bound} | {r.rate:.3f} | {_widths(r)} | "
                          f"{r.coding.artifact_bytes:,} | {r.coding.smaller_than_original:.1f} "
                          f"| {r.test.accuracy_compressed:.2%} ({r.test.accuracy_original:.2%}) "
                          f"| {'yes' if kept else 'no'} |")


def _widths(report) -> str:
    widths = [w.value_bits for w in report.weights]
    return f"{widths[0]}-bit" if len(set(widths)) == 1 else "/".join(map(str, widths)) + " bits"


def quantizers() -> None:
    """Uniform grid against activation-weighted k-means at the same width and mask."""
    print("\n| model | criterion | value bits | quantizer | nmse (calib) | test accuracy | "
          "coded bits/weight |")
    print("|---|---|---|---|---|---|---|")
    for name in ("digits_mlp", "digits_cnn"):
        for criterion in ("magnitude", "activation"):
            for bits in (4, 3):
                for quantizer in ("uniform", "kmeans"):
                    config = CompressConfig.of(rate=0.3, criterion=criterion, value_bits=bits,
                                            quantizer=quantizer, layer_distortion=False)
                    result = rdonnx.compress(ROOT / "models" / f"{name}.onnx", calib=CALIB,
                                             test=TEST, labels="label", config=config)
                    with tempfile.TemporaryDirectory() as tmp:
                        result.save(Path(tmp) / "q.rdonnx")
                    r = result.report
                    print(f"| {name} | {criterion} | {bits} | {quantizer} | "
                          f"{r.calibration.nmse:.4g} | {r.test.accuracy_compressed:.2%} | "
                          f"{r.coding.bits_per_weight:.3f} |")


if __name__ == "__main__":
    if "--quantizers" in sys.argv:
        quantizers()
        sys.exit()
    if "--synthetic" in sys.argv:
        synthetic()
        sys.exit()
    bundled()
    if "--quick" not in sys.argv:
        synthetic()
    smallest({n: ROOT / "models" / f"{n}.onnx" for n in ("digits_mlp", "digits_cnn")},
             (0.002, 0.005, 0.01, 0.02, 0.05), {"default": {}})
    quantizers()
