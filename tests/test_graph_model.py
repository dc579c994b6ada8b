"""rdonnx.graph.model: loading, lazy external data, atomic writing, sparse initializers, IR
version."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from _graphs import if_model, make_model, ort_run, sparsify, tiny_mlp, tiny_mlp_reference, vi
from onnx import TensorProto, helper, numpy_helper

import rdonnx.graph.model as rmodel
from rdonnx.errors import UsageError
from rdonnx.graph.model import (
    fit_ir_version,
    iter_graphs,
    load_model,
    simplify,
    tensor_array,
    tensor_bytes,
    tensor_slots,
    write_model,
)
from rdonnx.runtime.session import max_runtime_ir_version

X = np.random.default_rng(42).standard_normal((5, 8)).astype(np.float32)


def _save_external(model: onnx.ModelProto, folder: Path, name: str = "ext.onnx",
                   location: str = "weights.bin") -> Path:
    path = folder / name
    onnx.save_model(model, str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=location, size_threshold=0)
    return path


def _initializer(proto: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in proto.graph.initializer if t.name == name)


# ---------------------------------------------------------------- loading


def test_load_from_path_bytes_and_proto(tmp_path):
    proto, _ = tiny_mlp()
    path = tmp_path / "m.onnx"
    onnx.save_model(proto, str(path))

    from_path = load_model(path)
    assert from_path.path == path and from_path.base_dir == tmp_path
    assert from_path.proto == proto

    from_str = load_model(str(path))
    assert from_str.proto == proto

    from_bytes = load_model(proto.SerializeToString())
    assert from_bytes.proto == proto
    assert from_bytes.path is None and from_bytes.base_dir is None

    from_proto = load_model(proto)
    assert from_proto.proto is proto and from_proto.base_dir is None


def test_load_missing_file_raises_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(UsageError):
        load_model(tmp_path)  # a folder is not a model file


@pytest.mark.parametrize("content", [
    b"this is a plain text file, not a model\n",
    bytes(range(256)) * 4,
    b"",
    b"\x08\x08",  # a valid protobuf (ir_version only) without a graph
])
def test_non_onnx_file_raises_usage_error(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(UsageError, match="not a valid ONNX model"):
        load_model(path)
    with pytest.raises(UsageError):
        load_model(content)


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
def test_truncated_model_raises_usage_error(tmp_path, fraction):
    proto, _ = tiny_mlp()
    proto.metadata_props.add(key="k", value="v")
    data = proto.SerializeToString()
    cut = data[: int(len(data) * fraction)]
    path = tmp_path / "cut.onnx"
    path.write_bytes(cut)
    with pytest.raises(UsageError, match=re.escape(str(path))):
        load_model(path)


# ---------------------------------------------------------------- external data


def test_external_data_is_loaded_lazily_and_read_on_demand(tmp_path):
    proto, arrays = tiny_mlp()
    path = _save_external(proto, tmp_path)
    model = load_model(path)
    w1 = _initializer(model.proto, "W1")
    assert w1.data_location == TensorProto.EXTERNAL
    assert not w1.raw_data and not w1.float_data
    assert {e.key: e.value for e in w1.external_data}["location"] == "weights.bin"
    np.testing.assert_array_equal(tensor_array(model, w1), arrays["W1"])
    # reading did not pull the data into the protobuf
    assert _initializer(model.proto, "W1").data_location == TensorProto.EXTERNAL
    assert tensor_bytes(model) >= sum(a.nbytes for a in arrays.values())


def test_load_model_does_not_read_external_data(tmp_path):
    proto, _ = tiny_mlp()
    path = _save_external(proto, tmp_path)
    (tmp_path / "weights.bin").unlink()
    model = load_model(path)  # must not touch the (missing) data file
    assert _initializer(model.proto, "W2").data_location == TensorProto.EXTERNAL


def test_tensor_array_missing_external_file_raises_usage_error(tmp_path):
    proto, _ = tiny_mlp()
    path = _save_external(proto, tmp_path)
    (tmp_path / "weights.bin").unlink()
    model = load_model(path)
    with pytest.raises(UsageError, match="W1"):
        tensor_array(model, _initializer(model.proto, "W1"))


def test_tensor_array_external_data_without_folder_raises(tmp_path):
    proto, _ = tiny_mlp()
    path = _save_external(proto, tmp_path)
    model = load_model(path.read_bytes())
    with pytest.raises(UsageError, match="external data"):
        tensor_array(model, _initializer(model.proto, "W1"))


def test_write_model_inlines_external_source_below_threshold(tmp_path):
    proto, arrays = tiny_mlp()
    src = tmp_path / "src"
    src.mkdir()
    model = load_model(_save_external(proto, src))
    out = tmp_path / "out.onnx"
    write_model(model, out)
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "src"]
    written = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location == TensorProto.DEFAULT for t in written.graph.initializer)
    onnx.checker.check_model(written)
    np.testing.assert_allclose(ort_run(out, {"x": X})[0], tiny_mlp_reference(X, arrays), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("source_external", [False, True])
def test_write_model_external_above_threshold(tmp_path, monkeypatch, source_external):
    proto, arrays = tiny_mlp(hidden=64)  # W1, W2: 8x64 and 64x4 floats (2048 / 1024 bytes)
    src = tmp_path / "src"
    src.mkdir()
    model = load_model(_save_external(proto, src)) if source_external else load_model(proto)
    monkeypatch.setattr(rmodel, "EXTERNAL_DATA_THRESHOLD", 64)
    new_w1 = (arrays["W1"] * 2).astype(np.float32)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.onnx"
    size = write_model(model, out, {"W1": new_w1})

    assert sorted(os.listdir(out_dir)) == ["model.onnx", "model.onnx.data"]
    assert size == out.stat().st_size + (out_dir / "model.onnx.data").stat().st_size
    written = onnx.load(str(out), load_external_data=False)
    for name in ("W1", "W2"):
        t = _initializer(written, name)
        assert t.data_location == TensorProto.EXTERNAL
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "model.onnx.data"
        assert int(info["offset"]) % 4096 == 0
    onnx.checker.check_model(str(out))
    loaded = load_model(out)
    np.testing.assert_array_equal(tensor_array(loaded, _initializer(loaded.proto, "W1")), new_w1)
    expected = tiny_mlp_reference(X, {**arrays, "W1": new_w1})
    np.testing.assert_allclose(ort_run(out, {"x": X})[0], expected, rtol=1e-5, atol=1e-5)


def test_write_model_external_constant_node_runs(tmp_path, monkeypatch):
    proto, arrays = if_model(constant=True)
    monkeypatch.setattr(rmodel, "EXTERNAL_DATA_THRESHOLD", 64)
    out = tmp_path / "c.onnx"
    write_model(load_model(proto), out)
    assert (tmp_path / "c.onnx.data").is_file()
    feed = {"x": X, "c": np.array(True)}
    np.testing.assert_allclose(ort_run(out, feed)[0], X @ arrays["Wt"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- writing


def test_write_model_replaces_tensors(tmp_path):
    proto, arrays = tiny_mlp()
    new = {"W1": np.full_like(arrays["W1"], 0.5), "W2": -arrays["W2"]}
    out = tmp_path / "out.onnx"
    size = write_model(load_model(proto), out, new)
    assert size == out.stat().st_size
    written = onnx.load(str(out))
    for name, value in new.items():
        t = _initializer(written, name)
        assert t.data_type == TensorProto.FLOAT
        np.testing.assert_array_equal(numpy_helper.to_array(t), value)
    np.testing.assert_array_equal(numpy_helper.to_array(_initializer(written, "b1")),
                                  arrays["b1"])
    np.testing.assert_allclose(ort_run(out, {"x": X})[0], tiny_mlp_reference(X, {**arrays, **new}),
                               rtol=1e-5, atol=1e-5)
    # the source model is not modified
    np.testing.assert_array_equal(numpy_helper.to_array(_initializer(proto, "W1")),
                                  arrays["W1"])


def test_write_model_casts_replacement_to_tensor_dtype(tmp_path):
    proto, arrays = tiny_mlp(dtype=np.float16)
    out = tmp_path / "h.onnx"
    write_model(load_model(proto), out, {"W1": arrays["W1"].astype(np.float64)})
    t = _initializer(onnx.load(str(out)), "W1")
    assert t.data_type == TensorProto.FLOAT16
    np.testing.assert_array_equal(numpy_helper.to_array(t), arrays["W1"])


def test_write_model_leaves_no_temp_files(tmp_path):
    proto, _ = tiny_mlp()
    out = tmp_path / "out.onnx"
    write_model(load_model(proto), out)
    write_model(load_model(proto), out)  # overwrite in place
    assert os.listdir(tmp_path) == ["out.onnx"]


@pytest.mark.parametrize("external", [False, True])
def test_write_model_failure_leaves_no_temp_files_and_keeps_old_output(tmp_path, monkeypatch,
                                                                        external):
    proto, _ = tiny_mlp(hidden=64)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous content")
    if external:
        monkeypatch.setattr(rmodel, "EXTERNAL_DATA_THRESHOLD", 64)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_model(load_model(proto), out)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["out.onnx"]
    assert out.read_bytes() == b"previous content"


def test_write_model_failure_reading_external_data_leaves_no_temp_files(tmp_path, monkeypatch):
    proto, _ = tiny_mlp(hidden=64)
    src = tmp_path / "src"
    src.mkdir()
    model = load_model(_save_external(proto, src))
    (src / "weights.bin").write_bytes(b"\0" * 16)  # too short for the tensors it claims
    monkeypatch.setattr(rmodel, "EXTERNAL_DATA_THRESHOLD", 64)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(UsageError):
        write_model(model, out_dir / "m.onnx")
    assert os.listdir(out_dir) == []


def test_write_model_missing_folder_raises(tmp_path):
    proto, _ = tiny_mlp()
    with pytest.raises(UsageError, match="does not exist"):
        write_model(load_model(proto), tmp_path / "missing" / "out.onnx")


def test_write_model_output_has_normal_file_permissions(tmp_path):
    """The temp file from mkstemp is 0600; the final model must get the usual umask mode."""
    proto, _ = tiny_mlp()
    out = tmp_path / "out.onnx"
    write_model(load_model(proto), out)
    reference = tmp_path / "ref"
    reference.write_bytes(b"")
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)


def test_write_model_keeps_metadata_docs_and_value_info(tmp_path):
    proto, arrays = tiny_mlp()
    proto.doc_string = "model doc"
    proto.producer_name = "unit-test"
    proto.model_version = 7
    proto.graph.doc_string = "graph doc"
    proto.graph.node[0].doc_string = "node doc"
    onnx.helper.set_model_props(proto, {"author": "me", "licence": "MIT"})
    proto.graph.value_info.append(vi("h", TensorProto.FLOAT, ["N", 32]))
    out = tmp_path / "out.onnx"
    write_model(load_model(proto), out, {"W1": arrays["W1"] * 0})
    written = onnx.load(str(out))
    assert written.doc_string == "model doc"
    assert written.producer_name == "unit-test"
    assert written.model_version == 7
    assert written.graph.doc_string == "graph doc"
    assert written.graph.node[0].doc_string == "node doc"
    assert {p.key: p.value for p in written.metadata_props} == {"author": "me", "licence": "MIT"}
    assert [v.name for v in written.graph.value_info] == ["h"]
    assert written.graph.value_info[0] == proto.graph.value_info[0]


# ---------------------------------------------------------------- sparse initializers


@pytest.mark.parametrize("dtype,density,expect_sparse", [
    (np.float32, 0.10, True),
    (np.float32, 0.30, True),  # 12 bytes per nonzero < 4 bytes per entry below 1/3
    (np.float32, 0.40, False),
    (np.float16, 0.15, True),  # 10 bytes per nonzero < 2 bytes per entry below 1/5
    (np.float16, 0.25, False),
])
def test_sparse_initializer_only_when_smaller(tmp_path, dtype, density, expect_sparse):
    proto, arrays = tiny_mlp(hidden=64, dtype=dtype)
    model = load_model(proto)
    pruned = sparsify(arrays["W1"], density)
    dense_out, sparse_out = tmp_path / "dense.onnx", tmp_path / "sparse.onnx"
    dense_size = write_model(model, dense_out, {"W1": pruned})
    sparse_size = write_model(model, sparse_out, {"W1": pruned}, frozenset({"W1"}))

    written = onnx.load(str(sparse_out))
    onnx.checker.check_model(written)
    sparse_names = [s.values.name for s in written.graph.sparse_initializer]
    dense_names = [t.name for t in written.graph.initializer]
    if expect_sparse:
        assert sparse_names == ["W1"] and "W1" not in dense_names
        s = written.graph.sparse_initializer[0]
        assert s.indices.data_type == TensorProto.INT64
        assert list(s.indices.dims) == [np.count_nonzero(pruned)]  # linear indices
        assert list(s.dims) == list(pruned.shape)
        assert s.values.data_type == helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        np.testing.assert_array_equal(numpy_helper.to_array(s.indices),
                                      np.flatnonzero(pruned))
        assert sparse_size < dense_size
    else:
        assert sparse_names == [] and "W1" in dense_names
        assert sparse_size == dense_size
    x = X.astype(dtype)
    np.testing.assert_array_equal(ort_run(sparse_out, {"x": x})[0],
                                  ort_run(dense_out, {"x": x})[0])


def test_sparse_never_larger_than_dense_for_float64_replacement(tmp_path):
    """Replacements are cast to the tensor's dtype, so the size test must use that dtype."""
    proto, arrays = tiny_mlp(hidden=64)
    model = load_model(proto)
    pruned = sparsify(arrays["W1"], 0.4).astype(np.float64)  # float32 weight: dense is smaller
    dense_size = write_model(model, tmp_path / "d.onnx", {"W1": pruned})
    sparse_size = write_model(model, tmp_path / "s.onnx", {"W1": pruned}, frozenset({"W1"}))
    assert sparse_size <= dense_size


