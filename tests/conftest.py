"""Shared fixtures: small test models (built once per session) with matching calibration data.

Every model takes one input named "input" with a dynamic batch axis and is saved with
`ir_version = 8` so older onnxruntime releases load it. Each fixture returns a `Case`: the
model path, its calibration `.npz` (key "input") and what the model is.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models"
IR_VERSION = 8
OPSET = 17
CALIB_SAMPLES = 32


@dataclass(frozen=True)
class Case:
    """A test model on disk and calibration data that fits it."""

    name: str
    path: Path
    calib: Path
    float_input: bool = True  # synthetic calibration works without --input-range
    class_scores: bool = True  # output is [batch, classes]


def _save_calib(path: Path, array: np.ndarray) -> Path:
    np.savez(path, input=array)
    return path


def _finish(path: Path) -> None:
    """Pin the IR version and check the saved model."""
    proto = onnx.load(str(path))
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))


def _export(module, example, path: Path, **kwargs) -> Path:
    import torch

    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and PRESERVE notes
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          **kwargs)
    _finish(path)
    return path


_UNTRACKED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "build"}


def _repo_files() -> dict[str, int]:
    """Every file of the checkout (outside the folders tools keep for themselves) and its
    modification time."""
    files = {}
    for folder, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in _UNTRACKED_DIRS and not d.endswith(".egg-info")]
        for name in names:
            path = os.path.join(folder, name)
            files[os.path.relpath(path, REPO)] = os.stat(path).st_mtime_ns
    return files


@pytest.fixture(scope="session", autouse=True)
def repo_untouched():
    """Tests write into temporary folders only: no file of the checkout is added or changed."""
    before = _repo_files()
    yield
    after = _repo_files()
    written = sorted(p for p, mtime in after.items() if before.get(p) != mtime)
    assert not written, f"tests wrote into the repository: {written}"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def mlp(model_dir) -> Case:
    """Linear(16, 64), ReLU, Linear(64, 32), ReLU, Linear(32, 10): three Gemm weights."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32),
                              torch.nn.ReLU(), torch.nn.Linear(32, 10))
    path = _export(net, torch.randn(2, 16), model_dir / "mlp.onnx")
    rng = np.random.default_rng(1)
    calib = _save_calib(model_dir / "mlp_calib.npz",
                        rng.standard_normal((CALIB_SAMPLES, 16)).astype(np.float32))
    return Case("mlp", path, calib)


