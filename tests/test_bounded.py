"""Bounded decoding (issue 16): crafted `.rdonnx` files that pass every checksum (zstd bombs,
frames declaring 1.2e18 bytes, huge declared shapes / counts / offsets, non-finite numbers,
bytes after the last section) each end in one FormatError line, exit 2, with bounded memory.

The mutants are read by `rdonnx decompress` (header, manifest, graph and every tensor) in one
subprocess that records each mutant's exit code, stderr and tracemalloc peak, and the
process's peak RSS above its RSS after decoding the intact artifact.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import onnx
import pytest
import zstandard

from rdonnx.bounded import LimitError, decompress, layout_problem, limit, npz_problem
from rdonnx.strictjson import dumps, loads

MODELS = Path(__file__).resolve().parents[1] / "models"
HEADER = struct.Struct("<8sHHII")  # docs/FORMAT.md: magic, version, flags, length, CRC-32
MAX_RSS_GROWTH_MB = 200  # the stated bound: peak RSS over the intact artifact's, all mutants
MAX_TRACED_MB = 128  # and each mutant's tracemalloc peak


def rle_frame(total: int, declared: int | None = None, byte: bytes = b" ") -> bytes:
    """A zstd frame of `total` copies of `byte` in RLE blocks (4 bytes per 128 KiB), declaring
    `declared` bytes of content (None: no declared size)."""
    header = b"\x28\xb5\x2f\xfd" + (b"\xc0" if declared is not None else b"\x00") + b"\x38"
    if declared is not None:
        header += struct.pack("<Q", declared)
    blocks = []
    while total > 0 or not blocks:
        n = min(total, 1 << 17)
        total -= n
        blocks.append(struct.pack("<I", (n << 3) | (1 << 1) | (total == 0))[:3] + byte)
    return header + b"".join(blocks)


def split(blob: bytes) -> tuple[int, dict, bytes]:
    _, version, _, length, _ = HEADER.unpack_from(blob)
    manifest = json.loads(zstandard.ZstdDecompressor().decompress(
        blob[HEADER.size:HEADER.size + length]))
    return version, manifest, blob[HEADER.size + length:]


def build(version: int, frame: bytes, data: bytes) -> bytes:
    """An artifact around a manifest frame, its length and CRC-32 right."""
    return HEADER.pack(b"RDONNX\r\n", version, 0, len(frame), zlib.crc32(frame)) + frame + data


def assemble(version: int, text: str, data: bytes) -> bytes:
    return build(version, zstandard.ZstdCompressor().compress(text.encode()), data)


def with_manifest(blob: bytes, text: str) -> bytes:
    version, _, data = split(blob)
    return assemble(version, text, data)


def with_graph(blob: bytes, frame: bytes, manifest_edit=None) -> bytes:
    """The graph section replaced by `frame`, appended after the data, checksummed."""
    version, manifest, data = split(blob)
    manifest["graph"].update(offset=len(data), length=len(frame), crc32=zlib.crc32(frame))
    if manifest_edit:
        manifest_edit(manifest)
    return assemble(version, json.dumps(manifest), data + frame)


def edited(blob: bytes, edit) -> bytes:
    _, manifest, _ = split(blob)
    edit(manifest)
    return with_manifest(blob, json.dumps(manifest))


def huge_graph_dims(blob: bytes, dims: list[int]) -> bytes:
    """The first coded tensor declared with `dims` in both the graph and the manifest."""
    version, manifest, data = split(blob)
    g = manifest["graph"]
    proto = onnx.ModelProto()
    proto.ParseFromString(zstandard.ZstdDecompressor().decompress(
        data[g["offset"]:g["offset"] + g["length"]]))
    name = manifest["tensors"][0]["name"]
    tensor = next(t for t in proto.graph.initializer if t.name == name)
    del tensor.dims[:]
    tensor.dims.extend(dims)
    manifest["tensors"][0]["shape"] = dims
    frame = zstandard.ZstdCompressor().compress(proto.SerializeToString())
    return with_graph(blob, frame, lambda m: m["tensors"][0].update(shape=dims))


def set_first(key: str, value):
    def edit(manifest: dict) -> None:
        manifest["tensors"][0][key] = value
    return edit


def set_section(kind: str, **fields):
    def edit(manifest: dict) -> None:
        manifest["tensors"][0][kind].update(fields)
    return edit


E18 = 1_200_000_000_000_000_000  # the declared size of the MemoryError frame


def mutants(blob: bytes, exact: bytes) -> dict[str, bytes]:
    """Name -> crafted artifact; every manifest and section checksum is right."""
    version, manifest, data = split(blob)
    text = json.dumps(manifest)
    step = manifest["tensors"][0]["step"]

    def add(key: str, member: str) -> bytes:  # a member added to a top-level object
        return with_manifest(blob, text.replace(f'"{key}": {{', f'"{key}": {{{member}, ', 1))

    deep = "[" * 100_000 + "]" * 100_000
    out = {
        "manifest frame declaring 1.2e18 bytes": build(version, rle_frame(1 << 10, E18), data),
        "manifest bomb declaring 256 MiB - 1": build(version, rle_frame(2**28 - 1, 2**28 - 1),
                                                     data),
        "manifest bomb, no declared size, 1 GiB": build(version, rle_frame(2**30), data),
        "graph frame declaring 1.2e18 bytes": with_graph(blob, rle_frame(1 << 10, E18)),
        "graph bomb declaring 2 GiB - 1": with_graph(blob, rle_frame(2**31 - 1, 2**31 - 1)),
        "graph bomb, no declared size, 2 GiB": with_graph(blob, rle_frame(2**31)),
        "graph bomb within the floor, 24 MiB of spaces": with_graph(blob, rle_frame(24 << 20)),
        "NaN in the metrics": add("metrics", '"nan": NaN'),
        "Infinity as a step": with_manifest(blob, text.replace(
            f'"step": {json.dumps(step)}', '"step": Infinity', 1)),
        "-Infinity in the settings": add("settings", '"x": -Infinity'),
        "1e999 in the metrics": add("metrics", '"big": 1e999'),
        "shape of 2^40 elements": edited(blob, set_first("shape", [2**20, 2**20])),
        "shape of 2^33 elements in manifest only": edited(blob, set_first("shape",
                                                                          [2**20, 2**13])),
        "shape of 2^33 elements in manifest and graph": huge_graph_dims(blob, [2**20, 2**13]),
        "negative dimension": edited(blob, set_first("shape", [-1, 64])),
        "nnz 2^62": edited(blob, set_first("nnz", 2**62)),
        "positions offset 2^62": edited(blob, set_section("positions", offset=2**62)),
        "values length 2^62": edited(blob, set_section("values", length=2**62)),
        "negative offset": edited(blob, set_section("positions", offset=-8)),
        "graph offset 2^62": edited(blob, lambda m: m["graph"].update(offset=2**62)),
        "an integer of 5000 digits": with_manifest(blob, re.sub(
            r'"nnz": \d+', '"nnz": ' + "9" * 5000, text, count=1)),
        "100 000 nested arrays": with_manifest(blob, text[:-1] + f', "deep": {deep}}}'),
        "3.9 MiB of empty arrays": with_manifest(blob, "[" + ",".join(["[]"] * 1_300_000) + "]"),
        "manifest is a JSON list": with_manifest(blob, "[1, 2, 3]"),
        "bytes after the last section": blob + b"\0" * 64,
        "manifest length beyond the file": HEADER.pack(b"RDONNX\r\n", 1, 0, 2**31, 0) +
        blob[HEADER.size:],
    }
    for name, declared in (("exact values bomb declaring 1 GiB", 2**30),
                           ("exact values bomb, no declared size, 1 GiB", None)):
        version, manifest, data = split(exact)
        frame = rle_frame(2**30, declared)
        manifest["tensors"][0]["values"].update(offset=len(data), length=len(frame),
                                                crc32=zlib.crc32(frame))
        out[name] = assemble(version, json.dumps(manifest), data + frame)
    return out


READER = r"""
import contextlib, io, json, resource, sys, tracemalloc
from rdonnx.cli import main