def test_sparse_with_external_data_drops_the_dense_copy(tmp_path, monkeypatch):
    """A weight stored sparse must not also leave its dense bytes in `<name>.data`."""
    proto, arrays = tiny_mlp(d_in=64, hidden=64)  # W1: 64x64 floats = 16 KiB
    monkeypatch.setattr(rmodel, "EXTERNAL_DATA_THRESHOLD", 64)
    model = load_model(proto)
    pruned = sparsify(arrays["W1"], 0.05)
    dense_size = write_model(model, tmp_path / "d.onnx", {"W1": pruned})
    sparse_size = write_model(model, tmp_path / "s.onnx", {"W1": pruned}, frozenset({"W1"}))
    written = onnx.load(str(tmp_path / "s.onnx"))
    assert [s.values.name for s in written.graph.sparse_initializer] == ["W1"]
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(ort_run(tmp_path / "s.onnx", {"x": x})[0],
                               tiny_mlp_reference(x, {**arrays, "W1": pruned}), rtol=1e-5,
                               atol=1e-5)
    assert (tmp_path / "s.onnx.data").stat().st_size < arrays["W1"].nbytes
    assert sparse_size < dense_size


def test_sparse_all_zero_weight_runs(tmp_path):
    proto, arrays = tiny_mlp(hidden=64)
    zero = np.zeros_like(arrays["W2"])
    out = tmp_path / "z.onnx"
    write_model(load_model(proto), out, {"W2": zero}, frozenset({"W2"}))
    written = onnx.load(str(out))
    onnx.checker.check_model(written)
    assert [s.values.name for s in written.graph.sparse_initializer] == ["W2"]
    np.testing.assert_allclose(ort_run(out, {"x": X})[0],
                               np.broadcast_to(arrays["b2"], (len(X), 4)), rtol=1e-6)


