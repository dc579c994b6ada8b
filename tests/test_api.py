"""The Python API end to end: `rdonnx.compress`, `CompressResult.save`, `inspect`, `evaluate`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import PRUNABLE_CASES, Case, calib_feed
from onnx import numpy_helper

import rdonnx
from rdonnx import CompressConfig, CompressResult, DataOptions, UsageError

METHODS = ("uniform", "global")
RATE_TOLERANCE = 0.005  # params_kept / params_total within 0.5 % of the rate


def fast(rate: float, method: str = "uniform", **kwargs) -> CompressConfig:
    """Pruning to dense ONNX (exact values) without the per-weight measurement."""
    kwargs.setdefault("format", "dense")
    return CompressConfig.of(rate=rate, method=method, layer_distortion=False, **kwargs)


DENSE = CompressConfig.of(format="dense")  # these tests are about pruning: exact values


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def tensors(model: onnx.ModelProto | Path, base_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Every constant tensor of a model (initializers, sparse initializers, Constant nodes,
    subgraphs included) as a dense array, read independently of rdonnx."""
    if isinstance(model, Path):
        model = onnx.load(str(model))
    found = {}
    for graph in _graphs(model.graph):
        for t in graph.initializer:
            found[t.name] = numpy_helper.to_array(t, str(base_dir or ""))
        for sparse in graph.sparse_initializer:
            values = numpy_helper.to_array(sparse.values)
            indices = numpy_helper.to_array(sparse.indices)
            dense = np.zeros(int(np.prod(sparse.dims)), values.dtype)
            dense[indices.reshape(-1) if indices.ndim == 1 else
                  np.ravel_multi_index(indices.T, tuple(sparse.dims))] = values
            found[sparse.values.name] = dense.reshape(tuple(sparse.dims))
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        found[node.output[0]] = numpy_helper.to_array(attr.t)
    return found


def check_report(result: CompressResult, rate: float) -> None:
    """The invariants every report must satisfy."""
    report = result.report
    assert report.params_total > 0
    assert abs(report.params_kept / report.params_total - rate) <= RATE_TOLERANCE
    assert report.density == pytest.approx(report.params_kept / report.params_total)
    assert sum(w.kept for w in report.weights) == report.params_kept
    assert sum(w.params for w in report.weights) == report.params_total
    for w in report.weights:
        assert 0 <= w.kept <= w.params == int(np.prod(w.shape))
        assert w.density == pytest.approx(w.kept / w.params)
    assert abs(report.rate - rate) <= RATE_TOLERANCE
    assert report.schema_version >= 1


# ----------------------------------------------------------------------------------------------
# the report


@pytest.fixture(scope="module")
def mlp_10(mlp) -> CompressResult:
    """The MLP at rate 0.1 with per-weight distortions measured."""
    return rdonnx.compress(mlp.path, rate=0.1, calib=mlp.calib, method="uniform", config=DENSE)


@pytest.fixture(scope="module")
def mlp_full(mlp) -> CompressResult:
    return rdonnx.compress(mlp.path, rate=1.0, calib=mlp.calib, method="uniform", config=DENSE)


def test_report_numbers_are_consistent(mlp_10, mlp):
    check_report(mlp_10, 0.1)
    report = mlp_10.report
    assert report.method == "uniform"
    assert report.model == mlp.path.name
    assert report.input_bytes == mlp.path.stat().st_size
    assert [w.name for w in report.weights] == \
        [w.name for w in rdonnx.inspect(mlp.path).weights]
    # 32 samples: a quarter held out (seeded), the bounds' data; the rest fits
    assert (report.calibration.samples, report.holdout.samples) == (24, 8)
    assert report.calibration.metric == "nmse"
    assert report.calibration.distortion == report.calibration.nmse > 0
    assert 0 <= report.calibration.top1_agreement <= 1
    assert all(w.distortion is not None and w.distortion > 0 for w in report.weights)


