"""The `.rdonnx` artifact end to end: compress -> save -> open_session / load / decompress,
the coding report, value options, determinism, the --bits-per-weight target and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import BUNDLED, PRUNABLE_CASES, Case, calib_feed, listing

import rdonnx
from rdonnx.algo import grids
from rdonnx.algo.quantize import quantize, row_view
from rdonnx.artifact.format import HEADER, MAGIC, read_artifact
from rdonnx.artifact.parallel import decode_all
from rdonnx.graph.model import tensor_slots

GRID = (1.0, 0.5, 0.2, 0.1, 0.05)
CONFIG = rdonnx.CompressConfig.of(layer_distortion=False, grid=GRID)
FAST_CLI = ["--no-layer-distortion", "--grid", ",".join(map(str, GRID)), "--quiet"]





def _ort(model, feed) -> list[np.ndarray]:
    import onnxruntime as ort

    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    session = ort.InferenceSession(str(model) if isinstance(model, Path) else model,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y), float(np.abs(x.astype(np.float64) - y).max())


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every tensor value of the model (initializers, Constant nodes, subgraphs)."""
    from rdonnx.graph.model import Model, slot_array

    m = Model(proto=model)
    return {name: slot_array(m, slot) for name, slot in tensor_slots(model).items()}


def _compress(case, rate: float = 0.3, **overrides):
    return rdonnx.compress(case.path, rate=rate, calib=case.calib,
                           config=CONFIG.updated(**overrides))


# ----------------------------------------------------------------------------------------------
# every model: the artifact runs exactly as the model compress measured


@pytest.mark.parametrize("case", PRUNABLE_CASES, indirect=True)
def test_artifact_round_trip(case, tmp_path):
    result = _compress(case)
    path = tmp_path / "m.rdonnx"
    size = result.save(path)
    blob = path.read_bytes()
    assert blob[:8] == MAGIC == b"RDONNX\r\n"
    assert size == len(blob) and result.report.output_format == "rdonnx"
    assert result.report.output == str(path) and result.report.output_bytes == size
    feed = calib_feed(case)

    expected = _ort(result.model, feed)
    session = rdonnx.open_session(path)
    assert [i.name for i in session.get_inputs()] == ["input"]
    _same(session.run(None, feed), expected)

    dense = tmp_path / "out.onnx"
    written = rdonnx.decompress(path, dense)
    assert written == dense.stat().st_size
    onnx.checker.check_model(str(dense))
    _same(_ort(dense, feed), expected)

    sparse = tmp_path / "sparse.onnx"
    rdonnx.decompress(path, sparse, format="sparse")
    onnx.checker.check_model(str(sparse))
    _same(_ort(sparse, feed), expected)
    assert sparse.stat().st_size < dense.stat().st_size  # 30 % kept: sparse is smaller

    loaded = rdonnx.load(path)
    onnx.checker.check_model(loaded)
    _same(_ort(loaded, feed), expected)

    # the decoded tensors are exactly the weights compress measured
    decoded = decode_all(read_artifact(path))
    assert set(decoded) >= {w.name for w in result.report.weights}
    assert set(decoded) == set(result.weights)
    for name, value in result.weights.items():
        assert decoded[name].dtype == value.dtype
        assert decoded[name].tobytes() == np.ascontiguousarray(value).tobytes(), name
    values = _initializers(loaded)
    for name, value in result.weights.items():
        assert values[name].tobytes() == np.ascontiguousarray(value).tobytes(), name
    # the pruned density is what the report says
    kept = sum(int(np.count_nonzero(decoded[w.name])) for w in result.report.weights)
    assert kept <= result.report.params_kept  # quantization may round survivors to zero
    assert kept >= 0.9 * result.report.params_kept

    _check_coding(result, path)


