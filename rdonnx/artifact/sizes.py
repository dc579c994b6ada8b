"""What the coded artifact costs: bits per weight and sizes against the usual baselines."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import zstandard

from rdonnx.artifact.format import TensorEntry, encode_tensor
from rdonnx.graph.model import Model, write_model
from rdonnx.report.records import CodingReport
from rdonnx.runtime.session import max_runtime_ir_version

ZSTD_BASELINE_LIMIT = 256 * 2**20  # zstd -19 of larger dense models takes minutes: skipped


def stream_bits(quantized, values: np.ndarray) -> float:
    """Coded bits (positions + values streams) of one tensor, without writing anything."""
    if quantized is not None:
        entry, _, _ = encode_tensor("t", 1, quantized.q.shape, quantized.q, quantized.step, None,
                                    quantized.codebook, quantized.axis, quantized.classes)
    else:
        entry, _, _ = encode_tensor("t", 1, values.shape, None, None, np.asarray(values))
    return entry.bits["positions"] + entry.bits["values"]


def coding_report(source: Model, weights: Mapping[str, np.ndarray],
                  entries: Sequence[TensorEntry], prunable: set[str], artifact_bytes: int,
                  input_bytes: int) -> CodingReport:
    """Bits per prunable weight and the artifact's size against the pruned model (exact values)
    as dense ONNX + zstd -19 and as sparse ONNX."""
    mine = [e for e in entries if e.name in prunable]
    params = max(sum(e.size for e in mine), 1)
    ir_version = max_runtime_ir_version()
    with tempfile.TemporaryDirectory() as tmp:
        dense = Path(tmp) / "dense.onnx"
        dense_bytes = write_model(source, dense, dict(weights), ir_version=ir_version)
        sparse_bytes = write_model(source, Path(tmp) / "sparse.onnx", dict(weights),
                                   frozenset(weights), ir_version=ir_version)
        zstd_bytes = None
        if dense_bytes <= ZSTD_BASELINE_LIMIT and not Path(str(dense) + ".data").exists():
            zstd_bytes = len(zstandard.ZstdCompressor(level=19).compress(dense.read_bytes()))

    def per_weight(key: str) -> float:
        return sum(e.bits[key] for e in mine) / params

    return CodingReport(
        bits_per_weight=per_weight("positions") + per_weight("values"),
        positions_bits_per_weight=per_weight("positions"),
        values_bits_per_weight=per_weight("values"), side_bits_per_weight=per_weight("side"),
        iid_entropy_bits_per_weight=per_weight("iid_entropy"),
        artifact_bits_per_weight=8 * artifact_bytes / params, artifact_bytes=artifact_bytes,
        dense_bytes=dense_bytes, dense_zstd19_bytes=zstd_bytes, sparse_bytes=sparse_bytes,
        smaller_than_original=input_bytes / artifact_bytes,
        smaller_than_dense_zstd19=None if zstd_bytes is None else zstd_bytes / artifact_bytes,
        smaller_than_sparse=sparse_bytes / artifact_bytes)