def test_rate_one_keeps_everything_and_costs_nothing(mlp_full):
    check_report(mlp_full, 1.0)
    report = mlp_full.report
    assert report.params_kept == report.params_total
    assert report.calibration.distortion == 0
    assert report.calibration.nmse == 0
    assert report.calibration.top1_agreement == 1
    assert all(w.distortion == 0 for w in report.weights)


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.37, 0.5, 0.999])
@pytest.mark.parametrize("method", METHODS)
def test_rate_is_met(cnn, method, rate):
    result = rdonnx.compress(cnn.path, rate=rate, calib=cnn.calib, method=method,
                             config=fast(rate, method))
    check_report(result, rate)
    assert result.report.method == method
    assert all(w.distortion is None for w in result.report.weights)  # not measured


def test_uniform_keeps_the_same_density_in_every_weight(mlp_10):
    for w in mlp_10.report.weights:
        assert abs(w.density - 0.1) <= 1 / w.params + 1e-9


def test_report_json_is_complete(mlp_10):
    data = json.loads(mlp_10.report.to_json())
    assert data["schema_version"] == mlp_10.report.schema_version
    assert data["params_total"] == mlp_10.report.params_total
    assert data["params_kept"] == mlp_10.report.params_kept
    assert data["rate"] == pytest.approx(0.1, abs=RATE_TOLERANCE)
    assert data["settings"]["target"]["rate"] == 0.1
    assert data["settings"]["method"] == "uniform"
    assert [w["name"] for w in data["weights"]] == [w.name for w in mlp_10.report.weights]
    assert data["calibration"]["nmse"] == pytest.approx(mlp_10.report.calibration.nmse,
                                                         rel=1e-5)


def test_pruned_weights_keep_the_largest_entries(mlp, mlp_10):
    original = tensors(mlp.path)
    pruned = tensors(mlp_10.model)
    for w in mlp_10.report.weights:
        before, after = original[w.name], pruned[w.name]
        kept = after != 0
        assert int(kept.sum()) == w.kept
        np.testing.assert_array_equal(after[kept], before[kept])  # kept entries unchanged
        assert np.abs(before[~kept]).max() <= np.abs(before[kept]).min()  # magnitude order
    for name in set(original) - {w.name for w in mlp_10.report.weights}:
        np.testing.assert_array_equal(original[name], pruned[name])  # biases untouched


# ----------------------------------------------------------------------------------------------
# the model and the saved files


def test_model_property_is_a_valid_model_proto(mlp_10, mlp, ort_run):
    model = mlp_10.model
    assert isinstance(model, onnx.ModelProto)
    onnx.checker.check_model(model)
    original = ort_run(mlp.path, calib_feed(mlp))[0]
    pruned = ort_run(model, calib_feed(mlp))[0]
    assert pruned.shape == original.shape
    assert not np.allclose(pruned, original)  # pruning changed the outputs


@pytest.fixture(scope="module")
def mlp_saved(mlp_10, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("saved")
    sizes = {}
    paths = {}
    for fmt in ("dense", "sparse"):
        paths[fmt] = folder / f"mlp.{fmt}.onnx"
        sizes[fmt] = mlp_10.save(paths[fmt], fmt)
        assert mlp_10.report.output == str(paths[fmt])
        assert mlp_10.report.output_format == fmt
        assert mlp_10.report.output_bytes == sizes[fmt] == paths[fmt].stat().st_size
    return paths


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_saved_files_are_valid_and_match_the_dense_pruned_model(mlp_saved, mlp_10, mlp,
                                                                ort_run, fmt):
    path = mlp_saved[fmt]
    onnx.checker.check_model(str(path))
    onnx.checker.check_model(onnx.load(str(path)))
    feed = calib_feed(mlp, 32)
    expected = ort_run(mlp_10.model, feed)
    got = ort_run(path, feed)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-6)
    # the stored values equal the dense pruned weights
    dense = tensors(mlp_10.model)
    stored = tensors(path)
    assert stored.keys() == dense.keys()
    for name in dense:
        np.testing.assert_array_equal(stored[name], dense[name])