def _check_coding(result, path: Path) -> None:
    """The report's coding fields agree with each other and with the file."""
    report = result.report
    c = report.coding
    assert c is not None
    size = path.stat().st_size
    assert c.artifact_bytes == size
    assert c.bits_per_weight == pytest.approx(c.positions_bits_per_weight
                                              + c.values_bits_per_weight, rel=1e-12)
    assert 0 < c.side_bits_per_weight < c.bits_per_weight
    assert c.smaller_than_original == pytest.approx(report.input_bytes / size)
    assert c.smaller_than_sparse == pytest.approx(c.sparse_bytes / size)
    if c.dense_zstd19_bytes is not None:
        assert c.smaller_than_dense_zstd19 == pytest.approx(c.dense_zstd19_bytes / size)
    prunable = {w.name: w for w in report.weights}
    params = sum(w.params for w in report.weights)
    assert params == report.params_total
    assert c.artifact_bits_per_weight == pytest.approx(8 * size / params)
    # the stream bits are what the manifest records for the prunable weights
    manifest = read_artifact(path).manifest
    entries = {t["name"]: t for t in manifest["tensors"]}
    assert set(prunable) <= set(entries)
    pos = sum(entries[n]["bits"]["positions"] for n in prunable) / params
    val = sum(entries[n]["bits"]["values"] for n in prunable) / params
    assert c.positions_bits_per_weight == pytest.approx(pos)
    assert c.values_bits_per_weight == pytest.approx(val)
    # and the streams really occupy that many bits in the file
    for t in entries.values():
        assert t["bits"]["positions"] == 8 * t["positions"]["length"]
        side = t.get("steps", t.get("codebook", {"length": 0}))["length"]  # values' side info
        assert t["bits"]["values"] == 8 * (t["values"]["length"] + side)
    streams = sum(t["positions"]["length"] + t["values"]["length"] for t in entries.values())
    assert streams + manifest["graph"]["length"] + HEADER.size < size
    for w in report.weights:
        t = entries[w.name]
        assert w.bits_per_weight == pytest.approx(
            (t["bits"]["positions"] + t["bits"]["values"]) / w.params)
    assert manifest["metrics"]["value_bits"] == report.value_bits
    assert manifest["metrics"]["rate"] == pytest.approx(report.rate)
    assert manifest["settings"] == json.loads(json.dumps(report.settings))


