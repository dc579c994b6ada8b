"""Bad inputs (issue 16): an .npz whose header declares more rows than it holds, and a model
onnxruntime refuses, each give one line, exit 2, with the cause kept."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from rdonnx.causes import CausedError, caused, first_line
from rdonnx.cli import main

MODELS = Path(__file__).resolve().parents[1] / "models"
MLP = MODELS / "digits_mlp.onnx"


@pytest.fixture
def cli(capsys):
    def run(*args) -> tuple[int, str]:
        code = main([str(a) for a in args])
        return code, capsys.readouterr().err
    return run


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rdonnx: error: "), err
    return lines[0]


def test_npz_declaring_more_rows_than_it_holds(cli, tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, input=np.zeros((256, 1, 8, 8), np.float32))
    with zipfile.ZipFile(good) as z:
        member = z.read("input.npy")
    short = tmp_path / "short.npz"
    with zipfile.ZipFile(short, "w") as z:
        z.writestr("input.npy", member.replace(b"(256, 1, 8, 8)", b"(512, 1, 8, 8)"))
    code, err = cli("compress", MLP, "--rate", "0.2", "--calib", short, "-o",
                    tmp_path / "a.rdonnx", "-q")
    assert code == 2
    assert "(512, 1, 8, 8)" in one_line(err) and "short.npz" in err
    assert not (tmp_path / "a.rdonnx").exists()


def long_named_bad_model(path: Path, name_length: int = 400) -> str:
    """A model onnxruntime refuses (output type mismatch) in a node with a long name, so the
    cause comes after the first 300 characters of its message."""
    name = "n" * name_length
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.ones(16, np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("Relu", ["h"], ["y"], name=name)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return name


def test_onnxruntime_load_error_keeps_its_cause(cli, tmp_path):
    bad = tmp_path / "bad.onnx"
    name = long_named_bad_model(bad)
    code, err = cli("evaluate", bad, bad)
    assert code == 2
    line = one_line(err)
    assert "onnxruntime cannot load the model" in line
    assert name in line and "does not match expected type" in line, line


def test_debug_prints_the_whole_message(cli, tmp_path):
    bad = tmp_path / "bad.onnx"
    long_named_bad_model(bad)
    code, err = cli("evaluate", bad, bad, "--debug")
    assert code == 2
    assert "[ONNXRuntimeError]" in err and "Traceback" in err


def test_first_line_and_detail():
    exc = RuntimeError("  cause on the first line\nsecond line\n")
    assert first_line(exc) == "cause on the first line"
    error = caused("onnxruntime cannot load the model", exc)
    assert isinstance(error, CausedError)
    assert str(error) == "onnxruntime cannot load the model: cause on the first line"
    assert error.detail.endswith("second line")
    assert first_line(RuntimeError("")) == "RuntimeError"