def test_sparse_file_is_smaller_and_uses_sparse_initializers(mlp_saved, mlp_10):
    assert mlp_saved["sparse"].stat().st_size < mlp_saved["dense"].stat().st_size
    sparse = onnx.load(str(mlp_saved["sparse"]))
    assert {s.values.name for s in sparse.graph.sparse_initializer} == \
        {w.name for w in mlp_10.report.weights}
    dense = onnx.load(str(mlp_saved["dense"]))
    assert len(dense.graph.sparse_initializer) == 0


def test_save_refuses_existing_file_without_force(mlp, tmp_path):
    result = rdonnx.compress(mlp.path, rate=0.5, calib=mlp.calib, config=fast(0.5))
    path = tmp_path / "out.onnx"
    path.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="exists"):
        result.save(path)
    assert path.read_bytes() == b"keep me"
    result.save(path, force=True)
    onnx.checker.check_model(str(path))


def test_save_refuses_the_input_model_and_unknown_formats(mlp, tmp_path):
    model = tmp_path / "model.onnx"
    shutil.copy(mlp.path, model)
    before = model.read_bytes()
    result = rdonnx.compress(model, rate=0.5, calib=mlp.calib, config=fast(0.5))
    with pytest.raises(UsageError, match="input model"):
        result.save(model, force=True)
    with pytest.raises(UsageError, match="format"):
        result.save(tmp_path / "x.onnx", "zip")
    assert model.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_save_into_a_missing_folder_is_a_usage_error(mlp_10, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        mlp_10.save(tmp_path / "missing" / "out.onnx")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# every model, both methods


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", PRUNABLE_CASES, indirect=True)
def test_compress_every_model(case: Case, method, tmp_path, ort_run):
    rate = 0.2
    result = rdonnx.compress(case.path, rate=rate, calib=case.calib, method=method,
                             config=fast(rate, method))
    check_report(result, rate)
    assert result.report.calibration.distortion > 0
    onnx.checker.check_model(result.model)
    feed = calib_feed(case)
    expected = ort_run(result.model, feed)
    original = ort_run(case.path, feed)
    for fmt in ("dense", "sparse"):
        path = tmp_path / f"out.{fmt}.onnx"
        result.save(path, fmt)
        onnx.checker.check_model(str(path))
        for got, want, orig in zip(ort_run(path, feed), expected, original):
            assert got.shape == orig.shape and got.dtype == orig.dtype
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        stored = tensors(path)
        for w in result.report.weights:
            assert int(np.count_nonzero(stored[w.name])) == w.kept, (fmt, w.name)
    # the pruned files are self-contained: they load alone, away from any external data
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tmp_path / "out.dense.onnx", alone / "m.onnx")
    np.testing.assert_allclose(ort_run(alone / "m.onnx", feed)[0], expected[0], atol=1e-6)


def test_model_without_prunable_weights_is_a_usage_error(no_weights):
    with pytest.raises(UsageError, match="no prunable weight"):
        rdonnx.compress(no_weights.path, rate=0.5, calib=no_weights.calib)
    # --include makes its small weight prunable
    result = rdonnx.compress(no_weights.path, rate=0.5, calib=no_weights.calib,
                             config=fast(0.5, include=("w",)))
    assert [w.name for w in result.report.weights] == ["w"]
    assert result.report.params_kept == 8