def test_fp16_model_round_trip(tmp_path):
    """FLOAT16 weights: the artifact decodes to the same fp16 values, bit for bit."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(8)
    w1 = rng.standard_normal((32, 64)).astype(np.float16)
    w2 = rng.standard_normal((64, 16)).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w1"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["output"])], "fp16",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT16, ["batch", 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT16, ["batch", 16])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = tmp_path / "fp16.onnx"
    onnx.save_model(proto, str(model))
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=rng.standard_normal((32, 32)).astype(np.float16))
    result = rdonnx.compress(model, rate=0.3, calib=calib, config=CONFIG)
    path = tmp_path / "m.rdonnx"
    result.save(path)
    manifest = read_artifact(path).manifest
    assert {t["dtype"] for t in manifest["tensors"]} == {"FLOAT16"}
    decoded = decode_all(read_artifact(path))
    for name, value in result.weights.items():
        assert value.dtype == decoded[name].dtype == np.float16
        assert decoded[name].tobytes() == value.tobytes()
        q = result.quantized[name]
        assert value.tobytes() == (q.q.astype(np.float32) * np.float32(q.step)) \
            .astype(np.float16).tobytes()
    feed = {"input": rng.standard_normal((4, 32)).astype(np.float16)}
    _same(rdonnx.open_session(path).run(None, feed), _ort(result.model, feed))


# ----------------------------------------------------------------------------------------------
# values: --value-bits, exact, lossless unpruned


def test_value_bits_reported(mlp, tmp_path):
    result = _compress(mlp, value_bits=8)
    assert result.report.value_bits == 8
    path = tmp_path / "m.rdonnx"
    result.save(path)
    manifest = read_artifact(path).manifest
    assert manifest["metrics"]["value_bits"] == 8
    assert manifest["settings"]["coding"]["value_bits"] == 8
    plain = _compress(mlp, value_bits=8, rdoq=False)  # the fitted grid, nearest levels
    for name, q in plain.quantized.items():  # 8-bit levels, no worse than the unclipped grid
        assert int(np.abs(q.q).max()) <= 127
        pruned = plain.pruned[name]
        unclipped = quantize(pruned, 8).values(np.float32)
        assert np.sum((q.values(np.float32) - pruned) ** 2) <= np.sum((unclipped - pruned) ** 2)
    encodings = {t["name"]: t["encoding"] for t in manifest["tensors"]}
    assert {encodings[n] for n in result.quantized} == {"quantized"}
    # the rest are the biases that bias correction changed, stored exactly
    assert {n for n, e in encodings.items() if e != "quantized"} == \
        set(result.weights) - set(result.quantized)
    # 8 bits: the values stream costs more than at the automatic (fewer) bits
    auto = _compress(mlp)
    assert auto.report.value_bits < 8
    auto.save(tmp_path / "auto.rdonnx")
    assert auto.report.coding.values_bits_per_weight < result.report.coding \
        .values_bits_per_weight


def test_exact_values_decode_to_the_pruned_original(mlp, bundled_cnn, tmp_path):
    for case in (mlp, bundled_cnn):
        exact = _compress(case, values="exact")
        assert exact.report.value_bits is None and exact.quantized == {}
        path = tmp_path / f"{case.name}.rdonnx"
        exact.save(path)
        manifest = read_artifact(path).manifest
        assert {t["encoding"] for t in manifest["tensors"]} == {"exact"}
        dense = _compress(case, format="dense")
        assert dense.quantized == {}
        decoded = decode_all(read_artifact(path))
        assert set(decoded) == set(dense.weights)
        loaded = _initializers(rdonnx.load(path))
        original = _initializers(onnx.load(str(case.path)))
        for name, value in dense.weights.items():
            assert decoded[name].tobytes() == value.tobytes(), name
            assert loaded[name].tobytes() == value.tobytes(), name
            # survivors are the source values, bit for bit
            kept = value != 0
            assert np.array_equal(value[kept], original[name][kept])
        feed = calib_feed(case)
        _same(rdonnx.open_session(path).run(None, feed), _ort(dense.model, feed))


def test_lossless_unpruned_keeps_the_embedding(int64_model, tmp_path):
    source = _initializers(onnx.load(str(int64_model.path)))["embedding"]
    assert source.size >= 256  # large enough to be coded

    default = _compress(int64_model)
    assert "embedding" in default.quantized  # coded, not pruned
    assert "embedding" not in {w.name for w in default.report.weights}
    path = tmp_path / "default.rdonnx"
    default.save(path)
    embedding = _initializers(rdonnx.load(path))["embedding"]
    assert not np.array_equal(embedding, source)
    q = default.quantized["embedding"]
    step = q.step if q.axis is None else row_view(q.step, source.ndim, q.axis)
    # the nearest level, the one on the other side (RDOQ) or zero; or clipped by the grid fit
    error = np.abs(embedding - source)
    assert np.all((error <= step + 1e-6) | (embedding == 0) |
                  (np.abs(embedding) >= np.abs(source).max() / 4))
    assert np.count_nonzero(embedding) >= 0.9 * source.size  # quantized, not pruned
    entry = {t["name"]: t for t in read_artifact(path).manifest["tensors"]}["embedding"]
    assert entry["encoding"] in ("quantized", "quantized-channels")

    lossless = _compress(int64_model, lossless_unpruned=True)
    assert "embedding" not in lossless.quantized and "embedding" not in lossless.weights
    path = tmp_path / "lossless.rdonnx"
    lossless.save(path)
    embedding = _initializers(rdonnx.load(path))["embedding"]
    assert embedding.dtype == source.dtype
    assert embedding.tobytes() == source.tobytes()
    assert "w" in lossless.quantized  # prunable weights are still quantized
    feed = calib_feed(int64_model)
    _same(rdonnx.open_session(path).run(None, feed), _ort(lossless.model, feed))


# ----------------------------------------------------------------------------------------------
# determinism


def test_identical_runs_write_identical_files(attention, tmp_path):
    first, second = tmp_path / "a.rdonnx", tmp_path / "b.rdonnx"
    _compress(attention).save(first)
    _compress(attention).save(second)
    assert first.read_bytes() == second.read_bytes()


def test_identical_files_across_processes(bundled_cnn, tmp_path):
    """Another interpreter with another hash seed writes the same bytes."""
    script = (
        "import sys, rdonnx\n"
        f"config = rdonnx.CompressConfig.of(layer_distortion=False, grid={GRID!r})\n"
        "rdonnx.compress(sys.argv[1], rate=0.3, calib=sys.argv[2], config=config)"
        ".save(sys.argv[3])\n")
    here = tmp_path / "here.rdonnx"
    _compress(bundled_cnn).save(here)
    for seed in ("12345",):
        there = tmp_path / f"there{seed}.rdonnx"
        proc = subprocess.run(
            [sys.executable, "-c", script, bundled_cnn.path, bundled_cnn.calib, there],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONHASHSEED": seed})
        assert proc.returncode == 0, proc.stderr
        assert there.read_bytes() == here.read_bytes()


def test_readers_decode_the_same_with_workers(bundled_cnn, tmp_path):
    """open_session / load / decompress with forked workers (`workers=3`) give what one
    process gives, byte for byte."""
    from rdonnx.artifact.parallel import can_fork

    path = tmp_path / "m.rdonnx"
    _compress(bundled_cnn).save(path)
    feed = calib_feed(bundled_cnn)
    workers = 3 if can_fork() else 1
    _same(rdonnx.open_session(path, workers=workers).run(None, feed),
          rdonnx.open_session(path, workers=1).run(None, feed))
    assert rdonnx.load(path, workers=workers).SerializeToString() == \
        rdonnx.load(path, workers=1).SerializeToString()
    one, many = tmp_path / "one.onnx", tmp_path / "many.onnx"
    rdonnx.decompress(path, one, workers=1)
    rdonnx.decompress(path, many, workers=workers)
    assert one.read_bytes() == many.read_bytes()
    with pytest.raises(rdonnx.UsageError, match="workers"):
        rdonnx.open_session(path, workers=0)


# ----------------------------------------------------------------------------------------------
# --bits-per-weight


@pytest.mark.parametrize("budget", [0.8, 1.5, 3.0])
def test_bits_per_weight_target(bundled_mlp, tmp_path, budget):
    result = rdonnx.compress(bundled_mlp.path, bits_per_weight=budget, calib=bundled_mlp.calib,
                             config=CONFIG)
    path = tmp_path / "m.rdonnx"
    result.save(path)
    coded = result.report.coding.bits_per_weight
    assert coded <= budget
    steps = result.report.search
    assert steps
    # the search measured the chosen allocation with the real coder, within the budget
    assert any(s.meets and s.bits_per_weight == pytest.approx(coded, rel=1e-9) for s in steps)
    for s in steps:
        assert s.bits_per_weight is not None and s.meets == (s.bits_per_weight <= budget)
    if result.report.rate < 1.0 - 1e-9:  # the budget is used, not left idle
        assert coded >= 0.9 * budget
    # density and value width are chosen per weight together
    assert all(w.value_bits is not None for w in result.report.weights)


def test_bits_per_weight_loose_budget_keeps_everything(mlp, tmp_path):
    result = rdonnx.compress(mlp.path, bits_per_weight=64.0, calib=mlp.calib, config=CONFIG)
    assert result.report.rate == 1.0
    result.save(tmp_path / "m.rdonnx")
    assert result.report.coding.bits_per_weight <= 64.0


def test_bits_per_weight_too_small(mlp):
    with pytest.raises(rdonnx.UsageError, match="bits-per-weight"):
        rdonnx.compress(mlp.path, bits_per_weight=1e-4, calib=mlp.calib, config=CONFIG)


# ----------------------------------------------------------------------------------------------
# the command line


def test_cli_compress_inspect_decompress_evaluate(cli, tmp_path):
    model = tmp_path / "digits_mlp.onnx"
    shutil.copy(BUNDLED / "digits_mlp.onnx", model)
    calib = BUNDLED / "digits_calib.npz"
    run = cli("compress", model, "--rate", "0.3", "--calib", calib, *FAST_CLI,
              "--holdout", "0")  # the manifest's figure is then that of all of calib
    assert run.code == 0, run.err
    artifact = tmp_path / "digits_mlp.rdonnx"
    assert listing(tmp_path) == ["digits_mlp.onnx", "digits_mlp.rdonnx"]
    assert artifact.read_bytes()[:8] == MAGIC
    manifest = read_artifact(artifact).manifest
    assert manifest["settings"]["target"]["rate"] == 0.3 and \
        manifest["settings"]["coding"]["format"] == "rdonnx"

    run = cli("inspect", artifact)
    assert run.code == 0, run.err
    for t in manifest["tensors"]:
        assert t["name"] in run.out
    assert "bits per value" in run.out and "quantized" in run.out

    run = cli("inspect", artifact, "--json")
    assert run.code == 0, run.err
    assert json.loads(run.out) == manifest

    for fmt in ("dense", "sparse"):
        out = tmp_path / f"{fmt}.onnx"
        run = cli("decompress", artifact, "-o", out, "--format", fmt)
        assert run.code == 0, run.err
        onnx.checker.check_model(str(out))
        feed = calib_feed(Case("copy", model, calib))
        _same(_ort(out, feed), rdonnx.open_session(artifact).run(None, feed))
    run = cli("decompress", artifact, "-o", tmp_path / "dense.onnx")
    assert run.code == 2 and "--force" in run.err
    run = cli("decompress", artifact, "-o", tmp_path / "dense.onnx", "--force")
    assert run.code == 0, run.err

    run = cli("evaluate", model, artifact, "--data", calib, "--json")
    assert run.code == 0, run.err
    evaluation = json.loads(run.out)
    assert evaluation["samples"] > 0 and 0 < evaluation["nmse"] < 1
    # the same weights on the same data: evaluate measures what compress reported
    assert evaluation["distortion"] == pytest.approx(manifest["metrics"]["distortion"],
                                                     rel=1e-4)
    run = cli("evaluate", artifact, tmp_path / "dense.onnx", "--data", calib, "--json")
    assert run.code == 0, run.err
    assert json.loads(run.out)["nmse"] == 0.0


def test_cli_value_options(cli, tmp_path, mlp):
    out = tmp_path / "v.rdonnx"
    run = cli("compress", mlp.path, "--rate", "0.3", "--calib", mlp.calib, "--value-bits", "8",
              "-o", out, *FAST_CLI)
    assert run.code == 0, run.err
    assert read_artifact(out).manifest["metrics"]["value_bits"] == 8
    out = tmp_path / "e.rdonnx"
    run = cli("compress", mlp.path, "--rate", "0.3", "--calib", mlp.calib, "--values", "exact",
              "-o", out, *FAST_CLI)
    assert run.code == 0, run.err
    manifest = read_artifact(out).manifest
    assert manifest["metrics"]["value_bits"] is None
    assert {t["encoding"] for t in manifest["tensors"]} == {"exact"}
    run = cli("compress", mlp.path, "--rate", "0.3", "--calib", mlp.calib, "--value-bits", "1",
              "-o", tmp_path / "x.rdonnx", *FAST_CLI)
    assert run.code == 2 and not (tmp_path / "x.rdonnx").exists()


def test_cli_bits_per_weight(cli, tmp_path, mlp):
    out = tmp_path / "b.rdonnx"
    report = tmp_path / "r.json"
    run = cli("compress", mlp.path, "--bits-per-weight", "1.2", "--calib", mlp.calib,
              "-o", out, "--report", report, *FAST_CLI)
    assert run.code == 0, run.err
    data = json.loads(report.read_text())
    assert data["coding"]["bits_per_weight"] <= 1.2
    assert data["coding"]["artifact_bytes"] == out.stat().st_size


def test_quantize_reference_matches_artifact_levels(mlp, tmp_path):
    """The artifact's levels are the fitted grid's (`grids.choose`), RD-rounded, of the pruned
    weights; without RDOQ plain rounding on that grid."""
    for rdoq in (False, True):
        # no bias correction: no layer-input moments, so `grids.choose` is unweighted
        result = _compress(mlp, value_bits=6, rdoq=rdoq, bias_correction=False)
        for name, pruned in result.pruned.items():
            grid = grids.choose(pruned, 6, 1)  # MatMul [in, out]: output channels on axis 1
            q = grids.round_to(pruned, grid, 6)
            if rdoq:
                q = grids.rdoq(pruned, q, grid, 6)
            assert np.array_equal(result.quantized[name].q, q)
            assert np.array_equal(np.ravel(result.quantized[name].step), grid.steps)
