"""The `.rdonnx` artifact for users: write from a compress result, open in stock ONNX Runtime,
load as ONNX, decompress, inspect."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from rdonnx.algo.quantize import Quantized
from rdonnx.artifact.format import (
    CODED_LOCATION,
    encode_tensor,
    is_artifact,
    read_artifact,
    surp_entries,
    write_artifact,
)
from rdonnx.artifact.parallel import decode_all
from rdonnx.errors import UsageError
from rdonnx.graph.model import (
    Model,
    check_output,
    fit_ir_version,
    load_model,
    set_tensor,
    tensor_array,
    tensor_slots,
    uses_external_data,
    write_model,
)
from rdonnx.report.records import table
from rdonnx.runtime.session import CPU, import_onnxruntime, max_runtime_ir_version, ortvalue
from rdonnx.version import __version__


def container_graph(model: Model, coded: Sequence[str]) -> onnx.ModelProto:
    """The model with every coded tensor turned into a data-less main-graph initializer.

    Coded tensors held by Constant nodes or subgraph initializers move to the main graph
    (subgraphs see outer names), so ONNX Runtime can take them all as external initializers.
    Other tensors stored as external data are embedded.
    """
    proto = copy.deepcopy(model.proto)
    fit_ir_version(proto, max_runtime_ir_version())
    slots = tensor_slots(proto)
    for name, slot in slots.items():
        if name not in coded and slot.sparse is None and uses_external_data(slot.tensor):
            set_tensor(slot.tensor, tensor_array(model, slot.tensor))
    for name in coded:
        slot = slots[name]
        slot.detach()
        tensor = proto.graph.initializer.add()
        tensor.name, tensor.data_type = name, slot.tensor.data_type
        tensor.dims.extend(slot.dims)
        tensor.data_location = TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", CODED_LOCATION
    return proto


def save_artifact(model: Model, path: Path, quantized: Mapping[str, Quantized],
                  exact: Mapping[str, np.ndarray], settings: dict[str, Any],
                  metrics: dict[str, Any], surp: Any = None) -> tuple[int, list]:
    """Code `quantized` (levels + step) and `exact` tensors into an `.rdonnx` file.

    `surp` (a `rdonnx.artifact.surp_stream.Coded`): its pool's tensors (their decoded values in
    `exact`) are stored as one SuRP stream."""
    slots = tensor_slots(model.proto)
    coded = []
    pool = set() if surp is None else {t.name for t in surp.pool.tensors}
    for name in sorted((set(quantized) | set(exact)) - pool):
        slot = slots[name]
        if name in quantized:
            q = quantized[name]
            coded.append(encode_tensor(name, slot.tensor.data_type, slot.dims, q.q, q.step, None,
                                       q.codebook, q.axis, q.classes))
        else:
            coded.append(encode_tensor(name, slot.tensor.data_type, slot.dims, None, None,
                                       np.asarray(exact[name])))
    stream = None
    if surp is not None:
        coded.extend((e, b"", b"") for e in surp_entries(surp, exact))
        stream = (surp.stream.payload(), surp.manifest())
    graph = container_graph(model, [c[0].name for c in coded])
    size = write_artifact(path, graph, coded, settings, metrics, __version__, stream)
    return size, [c[0] for c in coded]


def open_session(path: str | os.PathLike, providers: Sequence[str] | None = None,
                 sess_options: Any = None, workers: int | None = None):
    """A stock `onnxruntime.InferenceSession` for an `.rdonnx` file.

    The weights are decoded in memory (by `workers` processes; None: one per core for
    artifacts of 16 MiB of weights or more) and handed over with
    `SessionOptions.add_external_initializers`; no dense file is written.
    """
    ort = import_onnxruntime()
    artifact = read_artifact(path)
    options = sess_options if sess_options is not None else ort.SessionOptions()
    dtypes = {e.name: e.dtype for e in artifact.tensors}
    names, values = [], []
    for name, value in decode_all(artifact, workers).items():
        names.append(name)
        values.append(ortvalue(value, TensorProto.DataType.Value(dtypes[name])))
    if names:
        options.add_external_initializers(names, values)
    session = ort.InferenceSession(artifact.graph.SerializeToString(), options,
                                   providers=list(providers or [CPU]))
    session._rdonnx_keepalive = values  # ORT borrows the buffers: keep them alive
    return session


def load(path: str | os.PathLike, workers: int | None = None) -> onnx.ModelProto:
    """The artifact as a dense in-memory `onnx.ModelProto` (models under 2 GB); `workers` as
    for `open_session`."""
    artifact = read_artifact(path)
    proto = artifact.graph
    slots = tensor_slots(proto)
    for name, value in decode_all(artifact, workers).items():
        tensor = slots[name].tensor
        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT
        set_tensor(tensor, value)
    return proto


def load_any(source: str | os.PathLike | onnx.ModelProto | bytes) -> Model:
    """`load_model` for callers that accept both: an `.rdonnx` artifact path reads as its
    decoded ONNX model, anything else as ONNX."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file() and \
            is_artifact(source):
        return Model(proto=load(source), path=Path(source))
    return load_model(source)