def test_external_data_model_prunes_like_the_inline_one(external, mlp, tmp_path, ort_run):
    inline = rdonnx.compress(mlp.path, rate=0.3, calib=mlp.calib, config=fast(0.3))
    ext = rdonnx.compress(external.path, rate=0.3, calib=external.calib, config=fast(0.3))
    assert ext.report.params_kept == inline.report.params_kept
    assert ext.report.input_bytes == external.path.stat().st_size + \
        (external.path.parent / "w.data").stat().st_size
    assert ext.report.calibration.nmse == pytest.approx(inline.report.calibration.nmse,
                                                        rel=1e-6)
    ext.save(tmp_path / "ext.onnx")
    inline.save(tmp_path / "inline.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "inline.onnx"]
    feed = calib_feed(mlp)
    np.testing.assert_array_equal(ort_run(tmp_path / "ext.onnx", feed)[0],
                                  ort_run(tmp_path / "inline.onnx", feed)[0])


def test_subgraph_and_constant_weights_are_pruned_correctly(subgraph, tmp_path, ort_run):
    result = rdonnx.compress(subgraph.path, rate=0.25, calib=subgraph.calib, config=fast(0.25))
    assert sorted(w.name for w in result.report.weights) == ["w_const", "w_then"]
    assert result.report.params_total == 512
    assert result.report.params_kept == 128
    path = tmp_path / "sub.onnx"
    result.save(path, "sparse")
    onnx.checker.check_model(str(path))
    values = tensors(path)
    w_const, w_then = values["w_const"], values["w_then"]
    assert np.count_nonzero(w_const) == 64 and np.count_nonzero(w_then) == 64
    # numpy reference of the graph with the pruned weights
    x = calib_feed(subgraph, 32)["input"]
    for batch in (x[:16], x[16:]):
        h = batch @ w_const
        expected = h @ w_then if h.sum() > 0 else -h
        np.testing.assert_allclose(ort_run(path, {"input": batch})[0], expected,
                                   rtol=1e-5, atol=1e-5)


def test_in_memory_models(mlp, tmp_path, ort_run):
    proto = onnx.load(str(mlp.path))
    from_proto = rdonnx.compress(proto, rate=0.4, calib=mlp.calib, config=fast(0.4))
    from_bytes = rdonnx.compress(mlp.path.read_bytes(), rate=0.4, calib=mlp.calib,
                                 config=fast(0.4))
    from_path = rdonnx.compress(str(mlp.path), rate=0.4, calib=mlp.calib, config=fast(0.4))
    assert from_proto.report.model == from_bytes.report.model == "<in-memory model>"
    assert from_proto.report.params_kept == from_path.report.params_kept
    from_proto.save(tmp_path / "a.onnx")
    from_path.save(tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_calibration_arrays_in_memory(mlp):
    with np.load(mlp.calib) as data:
        arrays = {"input": data["input"]}
    from_file = rdonnx.compress(mlp.path, rate=0.3, calib=mlp.calib, config=fast(0.3))
    from_arrays = rdonnx.compress(mlp.path, rate=0.3, calib=arrays, config=fast(0.3))
    assert from_arrays.report.calibration.nmse == from_file.report.calibration.nmse
    assert from_arrays.report.calibration.samples + from_arrays.report.holdout.samples == 32


@pytest.mark.parametrize("rate", [0, -0.5, 1.5])
def test_rate_outside_unit_interval_is_a_usage_error(mlp, rate):
    with pytest.raises(UsageError, match="rate"):
        rdonnx.compress(mlp.path, rate=rate, calib=mlp.calib)


def test_unknown_method_is_a_usage_error(mlp):
    with pytest.raises(UsageError, match="method"):
        rdonnx.compress(mlp.path, rate=0.5, calib=mlp.calib, method="random")


# ----------------------------------------------------------------------------------------------
# inspect


def test_inspect_before_and_after_pruning(cnn, tmp_path):
    before = rdonnx.inspect(cnn.path)
    assert before.model == cnn.path.name
    assert before.params_total > 0
    assert before.params_nonzero == before.params_total
    assert all(w.density == 1.0 for w in before.weights)
    assert "100.00% nonzero" in before.render()

    rate = 0.3
    result = rdonnx.compress(cnn.path, rate=rate, calib=cnn.calib, method="global",
                             config=fast(rate, "global"))
    assert [w.name for w in result.report.weights] == [w.name for w in before.weights]
    path = tmp_path / "pruned.onnx"
    result.save(path)
    after = rdonnx.inspect(path)
    assert [w.name for w in after.weights] == [w.name for w in before.weights]
    assert after.params_total == before.params_total == result.report.params_total
    assert after.params_nonzero == result.report.params_kept
    assert abs(after.params_nonzero / after.params_total - rate) <= RATE_TOLERANCE
    for w, r in zip(after.weights, result.report.weights):
        assert w.kept == r.kept and w.density == pytest.approx(r.density)
    assert rdonnx.inspect(onnx.load(str(path))).model == "<in-memory model>"


def test_inspect_sees_the_weights_of_a_sparse_output(mlp_saved, mlp_10):
    """A model written with --format sparse still has its prunable weights."""
    dense = rdonnx.inspect(mlp_saved["dense"])
    sparse = rdonnx.inspect(mlp_saved["sparse"])
    assert [w.name for w in sparse.weights] == [w.name for w in dense.weights]
    assert sparse.params_total == dense.params_total == mlp_10.report.params_total
    assert sparse.params_nonzero == dense.params_nonzero == mlp_10.report.params_kept


def test_inspect_min_params_include_exclude(mlp):
    names = [w.name for w in rdonnx.inspect(mlp.path).weights]
    assert len(names) == 3
    assert [w.name for w in rdonnx.inspect(mlp.path, exclude=names[:1]).weights] == names[1:]
    biggest = rdonnx.inspect(mlp.path, min_params=2000)
    assert [w.params for w in biggest.weights] == [2048]
    with_bias = rdonnx.inspect(mlp.path, include=["*bias*"])
    assert len(with_bias.weights) > 3


# ----------------------------------------------------------------------------------------------
# evaluate


@pytest.fixture(scope="module")
def bundled_cnn_pruned(bundled_cnn, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bundled") / "cnn_pruned.onnx"
    rdonnx.compress(bundled_cnn.path, rate=0.3, calib=bundled_cnn.calib,
                    config=fast(0.3)).save(path)
    return path


def test_evaluate_reports_accuracies_on_the_bundled_cnn(bundled_cnn, bundled_cnn_pruned,
                                                        digits_test):
    same = rdonnx.evaluate(bundled_cnn.path, bundled_cnn.path, digits_test, labels="label")
    assert same.samples == 360
    assert same.distortion == same.nmse == 0
    assert same.top1_agreement == 1
    assert same.accuracy_original == same.accuracy_compressed == pytest.approx(358 / 360)

    pruned = rdonnx.evaluate(bundled_cnn.path, bundled_cnn_pruned, digits_test, labels="label")
    assert pruned.samples == 360
    assert pruned.accuracy_original == pytest.approx(358 / 360)
    assert 0 <= pruned.accuracy_compressed < pruned.accuracy_original
    assert pruned.nmse > 0 and pruned.kl > 0 and pruned.cosine > 0
    assert pruned.top1_agreement < 1


def test_evaluate_metrics_and_errors(bundled_cnn, bundled_cnn_pruned, digits_test, attention,
                                    mlp, int64_model):
    kl = rdonnx.evaluate(bundled_cnn.path, bundled_cnn_pruned, bundled_cnn.calib, metric="kl",
                         options=DataOptions(samples=64))
    assert kl.metric == "kl" and kl.distortion == kl.kl > 0
    assert kl.samples == 64
    assert kl.accuracy_original is None  # no labels asked for
    with pytest.raises(UsageError):
        rdonnx.evaluate(bundled_cnn.path, bundled_cnn_pruned, digits_test, labels="nope")
    with pytest.raises(UsageError, match="metric"):
        rdonnx.evaluate(bundled_cnn.path, bundled_cnn_pruned, digits_test, metric="psnr")
    with pytest.raises(UsageError, match="kl"):
        rdonnx.evaluate(attention.path, attention.path, attention.calib, metric="kl")
    # an encoder's features are no distribution: no KL figure unless asked for (and refused)
    assert rdonnx.evaluate(attention.path, attention.path, attention.calib).kl is None
    with pytest.raises(UsageError, match="different inputs"):
        rdonnx.evaluate(mlp.path, int64_model.path, mlp.calib)


def test_evaluate_kl_of_a_sequence_classifier_is_per_position(tmp_path):
    """A classifier head's [N, T, classes] logits: KL per position over the classes, averaged
    over every position; the same graph with a Sigmoid after the head (not class scores) is
    refused under KL."""
    from _graphs import make_model, vi
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    head = rng.standard_normal((6, 9)).astype(np.float32)

    def model(weight: np.ndarray, last: str) -> Path:
        nodes = [helper.make_node("MatMul", ["x", "H"], ["z"])]
        if last == "Sigmoid":
            nodes.append(helper.make_node("Sigmoid", ["z"], ["y"]))
        else:
            nodes.append(helper.make_node("Identity", ["z"], ["y"]))
        path = tmp_path / f"{last}-{int(weight.sum() * 1000)}.onnx"
        onnx.save(make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 4, 6])],
                             [vi("y", TensorProto.FLOAT, ["N", 4, 9])], {"H": weight}), path)
        return path

    x = rng.standard_normal((8, 4, 6)).astype(np.float32)
    moved = head + rng.standard_normal(head.shape).astype(np.float32) * 0.2
    got = rdonnx.evaluate(model(head, "Identity"), model(moved, "Identity"), {"x": x},
                          metric="kl")
    lp, lq = (z - z.max(1, keepdims=True) for z in ((x @ h).reshape(-1, 9).astype(np.float64)
                                                     for h in (head, moved)))
    lp, lq = (v - np.log(np.exp(v).sum(1, keepdims=True)) for v in (lp, lq))
    assert got.kl == pytest.approx(float(np.mean((np.exp(lp) * (lp - lq)).sum(1))), rel=1e-4)
    with pytest.raises(UsageError, match="kl needs class scores"):
        rdonnx.evaluate(model(head, "Sigmoid"), model(moved, "Sigmoid"), {"x": x}, metric="kl")


