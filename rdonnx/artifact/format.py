"""The `.rdonnx` file: write, read and verify (layout in docs/FORMAT.md).

    MAGIC (8 bytes) | version u16 | flags u16 | manifest length u32 | manifest CRC-32 u32
    | manifest (zstd frame of UTF-8 JSON) | data (sections addressed by offset and length)

Every section (the zstd-compressed graph, each tensor's coded streams) carries a CRC-32 in the
manifest; readers check bounds and checksums before decoding anything.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import zstandard
from google.protobuf.message import DecodeError

from rdonnx import bounded, strictjson
from rdonnx.algo import grids
from rdonnx.algo.quantize import dequantize
from rdonnx.artifact.surp_stream import Coded, side_bits
from rdonnx.codec import entropy
from rdonnx.codec import surp as surp_codec
from rdonnx.errors import UsageError
from rdonnx.fs import atomic_output

MAGIC = b"RDONNX\r\n"
FORMAT_VERSION = 1
SURP_FORMAT_VERSION = 2  # written only for files holding a SuRP stream (`manifest["surp"]`)
CHANNELS_FORMAT_VERSION = 3  # written only for files holding "quantized-channels" tensors
CLASSES_FORMAT_VERSION = 4  # written only for files holding "quantized-classes" tensors
READ_VERSIONS = (FORMAT_VERSION, SURP_FORMAT_VERSION, CHANNELS_FORMAT_VERSION,
                 CLASSES_FORMAT_VERSION)
# one step per index on `step_axis`; "quantized-classes": log-scale steps as
# "quantized-channels", and the rows of the second class code their levels in a stream of their
# own (`classes`)
ROW_ENCODINGS = ("quantized-rows", "quantized-channels", "quantized-classes")
LOG_STEP_ENCODINGS = ("quantized-channels", "quantized-classes")
HEADER = struct.Struct("<8sHHII")
MAX_MANIFEST = 256 * 2**20
MAX_ELEMENTS = 2**33  # per tensor: refuse larger declared shapes rather than allocate them
MAX_CODEBOOK = 2**16 - 1  # centroids of a "codebook" tensor (16 value bits at most)
CODED_DTYPES = ("FLOAT", "FLOAT16", "BFLOAT16")
CODED_LOCATION = "rdonnx"  # external-data location of coded initializers in the graph


class FormatError(UsageError):
    """A damaged or foreign file: one line, exit 2."""


@dataclass
class Section:
    offset: int
    length: int
    crc32: int


@dataclass
class TensorEntry:
    """One coded tensor: how to rebuild it and what it cost."""

    name: str
    dtype: str  # ONNX element type name
    shape: list[int]
    encoding: str  # "quantized" (integer levels x step) or "exact" (original values, zstd)
    nnz: int
    positions: Section
    values: Section
    step: float | None = None
    bits: dict[str, float] = field(default_factory=dict)  # positions, values, side, iid
    codebook: Section | None = None  # "codebook" encoding: K float32 centroids
    codebook_bytes: bytes = field(default=b"", repr=False)  # the centroids until placed
    step_axis: int | None = None  # ROW_ENCODINGS: one step per index on this axis
    steps: Section | None = None  # ROW_ENCODINGS: float32 steps, or coded log-scale indices
    steps_bytes: bytes = field(default=b"", repr=False)  # the steps until placed
    classes: Section | None = None  # "quantized-classes": the coded rows of the second class
    classes_bytes: bytes = field(default=b"", repr=False)  # those until placed

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class Artifact:
    """A parsed `.rdonnx` file (sections verified lazily, on access)."""

    path: Path | None
    manifest: dict[str, Any]
    graph: onnx.ModelProto
    tensors: list[TensorEntry]
    data: bytes
    _surp: dict[str, np.ndarray] | None = field(default=None, repr=False)  # decoded pool

    def section(self, s: Section, what: str) -> bytes:
        if s.offset < 0 or s.length < 0 or s.offset + s.length > len(self.data):
            raise FormatError(f"{self.where()}: {what} lies outside the file (truncated?)")
        blob = self.data[s.offset:s.offset + s.length]
        if zlib.crc32(blob) != s.crc32:
            raise FormatError(f"{self.where()}: checksum mismatch in {what} (damaged file)")
        return blob

    def where(self) -> str:
        """The file's path for messages."""
        return str(self.path) if self.path else "artifact"

    def decode(self, entry: TensorEntry, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor's values, exactly as compress measured them.

        `out`: a zero-filled flat array of `entry.size` elements of the tensor's dtype to
        decode into (returned reshaped; surp tensors ignore it).
        """
        if entry.encoding == "surp":  # the shared SuRP stream, decoded once
            if self._surp is None:
                self._surp = decode_artifact(self)
            return self._surp[entry.name]
        positions = self.section(entry.positions, f"{entry.name} positions")
        values = self.section(entry.values, f"{entry.name} values")
        kept = self.decode_kept(entry, positions)
        survivors = self.decode_survivors(entry, values, kept)
        if out is None:
            out = np.zeros(entry.size, dtype=survivors.dtype)  # pruned entries are +0
        out[kept] = survivors
        return out.reshape(entry.shape)

    def decode_kept(self, entry: TensorEntry, positions: bytes) -> np.ndarray:
        """The tensor's kept entries (an `entropy.decode_kept` selector) from its checked
        positions section."""
        with self._decoding(entry):
            kept = entropy.decode_kept(positions, tuple(entry.shape))
            if entropy.kept_count(kept) != entry.nnz:
                raise FormatError(f"{self.where()}: {entry.name}: nonzero count mismatch")
            return kept

    def decode_survivors(self, entry: TensorEntry, values: bytes, kept: np.ndarray | None
                         ) -> np.ndarray:
        """The kept entries' values in the tensor's dtype from its checked values section
        (`kept` is needed by ROW_ENCODINGS only)."""
        dtype = entry_dtype(entry)
        with self._decoding(entry):
            if entry.encoding == "codebook":
                survivors = self._decode_codebook(entry, values)
            elif entry.encoding in ROW_ENCODINGS:
                survivors = self._decode_rows(entry, values, kept)
            elif entry.encoding == "quantized":
                levels = entropy.decode_values(values, entry.nnz)
                survivors = dequantize(levels, float(entry.step), np.float32)
            else:
                raw = bounded.decompress(values, entry.nnz * dtype.itemsize, "values")
                if len(raw) != entry.nnz * dtype.itemsize:
                    raise FormatError(f"{self.where()}: {entry.name}: value bytes mismatch")
                survivors = np.frombuffer(raw, dtype=dtype)
            return survivors.astype(dtype, copy=False)  # rounds each value once, as dense

    @contextlib.contextmanager
    def _decoding(self, entry: TensorEntry) -> Iterator[None]:
        """Raise codec failures while decoding `entry` as one-line FormatErrors."""
        try:
            yield
        except (entropy.CodecError, zstandard.ZstdError) as exc:
            raise FormatError(f"{self.where()}: cannot decode {entry.name}: {exc}") from None

    def _decode_rows(self, entry: TensorEntry, values: bytes, kept: np.ndarray) -> np.ndarray:
        """levels x the step of each kept entry's row (index along `step_axis`), in float32."""
        rows = entry.shape[entry.step_axis]
        blob = self.section(entry.steps, f"{entry.name} steps")
        if entry.encoding in LOG_STEP_ENCODINGS:
            try:
                steps = grids.step_of(grids.decode_steps(blob, rows))
            except ValueError as exc:
                raise FormatError(f"{self.where()}: {entry.name}: {exc}") from None
        elif len(blob) != 4 * rows:
            raise FormatError(f"{self.where()}: {entry.name}: {len(blob)} bytes of steps for "
                              f"{rows} rows")
        else:
            steps = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        if not np.all(np.isfinite(steps) & (steps > 0)):
            raise FormatError(f"{self.where()}: {entry.name}: steps must be positive numbers")
        inner = math.prod(entry.shape[entry.step_axis + 1:])
        rows_of = (entropy.kept_indices(kept) // inner) % rows
        if entry.encoding == "quantized-classes":
            second = entropy.decode_positions(
                self.section(entry.classes, f"{entry.name} classes"), (rows,))[rows_of]
            levels = _decode_classes(values, second)
        else:
            levels = entropy.decode_values(values, entry.nnz)
        return levels.astype(np.float32) * steps[rows_of]

    def _decode_codebook(self, entry: TensorEntry, values: bytes) -> np.ndarray:
        """codebook[index - 1] of the kept entries, in float32."""
        blob = self.section(entry.codebook, f"{entry.name} codebook")
        if len(blob) % 4 or not min(entry.nnz, 1) <= len(blob) // 4 <= MAX_CODEBOOK:
            raise FormatError(f"{self.where()}: {entry.name}: codebook of {len(blob)} bytes "
                              f"is not 1..{MAX_CODEBOOK} float32 values")
        codebook = np.frombuffer(blob, dtype="<f4").astype(np.float32)
        if not np.all(np.isfinite(codebook)):
            raise FormatError(f"{self.where()}: {entry.name}: codebook holds inf or NaN")
        indices = entropy.decode_values(values, entry.nnz)
        if indices.size and (int(indices.min()) < 1 or int(indices.max()) > codebook.size):
            raise FormatError(f"{self.where()}: {entry.name}: index out of codebook range "
                              f"1..{codebook.size}")
        return codebook[indices - 1]


def _decode_classes(values: bytes, second: np.ndarray) -> np.ndarray:
    """Levels of the kept entries from two streams, the first class's (its length a varint
    ahead of it), then the second's; `second`: whether each kept entry's row is of the second
    class."""
    reader = entropy.Reader(values)
    length = reader.varint(len(values), "first class stream length")
    start = reader.pos
    if length > reader.remaining():
        raise entropy.CodecError(f"first class stream of {length} bytes exceeds the values")
    levels = np.empty(second.size, np.int32)
    levels[~second] = entropy.decode_values(values[start:start + length],
                                            int(second.size - np.count_nonzero(second)))
    levels[second] = entropy.decode_values(values[start + length:], int(np.count_nonzero(second)))
    return levels


def entry_dtype(entry: TensorEntry) -> np.dtype:
    """The numpy dtype of a coded tensor."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(
        onnx.TensorProto.DataType.Value(entry.dtype)))


def encode_tensor(name: str, data_type: int, shape: tuple[int, ...], q: np.ndarray | None,
                  step: float | np.ndarray | None, exact: np.ndarray | None,
                  codebook: np.ndarray | None = None, step_axis: int | None = None,
                  classes: np.ndarray | None = None) -> tuple[TensorEntry, bytes, bytes]:
    """Code one tensor: integer levels (`q`, `step`; with `step_axis`, one step per index along
    that axis, and with `classes`, bool per such index, the levels of the rows marked coded in
    a stream of their own), codebook indices (`q`, `codebook`) or exact values; returns its
    entry and the two streams (sections, the codebook's, steps' or classes' too, are placed by
    `write_artifact`)."""
    classes_bytes = b""
    if q is not None:
        nnz, encoding = int(np.count_nonzero(q)), "quantized"
        steps_bytes = _steps_bytes(np.asarray(step, dtype=np.float32).reshape(-1)) \
            if step_axis is not None and codebook is None else None
        # two classes of rows need log-scale steps (else one stream)
        split = classes is not None and steps_bytes is not None and \
            0 < np.count_nonzero(classes) < np.size(classes)
        if split:
            pos, val, classes_bytes = _encode_classes(q, step_axis, classes)
        else:
            pos, val = entropy.encode_integers(q)
        values_blob = val.payload
        value_bits, value_iid, value_side = val.bits, val.iid_entropy_bits, val.side_bits
        if codebook is not None:  # the centroids count as side information of the values
            encoding, step = "codebook", None
            table = 32 * int(np.asarray(codebook).size)
            value_bits, value_side = value_bits + table, value_side + table
        elif step_axis is not None:  # per-row steps, side information of the values too
            encoding = "quantized-classes" if split else \
                "quantized-channels" if steps_bytes is not None else "quantized-rows"
            if steps_bytes is None:
                steps_bytes = np.asarray(step, dtype="<f4").reshape(-1).tobytes()
            table = 8 * (len(steps_bytes) + len(classes_bytes))
            value_bits, value_side = value_bits + table, value_side + table
    else:
        mask = exact != 0
        pos = entropy.encode_positions(mask)
        nnz, encoding = int(mask.sum()), "exact"
        values_blob = zstandard.ZstdCompressor(level=19).compress(exact[mask].tobytes())
        value_bits = value_iid = 8 * len(values_blob)
        value_side = 0
    entry = TensorEntry(
        name=name, dtype=onnx.TensorProto.DataType.Name(data_type), shape=list(shape),
        encoding=encoding, nnz=nnz, positions=Section(0, 0, 0), values=Section(0, 0, 0),
        step=None if step_axis is not None else step, step_axis=step_axis,
        bits={"positions": pos.bits, "values": value_bits,
                         "side": pos.side_bits + value_side,
                         "iid_entropy": pos.iid_entropy_bits + value_iid,
                         "positions_model": pos.model})
    if codebook is not None:
        entry.codebook_bytes = np.asarray(codebook, dtype="<f4").tobytes()
    if step_axis is not None:
        entry.steps_bytes = steps_bytes
    entry.classes_bytes = classes_bytes
    return entry, pos.payload, values_blob


def _encode_classes(q: np.ndarray, axis: int, classes: np.ndarray
                    ) -> tuple[entropy.CodedStream, entropy.CodedStream, bytes]:
    """The positions of `q`'s nonzeros, its values as two streams in one (the first class's
    behind its length, then the second's: `_decode_classes`), and the coded rows of the second
    class."""
    a = np.asarray(q)
    mask = a != 0
    rows_of = (np.flatnonzero(mask) // math.prod(a.shape[axis + 1:])) % a.shape[axis]
    second = np.asarray(classes, bool)[rows_of]
    levels = a[mask]
    first_stream, second_stream = (entropy.encode_values(levels[~second]),
                                   entropy.encode_values(levels[second]))
    head = entropy.varint(len(first_stream.payload))
    val = entropy.CodedStream(
        head + first_stream.payload + second_stream.payload,
        bits=first_stream.bits + second_stream.bits + 8 * len(head),
        iid_entropy_bits=first_stream.iid_entropy_bits + second_stream.iid_entropy_bits,
        side_bits=first_stream.side_bits + second_stream.side_bits + 8 * len(head),
        model="classes")
    return entropy.encode_positions(mask), val, \
        entropy.encode_positions(np.asarray(classes, bool)).payload


def _steps_bytes(steps: np.ndarray) -> bytes | None:
    """The coded log-scale indices of `steps` when every step lies on `grids`' log scale
    (else None: raw float32 steps)."""
    if not np.all(np.isfinite(steps) & (steps > 0)):
        return None
    index = grids.index_at_least(steps)
    return grids.encode_steps(index) if np.array_equal(grids.step_of(index), steps) else None


def write_artifact(path: Path, graph: onnx.ModelProto,
                   coded: list[tuple[TensorEntry, bytes, bytes]],
                   settings: dict[str, Any], metrics: dict[str, Any], version: str,
                   surp: tuple[bytes, dict[str, Any]] | None = None) -> int:
    """Write the container atomically; returns its size in bytes.

    `surp`: a SuRP stream and its manifest object (entries with encoding "surp" have empty
    positions / values sections); the file then has format version 2 (3 with per-channel steps)."""

    chunks: list[bytes] = []
    offset = 0

    def place(blob: bytes) -> Section:
        nonlocal offset
        chunks.append(blob)
        section = Section(offset, len(blob), zlib.crc32(blob))
        offset += len(blob)
        return section

    graph_section = place(zstandard.ZstdCompressor(level=19).compress(
        graph.SerializeToString(deterministic=True)))
    tensors = []
    for entry, positions, values in coded:
        if entry.encoding == "surp":
            tensors.append(_entry_json(entry))
            continue
        entry.positions, entry.values = place(positions), place(values)
        if entry.encoding == "codebook":
            entry.codebook = place(entry.codebook_bytes)
        if entry.encoding in ROW_ENCODINGS:
            entry.steps = place(entry.steps_bytes)
        if entry.encoding == "quantized-classes":
            entry.classes = place(entry.classes_bytes)
        tensors.append(_entry_json(entry))
    file_version = _file_version([e for e, _, _ in coded], surp is not None)
    extra = {} if surp is None else {"surp": {**surp[1], "stream": place(surp[0]).__dict__}}
    manifest = zstandard.ZstdCompressor(level=19).compress(strictjson.dumps({
        "format": "rdonnx", "format_version": file_version, "rdonnx_version": version,
        "graph": {**graph_section.__dict__, "codec": "zstd"}, "tensors": tensors,
        "settings": settings, "metrics": metrics, **extra}, sort_keys=True,
        separators=(",", ":")).encode())
    header = HEADER.pack(MAGIC, file_version, 0, len(manifest), zlib.crc32(manifest))
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(header + manifest)
        for chunk in chunks:
            f.write(chunk)
    return path.stat().st_size


def _file_version(tensors: list[TensorEntry], surp: bool) -> int:
    """The oldest format version that holds these encodings (older readers keep reading what
    they can)."""
    if any(t.encoding == "quantized-classes" for t in tensors):
        return CLASSES_FORMAT_VERSION
    if any(t.encoding == "quantized-channels" for t in tensors):
        return CHANNELS_FORMAT_VERSION
    return SURP_FORMAT_VERSION if surp else FORMAT_VERSION


def _entry_json(entry: TensorEntry) -> dict[str, Any]:
    data = dict(entry.__dict__)
    data["positions"], data["values"] = entry.positions.__dict__, entry.values.__dict__
    data.pop("codebook_bytes", None)
    data.pop("steps_bytes", None)
    data.pop("classes_bytes", None)
    # other encodings: the entry is unchanged
    for key in ("codebook", "steps", "step_axis", "classes"):
        if data[key] is None:
            del data[key]
        elif isinstance(data[key], Section):
            data[key] = data[key].__dict__
    return data


def is_artifact(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_artifact(source: str | os.PathLike | bytes) -> Artifact:
    """Parse and check the header, manifest and graph of an `.rdonnx` file."""
    path = None if isinstance(source, bytes) else Path(source)
    where = str(path) if path else "artifact"
    if path is not None:
        if not path.is_file():
            raise UsageError(f"file not found: {path}")
        blob = path.read_bytes()
    else:
        blob = source
    if len(blob) < HEADER.size or blob[:len(MAGIC)] != MAGIC:
        raise FormatError(f"{where} is not an .rdonnx file (wrong magic bytes)")
    _, version, flags, length, crc = HEADER.unpack_from(blob)
    if version not in READ_VERSIONS:
        raise FormatError(f"{where} has format version {version}; this rdonnx reads versions "
                          f"{', '.join(map(str, READ_VERSIONS))}: upgrade rdonnx")
    if flags != 0:
        raise FormatError(f"{where} sets reserved header flags {flags:#x} (damaged file?)")
    if length > min(MAX_MANIFEST, len(blob) - HEADER.size):
        raise FormatError(f"{where}: manifest size {length} exceeds the file (truncated?)")
    raw = blob[HEADER.size:HEADER.size + length]
    if zlib.crc32(raw) != crc:
        raise FormatError(f"{where}: manifest checksum mismatch (damaged file)")
    try:
        manifest = strictjson.loads(bounded.decompress(  # no NaN / Infinity, size bounded
            raw, bounded.limit(len(raw), MAX_MANIFEST, bounded.MANIFEST_FLOOR), "manifest"))
        if manifest.get("format") != "rdonnx" or manifest.get("format_version") != version:
            raise ValueError("format fields do not match the header")
        tensors = [_entry(t) for t in manifest["tensors"]]
        if _file_version(tensors, "surp" in manifest) != version or \
                any(t.encoding == "surp" for t in tensors) != ("surp" in manifest):
            raise ValueError("the tensors' encodings do not match the format version")
        graph_section = Section(**{k: int(manifest["graph"][k])
                                   for k in ("offset", "length", "crc32")})
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError,
            zstandard.ZstdError) as exc:
        raise FormatError(f"{where}: malformed manifest ({exc})") from None
    artifact = Artifact(path, manifest, onnx.ModelProto(), tensors,
                        blob[HEADER.size + length:])
    problem = bounded.layout_problem(_sections(graph_section, tensors, manifest),
                                     len(artifact.data))
    if problem is not None:
        raise FormatError(f"{where}: {problem}")
    try:
        packed = artifact.section(graph_section, "graph")
        artifact.graph.ParseFromString(bounded.decompress(
            packed, bounded.limit(len(packed), 2**31 - 1), "graph"))
    except (zstandard.ZstdError, ValueError, RuntimeError, DecodeError) as exc:
        raise FormatError(f"{where}: cannot read the graph ({exc})") from None
    _check_against_graph(artifact, where)
    return artifact


def _check_against_graph(artifact: Artifact, where: str) -> None:
    """The manifest's tensors must be exactly the graph's coded initializers, alike in type."""
    coded = {t.name: t for t in artifact.graph.graph.initializer
             if t.data_location == onnx.TensorProto.EXTERNAL and
             any(e.key == "location" and e.value == CODED_LOCATION for e in t.external_data)}
    names = [e.name for e in artifact.tensors]
    if len(set(names)) != len(names) or set(names) != set(coded):
        raise FormatError(f"{where}: the manifest's tensors do not match the graph's coded "
                          "initializers (damaged file)")
    for entry in artifact.tensors:
        t = coded[entry.name]
        if list(t.dims) != entry.shape or \
                onnx.TensorProto.DataType.Name(t.data_type) != entry.dtype:
            raise FormatError(f"{where}: tensor {entry.name} differs from its graph declaration")


def _sections(graph: Section, tensors: list[TensorEntry], manifest: dict[str, Any]
              ) -> list[tuple[str, int, int]]:
    """Every section the manifest declares, for `bounded.layout_problem`."""
    found = [("graph", graph.offset, graph.length)]
    for t in tensors:
        for kind in ("positions", "values", "codebook", "steps", "classes"):
            s = getattr(t, kind)
            if s is not None and (s.length or t.encoding != "surp"):
                found.append((f"{t.name} {kind}", s.offset, s.length))
    if "surp" in manifest:
        try:
            stream = manifest["surp"]["stream"]
            found.append(("SuRP stream", int(stream["offset"]), int(stream["length"])))
        except (KeyError, TypeError, ValueError):
            pass  # the SuRP decoder reports a malformed stream entry
    return found


def _entry(data: dict[str, Any]) -> TensorEntry:
    if data["encoding"] not in ("quantized", *ROW_ENCODINGS, "exact", "codebook", "surp"):
        raise ValueError(f"unknown encoding {data['encoding']!r}")
    if data["dtype"] not in CODED_DTYPES:
        raise ValueError(f"{data['name']}: dtype {data['dtype']!r} is not a coded float type")
    shape = [int(d) for d in data["shape"]]
    if any(d < 0 for d in shape) or math.prod(shape) > MAX_ELEMENTS:
        raise ValueError(f"{data['name']}: shape {shape} is larger than any model rdonnx writes")
    nnz = int(data["nnz"])
    if not 0 <= nnz <= math.prod(shape):
        raise ValueError(f"{data['name']}: nnz {nnz} does not fit shape {shape}")
    if data["encoding"] == "quantized":
        step = float(data["step"])
        if not (math.isfinite(step) and step > 0):
            raise ValueError(f"{data['name']}: step {step} is not a positive number")
    step_axis = None
    if data["encoding"] in ROW_ENCODINGS:
        step_axis = int(data["step_axis"])
        if not 0 <= step_axis < len(shape):
            raise ValueError(f"{data['name']}: step axis {step_axis} is not an axis of {shape}")
    return TensorEntry(
        name=str(data["name"]), dtype=str(data["dtype"]), shape=shape,
        encoding=data["encoding"], nnz=nnz,
        positions=Section(*(int(data["positions"][k]) for k in ("offset", "length", "crc32"))),
        values=Section(*(int(data["values"][k]) for k in ("offset", "length", "crc32"))),
        step=None if data.get("step") is None else float(data["step"]),
        bits=dict(data.get("bits", {})),
        codebook=Section(*(int(data["codebook"][k]) for k in ("offset", "length", "crc32")))
        if data["encoding"] == "codebook" else None, step_axis=step_axis,
        steps=Section(*(int(data["steps"][k]) for k in ("offset", "length", "crc32")))
        if step_axis is not None else None,
        classes=Section(*(int(data["classes"][k]) for k in ("offset", "length", "crc32")))
        if data["encoding"] == "quantized-classes" else None)


def artifact_coded(artifact: Artifact) -> Coded:
    """The SuRP pool and stream of a parsed `.rdonnx` file (FormatError when damaged)."""
    where = artifact.where()
    meta = artifact.manifest.get("surp")
    if meta is None:
        raise UsageError(f"{where} holds no SuRP stream (compress it with --method surp)")
    entries = {e.name: e for e in artifact.tensors if e.encoding == "surp"}
    try:
        section = Section(*(int(meta["stream"][k]) for k in ("offset", "length", "crc32")))
        payload = artifact.section(section, "SuRP stream")
        shapes = {n: (tuple(e.shape), onnx.TensorProto.DataType.Value(e.dtype))
                  for n, e in entries.items()}
        coded = Coded.from_manifest(meta, shapes, payload)
        if {t.name for t in coded.pool.tensors} != set(entries) or \
                len(coded.pool.tensors) != len(entries):
            raise ValueError("SuRP tensors differ from the manifest's tensor list")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"{where}: malformed SuRP stream ({exc})") from None
    return coded


def decode_artifact(artifact: Artifact) -> dict[str, np.ndarray]:
    """Every SuRP tensor of an artifact, decoded from the shared stream."""
    coded = artifact_coded(artifact)
    try:
        decoded = surp_codec.decode(coded.stream)
    except surp_codec.CodecError as exc:
        raise FormatError(f"{artifact.where()}: cannot decode the SuRP stream: {exc}") from None
    with np.errstate(over="ignore", invalid="ignore"):  # a crafted scale: refused below
        values = coded.pool.values(decoded.uhat, decoded.negative)
    if not all(np.isfinite(v).all() for v in values.values()):
        raise FormatError(f"{artifact.where()}: SuRP values overflow their type (damaged file)")
    entries = {e.name: e for e in artifact.tensors if e.encoding == "surp"}
    if any(int(np.count_nonzero(values[n])) > e.nnz for n, e in entries.items()):
        raise FormatError(f"{artifact.where()}: SuRP nonzero counts differ from the manifest")
    return values


def surp_entries(coded: Coded, values: dict[str, np.ndarray]) -> list[TensorEntry]:
    """Manifest entries of the pool's tensors; the stream's bits are split by nonzeros
    (signs: 1 bit each; the rest, indices and refresh counts, in proportion)."""
    nnz = {t.name: int(np.count_nonzero(values[t.name])) for t in coded.pool.tensors}
    total = max(sum(nnz.values()), 1)
    index_bits = coded.stream.bits - sum(nnz.values())
    out = []
    for t in coded.pool.tensors:
        share = nnz[t.name] / total
        out.append(TensorEntry(
            name=t.name, dtype=onnx.TensorProto.DataType.Name(t.data_type),
            shape=list(t.shape), encoding="surp", nnz=nnz[t.name],
            positions=Section(0, 0, 0), values=Section(0, 0, 0),
            bits={"positions": index_bits * share, "values": float(nnz[t.name]),
                  "side": side_bits(coded.pool, coded.stream) * t.size / coded.pool.n,
                  "iid_entropy": index_bits * share + nnz[t.name],
                  "positions_model": "surp"}))
    return out
