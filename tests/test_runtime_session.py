"""rdonnx.runtime.session: device choice, measurement model, Runner with overridable weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from _graphs import if_model, make_model, ort_run, tiny_mlp, tiny_mlp_reference, vi
from onnx import TensorProto, helper, numpy_helper

from rdonnx.errors import UsageError
from rdonnx.graph.model import load_model
from rdonnx.graph.weights import find_weights
from rdonnx.runtime.session import CPU, Device, Runner, create_session, measurement_model

X = np.random.default_rng(7).standard_normal((6, 8)).astype(np.float32)


def _runner(proto, device="cpu", **kwargs):
    model = load_model(proto)
    return Runner(model, find_weights(model, min_params=1), device, **kwargs)


@pytest.fixture
def cpu_only(monkeypatch):
    """onnxruntime without a CUDA provider, whatever is installed."""
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CPU])


def test_run_without_overrides_matches_onnxruntime_exactly():
    proto, arrays = tiny_mlp()
    runner = _runner(proto)
    assert runner.output_names == ["y"]
    got = runner.run({"x": X})
    assert len(got) == 1
    np.testing.assert_array_equal(got[0], ort_run(proto, {"x": X}, optimize=False)[0])
    np.testing.assert_array_equal(got[0], ort_run(proto, {"x": X})[0])
    np.testing.assert_allclose(got[0], tiny_mlp_reference(X, arrays), rtol=1e-5, atol=1e-5)


def test_weight_overrides_change_outputs_for_that_run_only():
    proto, arrays = tiny_mlp()
    runner = _runner(proto)
    before = runner.run({"x": X})[0]
    new_w1 = np.where(np.abs(arrays["W1"]) > 1, arrays["W1"], 0).astype(np.float32)
    changed = runner.run({"x": X}, {"W1": new_w1})[0]
    assert not np.allclose(changed, before)
    np.testing.assert_allclose(changed, tiny_mlp_reference(X, {**arrays, "W1": new_w1}),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(runner.run({"x": X})[0], before)  # not sticky
    # float64 arrays are converted to the weight's dtype; prepared values are accepted too
    as64 = runner.run({"x": X}, {"W1": new_w1.astype(np.float64)})[0]
    np.testing.assert_array_equal(as64, changed)
    prepared = runner.weight_value("W1", new_w1)
    np.testing.assert_array_equal(runner.run({"x": X}, {"W1": prepared})[0], changed)


def test_weights_become_graph_inputs_of_the_measurement_model():
    proto, _ = tiny_mlp()
    model = load_model(proto)
    weights = find_weights(model, min_params=1)
    measured = measurement_model(model, weights, extra_outputs=["h"])
    assert {t.name for t in measured.graph.initializer} == {"b1", "b2"}
    inputs = {v.name: v for v in measured.graph.input}
    assert set(inputs) == {"x", "W1", "W2"}
    assert [d.dim_value for d in inputs["W1"].type.tensor_type.shape.dim] == [8, 32]
    assert [o.name for o in measured.graph.output] == ["y", "h"]
    assert len(proto.graph.initializer) == 4  # the source model is untouched


def test_extra_outputs_return_intermediate_tensors():
    proto, arrays = tiny_mlp()
    runner = _runner(proto, extra_outputs=["h"])
    y, h = runner.run({"x": X}, outputs=["y", "h"])
    np.testing.assert_allclose(h, np.maximum(X @ arrays["W1"] + arrays["b1"], 0), rtol=1e-5,
                               atol=1e-5)
    assert y.shape == (6, 4)
    assert len(runner.run({"x": X})) == 1  # by default only the model outputs


@pytest.mark.parametrize("constant", [False, True])
def test_override_weight_inside_subgraph(constant):
    proto, arrays = if_model(constant=constant)
    runner = _runner(proto)
    feed = {"x": X, "c": np.array(True)}
    np.testing.assert_allclose(runner.run(feed)[0], X @ arrays["Wt"], rtol=1e-5, atol=1e-5)
    new = -2 * arrays["Wt"]
    np.testing.assert_allclose(runner.run(feed, {"Wt": new})[0], X @ new, rtol=1e-5, atol=1e-5)
    other = {"x": X, "c": np.array(False)}
    np.testing.assert_allclose(runner.run(other, {"W": new})[0], X @ new, rtol=1e-5, atol=1e-5)


def test_override_constant_node_weight():
    w = np.random.default_rng(3).standard_normal((8, 5)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(w, "Wc")),
             helper.make_node("MatMul", ["x", "Wc"], ["y"])]
    proto = make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 8])],
                       [vi("y", TensorProto.FLOAT, ["N", 5])])
    runner = _runner(proto)
    np.testing.assert_allclose(runner.run({"x": X})[0], X @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runner.run({"x": X}, {"Wc": w * 0})[0], np.zeros((6, 5)))


def test_fp16_weights_override():
    proto, arrays = tiny_mlp(dtype=np.float16)
    runner = _runner(proto)
    x = X.astype(np.float16)
    base = runner.run({"x": x})[0]
    assert base.dtype == np.float16
    np.testing.assert_array_equal(base, ort_run(proto, {"x": x}, optimize=False)[0])
    zero = runner.run({"x": x}, {"W2": np.zeros((32, 4), np.float32)})[0]
    np.testing.assert_allclose(zero, np.broadcast_to(arrays["b2"], (6, 4)))


def test_runner_reads_external_data_from_model_folder(tmp_path):
    proto, arrays = tiny_mlp()
    path = tmp_path / "ext.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, location="ext.bin",
                    size_threshold=0)
    model = load_model(path)
    runner = Runner(model, [w for w in find_weights(model, min_params=1) if w.name == "W1"],
                    "cpu")  # W2 and the biases stay external initializers of the session
    np.testing.assert_allclose(runner.run({"x": X})[0], tiny_mlp_reference(X, arrays),
                               rtol=1e-5, atol=1e-5)


def test_run_failure_is_a_usage_error():
    proto, _ = tiny_mlp()
    runner = _runner(proto)
    with pytest.raises(UsageError, match="onnxruntime failed"):
        runner.run({"x": np.zeros((2, 5), np.float32)})


def test_device_cuda_without_cuda_provider_raises(cpu_only):
    proto, _ = tiny_mlp()
    with pytest.raises(UsageError, match="--device cuda.*--device cpu"):
        _runner(proto, "cuda")


def test_device_cuda_raises_on_this_machine():
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        proto, _ = tiny_mlp()
        runner = _runner(proto, "cuda")  # a GPU build on a GPU machine must really use it
        assert runner.device.provider == "CUDAExecutionProvider"
        return
    proto, _ = tiny_mlp()
    with pytest.raises(UsageError, match="cuda"):
        _runner(proto, "cuda")


def test_device_auto_falls_back_to_cpu_with_notice(cpu_only):
    proto, _ = tiny_mlp()
    runner = _runner(proto, "auto")
    assert runner.device.provider == CPU
    assert runner.device.ort_device == "cpu"
    assert runner.device.notice and "CPU" in runner.device.notice
    assert runner.session.get_providers() == [CPU]


def test_device_cpu_has_no_notice_and_resolved_device_is_reused():
    proto, _ = tiny_mlp()
    runner = _runner(proto, "cpu")
    assert runner.device == Device(CPU)
    again = _runner(proto, runner.device)
    assert again.device.provider == CPU and again.device.notice is None


def test_unknown_device_raises():
    proto, _ = tiny_mlp()
    with pytest.raises(UsageError, match="unknown device"):
        _runner(proto, "tpu")


def test_create_session_rejects_unloadable_model():
    proto, _ = tiny_mlp()
    proto.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(UsageError, match="cannot load the model"):
        create_session(proto.SerializeToString(), load_model(proto), "cpu")


def test_bfloat16_weights_override():
    import ml_dtypes

    w = np.random.default_rng(0).standard_normal((8, 4)).astype(ml_dtypes.bfloat16)
    proto = make_model([helper.make_node("Cast", ["W"], ["wf"], to=TensorProto.FLOAT),
                        helper.make_node("MatMul", ["x", "wf"], ["y"])],
                       [vi("x", TensorProto.FLOAT, ["N", 8])],
                       [vi("y", TensorProto.FLOAT, ["N", 4])],
                       [numpy_helper.from_array(w, "W")])
    runner = _runner(proto)
    np.testing.assert_array_equal(runner.run({"x": X})[0], ort_run(proto, {"x": X})[0])
    half = (w.astype(np.float32) / 2).astype(np.float32)
    np.testing.assert_allclose(runner.run({"x": X}, {"W": half})[0],
                               X @ half.astype(ml_dtypes.bfloat16).astype(np.float32), rtol=1e-5,
                               atol=1e-5)