# ----------------------------------------------------------------------------------------------
# determinism


def _run(case: Case, calib, seed: int, method: str, fmt: str, folder: Path):
    config = CompressConfig.of(rate=0.25, method=method, data=DataOptions(seed=seed, samples=32),
                            format="dense")
    result = rdonnx.compress(case.path, rate=0.25, calib=calib, method=method, config=config)
    before_save = result.report.to_json(timings=False)  # timings differ from run to run
    folder.mkdir(parents=True)
    result.save(folder / "out.onnx", fmt)
    return before_save, result.report.to_json(timings=False), (folder / "out.onnx").read_bytes()


@pytest.mark.parametrize("method,fmt", [("uniform", "sparse"), ("global", "dense")])
def test_same_seed_gives_identical_files_and_reports(cnn, tmp_path, method, fmt):
    first = _run(cnn, None, 7, method, fmt, tmp_path / "a")
    second = _run(cnn, None, 7, method, fmt, tmp_path / "b")
    assert first[0] == second[0]  # report JSON, byte for byte
    assert first[2] == second[2]  # model file, byte for byte
    a, b = json.loads(first[1]), json.loads(second[1])
    assert a.pop("output").endswith("a/out.onnx") and b.pop("output").endswith("b/out.onnx")
    assert a == b
    assert a["settings"]["data"]["seed"] == 7