def decompress(path: str | os.PathLike, output: str | os.PathLike, format: str = "dense",
               force: bool = False, workers: int | None = None) -> int:
    """Write the artifact as plain ONNX (`dense`, or `sparse` initializers where smaller);
    `workers` as for `open_session`."""
    if format not in ("dense", "sparse"):
        raise UsageError(f"unknown format {format!r}; choose dense or sparse")
    output = Path(output)
    check_output(output, Path(path), force)
    artifact = read_artifact(path)
    model, values = Model(proto=artifact.graph), decode_all(artifact, workers)
    sparse = frozenset(values) if format == "sparse" else frozenset()
    return write_model(model, output, values, sparse, ir_version=max_runtime_ir_version())


@dataclass(frozen=True)
class ArtifactInspection:
    """What an `.rdonnx` file holds: settings, metrics and per-tensor bits."""

    path: str
    size: int
    manifest: dict[str, Any]

    def render(self) -> str:
        tensors = self.manifest["tensors"]
        rows = []
        for t in tensors:
            n = int(np.prod(t["shape"], dtype=np.int64)) or 1
            bits = t["bits"]
            total = bits["positions"] + bits["values"]
            rows.append((t["name"], "x".join(map(str, t["shape"])), t["encoding"],
                         f"{t['nnz'] / n:.2%}", f"{bits['positions'] / n:.3f}",
                         f"{bits['values'] / n:.3f}", f"{total / n:.3f}",
                         f"{bits['iid_entropy'] / n:.3f}", bits.get("positions_model", "-")))
        coded = sum(t["bits"]["positions"] + t["bits"]["values"] for t in tensors)
        params = sum(int(np.prod(t["shape"], dtype=np.int64)) for t in tensors)
        lines = [table(rows, ("tensor", "shape", "encoding", "kept", "pos bits/w",
                              "value bits/w", "bits/w", "iid bits/w", "positions model")), ""]
        lines.append(f"{self.path}: {self.size:,} bytes, format version "
                     f"{self.manifest['format_version']}, written by rdonnx "
                     f"{self.manifest['rdonnx_version']}")
        lines.append(f"coded tensors: {len(tensors)}, {params:,} values, "
                     f"{coded / max(params, 1):.3f} bits per value in coded streams")
        if any(t["encoding"] == "surp" for t in tensors):
            lines.append("surp: one shared stream; its bits are split over the pool's tensors "
                         "by kept count (positions = indices and refreshes, values = signs)")
        metrics = self.manifest.get("metrics", {})
        if metrics:
            lines.append("measured: " + ", ".join(f"{k} {v}" for k, v in sorted(metrics.items())
                                                  if v is not None))
        return "\n".join(lines)


def inspect_artifact(path: str | os.PathLike) -> ArtifactInspection:
    artifact = read_artifact(path)
    decode_all(artifact)  # verify every checksum and decode
    return ArtifactInspection(str(path), Path(path).stat().st_size, artifact.manifest)
