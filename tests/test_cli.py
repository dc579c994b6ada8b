"""The command line: `rdonnx.cli.main` in-process, `python cli.py` and the `rdonnx` script.

Exit codes: 0 success, 2 bad input (exactly one line "rdonnx: error: ..." on stderr, no
traceback, nothing written), 3 a --fail-above bound exceeded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import BUNDLED, REPO, Run, assert_usage_error, listing

import rdonnx
from rdonnx.cli import main

CNN = BUNDLED / "digits_cnn.onnx"
MLP = BUNDLED / "digits_mlp.onnx"
CALIB = BUNDLED / "digits_calib.npz"
TEST = BUNDLED / "digits_test.npz"
CNN_PARAMS = 56224  # prunable parameters of the bundled CNN (README: 4 weights)
CNN_WEIGHTS = ["0.weight", "3.weight", "7.weight", "11.weight"]
FAST = ["--method", "uniform", "--no-layer-distortion", "--calib-samples", "64",
        "--format", "dense"]


def subprocess_run(*args, cwd: Path = REPO) -> Run:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def console_script() -> Path:
    script = Path(sys.executable).parent / ("rdonnx.exe" if os.name == "nt" else "rdonnx")
    assert script.is_file(), f"the rdonnx console script is not installed beside {sys.executable}"
    return script


@pytest.fixture(autouse=True)
def bundled_models_untouched():
    """No command may write beside the bundled models."""
    before = listing(BUNDLED)
    yield
    assert listing(BUNDLED) == before


# ----------------------------------------------------------------------------------------------
# compress: success


@pytest.fixture(scope="module")
def compressed_cnn(tmp_path_factory) -> tuple[Run, Path]:
    """`compress` of the bundled CNN with test data and a report, run once in-process."""
    folder = tmp_path_factory.mktemp("cli_compress")
    capture = _Capture()
    with capture:
        code = main(["compress", str(CNN), "--rate", "0.5", "--calib", str(CALIB),
                     "--format", "dense", "--test", str(TEST), "--labels", "label", "--report",
                     str(folder / "r.json"), "-o", str(folder / "out.onnx")])
    return Run(code, capture.out, capture.err), folder


class _Capture:
    """capsys is function-scoped; module fixtures capture with redirected streams."""

    def __enter__(self):
        import io

        self._saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
        return self

    def __exit__(self, *exc):
        self.out, self.err = sys.stdout.getvalue(), sys.stderr.getvalue()
        sys.stdout, sys.stderr = self._saved


def test_compress_writes_model_and_report(compressed_cnn, ort_run):
    run, folder = compressed_cnn
    assert run.code == 0, run.err
    assert listing(folder) == ["out.onnx", "r.json"]  # no temporary files left
    umask = os.umask(0)
    os.umask(umask)
    for name in ("out.onnx", "r.json"):  # the mode of a normal file, not mkstemp's 0o600
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask
    onnx.checker.check_model(str(folder / "out.onnx"))
    feed = {"input": np.load(CALIB)["input"][:8]}
    assert ort_run(folder / "out.onnx", feed)[0].shape == (8, 10)

    report = json.loads((folder / "r.json").read_text())
    assert report["schema_version"] >= 1
    assert report["params_total"] == CNN_PARAMS
    assert abs(report["params_kept"] / CNN_PARAMS - 0.5) <= 0.005
    assert [w["name"] for w in report["weights"]] == CNN_WEIGHTS
    assert sum(w["kept"] for w in report["weights"]) == report["params_kept"]
    # each weight pruned alone was measured (0 only where a weight keeps everything)
    assert all(w["distortion"] is not None and w["distortion"] >= 0 for w in report["weights"])
    assert all(w["distortion"] > 0 for w in report["weights"] if w["kept"] < w["params"])
    assert report["test"]["accuracy_original"] == pytest.approx(358 / 360, abs=1e-5)
    assert 0 <= report["test"]["accuracy_compressed"] <= 1
    assert report["test"]["samples"] == 360
    assert report["calibration"]["samples"] == 192  # the fit part; a quarter is held out
    assert report["holdout"]["samples"] == 64
    assert report["output"] == str(folder / "out.onnx")
    assert report["output_format"] == "dense"
    assert report["output_bytes"] == (folder / "out.onnx").stat().st_size
    # the pruned file holds what the report says
    assert rdonnx.inspect(folder / "out.onnx").params_nonzero == report["params_kept"]


def test_compress_prints_a_table_with_accuracy(compressed_cnn):
    run, _ = compressed_cnn
    assert run.out == ""  # everything for people goes to stderr
    assert "accuracy" in run.err
    assert "99.44%" in run.err
    for name in CNN_WEIGHTS:
        assert name in run.err
    assert "Traceback" not in run.err


def test_compress_sparse_format(cli, tmp_path, ort_run):
    common = ["--rate", "0.1", "--calib", CALIB, *FAST]
    assert cli("compress", MLP, *common, "-o", tmp_path / "dense.onnx").code == 0
    run = cli("compress", MLP, *common, "--format", "sparse", "-o", tmp_path / "sparse.onnx",
              "--report", tmp_path / "r.json")
    assert run.code == 0, run.err
    sparse, dense = tmp_path / "sparse.onnx", tmp_path / "dense.onnx"
    onnx.checker.check_model(str(sparse))
    assert len(onnx.load(str(sparse)).graph.sparse_initializer) == 3
    assert sparse.stat().st_size < dense.stat().st_size
    feed = {"input": np.load(CALIB)["input"][:32]}
    np.testing.assert_array_equal(ort_run(sparse, feed)[0], ort_run(dense, feed)[0])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["output_format"] == "sparse"
    assert report["output_bytes"] == sparse.stat().st_size
    assert "sparse" in run.err


def test_default_output_beside_the_input_and_force(cli, tmp_path):
    model = tmp_path / "digits_cnn.onnx"
    shutil.copy(CNN, model)
    first = cli("compress", model, "--rate", "0.5", "--calib", CALIB, *FAST)
    assert first.code == 0, first.err
    pruned = tmp_path / "digits_cnn.pruned.onnx"
    assert listing(tmp_path) == ["digits_cnn.onnx", "digits_cnn.pruned.onnx"]
    assert str(pruned) in first.err
    written = pruned.read_bytes()
    assert model.read_bytes() == CNN.read_bytes()  # the input is never touched

    again = cli("compress", model, "--rate", "0.2", "--calib", CALIB, *FAST)
    assert_usage_error(again, "exists.*--force")
    assert pruned.read_bytes() == written

    forced = cli("compress", model, "--rate", "0.2", "--calib", CALIB, *FAST, "--force")
    assert forced.code == 0, forced.err
    assert pruned.read_bytes() != written
    assert listing(tmp_path) == ["digits_cnn.onnx", "digits_cnn.pruned.onnx"]
    density = rdonnx.inspect(pruned).params_nonzero / CNN_PARAMS
    assert abs(density - 0.2) <= 0.005


def test_compress_conftest_models(cli, tmp_path, cnn, int64_model, external):
    """Synthetic inputs with --input-range for integer inputs; external data input."""
    run = cli("compress", int64_model.path, "--rate", "0.3", "--input-range", "input=0:49",
              "--calib-samples", "32", "-o", tmp_path / "int.onnx")
    assert run.code == 0, run.err
    assert "synthetic" in run.err
    run = cli("compress", external.path, "--rate", "0.3", "--calib", external.calib,
              "--method", "global", "-o", tmp_path / "ext.onnx", "--report", tmp_path / "e.json")
    assert run.code == 0, run.err
    assert json.loads((tmp_path / "e.json").read_text())["method"] == "global"
    assert listing(tmp_path) == ["e.json", "ext.onnx", "int.onnx"]


# ----------------------------------------------------------------------------------------------
# compress: bad input


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, no_weights, int64_model, attention) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(0)
    files = {"random": folder / "random.onnx", "truncated": folder / "truncated.onnx",
             "empty": folder / "empty.onnx", "names": folder / "names.npz",
             "shapes": folder / "shapes.npz", "dtype": folder / "dtype.npz",
             "not_npz": folder / "not_npz.npz"}
    files["random"].write_bytes(rng.bytes(4096))
    data = CNN.read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"].write_bytes(b"")
    np.savez(files["names"], x=np.zeros((8, 1, 8, 8), np.float32))
    np.savez(files["shapes"], input=np.zeros((8, 1, 7, 7), np.float32))
    np.savez(files["dtype"], input=rng.integers(0, 50, (8, 6)).astype(np.float32))
    files["not_npz"].write_bytes(rng.bytes(1000))
    files.update(no_weights=no_weights.path, no_weights_calib=no_weights.calib,
                 int64=int64_model.path, attention=attention.path,
                 attention_calib=attention.calib)
    return files


def _compress(model, *extra) -> list:
    return ["compress", model, "--rate", "0.5", *extra]


# name -> (argv from (bad files, output folder), what the one error line must say)
BAD_COMPRESS: dict[str, tuple[Callable[[dict, Path], list], str]] = {
    "not_onnx": (lambda f, o: _compress(f["random"], "-o", o / "m.onnx"),
                 "not a valid ONNX model"),
    "truncated": (lambda f, o: _compress(f["truncated"], "-o", o / "m.onnx"),
                  "not a valid ONNX model"),
    "empty_file": (lambda f, o: _compress(f["empty"], "-o", o / "m.onnx"),
                   "not a valid ONNX model"),
    "no_prunable_weight": (lambda f, o: _compress(f["no_weights"], "--calib",
                                                  f["no_weights_calib"], "-o", o / "m.onnx"),
                           "no prunable weight"),
    "calib_wrong_names": (lambda f, o: _compress(CNN, "--calib", f["names"], "-o", o / "m.onnx"),
                          r"missing \['input'\].*unknown \['x'\]"),
    "calib_wrong_shapes": (lambda f, o: _compress(CNN, "--calib", f["shapes"],
                                                  "-o", o / "m.onnx"), "shape"),
    "calib_wrong_dtype": (lambda f, o: _compress(f["int64"], "--calib", f["dtype"],
                                                 "-o", o / "m.onnx"), "float32.*int64"),
    "calib_missing": (lambda f, o: _compress(CNN, "--calib", o / "nope.npz", "-o", o / "m.onnx"),
                      "not found"),
    "calib_not_npz": (lambda f, o: _compress(CNN, "--calib", f["not_npz"], "-o", o / "m.onnx"),
                      r"not a readable \.npz"),
    "int_input_without_range": (lambda f, o: _compress(f["int64"], "-o", o / "m.onnx"),
                                "input-range"),
    "bad_input_shape_option": (lambda f, o: _compress(CNN, "--input-shape", "input=axb",
                                                      "-o", o / "m.onnx"), "input-shape"),
    "unknown_input_in_range": (lambda f, o: _compress(CNN, "--input-range", "nope=0:1",
                                                      "-o", o / "m.onnx"), "nope"),
    "rate_zero": (lambda f, o: ["compress", CNN, "--rate", "0", "-o", o / "m.onnx"], "rate"),
    "rate_negative": (lambda f, o: ["compress", CNN, "--rate", "-0.5", "-o", o / "m.onnx"],
                      "rate"),
    "rate_above_one": (lambda f, o: ["compress", CNN, "--rate", "1.5", "-o", o / "m.onnx"],
                       "rate"),
    "rate_not_a_number": (lambda f, o: ["compress", CNN, "--rate", "half", "-o", o / "m.onnx"],
                          "rate"),
    "rate_missing": (lambda f, o: ["compress", CNN, "-o", o / "m.onnx"], "rate"),
    "output_missing_folder": (lambda f, o: _compress(CNN, "-o", o / "missing" / "m.onnx"),
                              "does not exist"),
    "output_parent_is_a_file": (lambda f, o: _touch(o / "file") and
                                _compress(CNN, "-o", o / "file" / "m.onnx"), "file|folder"),
    "output_is_a_folder": (lambda f, o: _compress(CNN, "-o", o), "folder"),
    "output_is_input": (lambda f, o: _copy(CNN, o / "m.onnx") and
                        _compress(o / "m.onnx", "--force", "-o", o / "m.onnx"), "input model"),
    "model_missing": (lambda f, o: _compress(o / "nope.onnx", "-o", o / "m.onnx"), "not found"),
    "device_unknown": (lambda f, o: _compress(CNN, "--device", "tpu", "-o", o / "m.onnx"),
                       "device"),
    "metric_kl_without_class_scores": (
        lambda f, o: _compress(f["attention"], "--calib", f["attention_calib"], "--metric", "kl",
                               "-o", o / "m.onnx"), "kl"),
    "metric_unknown": (lambda f, o: _compress(CNN, "--metric", "psnr", "-o", o / "m.onnx"),
                       "metric"),
    "labels_without_test": (lambda f, o: _compress(CNN, "--labels", "label", "-o", o / "m.onnx"),
                            "--test"),
    "labels_key_wrong": (lambda f, o: _compress(CNN, "--calib", CALIB, "--test", TEST,
                                                "--labels", "nope", "-o", o / "m.onnx"),
                         "nope"),
    "report_exists": (lambda f, o: _touch(o / "r.json") and
                      _compress(CNN, "--report", o / "r.json", "-o", o / "m.onnx"), "exists"),
    "report_is_the_output": (lambda f, o: _compress(CNN, "--calib", CALIB, "--report",
                                                    o / "m.onnx", "-o", o / "m.onnx"),
                             "report|output"),
    "unknown_option": (lambda f, o: _compress(CNN, "--rank", "3", "-o", o / "m.onnx"),
                       "--rank"),
}


def _touch(path: Path) -> bool:
    path.write_text("{}")
    return True


def _copy(src: Path, dst: Path) -> bool:
    shutil.copy(src, dst)
    return True


@pytest.mark.parametrize("name", list(BAD_COMPRESS))
def test_compress_bad_input(cli, bad_files, tmp_path, name):
    build, match = BAD_COMPRESS[name]
    out = tmp_path / "out"
    out.mkdir()
    argv = build(bad_files, out) + ["--no-layer-distortion"]
    before, inputs_before = listing(tmp_path), listing(bad_files["random"].parent)
    run = cli(*argv)
    assert_usage_error(run, match)
    assert listing(tmp_path) == before  # no output, report or temporary file left
    assert listing(bad_files["random"].parent) == inputs_before


def test_device_cuda_without_cuda_is_a_usage_error(cli, tmp_path, monkeypatch):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        # on a GPU machine, pretend to be the CPU-only one this test is about
        monkeypatch.setattr(onnxruntime, "get_available_providers",
                            lambda: ["CPUExecutionProvider"])
    run = cli(*_compress(CNN, "--calib", CALIB, "--device", "cuda", "-o", tmp_path / "m.onnx"))
    assert_usage_error(run, "--device cuda.*CUDA")
    assert listing(tmp_path) == []
    # --device cpu and auto work on the same machine
    run = cli(*_compress(CNN, "--calib", CALIB, *FAST, "--device", "cpu",
                         "-o", tmp_path / "m.onnx"))
    assert run.code == 0, run.err
    assert "CPUExecutionProvider" in run.err


def test_debug_shows_the_traceback(cli, bad_files, tmp_path):
    run = cli(*_compress(bad_files["random"], "-o", tmp_path / "m.onnx", "--debug"))
    assert run.code == 2
    assert "Traceback (most recent call last)" in run.err
    assert run.err.splitlines()[-1].startswith("rdonnx: error: ")
    assert "not a valid ONNX model" in run.err.splitlines()[-1]
    assert listing(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# inspect, evaluate, doctor


def test_inspect_table(cli):
    run = cli("inspect", CNN)
    assert run.code == 0, run.err
    for name in CNN_WEIGHTS:
        assert name in run.out
    assert "56,224 params" in run.out
    assert "100.00% nonzero" in run.out
    assert "4 prunable weights" in run.out


def test_inspect_json_before_and_after(cli, tmp_path):
    run = cli("inspect", CNN, "--json")
    assert run.code == 0, run.err
    data = json.loads(run.out)
    assert data["params_total"] == data["params_nonzero"] == CNN_PARAMS
    assert [w["name"] for w in data["weights"]] == CNN_WEIGHTS
    assert all(w["density"] == 1.0 for w in data["weights"])
    assert cli("compress", CNN, "--rate", "0.25", "--calib", CALIB, *FAST, "-q",
               "-o", tmp_path / "p.onnx").code == 0
    after = json.loads(cli("inspect", tmp_path / "p.onnx", "--json").out)
    assert after["params_total"] == CNN_PARAMS
    assert abs(after["params_nonzero"] / CNN_PARAMS - 0.25) <= 0.005
    small = json.loads(cli("inspect", CNN, "--json", "--min-params", "1000").out)
    assert [w["name"] for w in small["weights"]] == ["3.weight", "7.weight"]


def test_inspect_bad_input(cli, bad_files, tmp_path):
    assert_usage_error(cli("inspect", bad_files["truncated"]), "not a valid ONNX model")
    assert_usage_error(cli("inspect", tmp_path / "nope.onnx"), "not found")


@pytest.fixture(scope="module")
def pruned_cnn(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli_eval") / "pruned.onnx"
    rdonnx.compress(CNN, rate=0.3, calib=CALIB,
                    config=rdonnx.CompressConfig.of(rate=0.3, layer_distortion=False)).save(path)
    return path


def test_evaluate_text_and_json(cli, pruned_cnn):
    run = cli("evaluate", CNN, pruned_cnn, "--data", TEST, "--labels", "label")
    assert run.code == 0, run.err
    assert re.search(r"^nmse: \d", run.out, re.MULTILINE)
    assert "accuracy: 99.44% (reference) ->" in run.out
    assert "samples: 360" in run.out
    run = cli("evaluate", CNN, pruned_cnn, "--data", TEST, "--labels", "label", "--json",
              "--metric", "cosine")
    assert run.code == 0, run.err
    data = json.loads(run.out)
    assert data["metric"] == "cosine" and data["distortion"] == data["cosine"] > 0
    assert data["accuracy_original"] == pytest.approx(358 / 360)
    assert data["samples"] == 360


def test_evaluate_fail_above(cli, pruned_cnn):
    args = ["evaluate", CNN, pruned_cnn, "--data", CALIB, "--calib-samples", "64"]
    value = json.loads(cli(*args, "--json").out)["distortion"]
    assert value > 0
    ok = cli(*args, "--fail-above", value * 2)
    assert ok.code == 0, ok.err
    assert ok.err == ""
    exceeded = cli(*args, "--fail-above", value / 2)
    assert exceeded.code == 3
    assert "exceeds --fail-above" in exceeded.err
    same = cli("evaluate", CNN, CNN, "--data", CALIB, "--fail-above", "0")
    assert same.code == 0, same.err  # identical models: distortion 0 is not above 0


def test_evaluate_bad_input(cli, bad_files, pruned_cnn):
    assert_usage_error(cli("evaluate", CNN, bad_files["random"], "--data", CALIB),
                       "not a valid ONNX model")
    assert_usage_error(cli("evaluate", CNN, pruned_cnn, "--data", bad_files["shapes"]), "shape")
    assert_usage_error(cli("evaluate", CNN, bad_files["int64"], "--data", CALIB),
                       "different inputs")


def test_doctor(cli):
    run = cli("doctor")
    assert run.code == 0, run.err
    assert re.search(r"^onnxruntime \d", run.out, re.MULTILINE)
    assert "providers available: " in run.out
    assert "CPUExecutionProvider" in run.out
    assert "CUDA execution provider works: " in run.out
    assert f"rdonnx {rdonnx.__version__}" in run.out


def test_version_and_help(cli):
    run = cli("--version")
    assert run.code == 0 and rdonnx.__version__ in run.out
    run = cli("compress", "--help")
    assert run.code == 0 and "--rate" in run.out and "--format" in run.out
    assert_usage_error(cli("frobnicate"), "no such command")


def test_no_arguments_prints_readable_help(cli):
    """`rdonnx` alone lists the commands, one per line, instead of an error."""
    run = cli()
    assert run.code in (0, 2)
    text = run.out + run.err
    assert "rdonnx: error" not in text
    assert re.search(r"^\s+compress\s", text, re.MULTILINE)
    assert re.search(r"^\s+inspect\s", text, re.MULTILINE)


# ----------------------------------------------------------------------------------------------
# the real entry points, as subprocesses


def test_python_cli_py_compress(tmp_path, ort_run):
    run = subprocess_run(sys.executable, "cli.py", "compress", "models/digits_cnn.onnx",
                         "--rate", "0.5", "--calib", "models/digits_calib.npz",
                         "--test", "models/digits_test.npz", "--labels", "label",
                         "--no-layer-distortion", "--report", tmp_path / "r.json",
                         "--format", "dense", "-o", tmp_path / "out.onnx")
    assert run.code == 0, run.err
    assert "accuracy" in run.err
    assert listing(tmp_path) == ["out.onnx", "r.json"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["test"]["accuracy_original"] == pytest.approx(358 / 360, abs=1e-5)
    onnx.checker.check_model(str(tmp_path / "out.onnx"))


def test_usage_is_checked_before_the_file_system(cli, tmp_path):
    """A bad option is the error even when the default output already exists (as after the
    README's first command) or the model is missing."""
    model = tmp_path / "digits_cnn.onnx"
    model.write_bytes(CNN.read_bytes())
    (tmp_path / "digits_cnn.rdonnx").write_bytes(b"an earlier result")
    for args in ((model, "--rate", "2"), (tmp_path / "missing.onnx", "--rate", "2"),
                 (model, "--rate", "0.5", "--pattern", "5:4"),
                 (model, "--rate", "0.5", "--input-shape", "x=0x3")):
        run = cli("compress", *args)
        assert run.code == 2 and "exists" not in run.err and "not found" not in run.err, run.err
    assert (tmp_path / "digits_cnn.rdonnx").read_bytes() == b"an earlier result"


def test_python_cli_py_bad_input(tmp_path):
    model = tmp_path / "bad.onnx"
    model.write_bytes(b"\x00not an onnx model" * 10)
    run = subprocess_run(sys.executable, "cli.py", "compress", model, "--rate", "0.5",
                         "-o", tmp_path / "out.onnx")
    assert_usage_error(run, "not a valid ONNX model")
    assert listing(tmp_path) == ["bad.onnx"]


def test_console_script(tmp_path, pruned_cnn):
    script = console_script()
    run = subprocess_run(script, "inspect", "--json", CNN, cwd=tmp_path)
    assert run.code == 0, run.err
    assert json.loads(run.out)["params_total"] == CNN_PARAMS
    run = subprocess_run(script, "evaluate", CNN, pruned_cnn, "--data", CALIB,
                         "--fail-above", "1e-9", cwd=tmp_path)
    assert run.code == 3, run.err
    assert "exceeds --fail-above" in run.err
    run = subprocess_run(script, "compress", CNN, "--rate", "2", cwd=tmp_path)
    assert_usage_error(run, "rate")
    assert listing(tmp_path) == []



def test_option_defaults_come_from_the_settings_dataclasses():
    """Every CLI option of a setting takes its default from the one place it is written."""
    from rdonnx.cli import cli
    from rdonnx.flow.config import DEFAULTS, GROUPS, KEYS
    from rdonnx.flow.methods.options import METHOD_OPTIONS

    defaults = {key: getattr(getattr(DEFAULTS, owner) if owner in GROUPS
                             else METHOD_OPTIONS[owner](), name)
                for key, (owner, name) in KEYS.items()}
    defaults["method"] = DEFAULTS.method
    seen = 0
    for command in cli.commands.values():
        values = command.make_context(command.name, [], resilient_parsing=True).params
        for param in command.params:
            if param.name not in defaults or command.name == "decompress":
                continue  # decompress --format is its own option (dense | sparse)
            seen += 1
            default, expected = values[param.name], defaults[param.name]
            if param.name in ("grid", "shapes", "ranges", "confidence"):  # text parsed
                assert default in (None, ()), param.name
            elif isinstance(expected, tuple):
                assert tuple(default or ()) == expected, param.name
            else:
                assert default == expected, (command.name, param.name)
    assert seen > 50