def test_seed_changes_synthetic_data(cnn, tmp_path):
    seven = json.loads(_run(cnn, None, 7, "uniform", "dense", tmp_path / "a")[0])
    eight = json.loads(_run(cnn, None, 8, "uniform", "dense", tmp_path / "b")[0])
    assert seven["calibration"]["nmse"] != eight["calibration"]["nmse"]


def test_same_calibration_file_gives_identical_output(bundled_mlp, tmp_path):
    first = _run(bundled_mlp, bundled_mlp.calib, 0, "global", "sparse", tmp_path / "a")
    second = _run(bundled_mlp, bundled_mlp.calib, 0, "global", "sparse", tmp_path / "b")
    assert first[0] == second[0] and first[2] == second[2]


# ----------------------------------------------------------------------------------------------
# synthetic calibration


@pytest.mark.parametrize("case", ["mlp", "cnn", "attention", "subgraph", "external",
                                  "bundled_cnn"], indirect=True)
def test_synthetic_calibration_for_float_inputs(case: Case):
    result = rdonnx.compress(case.path, rate=0.5, calib=None, config=fast(0.5))
    check_report(result, 0.5)
    assert result.report.calibration.data == "calibration (synthetic)"
    assert result.report.calibration.samples >= 16
    assert result.report.calibration.nmse > 0


