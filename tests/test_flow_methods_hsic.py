"""rdonnx.algo.hsic, rdonnx.flow.methods.hsic and `--method hsic` (ITPruner): linear CKA / nHSIC,
redundancy and importance, the width program under a parameter or FLOPs budget, and the compress
flow."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BUNDLED, assert_usage_error

import rdonnx
from rdonnx.algo.hsic import cka, importance, macs, redundancy, similarity
from rdonnx.allocate.allocators import ALLOCATORS, Allocation, hsic, target_count
from rdonnx.allocate.widths import solve_widths
from rdonnx.errors import UsageError
from rdonnx.flow.calibration import calibrate_model
from rdonnx.flow.config import CompressConfig
from rdonnx.flow.methods.hsic import prepare as hsic_prepare

MLP = BUNDLED / "digits_mlp.onnx"
CNN = BUNDLED / "digits_cnn.onnx"
CALIB = BUNDLED / "digits_calib.npz"
TEST = BUNDLED / "digits_test.npz"


def _feature_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA in feature space: ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    x = x.reshape(len(x), -1) - x.reshape(len(x), -1).mean(0)
    y = y.reshape(len(y), -1) - y.reshape(len(y), -1).mean(0)
    return float(np.linalg.norm(x.T @ y) ** 2 /
                 (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


@pytest.mark.parametrize("dims", [(16, 5), (8, 200)])  # D < N and D > N
def test_cka_invariances(dims):
    n, d = 40, dims[1]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d))
    y = x @ rng.standard_normal((d, 7)) + 0.5 * rng.standard_normal((n, 7))
    assert cka(x, x) == pytest.approx(1.0)
    assert cka(x, 3.7 * x) == pytest.approx(1.0)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    assert cka(x @ q, y) == pytest.approx(cka(x, y))  # orthogonal transform
    assert cka(2.5 * x, y) == pytest.approx(cka(x, y))  # isotropic scaling
    assert cka(x + 4.0, y) == pytest.approx(cka(x, y))  # centring
    assert cka(x, y) == pytest.approx(_feature_cka(x, y))
    assert cka(x, rng.standard_normal((n, 3))) < cka(x, y) < 1
    assert cka(x.reshape(n, -1, 1), y) == pytest.approx(cka(x, y))  # flattened per sample
    with pytest.raises(UsageError, match="same samples"):
        cka(x, y[:-1])


def test_redundancy_and_importance():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((50, 10))
    acts = [base, base + 0.1 * rng.standard_normal((50, 10)), base @ rng.standard_normal((10, 10)),
            rng.standard_normal((50, 10))]
    sim = similarity(acts)
    np.testing.assert_allclose(np.diag(sim), 1.0)
    np.testing.assert_allclose(sim, sim.T)
    s = redundancy(sim)
    assert s.sum() == pytest.approx(1.0)
    assert s[3] == s.min()  # the unrelated layer is the least redundant
    alpha = importance(sim)
    assert np.argmax(alpha) == 3 and alpha[0] < alpha[3]
    # beta scales with L by default: 10 * L
    np.testing.assert_allclose(alpha / alpha.max(),
                               np.exp(-40 * (s - s.min())) / np.exp(-40 * (s - s.min())).max())
    np.testing.assert_allclose(importance(sim, 0.0), 1.0)


def test_macs_from_output_shapes():
    assert macs(64 * 32 * 9, (4, 64, 6, 6), "Conv") == 64 * 32 * 9 * 36
    assert macs(128 * 64, (4, 128), "Gemm") == 128 * 64
    assert macs(32 * 16, (4, 10, 16), "MatMul") == 32 * 16 * 10


def _inputs(alpha, sizes, costs=None):
    names = [f"w{i}" for i in range(len(sizes))]
    return Allocation({n: np.ones(s, np.float32) for n, s in zip(names, sizes)},
                      importance=dict(zip(names, alpha)),
                      costs=dict(zip(names, costs if costs is not None else sizes)))


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.5, 0.9, 1.0])
def test_allocation_meets_the_parameter_budget(rate):
    inputs = _inputs([1.0, 0.2, 1.0, 0.9], [300, 2000, 2000, 500])
    keep = hsic(inputs, rate)
    assert sum(keep.values()) == target_count(inputs.sizes(), rate)
    assert all(0 <= keep[n] <= s for n, s in inputs.sizes().items())
    assert ALLOCATORS["hsic"] is hsic


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8])
def test_more_redundant_layers_get_lower_density(rate):
    """Lowering one layer's importance (more redundant) lowers its output width, hence its
    density (x_prev * x), and gives the budget to the others."""
    sizes = [1000, 1000, 1000, 1000]
    even = hsic(_inputs([1.0, 1.0, 1.0, 1.0], sizes), rate)
    redundant = hsic(_inputs([1.0, 1.0, 0.3, 1.0], sizes), rate)
    assert redundant["w2"] < even["w2"]
    assert redundant["w0"] > even["w0"] and redundant["w1"] > even["w1"]
    assert redundant["w2"] == min(redundant.values())
    x = solve_widths(np.array([1.0, 1.0, 0.3, 1.0]), np.array(sizes, float), rate)
    assert x[2] == x.min()


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.6])
def test_allocation_meets_the_flops_budget(rate):
    sizes = [300, 2000, 2000, 500]
    flops = [300 * 100, 2000 * 25, 2000 * 4, 500.0]
    inputs = _inputs([1.0, 0.8, 1.0, 0.9], sizes, flops)
    keep = hsic(inputs, rate)
    spent = sum(keep[f"w{i}"] / s * f for i, (s, f) in enumerate(zip(sizes, flops)))
    assert spent / sum(flops) == pytest.approx(rate, rel=0.005)


def test_widths_keep_the_quadratic_budget_and_floor():
    alpha = np.array([1.0, 0.3, 1.0, 1.0])
    costs = np.array([100.0, 1000, 1000, 100])
    for rate in (0.1, 0.3, 0.7):
        x = solve_widths(alpha, costs, rate)
        density = x * np.concatenate([[1.0], x[:-1]])
        assert np.sum(costs * density) <= rate * costs.sum() * (1 + 1e-4)
        assert np.all(x >= 0.1 - 1e-9) and np.all(x <= 1)
        assert np.array_equal(x, solve_widths(alpha, costs, rate))  # deterministic


def _cfg(**kw) -> CompressConfig:
    return CompressConfig.of(values="exact", layer_distortion=False, format="dense", **kw)


def test_compress_hsic_on_test_models(mlp, cnn):
    first = rdonnx.compress(mlp.path, calib=mlp.calib, config=_cfg(rate=0.3, method="hsic"))
    again = rdonnx.compress(mlp.path, calib=mlp.calib, config=_cfg(rate=0.3, method="hsic"))
    assert first.report.params_kept == round(0.3 * first.report.params_total)
    for name, value in first.weights.items():
        assert np.array_equal(value, again.weights[name])
    flops = rdonnx.compress(cnn.path, calib=cnn.calib,
                            config=_cfg(rate=0.3, method="hsic", budget="flops",
                                        hsic_samples=16))
    assert any("multiply-accumulates" in n for n in flops.report.notices)
    assert flops.report.settings["method_options"]["budget"] == "flops"


def test_cli_compress_hsic_bundled(cli, tmp_path):
    run = cli("compress", CNN, "--method", "hsic", "--budget", "flops", "--rate", "0.2",
              "--calib", CALIB, "--test", TEST, "--labels", "label", "--format", "dense",
              "--no-layer-distortion", "-o", tmp_path / "c.onnx", "--report", tmp_path / "c.json")
    assert run.code == 0, run.err
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["method"] == "hsic" and report["settings"]["method_options"]["budget"] == "flops"
    config = _cfg(rate=0.2, method="hsic", budget="flops")
    cal = calibrate_model(CNN, config, CALIB, consumers=True)
    costs = hsic_prepare(cal, config.method_options, Allocation({}))[1].costs
    conv = next(w for w in cal.weights if w.name == "3.weight")
    assert costs["3.weight"] > conv.size  # MACs: the weight times its output positions
    spent = sum(costs[w["name"]] * w["density"] for w in report["weights"])
    assert spent / sum(costs.values()) == pytest.approx(0.2, rel=0.005)
    assert report["rate"] != pytest.approx(0.2, abs=1e-3)  # the parameter rate differs
    run = cli("compress", MLP, "--method", "hsic", "--max-distortion", "0.2", "--calib", CALIB,
              "--calib-samples", "64", "--format", "dense", "--no-layer-distortion", "--grid",
              "1,0.5,0.2,0.1", "-o", tmp_path / "m.onnx", "--report", tmp_path / "m.json")
    assert run.code == 0, run.err
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["check"]["limit"] <= 0.2 and report["check"]["data"] == "held-out"
    assert report["holdout"]["distortion"] <= 0.2


def test_cli_refuses_hsic_options_elsewhere(cli, tmp_path):
    assert_usage_error(cli("compress", MLP, "--rate", "0.2", "--method", "uniform",
                           "--budget", "flops", "-o", tmp_path / "x.onnx"),
                       "--budget applies to --method hsic only")
    assert_usage_error(cli("compress", MLP, "--rate", "0.2", "--method", "hsic",
                           "--hsic-samples", "1", "-o", tmp_path / "x.onnx"), "--hsic-samples")
    assert_usage_error(cli("compress", MLP, "--rate", "0.2", "--method", "hsic",
                           "--hsic-beta", "-1", "-o", tmp_path / "x.onnx"), "--hsic-beta")
    assert not (tmp_path / "x.onnx").exists()


def _folded_model() -> bytes:
    """x [N, 4, 32] -> MatMul w1 -> Reshape [N*4, 32] -> MatMul w2 -> Reshape [N, 128] ->
    MatMul w3: w2's output folds batch and tokens into one axis."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, n)
             for n, s in (("w1", (32, 32)), ("w2", (32, 32)), ("w3", (128, 10)))]
    inits += [numpy_helper.from_array(np.array(s, dtype=np.int64), n)
              for n, s in (("fold", (-1, 32)), ("unfold", (-1, 128)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Reshape", ["b", "fold"], ["c"]),
             helper.make_node("MatMul", ["c", "w2"], ["d"]),
             helper.make_node("Reshape", ["d", "unfold"], ["e"]),
             helper.make_node("MatMul", ["e", "w3"], ["y"])]
    graph = helper.make_graph(
        nodes, "folded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_outputs_without_a_batch_axis_get_the_median_importance():
    x = np.random.default_rng(4).standard_normal((64, 4, 32)).astype(np.float32)
    result = rdonnx.compress(_folded_model(), rate=0.3, method="hsic", calib={"x": x},
                             config=CompressConfig.of(layer_distortion=False, format="dense",
                                                   simplify=False))
    assert any("1 weight(s) without an observable output" in n for n in result.report.notices)
    assert result.report.rate == pytest.approx(0.3, abs=0.005)
