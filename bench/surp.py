"""SuRP encode / decode speed and quality on one core.

A synthetic model of a few large MatMul layers (Laplace weights, about 25M float32 by default)
is coded with `--method surp`'s encoder to each rate; the table gives the encode and decode
seconds, the coded bits per weight (indices + refresh counts + signs + chunk headers, plus the
side information) and the relative L2 weight error against magnitude pruning with exact values
at the same number of nonzeros.

    .venv/bin/python bench/surp.py [--weights 25000000] [--rates 0.1,0.05,0.2]

Measured on a shared 2-core machine, one thread (load average 1.2-1.9 while it ran; another
process had the second core). Encode is well under 10 minutes at 25M weights:

| weights | rate | steps | encode s | decode s | bits/weight | rel. L2 SuRP | rel. L2 magnitude |
|---|---|---|---|---|---|---|---|
| 25,000,000 | 0.1 | 2,500,002 | 130.5 | 3.2 | 1.1095 | 0.6374 | 0.6362 |
| 25,000,000 | 0.05 | 1,250,001 | 64.2 | 1.3 | 0.5817 | 0.7598 | 0.7589 |
| 25,000,000 | 0.2 | 5,000,004 | 254.0 | 4.9 | 2.2257 | 0.4716 | 0.4681 |

(rate 0.1 at load 0.5-0.9: 99.1 s encode, 2.1 s decode.)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from rdonnx.artifact import surp_stream as surp
from rdonnx.codec import surp as codec

IR_VERSION = 8
OPSET = 17


def synthetic(weights: int, layers: int = 4, seed: int = 0) -> onnx.ModelProto:
    """`layers` square MatMuls of about weights / layers entries each, Laplace(0, 0.02)."""
    d = int(round((weights / layers) ** 0.5))
    rng = np.random.default_rng(seed)
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        w = rng.laplace(0.0, 0.02, (d, d)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "surp_bench",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, d])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def relative_error(arrays: dict[str, np.ndarray], approx: dict[str, np.ndarray]) -> float:
    num = sum(float(np.sum((arrays[n].astype(np.float64) - approx[n]) ** 2)) for n in arrays)
    den = sum(float(np.sum(arrays[n].astype(np.float64) ** 2)) for n in arrays)
    return (num / den) ** 0.5


def magnitude(arrays: dict[str, np.ndarray], nnz: int) -> dict[str, np.ndarray]:
    """Global magnitude pruning to `nnz` nonzeros, exact values."""
    flat = np.concatenate([np.abs(a).ravel() for a in arrays.values()])
    cut = np.partition(flat, flat.size - nnz)[flat.size - nnz] if nnz else np.inf
    return {n: np.where(np.abs(a) >= cut, a, 0) for n, a in arrays.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=int, default=25_000_000)
    parser.add_argument("--rates", default="0.1")
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    print(f"load average before: {os.getloadavg()}", flush=True)
    model = synthetic(args.weights)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    names = list(arrays)
    n = sum(a.size for a in arrays.values())
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        start = time.perf_counter()
        coded = surp.encode(arrays, names, seed=0, nnz=round(rate * n))
        encode_s = time.perf_counter() - start
        start = time.perf_counter()
        decoded = codec.decode(coded.stream)
        values = coded.pool.values(decoded.uhat, decoded.negative)
        decode_s = time.perf_counter() - start
        bits = coded.stream.bits + surp.side_bits(coded.pool, coded.stream)
        err = relative_error(arrays, values)
        base = relative_error(arrays, magnitude(arrays, decoded.nnz))
        rows.append(f"| {n:,} | {rate:g} | {coded.stream.steps:,} | {encode_s:.1f} | "
                    f"{decode_s:.1f} | {bits / n:.4f} | {err:.4f} | {base:.4f} |")
        print(rows[-1], flush=True)
    print(f"load average after: {os.getloadavg()}")
    print("\n| weights | rate | steps | encode s | decode s | bits/weight | rel. L2 error "
          "SuRP | rel. L2 error magnitude (exact values) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