def test_synthetic_calibration_needs_a_range_for_integer_inputs(int64_model, ort_run):
    with pytest.raises(UsageError, match="input-range"):
        rdonnx.compress(int64_model.path, rate=0.5, calib=None)
    config = fast(0.5, data=DataOptions(ranges={"input": (0, 49)}, samples=32))
    result = rdonnx.compress(int64_model.path, rate=0.5, calib=None, config=config)
    check_report(result, 0.5)
    assert result.report.calibration.samples == 32
    assert result.report.calibration.nmse > 0
    assert [w.name for w in result.report.weights] == ["w"]  # the embedding is not a weight
    np.testing.assert_array_equal(tensors(result.model)["embedding"],
                                  tensors(int64_model.path)["embedding"])


def test_integer_range_beyond_the_vocabulary_is_a_usage_error(int64_model):
    config = fast(0.5, data=DataOptions(ranges={"input": (0, 10_000)}))
    with pytest.raises(UsageError):
        rdonnx.compress(int64_model.path, rate=0.5, calib=None, config=config)


def test_calibration_problems_are_usage_errors(bundled_cnn, int64_model, tmp_path):
    wrong_name = tmp_path / "name.npz"
    np.savez(wrong_name, x=np.zeros((4, 1, 8, 8), np.float32))
    wrong_shape = tmp_path / "shape.npz"
    np.savez(wrong_shape, input=np.zeros((4, 1, 7, 7), np.float32))
    wrong_dtype = tmp_path / "dtype.npz"
    np.savez(wrong_dtype, input=np.zeros((4, 6), np.float32))
    with pytest.raises(UsageError, match="missing"):
        rdonnx.compress(bundled_cnn.path, rate=0.5, calib=wrong_name)
    with pytest.raises(UsageError, match="shape"):
        rdonnx.compress(bundled_cnn.path, rate=0.5, calib=wrong_shape)
    with pytest.raises(UsageError, match="float32"):
        rdonnx.compress(int64_model.path, rate=0.5, calib=wrong_dtype)
    with pytest.raises(UsageError, match="not found"):
        rdonnx.compress(bundled_cnn.path, rate=0.5, calib=tmp_path / "missing.npz")


@pytest.mark.parametrize("method", ["surp", "pqi", "hsic", "gao"])
@pytest.mark.parametrize("case", PRUNABLE_CASES, indirect=True)
def test_seed_paper_methods_on_every_model(case: Case, method, tmp_path, ort_run):
    """Each seed paper's method runs on every test model and its .rdonnx runs exactly as
    measured."""
    rate = 0.3
    result = rdonnx.compress(case.path, rate=rate, calib=case.calib, method=method,
                             config=CompressConfig.of(layer_distortion=False))
    assert result.report.method == method
    assert abs(result.report.rate - rate) <= 0.005 + 1 / result.report.params_total
    path = tmp_path / "m.rdonnx"
    result.save(path)
    feed = calib_feed(case)
    expected = ort_run(result.model, feed)
    got = rdonnx.open_session(path).run(None, feed)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
