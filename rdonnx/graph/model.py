"""Load and save ONNX models: external data, > 2 GB models, IR version, simplification.

A `Model` keeps the protobuf with external tensors left on disk (never one protobuf over
2 GB in memory); tensor values are read lazily with `tensor_array`.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from rdonnx.errors import UsageError
from rdonnx.fs import atomic_output
from rdonnx.outputs import check_target, probe_writable

# Above this many bytes of tensor data a model is written with external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass
class Model:
    """An ONNX model whose externally stored tensors stay on disk until read."""

    proto: onnx.ModelProto
    base_dir: Path | None = None  # folder of the external data files, if any
    path: Path | None = None  # where it was read from


def load_model(source: str | os.PathLike | onnx.ModelProto | bytes) -> Model:
    """Read an ONNX model from a path, bytes or a ModelProto, without loading external data.

    (`rdonnx.artifact.io.load_any` also accepts `.rdonnx` artifacts.)"""
    if isinstance(source, onnx.ModelProto):
        return Model(proto=source)
    if isinstance(source, bytes):
        return Model(proto=_parse(source, "the given bytes"))
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"model file not found: {path}")
    with open(path, "rb") as f:
        proto = _parse(f.read(), str(path))
    return Model(proto=proto, base_dir=path.parent, path=path)


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise UsageError(f"{what} is not a valid ONNX model ({exc}); pass an .onnx file") from None
    if not proto.graph.node or not proto.opset_import:
        raise UsageError(f"{what} is not a valid ONNX model (no graph nodes or opset); "
                         "pass an .onnx file")
    return proto


def check_output(path: Path, source: Path | None, force: bool) -> None:
    """Refuse, before any work, an output that would overwrite the input, replace a file
    without `force`, or cannot be written."""
    if source is not None and path.exists() and path.resolve() == Path(source).resolve():
        raise UsageError(f"output {path} is the input model; choose another -o")
    check_target(path)  # not a device node, FIFO, socket or `-`, even with --force
    if path.is_dir():
        raise UsageError(f"output {path} is a folder; give a file name")
    if path.exists() and not force:
        raise UsageError(f"output {path} exists; pass --force to replace it")
    if not path.parent.is_dir():
        raise UsageError(f"output folder does not exist: {path.parent}; create it first")
    if not os.access(path.parent, os.W_OK):
        raise UsageError(f"output folder is not writable: {path.parent}; choose another -o")
    probe_writable(path)  # e.g. /proc or a read-only mount: fail now, not after the work


def tensor_array(model: Model, tensor: TensorProto) -> np.ndarray:
    """The value of `tensor`, reading external data from the model's folder when needed."""
    base = str(model.base_dir) if model.base_dir is not None else ""
    if uses_external_data(tensor) and not base:
        raise UsageError(f"tensor {tensor.name!r} has external data but the model's folder is "
                         "unknown; load the model from its path")
    try:
        return numpy_helper.to_array(tensor, base)
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise UsageError(f"cannot read tensor {tensor.name!r}: {exc}") from None