@pytest.fixture(scope="session")
def cnn(model_dir) -> Case:
    """Conv + BatchNorm + ReLU twice, global average pool, Linear: BN nodes kept."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))
    with torch.no_grad():  # non-trivial running statistics
        for module in net:
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    path = _export(net, torch.randn(2, 3, 8, 8), model_dir / "cnn.onnx",
                   training=torch.onnx.TrainingMode.PRESERVE)
    assert "BatchNormalization" in {n.op_type for n in onnx.load(str(path)).graph.node}
    rng = np.random.default_rng(2)
    calib = _save_calib(model_dir / "cnn_calib.npz",
                        rng.standard_normal((CALIB_SAMPLES, 3, 8, 8)).astype(np.float32))
    return Case("cnn", path, calib)


def _self_attention(d: int = 32, heads: int = 4, ff: int = 64, seq: int = 8):
    """One encoder layer: q/k/v/out projections, softmax attention, feed-forward, LayerNorms.

    Written by hand because the legacy exporter cannot trace nn.TransformerEncoderLayer
    (scaled_dot_product_attention gets a tensor for is_causal).
    """
    import torch

    class SelfAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
            self.ff1, self.ff2 = torch.nn.Linear(d, ff), torch.nn.Linear(ff, d)
            self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)

        def split(self, x):
            return x.reshape(-1, seq, heads, d // heads).transpose(1, 2)

        def forward(self, x):
            q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
            scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
            a = torch.softmax(scores, dim=-1) @ v
            x = self.ln1(x + self.o(a.transpose(1, 2).reshape(-1, seq, d)))
            return self.ln2(x + self.ff2(torch.relu(self.ff1(x))))

    return SelfAttention()


@pytest.fixture(scope="session")
def attention(model_dir) -> Case:
    """A small transformer encoder layer on input [batch, 8, 32]; output [batch, 8, 32]."""
    import torch

    torch.manual_seed(0)
    path = _export(_self_attention(), torch.randn(2, 8, 32), model_dir / "attention.onnx")
    rng = np.random.default_rng(3)
    calib = _save_calib(model_dir / "attention_calib.npz",
                        rng.standard_normal((CALIB_SAMPLES, 8, 32)).astype(np.float32))
    return Case("attention", path, calib, class_scores=False)


@pytest.fixture(scope="session")
def external(model_dir, mlp) -> Case:
    """The MLP saved with all tensors in one external data file, w.data."""
    folder = model_dir / "external"
    folder.mkdir()
    proto = onnx.load(str(mlp.path))
    proto.ir_version = IR_VERSION
    path = folder / "mlp_ext.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.data", size_threshold=0)
    assert (folder / "w.data").stat().st_size > 0
    return Case("external", path, mlp.calib)


def _tensor(rng: np.random.Generator, name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


@pytest.fixture(scope="session")
def subgraph(model_dir) -> Case:
    """A MatMul weight held by a Constant node and one inside an If branch.

    h = input @ w_const (Constant node); if sum(h) > 0: output = h @ w_then (initializer of
    the then-branch) else: output = -h.
    """
    rng = np.random.default_rng(4)
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w_then"], ["y_then"])], "then_branch", [],
        [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, ["batch", 16])],
        initializer=[_tensor(rng, "w_then", 16, 16)])
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["y_else"])], "else_branch", [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, ["batch", 16])])
    nodes = [
        helper.make_node("Constant", [], ["w_const"], value=_tensor(rng, "w_const", 16, 16)),
        helper.make_node("MatMul", ["input", "w_const"], ["h"]),
        helper.make_node("ReduceSum", ["h"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["output"], then_branch=then_branch,
                         else_branch=else_branch),
    ]
    graph = helper.make_graph(
        nodes, "subgraph",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 16])],
        initializer=[numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    path = model_dir / "subgraph.onnx"
    onnx.save_model(proto, str(path))
    # mostly positive inputs so both branches run: batches of 16 alternate in sign
    data = np.abs(rng.standard_normal((CALIB_SAMPLES, 16))).astype(np.float32)
    data[16:] *= -1
    calib = _save_calib(model_dir / "subgraph_calib.npz", data)
    return Case("subgraph", path, calib, class_scores=False)


@pytest.fixture(scope="session")
def no_weights(model_dir) -> Case:
    """Only a 4x4 MatMul (16 elements, below --min-params) and a Relu: nothing to prune."""
    rng = np.random.default_rng(5)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["h"]),
         helper.make_node("Relu", ["h"], ["output"])], "no_weights",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
        initializer=[_tensor(rng, "w", 4, 4)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    path = model_dir / "no_weights.onnx"
    onnx.save_model(proto, str(path))
    calib = _save_calib(model_dir / "no_weights_calib.npz",
                        rng.standard_normal((CALIB_SAMPLES, 4)).astype(np.float32))
    return Case("no_weights", path, calib)


VOCAB = 50


@pytest.fixture(scope="session")
def int64_model(model_dir) -> Case:
    """Token ids int64 [batch, 6] -> Gather embedding [50, 16] -> MatMul [16, 32] -> mean."""
    rng = np.random.default_rng(6)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embedding", "input"], ["e"], axis=0),
         helper.make_node("MatMul", ["e", "w"], ["h"]),
         helper.make_node("ReduceMean", ["h"], ["output"], axes=[1], keepdims=0)],
        "int64_input",
        [helper.make_tensor_value_info("input", TensorProto.INT64, ["batch", 6])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 32])],
        initializer=[_tensor(rng, "embedding", VOCAB, 16), _tensor(rng, "w", 16, 32)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    path = model_dir / "int64_input.onnx"
    onnx.save_model(proto, str(path))
    calib = _save_calib(model_dir / "int64_calib.npz",
                        rng.integers(0, VOCAB, (CALIB_SAMPLES, 6)).astype(np.int64))
    return Case("int64", path, calib, float_input=False)


@pytest.fixture(scope="session")
def bundled_cnn() -> Case:
    return Case("bundled_cnn", BUNDLED / "digits_cnn.onnx", BUNDLED / "digits_calib.npz")


@pytest.fixture(scope="session")
def bundled_mlp() -> Case:
    return Case("bundled_mlp", BUNDLED / "digits_mlp.onnx", BUNDLED / "digits_calib.npz")


@pytest.fixture(scope="session")
def digits_test() -> Path:
    """Labelled test data for the bundled models: keys "input" and "label"."""
    return BUNDLED / "digits_test.npz"


# Every model that has prunable weights, by fixture name.
PRUNABLE_CASES = ("mlp", "cnn", "attention", "external", "subgraph", "int64_model",
                  "bundled_cnn", "bundled_mlp")


@pytest.fixture
def case(request) -> Case:
    """Indirect parametrisation by fixture name: `@pytest.mark.parametrize("case", [...],
    indirect=True)`."""
    return request.getfixturevalue(request.param)


def _ort_run(model: str | Path | onnx.ModelProto | bytes,
             feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


@pytest.fixture(scope="session")
def ort_run() -> Callable[..., list[np.ndarray]]:
    """Run a model (path, ModelProto or bytes) on the CPU: `ort_run(model, {"input": x})`."""
    return _ort_run


def calib_feed(case: Case, samples: int = 8) -> dict[str, np.ndarray]:
    with np.load(case.calib) as data:
        return {"input": data["input"][:samples]}


@pytest.fixture(scope="session")
def feed_of() -> Callable[[Case], dict[str, np.ndarray]]:
    """`feed_of(case)`: the first samples of a case's calibration data as an ORT feed."""
    return calib_feed


