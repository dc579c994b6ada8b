"""`--quantizer kmeans` and `--method gao` through the pipeline, the `codebook` encoding of the
container, and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import BUNDLED, assert_usage_error, calib_feed, write_coded

import rdonnx
from rdonnx.algo.kmeans import kmeans_quantize, weighted_error
from rdonnx.artifact.format import FormatError, read_artifact
from rdonnx.artifact.parallel import decode_all
from rdonnx.artifact.sizes import stream_bits
from rdonnx.flow.calibration import calibrate_model

GRID = (1.0, 0.5, 0.2, 0.1, 0.05)
# all 32 calibration samples fit and check (the held-out part: tests/test_flow_verify.py)
CONFIG = rdonnx.CompressConfig.of(layer_distortion=False, grid=GRID, holdout=0.0)
FAST_CLI = ["--no-layer-distortion", "--grid", ",".join(map(str, GRID)), "--quiet"]


def _ort(model, feed) -> list[np.ndarray]:
    import onnxruntime as ort

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feed)


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _check_artifact(result, path: Path, feed: dict[str, np.ndarray], tmp_path: Path) -> None:
    """The artifact decodes to exactly the measured weights; every reader runs the same."""
    result.save(path)
    artifact = read_artifact(path)
    decoded = decode_all(artifact)
    assert set(decoded) == set(result.weights)  # the codebooks and the corrected biases
    for name, q in result.quantized.items():
        assert q.codebook is not None
        assert decoded[name].tobytes() == result.weights[name].tobytes() == \
            q.values(result.weights[name].dtype).tobytes()
    encodings = {t["name"]: t["encoding"] for t in artifact.manifest["tensors"]}
    assert {encodings[n] for n in result.quantized} == {"codebook"}
    for name in set(result.weights) - set(result.quantized):  # biases, exact
        assert encodings[name] == "exact"
        assert decoded[name].tobytes() == result.weights[name].tobytes()
    expected = _ort(result.model, feed)
    _same(rdonnx.open_session(path).run(None, feed), expected)
    _same(_ort(rdonnx.load(path), feed), expected)
    dense = tmp_path / "dense.onnx"
    rdonnx.decompress(path, dense)
    _same(_ort(dense, feed), expected)
    rdonnx.inspect(path)  # verifies every section


# ----------------------------------------------------------------------------------------------
# --method gao


def test_gao_same_density_in_every_layer(cnn, tmp_path):
    result = rdonnx.compress(cnn.path, rate=0.3, calib=cnn.calib, method="gao", config=CONFIG)
    report = result.report
    assert report.method == "gao" and report.criterion == "activation"
    assert report.settings["prune"]["criterion"] == "activation"
    assert report.settings["coding"]["quantizer"] == "kmeans"
    for w in report.weights:
        assert abs(w.kept - 0.3 * w.params) <= 1, (w.name, w.kept, w.params)
        assert w.criterion == "activation"
        assert np.count_nonzero(result.quantized[w.name].q) == w.kept
    assert abs(report.rate - 0.3) < 1e-3
    _check_artifact(result, tmp_path / "gao.rdonnx", calib_feed(cnn), tmp_path)


def test_gao_uses_activation_weighted_codebooks(mlp):
    """The codebooks compress measured are the activation-weighted ones: lower weighted error
    than plain k-means on the same survivors, with E[x^2] as the weights."""
    result = rdonnx.compress(mlp.path, rate=0.5, calib=mlp.calib, method="gao",
                             config=CONFIG.updated(value_bits=3))
    cal = calibrate_model(mlp.path, CONFIG.updated(criterion="activation",
                                                            quantizer="kmeans"), mlp.calib)
    assert set(cal.importance) == {w.name for w in result.report.weights}
    for name, q in result.quantized.items():
        pruned, importance = result.pruned[name], cal.importance[name]
        again = kmeans_quantize(pruned, 3, importance)
        assert again.q.tobytes() == q.q.tobytes()
        assert again.codebook.tobytes() == q.codebook.tobytes()
        plain = kmeans_quantize(pruned, 3).values(np.float32)
        assert weighted_error(pruned, q.values(np.float32), importance) <= \
            weighted_error(pruned, plain, importance)


def test_gao_with_exact_values_is_uniform_activation_pruning(mlp):
    result = rdonnx.compress(mlp.path, rate=0.3, calib=mlp.calib, method="gao",
                             config=CONFIG.updated(format="dense"))
    assert not result.quantized and result.report.criterion == "activation"
    assert result.report.settings["coding"]["quantizer"] == "uniform"


@pytest.mark.parametrize("target", [{"max_distortion": 0.05}, {"min_agreement": 0.9},
                                    {"bits_per_weight": 3.0}])
def test_gao_meets_other_targets(mlp, target):
    result = rdonnx.compress(mlp.path, calib=mlp.calib, method="gao", config=CONFIG, **target)
    report = result.report
    densities = [w.kept / w.params for w in report.weights]
    assert max(densities) - min(densities) <= 2 / min(w.params for w in report.weights)
    cal = report.calibration
    if "max_distortion" in target:
        assert cal.distortion <= target["max_distortion"]
    elif "min_agreement" in target:
        assert cal.top1_agreement >= target["min_agreement"]
    else:
        bits = sum(stream_bits(result.quantized[w.name], None)
                   for w in report.weights)
        assert bits / report.params_total <= 3.0


# ----------------------------------------------------------------------------------------------
# --quantizer kmeans with other methods


def test_kmeans_quantizer_rd_method_and_extras(int64_model, tmp_path):
    """rd allocation with k-means values; the unpruned embedding gets a plain codebook."""
    result = rdonnx.compress(int64_model.path, rate=0.3, calib=int64_model.calib,
                             config=CONFIG.updated(quantizer="kmeans"))
    assert "embedding" in result.quantized and result.report.value_bits is not None
    assert any("plain k-means" in n and "embedding" in n for n in result.report.notices)
    _check_artifact(result, tmp_path / "k.rdonnx", calib_feed(int64_model), tmp_path)


def test_kmeans_joint_bits_budget(mlp):
    """The joint (density, bits) allocation prices k-means codebooks; the budget holds."""
    result = rdonnx.compress(mlp.path, bits_per_weight=2.5, calib=mlp.calib,
                             config=CONFIG.updated(quantizer="kmeans"))
    assert all(q.codebook is not None for q in result.quantized.values())
    bits = sum(stream_bits(result.quantized[w.name], None)
               for w in result.report.weights)
    assert bits / result.report.params_total <= 2.5


def test_value_curves_are_not_reused_across_quantizers(mlp, tmp_path):
    """Curves carrying uniform value curves are remeasured for a k-means run, and back."""
    uniform = rdonnx.compress(mlp.path, bits_per_weight=2.5, calib=mlp.calib, config=CONFIG)
    assert uniform.curves.values_quantizer == "uniform" and uniform.curves.values
    kmeans = rdonnx.compress(mlp.path, bits_per_weight=2.5, calib=mlp.calib,
                             curves=uniform.curves, config=CONFIG.updated(quantizer="kmeans"))
    assert kmeans.curves.values_quantizer == "kmeans"
    assert kmeans.curves.values != uniform.curves.values
    again = rdonnx.compress(mlp.path, bits_per_weight=2.5, calib=mlp.calib,
                            curves=kmeans.curves, config=CONFIG.updated(quantizer="kmeans"))
    assert again.curves is kmeans.curves  # same quantizer: reused as they are
    saved = tmp_path / "curves.json"
    saved.write_text(kmeans.curves.to_json())
    assert rdonnx.Curves.load(saved).values_quantizer == "kmeans"


def test_kmeans_not_worse_than_uniform_on_a_layer(mlp):
    """Same model, rate and bits: each k-means layer has no larger weighted error."""
    runs = {q: rdonnx.compress(mlp.path, rate=0.3, calib=mlp.calib, criterion="activation",
                               method="uniform", config=CONFIG.updated(value_bits=4,
                                                                quantizer=q))
            for q in ("uniform", "kmeans")}
    for name, pruned in runs["kmeans"].pruned.items():
        assert pruned.tobytes() == runs["uniform"].pruned[name].tobytes()
        uniform = runs["uniform"].quantized[name].values(np.float32)
        assert runs["uniform"].weights[name].tobytes() == uniform.tobytes()
        assert weighted_error(pruned, runs["kmeans"].weights[name]) <= \
            weighted_error(pruned, uniform) * (1 + 1e-9)


def test_identical_runs_write_identical_files(mlp, tmp_path):
    paths = [tmp_path / f"{i}.rdonnx" for i in range(2)]
    for path in paths:
        rdonnx.compress(mlp.path, rate=0.3, calib=mlp.calib, method="gao",
                        config=CONFIG).save(path)
    assert paths[0].read_bytes() == paths[1].read_bytes()


# ----------------------------------------------------------------------------------------------
# the codebook encoding


def test_codebook_round_trip_and_index_out_of_range(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 24)).astype(np.float32)
    w[rng.random(w.shape) > 0.4] = 0
    k = kmeans_quantize(w, 3)
    path = write_coded(tmp_path, k.q, 1.0, codebook=k.codebook)
    entry = read_artifact(path).manifest["tensors"][0]
    assert entry["encoding"] == "codebook" and entry["step"] is None
    assert entry["codebook"]["length"] == 4 * k.codebook.size
    assert entry["bits"]["side"] >= 32 * k.codebook.size
    assert decode_all(read_artifact(path))["w"].tobytes() == k.values(np.float32).tobytes()

    bad = k.q.copy()
    bad[bad == bad.max()] = k.codebook.size + 1  # an index past the codebook
    path = write_coded(tmp_path, bad, 1.0, codebook=k.codebook)
    with pytest.raises(FormatError, match="index out of codebook range"):
        decode_all(read_artifact(path))
    path = write_coded(tmp_path, k.q, 1.0, codebook=np.array([1.0, np.inf] + [0.5] * 5, np.float32))
    with pytest.raises(FormatError, match="inf or NaN"):
        decode_all(read_artifact(path))
    path = write_coded(tmp_path, k.q, 1.0, codebook=np.zeros(0, np.float32))
    with pytest.raises(FormatError, match="codebook of 0 bytes"):
        decode_all(read_artifact(path))


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_gao_end_to_end(cli, tmp_path):
    out = tmp_path / "mlp.rdonnx"
    test = BUNDLED / "digits_test.npz"
    run = cli("compress", BUNDLED / "digits_mlp.onnx", "--method", "gao", "--rate", "0.3",
              "--calib", BUNDLED / "digits_calib.npz", "-o", out, "--test", test,
              "--labels", "label", *FAST_CLI[:-1])  # no --quiet: the table is read
    assert run.code == 0, run.err
    assert "method gao, criterion activation" in run.err
    with np.load(test) as data:
        feed = {"input": data["input"][:16]}
    session = rdonnx.open_session(out)
    assert session.run(None, feed)[0].shape[0] == 16
    run = cli("inspect", out)
    assert run.code == 0 and "codebook" in run.out + run.err


@pytest.mark.parametrize("flags", [["--quantizer", "kmeans", "--reconstruct"],
                                   ["--method", "gao", "--sequential"],
                                   ["--quantizer", "kmeans", "--criterion", "obs"]])
def test_cli_kmeans_refuses_reconstruction(cli, tmp_path, mlp, flags):
    run = cli("compress", mlp.path, "--rate", "0.3", "--calib", mlp.calib, "-o",
              tmp_path / "x.rdonnx", *flags, *FAST_CLI)
    assert_usage_error(run, "k-means", "reconstruct")
    assert not (tmp_path / "x.rdonnx").exists()


def test_cli_unknown_quantizer(cli, mlp, tmp_path):
    run = cli("compress", mlp.path, "--rate", "0.3", "--quantizer", "lloyd", "-o",
              tmp_path / "x.rdonnx")
    assert run.code == 2 and "lloyd" in run.err