def run(path):
    err = io.StringIO()
    tracemalloc.start()
    with contextlib.redirect_stderr(err):
        code = main(["decompress", path, "-o", sys.argv[1], "--force", "-q"])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"code": code, "stderr": err.getvalue(), "traced_mb": peak / 2**20}

intact = [run(p) for p in sys.argv[2:4]]
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = {p: run(p) for p in sys.argv[4:]}
growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
print(json.dumps({"intact": intact, "results": results, "rss_growth_mb": growth}))
"""


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> tuple[bytes, bytes]:
    """The bundled MLP at rate 0.2 as an artifact with quantized values, and with exact."""
    import rdonnx

    folder = tmp_path_factory.mktemp("fuzz")
    blobs = []
    for values in ("auto", "exact"):
        config = rdonnx.CompressConfig.of(rate=0.2, method="uniform", layer_distortion=False,
                                       values=values, format="rdonnx")
        result = rdonnx.compress(MODELS / "digits_mlp.onnx", calib=MODELS / "digits_calib.npz",
                                 config=config)
        result.save(folder / f"{values}.rdonnx")
        blobs.append((folder / f"{values}.rdonnx").read_bytes())
    return blobs[0], blobs[1]


def test_fuzzed_artifacts_fail_cleanly_with_bounded_memory(artifacts, tmp_path):
    blob, exact = artifacts
    crafted = mutants(blob, exact)
    paths = {}
    for i, (name, data) in enumerate(crafted.items()):
        paths[name] = tmp_path / f"m{i:02d}.rdonnx"
        paths[name].write_bytes(data)
    (tmp_path / "ok.rdonnx").write_bytes(blob)
    (tmp_path / "exact.rdonnx").write_bytes(exact)
    proc = subprocess.run([sys.executable, "-c", READER, tmp_path / "out.onnx",
                           tmp_path / "ok.rdonnx", tmp_path / "exact.rdonnx",
                           *paths.values()], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["code"] for r in found["intact"]] == [0, 0], found["intact"]
    clean = 0
    failures = []
    for name, path in paths.items():
        r = found["results"][str(path)]
        lines = r["stderr"].strip().splitlines()
        ok = (r["code"] == 2 and len(lines) == 1 and lines[0].startswith("rdonnx: error: ")
              and str(path) in lines[0] and r["traced_mb"] < MAX_TRACED_MB)
        clean += ok
        if not ok:
            failures.append(f"{name}: exit {r['code']}, {r['traced_mb']:.0f} MB: {r['stderr']}")
    figures = (f"{len(paths)} mutants, {clean} clean one-line errors (exit 2), peak traced "
               f"{max(r['traced_mb'] for r in found['results'].values()):.1f} MB, peak RSS "
               f"growth {found['rss_growth_mb']:.1f} MB")
    largest = max(found["results"], key=lambda p: found["results"][p]["traced_mb"])
    print(figures, "; largest:", next(n for n, p in paths.items() if str(p) == largest))
    assert not failures, "\n".join(failures)
    assert found["rss_growth_mb"] < MAX_RSS_GROWTH_MB, figures


def test_declared_size_is_checked_before_decoding():
    with pytest.raises(LimitError, match="declares 1,200,000,000,000,000,000 bytes"):
        decompress(rle_frame(10, 1_200_000_000_000_000_000), 2**31 - 1, "graph")
    with pytest.raises(LimitError, match="more than its limit"):
        decompress(rle_frame(2**30), 2**20, "graph")  # undeclared: streamed, stopped at 1 MiB
    with pytest.raises(zstandard.ZstdError):  # zstd itself sees the size mismatch
        decompress(rle_frame(100, 50), 1000, "values")
    with pytest.raises(LimitError, match="not 1,000"):
        decompress(rle_frame(100, 100), 1000, "values", exact=True)
    assert decompress(rle_frame(3 << 17, 3 << 17, b"a"), 3 << 17, "x") == b"a" * (3 << 17)
    assert decompress(zstandard.ZstdCompressor().compress(b"abc"), 3, "x") == b"abc"
    assert limit(1000, 2**31) == 32 * 2**20 and limit(2**20, 2**28) == 2**28


def test_layout_and_npz_checks():
    assert layout_problem([("graph", 0, 10), ("w", 10, 5)], 15) is None
    assert "after the last section" in layout_problem([("graph", 0, 10)], 15)
    assert "outside the file" in layout_problem([("w", 2**62, 1)], 15)
    assert npz_problem((10, 4), 4, 160) is None
    assert "declares shape (11, 4)" in npz_problem((11, 4), 4, 160)


def test_strict_json():
    text = dumps({"a": float("nan"), "b": [1.0, float("inf")], "c": 2})
    data = json.loads(text)
    assert data["a"] is None and data["b"] == [1.0, None] and data["c"] == 2
    assert set(data["non_finite"]) == {"$.a", "$.b[1]"}
    assert "NaN" not in text and "Infinity" not in text
    assert "non_finite" not in dumps({"a": 1.5})
    for bad in ('{"a": NaN}', '{"a": -Infinity}', '{"a": 1e999}'):
        with pytest.raises(ValueError):
            loads(bad)
    assert loads('{"a": 1e300}') == {"a": 1e300}


def test_a_surp_scale_that_overflows_is_refused(tmp_path, capsys):
    """A re-checksummed SuRP artifact whose manifest scale (alpha) is huge but finite decodes
    to values that overflow float32: one FormatError line, not an artifact of infinities."""
    import numpy as np
    from onnx import TensorProto, helper

    import rdonnx
    from rdonnx.cli import main

    rng = np.random.default_rng(0)
    weights = [helper.make_tensor(n, TensorProto.FLOAT, s, rng.standard_normal(s).ravel()
                                  .astype(np.float32)) for n, s in (("w1", (32, 64)),
                                                                     ("w2", (64, 16)))]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    calib = tmp_path / "c.npz"
    np.savez(calib, x=rng.standard_normal((64, 32)).astype(np.float32))
    result = rdonnx.compress(model, calib=calib, config=rdonnx.CompressConfig.of(
        rate=0.3, method="surp", layer_distortion=False))
    good = tmp_path / "good.rdonnx"
    result.save(good)
    version, manifest, data = split(good.read_bytes())
    manifest["surp"]["alpha"] = 1e30
    bad = tmp_path / "bad.rdonnx"
    bad.write_bytes(assemble(version, json.dumps(manifest), data))
    assert main(["decompress", str(good), "-o", str(tmp_path / "g.onnx"), "-q"]) == 0
    capsys.readouterr()
    assert main(["decompress", str(bad), "-o", str(tmp_path / "b.onnx"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rdonnx: error: ") and err.count("\n") == 1 and "overflow" in err
    assert not (tmp_path / "b.onnx").exists()