def test_sparse_names_not_replaced_or_constant_stay_dense(tmp_path):
    proto, arrays = if_model(constant=True)
    zero_w = np.zeros_like(arrays["W"])
    out = tmp_path / "o.onnx"
    write_model(load_model(proto), out, {"W": zero_w, "Wt": np.zeros_like(arrays["Wt"])},
                frozenset({"Wt"}))
    written = onnx.load(str(out))
    assert len(written.graph.sparse_initializer) == 0
    assert [t.name for t in written.graph.initializer] == ["W"]
    feed = {"x": X, "c": np.array(True)}
    np.testing.assert_array_equal(ort_run(out, feed)[0], np.zeros((5, 16), np.float32))


def test_sparse_initializer_inside_subgraph_runs(tmp_path):
    proto, arrays = if_model()
    pruned = sparsify(arrays["Wt"], 0.1)
    out = tmp_path / "sub.onnx"
    write_model(load_model(proto), out, {"Wt": pruned}, frozenset({"Wt"}))
    written = onnx.load(str(out))
    onnx.checker.check_model(written)
    then = next(a.g for a in written.graph.node[0].attribute if a.name == "then_branch")
    assert [s.values.name for s in then.sparse_initializer] == ["Wt"]
    assert len(then.initializer) == 0
    got = ort_run(out, {"x": X, "c": np.array(True)})[0]
    np.testing.assert_allclose(got, X @ pruned, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- IR version, slots, simplify


def test_fit_ir_version_lowers_to_what_onnxruntime_loads(tmp_path):
    proto, arrays = tiny_mlp()
    newest = max_runtime_ir_version()
    assert 7 <= newest <= onnx.IR_VERSION
    proto.ir_version = newest + 5
    fit_ir_version(proto, newest)
    assert proto.ir_version == newest
    np.testing.assert_allclose(ort_run(proto, {"x": X})[0], tiny_mlp_reference(X, arrays),
                               rtol=1e-5, atol=1e-5)

    old = tiny_mlp()[0]
    old.ir_version = 7
    fit_ir_version(old, newest)
    assert old.ir_version == 7  # never raised


def test_write_model_fits_ir_version(tmp_path):
    proto, arrays = tiny_mlp()
    proto.ir_version = max_runtime_ir_version() + 3
    out = tmp_path / "o.onnx"
    write_model(load_model(proto), out, ir_version=max_runtime_ir_version())
    assert onnx.load(str(out)).ir_version == max_runtime_ir_version()
    kept = tmp_path / "kept.onnx"
    write_model(load_model(proto), kept)  # None: the graph layer keeps the version it was given
    assert onnx.load(str(kept)).ir_version == max_runtime_ir_version() + 3
    np.testing.assert_allclose(ort_run(out, {"x": X})[0], tiny_mlp_reference(X, arrays),
                               rtol=1e-5, atol=1e-5)


def test_tensor_slots_and_iter_graphs_cover_subgraphs_and_constants():
    proto, _ = if_model(constant=True)
    graphs = list(iter_graphs(proto.graph))
    assert graphs[0] is proto.graph
    assert sorted(g.name for g in graphs) == ["else", "g", "then"]
    slots = tensor_slots(proto)
    assert set(slots) == {"W", "Wt"}
    assert slots["W"].node is None and slots["W"].graph is proto.graph
    assert slots["Wt"].node is not None and slots["Wt"].node.op_type == "Constant"
    assert slots["Wt"].graph is not proto.graph


def test_simplify_skips_models_with_external_data(tmp_path):
    proto, _ = tiny_mlp()
    model = load_model(_save_external(proto, tmp_path))
    same, notice = simplify(model)
    assert same is model
    assert notice is not None and "external data" in notice


def test_simplify_keeps_model_metadata():
    proto = make_model([helper.make_node("Identity", ["x"], ["a"]),
                        helper.make_node("Identity", ["a"], ["y"])],
                       [vi("x", TensorProto.FLOAT, [2, 3])], [vi("y", TensorProto.FLOAT, [2, 3])])
    proto.doc_string = "keep me"
    proto.producer_name = "unit-test"
    onnx.helper.set_model_props(proto, {"k": "v"})
    simplified, notice = simplify(load_model(proto))
    assert notice is None
    assert simplified.proto.doc_string == "keep me"
    assert simplified.proto.producer_name == "unit-test"
    assert simplified.proto.ir_version == proto.ir_version
    assert {p.key: p.value for p in simplified.proto.metadata_props} == {"k": "v"}
    assert len(simplified.proto.graph.node) < 2


def test_bfloat16_weight_written_dense_and_sparse(tmp_path):
    import ml_dtypes

    w = np.random.default_rng(5).standard_normal((32, 32)).astype(ml_dtypes.bfloat16)
    proto = make_model([helper.make_node("Cast", ["W"], ["wf"], to=TensorProto.FLOAT),
                        helper.make_node("MatMul", ["x", "wf"], ["y"])],
                       [vi("x", TensorProto.FLOAT, ["N", 32])],
                       [vi("y", TensorProto.FLOAT, ["N", 32])], [numpy_helper.from_array(w, "W")])
    pruned = sparsify(w.astype(np.float32), 0.1)  # exactly representable in bfloat16
    x = np.ones((2, 32), np.float32)
    for name, sparse in (("d.onnx", frozenset()), ("s.onnx", frozenset({"W"}))):
        write_model(load_model(proto), tmp_path / name, {"W": pruned}, sparse)
        written = onnx.load(str(tmp_path / name))
        onnx.checker.check_model(written)
        assert len(written.graph.sparse_initializer) == len(sparse)
        expected = x @ pruned.astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_allclose(ort_run(tmp_path / name, {"x": x})[0], expected, rtol=1e-6)