def uses_external_data(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph nested in its nodes' attributes (If, Loop, Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graphs(sub)


def tensor_bytes(model: Model) -> int:
    """Bytes of tensor data in the model, external data included."""
    total = 0
    for graph in iter_graphs(model.proto.graph):
        for t in graph.initializer:
            total += _data_size(t)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    total += _data_size(attr.t)
    return total


def _data_size(t: TensorProto) -> int:
    if uses_external_data(t):
        return int(next((e.value for e in t.external_data if e.key == "length"), 0))
    return t.ByteSize()


def fit_ir_version(proto: onnx.ModelProto, newest: int) -> None:
    """Lower the IR version in place to `newest` (the runtime's: the caller knows it)."""
    proto.ir_version = min(proto.ir_version or onnx.IR_VERSION, newest)


def simplify(model: Model) -> tuple[Model, str | None]:
    """Run onnxsim; returns the simplified model, or the input and a notice when it fails."""
    if any(uses_external_data(t) for g in iter_graphs(model.proto.graph) for t in g.initializer):
        return model, "onnxsim skipped: the model keeps its weights in external data"
    if model.proto.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        return model, "onnxsim skipped: the model is too large for an in-memory protobuf"
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(copy.deepcopy(model.proto))
    except Exception as exc:  # noqa: BLE001 - onnxsim fails in many ways; fall back
        return model, f"onnxsim failed ({type(exc).__name__}: {str(exc)[:200]}); continuing " \
                      "with the model as given"
    if not ok:
        return model, "onnxsim could not validate its result; continuing with the model as given"
    for field in ("ir_version", "producer_name", "producer_version", "domain",
                  "model_version", "doc_string"):
        setattr(simplified, field, getattr(model.proto, field))
    del simplified.metadata_props[:]
    simplified.metadata_props.extend(model.proto.metadata_props)
    simplified.graph.doc_string = model.proto.graph.doc_string
    return Model(proto=simplified, base_dir=model.base_dir, path=model.path), None


@dataclass
class TensorSlot:
    """Where a named constant tensor lives: a graph's initializer or a Constant node's value."""

    graph: onnx.GraphProto
    tensor: TensorProto  # for a sparse initializer: its values
    node: onnx.NodeProto | None = None  # the Constant node, when it holds the tensor
    sparse: onnx.SparseTensorProto | None = None  # when a sparse_initializer holds it

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(int(d) for d in (self.sparse.dims if self.sparse else self.tensor.dims))

    def detach(self) -> None:
        """Remove the tensor from where it lives in its graph."""
        if self.node is not None:
            self.graph.node.remove(self.node)
        elif self.sparse is not None:
            self.graph.sparse_initializer.remove(self.sparse)
        else:
            self.graph.initializer.remove(self.tensor)


def tensor_slots(proto: onnx.ModelProto) -> dict[str, TensorSlot]:
    """Every initializer (dense or sparse) and Constant-node tensor, subgraphs included."""
    slots: dict[str, TensorSlot] = {}
    for graph in iter_graphs(proto.graph):
        for t in graph.initializer:
            slots[t.name] = TensorSlot(graph, t)
        for sp in graph.sparse_initializer:
            slots[sp.values.name] = TensorSlot(graph, sp.values, sparse=sp)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        slots[node.output[0]] = TensorSlot(graph, attr.t, node)
    return slots


def slot_array(model: Model, slot: TensorSlot) -> np.ndarray:
    """The dense value of a slot (sparse initializers expanded)."""
    if slot.sparse is None:
        return tensor_array(model, slot.tensor)
    values = tensor_array(model, slot.sparse.values)
    indices = numpy_helper.to_array(slot.sparse.indices).astype(np.int64)
    dense = np.zeros(slot.dims, dtype=values.dtype)
    flat = indices if indices.ndim == 1 else np.ravel_multi_index(indices.T, slot.dims)
    dense.reshape(-1)[flat] = values
    return dense


def set_tensor(tensor: TensorProto, array: np.ndarray) -> None:
    """Replace the data of `tensor` in place, keeping its name and data type."""
    tensor.CopyFrom(numpy_helper.from_array(_as_type(array, tensor.data_type), tensor.name))


def _as_type(array: np.ndarray, data_type: int) -> np.ndarray:
    return np.asarray(array).astype(onnx.helper.tensor_dtype_to_np_dtype(data_type), copy=False)


def write_model(model: Model, path: Path, replace: dict[str, np.ndarray] | None = None,
                sparse: frozenset[str] = frozenset(), *, ir_version: int | None = None) -> int:
    """Write `model` with the tensors in `replace` swapped in; returns the bytes written.

    Small models become one self-contained file. Models whose tensor data exceed
    `EXTERNAL_DATA_THRESHOLD` are streamed tensor by tensor into `<name>.data` beside the model,
    so no protobuf over 2 GB is ever built. The names in `sparse` are stored as
    `sparse_initializer` when that is smaller. `ir_version`: the newest IR version the
    model may declare (`fit_ir_version`; None keeps it). Writes to temporary files and renames.
    """
    replace = replace or {}
    proto = copy.deepcopy(model.proto)
    if ir_version is not None:
        fit_ir_version(proto, ir_version)
    slots = tensor_slots(proto)
    external = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"output folder does not exist: {folder}; create it first")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"output folder is not writable: {folder}; choose another -o")
    data_name = path.name + ".data"
    with contextlib.ExitStack() as outputs:  # the data file is renamed first, then the model
        tmp_model = outputs.enter_context(atomic_output(path))
        tmp_data = outputs.enter_context(atomic_output(folder / data_name)) if external else None
        for name in replace:  # replaced sparse initializers become dense ones first
            slot = slots[name]
            if slot.sparse is not None:
                slot.detach()
                dense = slot.graph.initializer.add()
                dense.name, dense.data_type = name, slot.tensor.data_type
                slots[name] = TensorSlot(slot.graph, dense)
        if external:
            with open(tmp_data, "wb") as data_file:
                for name, slot in slots.items():
                    if slot.sparse is not None or (
                            name in sparse and slot.node is None and name in replace and
                            _sparse_is_smaller(replace[name], slot.tensor.data_type)):
                        continue  # stored sparse, inline
                    _to_external(model, slot.tensor, replace.get(name), data_file, data_name)
        else:
            for name, slot in slots.items():
                if slot.sparse is not None:
                    continue
                if name in replace:
                    set_tensor(slot.tensor, replace[name])
                elif uses_external_data(slot.tensor):
                    set_tensor(slot.tensor, tensor_array(model, slot.tensor))
                    del slot.tensor.external_data[:]
                    slot.tensor.data_location = TensorProto.DEFAULT
        for name in sorted(sparse):
            slot = slots[name]
            if slot.node is None and name in replace:
                _make_sparse_if_smaller(slot.graph, slot.tensor, replace[name])
        try:
            payload = proto.SerializeToString(deterministic=True)
        except ValueError as exc:
            raise UsageError(f"the output model is too large for one protobuf ({exc}); "
                             "use --format dense") from None
        tmp_model.write_bytes(payload)
    size = path.stat().st_size
    return size + ((folder / data_name).stat().st_size if external else 0)