# ----------------------------------------------------------------------------------------------
# the CLI, in-process


@dataclass
class Run:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys) -> Callable[..., Run]:
    """`cli("compress", path, ...)`: run `rdonnx.cli.main` in-process, capture its output."""
    from rdonnx.cli import main

    def run(*args) -> Run:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # main() must return the code, never exit
            out, err = capsys.readouterr()
            pytest.fail(f"main() raised SystemExit({exc.code}) instead of returning the exit "
                        f"code; stderr: {err!r}")
        out, err = capsys.readouterr()
        return Run(code, out, err)

    return run


def listing(folder: Path) -> list[str]:
    """Every file and folder below `folder`, hidden and temporary files included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_usage_error(run: Run, *patterns: str) -> None:
    """Exit 2, exactly one "rdonnx: error:" line on stderr matching every pattern, no output."""
    import re

    assert run.code == 2, run
    lines = run.err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {run.err!r}"
    assert lines[0].startswith("rdonnx: error: "), lines[0]
    assert "Traceback" not in run.err
    for pattern in patterns:
        assert re.search(pattern, lines[0], re.IGNORECASE), f"{pattern!r} not in {lines[0]!r}"
    assert run.out == ""


def write_coded(tmp_path: Path, q: np.ndarray, step, codebook: np.ndarray | None = None,
                step_axis: int | None = None, classes: np.ndarray | None = None) -> Path:
    """An .rdonnx file holding one coded float tensor "w" (levels `q`) and an Identity graph."""
    from onnx import TensorProto, helper

    from rdonnx.artifact.format import encode_tensor, write_artifact

    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["out"])], "g", [],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, q.shape)])
    tensor = graph.initializer.add()
    tensor.name, tensor.data_type = "w", TensorProto.FLOAT
    tensor.dims.extend(q.shape)
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "rdonnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "c.rdonnx"
    coded = [encode_tensor("w", TensorProto.FLOAT, q.shape, q, step, None, codebook, step_axis,
                           classes)]
    write_artifact(path, model, coded, {}, {}, "test")
    return path