def _to_external(model: Model, tensor: TensorProto, array: np.ndarray | None, data_file,
                 location: str) -> None:
    """Move one tensor's data into the open data file (page-aligned) and point to it."""
    if array is None and not uses_external_data(tensor) and tensor.ByteSize() < 1024:
        return
    if array is None:
        array = tensor_array(model, tensor)
    blob = numpy_helper.from_array(_as_type(array, tensor.data_type)).raw_data
    offset = -data_file.tell() % 4096 + data_file.tell()
    data_file.seek(offset)
    data_file.write(blob)
    name, dtype, dims = tensor.name, tensor.data_type, list(tensor.dims)
    tensor.Clear()
    tensor.name, tensor.data_type = name, dtype
    tensor.dims.extend(dims)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)),
                       ("length", str(len(blob)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _sparse_is_smaller(array: np.ndarray, data_type: int) -> bool:
    """Whether int64-indexed sparse storage takes fewer bytes than dense storage."""
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    return array.ndim > 0 and np.count_nonzero(array) * (itemsize + 8) < array.size * itemsize


def _make_sparse_if_smaller(graph: onnx.GraphProto, tensor: TensorProto,
                            array: np.ndarray) -> None:
    """Move an initializer to `sparse_initializer` (int64 linear indices) if that is smaller."""
    if not _sparse_is_smaller(array, tensor.data_type):
        return
    flat = _as_type(array, tensor.data_type).reshape(-1)
    nonzero = np.flatnonzero(flat)
    values = numpy_helper.from_array(flat[nonzero], tensor.name)
    indices = numpy_helper.from_array(nonzero.astype(np.int64), tensor.name + "_indices")
    sparse = onnx.helper.make_sparse_tensor(values, indices, list(array.shape))
    for i, t in enumerate(graph.initializer):
        if t.name == tensor.name:
            del graph.initializer[i]
            break
    graph.sparse_initializer.append(sparse)
