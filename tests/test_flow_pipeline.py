"""The compress pipeline end to end: the R-D allocator against a known optimum, curves reuse
and their fingerprint, the calibrate command, additivity, distortion / agreement targets,
every method with every criterion, nmse-channel and plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from _graphs import make_model, vi
from conftest import BUNDLED, Case
from onnx import TensorProto, helper, numpy_helper

import rdonnx
from rdonnx import CompressConfig, DataOptions, UsageError
from rdonnx.allocate.allocators import Allocation, Curve, predicted, rd, rd_dp, uniform
from rdonnx.cli import main
from rdonnx.report.records import render

GRID = (1.0, 0.5, 0.2, 0.1, 0.05)
GRID_TEXT = "1,0.5,0.2,0.1,0.05"
# these tests check the search and its figures on all the calibration data (no holdout, bounds
# checked as measured); tests/test_flow_verify.py checks the held-out part and the confidence
ALL_DATA = {"holdout": 0.0, "confidence": 0.0}
FAST = CompressConfig.of(grid=GRID, layer_distortion=False, format="dense", **ALL_DATA)
DIGITS_MLP = BUNDLED / "digits_mlp.onnx"
DIGITS_CALIB = BUNDLED / "digits_calib.npz"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run `rdonnx ARGS` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("rdonnx: error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# The allocator on synthetic convex curves with a known optimum
#
# minimise sum_l a_l (1 - d_l)^2  subject to  sum_l n_l d_l = R N
# Lagrangian: -2 a_l (1 - d_l) + lambda n_l = 0  =>  d_l = 1 - lambda n_l / (2 a_l)
# rate:  N - (lambda / 2) sum_l n_l^2 / a_l = R N  =>  lambda = 2 N (1 - R) / sum_l n_l^2 / a_l

SIZES = {"a": 1000, "b": 3000, "c": 500, "d": 2000}
COEF = {"a": 5.0, "b": 2.0, "c": 4.0, "d": 1.0}
FINE = tuple(float(v) for v in np.round(np.linspace(1.0, 0.01, 100), 6))  # steps of 0.01


def _quadratic_allocation(grid=FINE) -> Allocation:
    g = np.asarray(grid)
    return Allocation({n: np.zeros(s, np.float32) for n, s in SIZES.items()},
                      {n: Curve(tuple(grid), tuple(COEF[n] * (1 - g) ** 2)) for n in SIZES})


def _analytic(rate: float) -> dict[str, float]:
    total = sum(SIZES.values())
    lam = 2 * total * (1 - rate) / sum(SIZES[n] ** 2 / COEF[n] for n in SIZES)
    return {n: 1 - lam * SIZES[n] / (2 * COEF[n]) for n in SIZES}


@pytest.mark.parametrize("rate", [0.45, 0.5, 0.6, 0.7, 0.85])
def test_rd_matches_the_analytic_lagrangian_optimum(rate):
    density = _analytic(rate)
    assert all(0.01 < d < 1 for d in density.values())  # an interior optimum on the grid
    alloc = _quadratic_allocation()
    keep = rd(alloc, rate)
    for name, size in SIZES.items():
        # piecewise-linear interpolation: within one grid step (0.01) of the true optimum
        assert abs(keep[name] / size - density[name]) <= 0.01 + 1 / size, name
    optimum = sum(COEF[n] * (1 - density[n]) ** 2 for n in SIZES)
    assert optimum <= predicted(alloc, keep) <= optimum * 1.01 + 1e-9


@pytest.mark.parametrize("rate", [0.3, 0.45, 0.6, 0.85])
def test_rd_dp_reaches_the_same_predicted_distortion(rate):
    alloc = _quadratic_allocation()
    by_rd, by_dp = predicted(alloc, rd(alloc, rate)), predicted(alloc, rd_dp(alloc, rate))
    assert sum(rd_dp(alloc, rate).values()) == round(rate * sum(SIZES.values()))
    assert by_dp >= by_rd - 1e-9  # rd is optimal on convex curves
    assert by_dp <= by_rd * 1.01 + 1e-9


@pytest.mark.parametrize("rate", [0.011, 0.05, 0.1234, 1 / 3, 0.5, 0.77, 0.999, 1.0])
def test_rd_meets_the_rate_exactly(rate):
    alloc = _quadratic_allocation()
    keep = rd(alloc, rate)
    assert sum(keep.values()) == round(rate * sum(SIZES.values()))
    assert all(0 <= keep[n] <= SIZES[n] for n in SIZES)


@pytest.mark.parametrize("grid", [FINE, GRID, (1.0, 0.3, 0.02)])
@pytest.mark.parametrize("rate", [0.1, 0.2, 0.4, 0.6, 0.8, 0.95])
def test_rd_is_never_worse_than_uniform_on_convex_curves(grid, rate):
    alloc = _quadratic_allocation(grid)
    by_rd, by_uniform = predicted(alloc, rd(alloc, rate)), predicted(alloc, uniform(alloc, rate))
    assert by_rd <= by_uniform + 1e-9
    # and the quadratic costs differ enough that the allocation is not uniform
    if rate < 0.95:
        assert by_rd < 0.9 * by_uniform


def test_rd_at_the_smallest_grid_density_meets_the_rate():
    """A rate equal to the grid's smallest density is feasible (every weight at that density),
    even when round(rate * N) is below the sum of the fractional per-weight counts.

    Sizes 8192 + 8192 + 640 at 0.05 keep 409.6 + 409.6 + 32 = 851.2 entries; round gives 851.
    """
    sizes = {"w1": 8192, "w2": 8192, "w3": 640}
    g = np.asarray(GRID)
    alloc = Allocation({n: np.zeros(s, np.float32) for n, s in sizes.items()},
                       {n: Curve(GRID, tuple((1 - g) ** 2)) for n in sizes})
    keep = rd(alloc, 0.05)
    assert sum(keep.values()) == round(0.05 * sum(sizes.values()))


# ---------------------------------------------------------------------------------------------
# Curves reuse: the fingerprint refuses curves of another model, other data or settings


@pytest.fixture(scope="module")
def curves_case(mlp: Case, tmp_path_factory) -> dict[str, Path]:
    """`rdonnx calibrate` on the MLP fixture; a second model (one weight changed) and a second
    calibration file (one value changed)."""
    folder = tmp_path_factory.mktemp("curves")
    proto = onnx.load(str(mlp.path))
    tensor = next(t for t in proto.graph.initializer if t.dims and len(t.dims) == 2)
    array = numpy_helper.to_array(tensor).copy()
    array[0, 0] += 0.5
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    other_model = folder / "mlp_other_weights.onnx"
    onnx.save_model(proto, str(other_model))
    with np.load(mlp.calib) as data:
        x = data["input"].copy()
    x[3, 1] += 1.0
    other_calib = folder / "other_calib.npz"
    np.savez(other_calib, input=x)
    curves = folder / "curves.json"
    assert main(["calibrate", str(mlp.path), "--calib", str(mlp.calib), "--grid", GRID_TEXT,
                 "-o", str(curves), "-q", "--holdout", "0"]) == 0  # as FAST
    return {"model": mlp.path, "calib": mlp.calib, "curves": curves,
            "other_model": other_model, "other_calib": other_calib}


def test_calibrate_writes_a_curves_file(curves_case):
    data = json.loads(curves_case["curves"].read_text())
    assert data["format"] == "rdonnx-curves" and data["version"] == 1
    assert set(data["fingerprint"]) == {"model", "data", "settings"}
    assert data["grid"] == list(GRID)
    assert len(data["weights"]) == 3
    for entry in data["weights"].values():
        assert entry["params"] > 0
        assert len(entry["distortion"]) == len(GRID) and entry["distortion"][0] == 0.0
        assert all(v >= 0 for v in entry["distortion"])
        assert entry["distortion"][-1] > 0


def test_curves_from_another_model_are_refused(curves_case):
    with pytest.raises(UsageError, match="model") as info:
        rdonnx.compress(curves_case["other_model"], calib=curves_case["calib"], rate=0.3,
                        curves=curves_case["curves"], config=FAST)
    assert "data" not in str(info.value).split("(")[1].split(")")[0]


def test_curves_from_other_data_are_refused(curves_case):
    with pytest.raises(UsageError, match=r"\(data differ") as info:
        rdonnx.compress(curves_case["model"], calib=curves_case["other_calib"], rate=0.3,
                        curves=curves_case["curves"], config=FAST)
    assert "model" not in str(info.value).split("(")[1].split(")")[0]


@pytest.mark.parametrize("change", [dict(criterion="activation"),
                                    dict(grid=(1.0, 0.5, 0.2, 0.1)),
                                    dict(metric="cosine")])
def test_curves_with_other_settings_are_refused(curves_case, change):
    with pytest.raises(UsageError, match=r"\(settings differ"):
        rdonnx.compress(curves_case["model"], calib=curves_case["calib"], rate=0.3,
                        curves=curves_case["curves"], config=FAST.updated(**change))


def test_matching_curves_are_used_and_give_identical_output(curves_case, tmp_path):
    reused = rdonnx.compress(curves_case["model"], calib=curves_case["calib"], rate=0.3,
                             curves=curves_case["curves"], config=FAST)
    measured = rdonnx.compress(curves_case["model"], calib=curves_case["calib"], rate=0.3,
                               config=FAST)
    assert reused.curves.distortion == measured.curves.distortion
    reused.save(tmp_path / "reused.onnx")
    measured.save(tmp_path / "measured.onnx")
    assert (tmp_path / "reused.onnx").read_bytes() == (tmp_path / "measured.onnx").read_bytes()
    assert reused.report.to_json(timings=False) == \
        measured.report.to_json(timings=False).replace("measured.onnx", "reused.onnx")


def test_the_same_grid_written_differently_is_the_same_setting(mlp, tmp_path):
    """Grids are normalised by check_grid (1.0 added, sorted, duplicates dropped): curves
    calibrated with --grid 0.05,0.1,0.2,0.5 serve a run with grid (1, 0.5, 0.2, 0.1, 0.05)."""
    curves = rdonnx.calibrate(mlp.path, calib=mlp.calib,
                              config=FAST.updated(grid=(0.05, 0.1, 0.2, 0.5)))
    assert curves.grid == GRID
    result = rdonnx.compress(mlp.path, calib=mlp.calib, rate=0.3, curves=curves, config=FAST)
    assert result.curves is curves


# ---------------------------------------------------------------------------------------------
# The calibrate and compress commands


def test_cli_calibrate_then_compress_with_the_curves(mlp, tmp_path, capsys):
    curves = tmp_path / "curves.json"
    code, _, err = cli(capsys, "calibrate", mlp.path, "--calib", mlp.calib, "-o", curves)
    assert code == 0, err
    data = json.loads(curves.read_text())
    assert {"format", "version", "fingerprint", "grid", "weights"} <= set(data)
    assert data["format"] == "rdonnx-curves" and data["version"] == 1
    assert data["grid"][0] == 1.0 and data["grid"] == sorted(data["grid"], reverse=True)
    out = tmp_path / "out.onnx"
    code, _, err = cli(capsys, "compress", mlp.path, "--curves", curves, "--calib", mlp.calib,
                       "--rate", "0.3", "--format", "dense", "-o", out, "-q")
    assert code == 0, err
    onnx.checker.check_model(onnx.load(str(out)))
    # the same run measuring its own curves writes the same file
    again = tmp_path / "again.onnx"
    code, _, err = cli(capsys, "compress", mlp.path, "--calib", mlp.calib, "--rate", "0.3",
                       "--format", "dense", "-o", again, "-q")
    assert code == 0, err
    assert out.read_bytes() == again.read_bytes()


def test_cli_calibrate_refuses_to_overwrite(mlp, tmp_path, capsys):
    curves = tmp_path / "curves.json"
    curves.write_text("keep me")
    code, _, err = cli(capsys, "calibrate", mlp.path, "--calib", mlp.calib, "--grid", GRID_TEXT,
                       "-o", curves, "-q")
    assert code == 2 and "--force" in _error_line(err)
    assert curves.read_text() == "keep me"


@pytest.mark.parametrize("which,word", [("other_model", "model"), ("other_calib", "data"),
                                        ("criterion", "settings"), ("grid", "settings")])
def test_cli_mismatching_curves_exit_2_without_output(curves_case, tmp_path, capsys, which,
                                                      word):
    model, calib, grid, extra = curves_case["model"], curves_case["calib"], GRID_TEXT, []
    if which == "other_model":
        model = curves_case["other_model"]
    elif which == "other_calib":
        calib = curves_case["other_calib"]
    elif which == "grid":
        grid = "1,0.5,0.2"
    else:
        extra = ["--criterion", "activation"]
    out = tmp_path / "out.onnx"
    code, stdout, err = cli(capsys, "compress", model, "--curves", curves_case["curves"],
                            "--calib", calib, "--rate", "0.3", "--grid", grid, "-o", out,
                            "-q", *extra)
    assert code == 2
    assert word in _error_line(err)
    assert stdout == ""
    assert not out.exists()


@pytest.mark.parametrize("text", ["[]", '{"format": "rdonnx-report"}', "not json"])
def test_cli_curves_that_are_not_curves_exit_2(mlp, tmp_path, capsys, text):
    curves = tmp_path / "curves.json"
    curves.write_text(text)
    out = tmp_path / "out.onnx"
    code, _, err = cli(capsys, "compress", mlp.path, "--curves", curves, "--calib", mlp.calib,
                       "--rate", "0.3", "--format", "dense", "-o", out, "-q")
    assert code == 2, err
    assert "curves" in _error_line(err)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Additivity: the predicted figure is the sum of the curves, the calibration figure is measured


def test_predicted_distortion_is_the_sum_of_the_curves_and_calibration_is_measured(mlp,
                                                                                   tmp_path):
    result = rdonnx.compress(mlp.path, calib=mlp.calib, rate=0.3, config=FAST)
    report = result.report
    assert report.grid == list(GRID)
    total = 0.0
    for w in report.weights:
        kept_at = np.asarray(report.grid) * w.params
        total += float(np.interp(w.kept, kept_at[::-1], np.asarray(w.curve)[::-1]))
    assert report.predicted_distortion == pytest.approx(total, rel=1e-12)
    path = tmp_path / "pruned.onnx"
    result.save(path)
    measured = rdonnx.evaluate(mlp.path, path, mlp.calib)
    assert report.calibration.distortion == pytest.approx(measured.distortion, rel=1e-6)
    assert report.calibration.samples == measured.samples
    # a measurement, not the prediction copied (pruning three weights is not exactly additive)
    assert report.calibration.distortion != pytest.approx(report.predicted_distortion,
                                                          rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Targets: --max-distortion and --min-agreement, measured on the saved model

TARGET_CONFIG = CompressConfig.of(layer_distortion=False, grid=(1.0, 0.5, 0.3, 0.2, 0.1, 0.05),
                                  format="dense", **ALL_DATA)


@pytest.mark.parametrize("method", ["rd", "uniform"])
@pytest.mark.parametrize("bound", [0.002, 0.03])
def test_max_distortion_is_met_at_a_near_minimal_rate(method, bound, tmp_path):
    result = rdonnx.compress(DIGITS_MLP, calib=DIGITS_CALIB, max_distortion=bound,
                             method=method, config=TARGET_CONFIG)
    path = tmp_path / "pruned.onnx"
    result.save(path)
    measured = rdonnx.evaluate(DIGITS_MLP, path, DIGITS_CALIB)
    assert measured.distortion <= bound
    assert result.report.calibration.distortion == pytest.approx(measured.distortion,
                                                                 rel=1e-6)
    steps = result.report.search
    assert steps and all(s.meets == (s.distortion <= bound) for s in steps)
    chosen = min(s.rate for s in steps if s.meets)
    assert result.report.rate == pytest.approx(chosen, abs=1e-3)
    assert chosen < 1.0  # the bound allows pruning
    if chosen > min(TARGET_CONFIG.measure.grid):
        below = [s.rate for s in steps if not s.meets and s.rate < chosen]
        assert below, "no probe below the chosen rate misses the bound"
        assert chosen - max(below) <= 0.02  # bisected down to a narrow bracket


@pytest.mark.parametrize("method", ["rd", "uniform"])
def test_a_loose_max_distortion_goes_down_to_the_grid_minimum(method, tmp_path):
    """Any rate meets nmse <= 10: the search stops at the grid's smallest density."""
    result = rdonnx.compress(DIGITS_MLP, calib=DIGITS_CALIB, max_distortion=10.0,
                             method=method, config=TARGET_CONFIG)
    assert result.report.rate == pytest.approx(min(TARGET_CONFIG.measure.grid), abs=1e-3)
    path = tmp_path / "pruned.onnx"
    result.save(path)
    assert rdonnx.evaluate(DIGITS_MLP, path, DIGITS_CALIB).distortion <= 10.0


def test_min_agreement_is_met(tmp_path):
    result = rdonnx.compress(DIGITS_MLP, calib=DIGITS_CALIB, min_agreement=0.95,
                             config=TARGET_CONFIG)
    path = tmp_path / "pruned.onnx"
    result.save(path)
    measured = rdonnx.evaluate(DIGITS_MLP, path, DIGITS_CALIB)
    assert measured.top1_agreement >= 0.95
    assert result.report.rate < 0.9
    steps = result.report.search
    assert any(not s.meets and s.rate < result.report.rate for s in steps)


def test_min_agreement_needs_class_scores(attention):
    with pytest.raises(UsageError, match="class scores"):
        rdonnx.compress(attention.path, calib=attention.calib, min_agreement=0.9,
                        method="uniform", config=TARGET_CONFIG)


# ---------------------------------------------------------------------------------------------
# Every method with every criterion


@pytest.fixture(scope="module")
def method_runs(request) -> dict:
    """compress(rate=0.3) for each (model, method, criterion), run once."""
    cases = {name: request.getfixturevalue(name)
             for name in ("mlp", "cnn", "attention", "bundled_cnn")}
    config = FAST.updated(data=DataOptions(samples=32))
    runs = {}
    for name, case in cases.items():
        for method in ("rd", "uniform", "global", "lamp"):
            for criterion in ("magnitude", "activation"):
                runs[name, method, criterion] = rdonnx.compress(
                    case.path, calib=case.calib, rate=0.3, method=method, criterion=criterion,
                    config=config)
    return runs


@pytest.mark.parametrize("model", ["mlp", "cnn", "attention", "bundled_cnn"])
@pytest.mark.parametrize("method", ["rd", "uniform", "global", "lamp"])
@pytest.mark.parametrize("criterion", ["magnitude", "activation"])
def test_every_method_and_criterion_meets_the_rate(method_runs, model, method, criterion):
    result = method_runs[model, method, criterion]
    report = result.report
    assert abs(report.rate - 0.3) <= 0.005
    assert report.method == method and report.criterion == criterion
    nonzero = sum(int(np.count_nonzero(a)) for a in result.weights.values())
    assert nonzero <= report.params_kept
    assert nonzero >= report.params_kept - 0.001 * report.params_total
    assert np.isfinite(report.calibration.distortion) and report.calibration.distortion > 0
    for w in report.weights:
        assert w.criterion == ("activation" if criterion == "activation" else "magnitude")
        assert int(np.count_nonzero(result.weights[w.name])) <= w.kept


@pytest.mark.parametrize("model", ["mlp", "attention"])
def test_activation_criterion_changes_which_entries_are_kept(method_runs, model):
    """Same counts per weight (uniform), different masks: the criterion really is used."""
    magnitude = method_runs[model, "uniform", "magnitude"]
    activation = method_runs[model, "uniform", "activation"]
    ops = {w.name: w.op for w in activation.report.weights}
    assert set(ops.values()) <= {"Gemm", "MatMul"}
    assert all(w.criterion == "activation" for w in activation.report.weights)
    differ = [n for n in magnitude.weights
              if not np.array_equal(magnitude.weights[n] != 0, activation.weights[n] != 0)]
    assert differ


def test_activation_criterion_ranks_by_w_squared_times_input_moment(mlp):
    """For the MLP's first Gemm (fed by the model input), the kept entries of each output row
    are those with the largest w^2 * E[x^2] over the calibration data."""
    result = rdonnx.compress(mlp.path, calib=mlp.calib, rate=0.3, method="uniform",
                             criterion="activation", config=FAST)
    first = result.report.weights[0]
    proto = onnx.load(str(mlp.path))
    w = next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == first.name)
    assert w.shape == (64, 16)  # Gemm transB: [out, in]
    with np.load(mlp.calib) as data:
        moments = np.mean(data["input"].astype(np.float64) ** 2, axis=0)
    scores = w.astype(np.float64) ** 2 * moments[None, :]
    kept = result.weights[first.name] != 0
    for row in range(w.shape[0]):
        n = int(kept[row].sum())
        top = np.argsort(-scores[row], kind="stable")[:n]
        assert set(np.flatnonzero(kept[row])) == set(top), row


# ---------------------------------------------------------------------------------------------
# nmse-channel


def _two_channel_model(scale: float = 1000.0) -> tuple[onnx.ModelProto, np.ndarray]:
    """y[batch, 2] = x[batch, 64] @ W[64, 2], channel 0 exactly `scale` times channel 1."""
    rng = np.random.default_rng(13)
    u = (rng.uniform(0.5, 1.0, 64) * rng.choice([-1, 1], 64)).astype(np.float32)
    w = np.stack([scale * u, u], axis=1).astype(np.float32)
    proto = make_model([helper.make_node("MatMul", ["input", "W"], ["output"])],
                       [vi("input", TensorProto.FLOAT, ["batch", 64])],
                       [vi("output", TensorProto.FLOAT, ["batch", 2])], {"W": w})
    return proto, w


def test_nmse_channel_sees_a_destroyed_small_channel():
    proto, w = _two_channel_model()
    broken = onnx.ModelProto()
    broken.CopyFrom(proto)
    w2 = w.copy()
    w2[:, 1] = 0
    broken.graph.initializer[0].CopyFrom(numpy_helper.from_array(w2, "W"))
    x = {"input": np.random.default_rng(14).standard_normal((40, 64)).astype(np.float32)}
    result = rdonnx.evaluate(proto, broken, x, metric="nmse-channel")
    assert result.nmse < 1e-5  # 1 / (1000^2 + 1)
    assert result.nmse_channel == pytest.approx(0.5, abs=1e-3)
    assert result.distortion == result.nmse_channel
    assert rdonnx.evaluate(proto, broken, x).distortion == result.nmse


def test_compress_measures_curves_in_nmse_channel():
    proto, _ = _two_channel_model()
    x = {"input": np.random.default_rng(15).standard_normal((40, 64)).astype(np.float32)}
    config = FAST.updated(min_params=16)
    by_channel = rdonnx.compress(proto, calib=x, rate=0.5,
                                 config=config.updated(metric="nmse-channel"))
    report = by_channel.report
    assert report.calibration.metric == "nmse-channel"
    # density 0.5 keeps the 64 large entries of channel 0: channel 1 is lost entirely
    curve = report.weights[0].curve
    assert curve[GRID.index(0.5)] == pytest.approx(0.5, abs=1e-3)
    assert report.calibration.distortion == pytest.approx(0.5, abs=1e-3)
    assert report.calibration.distortion == report.calibration.nmse_channel
    plain = rdonnx.compress(proto, calib=x, rate=0.5, config=config).report
    assert plain.weights[0].curve[GRID.index(0.5)] < 1e-5
    assert plain.calibration.metric == "nmse"


# ---------------------------------------------------------------------------------------------
# --plot


@pytest.mark.parametrize("method", ["uniform", "rd"])
def test_cli_plot_writes_a_png(mlp, tmp_path, capsys, method):
    out, plot = tmp_path / "out.onnx", tmp_path / "curves.png"
    code, _, err = cli(capsys, "compress", mlp.path, "--calib", mlp.calib, "--rate", "0.3",
                       "--method", method, "--grid", GRID_TEXT, "--no-layer-distortion",
                       "-o", out, "--plot", plot, "-q")
    assert code == 0, err
    assert plot.read_bytes()[:8] == PNG_MAGIC
    assert plot.stat().st_size > 5000
    umask = os.umask(0)
    os.umask(umask)
    assert plot.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "out.onnx"]


def test_plot_without_curves_draws_without_warnings(mlp, tmp_path, capsys, recwarn):
    """Methods that measure no curves (uniform at a rate) leave the curves panel empty: the
    plot must not emit matplotlib's "No artists with labels found to put in legend"
    UserWarning, which a person running the CLI sees on stderr."""
    out, plot = tmp_path / "out.onnx", tmp_path / "curves.png"
    code, _, err = cli(capsys, "compress", mlp.path, "--calib", mlp.calib, "--rate", "0.3",
                       "--method", "uniform", "--no-layer-distortion", "-o", out, "--plot",
                       plot, "-q")
    assert code == 0, err
    assert plot.read_bytes()[:8] == PNG_MAGIC
    assert [str(w.message) for w in recwarn if issubclass(w.category, UserWarning)] == []


@pytest.mark.parametrize("method", ["rd", "lamp"])
def test_a_bound_only_exact_values_meet_is_met_with_exact_values(mlp, method):
    """No value width up to 16 bits meets a bound of 1e-15: the result keeps the values exact
    (the original model here, losslessly coded) with a notice, instead of exit 2."""
    result = rdonnx.compress(mlp.path, max_distortion=1e-15, calib=mlp.calib, method=method,
                             config=FAST.updated(format="rdonnx"))
    assert result.quantized == {}
    assert any("kept exact" in n for n in result.report.notices)
    assert result.report.calibration.distortion <= 1e-15
    originals = {t.name: numpy_helper.to_array(t) for t in onnx.load(mlp.path).graph.initializer}
    for name, value in result.weights.items():
        assert np.array_equal(value[value != 0], originals[name][value != 0])


# ----------------------------------------------------------------------------------------------
# Fewer probes: curves only where the method allocates with them and something is pruned


def test_rate_one_measures_no_curves_and_keeps_every_weight():
    result = rdonnx.compress(DIGITS_MLP, rate=1.0, calib=DIGITS_CALIB,
                             config=FAST.updated(values="quantized", value_bits=8,
                                                 layer_distortion=True))
    assert result.curves is None and result.report.grid is None
    assert result.report.params_kept == result.report.params_total
    assert "curves" not in result.report.timings
    assert all(w.distortion == 0.0 for w in result.report.weights)  # measured without probes


def test_a_bound_with_a_method_that_needs_no_curves_measures_none():
    result = rdonnx.compress(DIGITS_MLP, max_distortion=0.05, calib=DIGITS_CALIB,
                             method="uniform", config=FAST)
    assert result.curves is None
    assert result.report.calibration.nmse <= 0.05
    rd = rdonnx.compress(DIGITS_MLP, max_distortion=0.05, calib=DIGITS_CALIB, config=FAST)
    assert rd.curves is not None


def test_the_report_records_the_seconds_of_each_stage():
    result = rdonnx.compress(DIGITS_MLP, rate=0.3, calib=DIGITS_CALIB,
                             config=FAST.updated(layer_distortion=True))
    timings = result.report.timings
    assert list(timings)[:2] == ["reference", "curves"]
    assert {"allocate and measure", "report"} <= set(timings)
    assert all(v >= 0 for v in timings.values())
    assert json.loads(result.report.to_json())["timings"] == timings
    assert "timings" not in json.loads(result.report.to_json(timings=False))


def test_jobs_give_the_same_file_and_report(tmp_path):
    paths = []
    for jobs in (1, 2):
        result = rdonnx.compress(DIGITS_MLP, rate=0.3, calib=DIGITS_CALIB,
                                 config=FAST.updated(jobs=jobs, layer_distortion=True))
        paths.append(tmp_path / f"{jobs}.onnx")
        result.save(paths[-1])
        paths.append(result.report.to_json(timings=False).replace(f"{jobs}.onnx", "x")
                     .replace(f'"jobs": {jobs}', '"jobs": N'))
    assert paths[0].read_bytes() == paths[2].read_bytes()
    assert paths[1] == paths[3]


@pytest.mark.parametrize("argv,match", [
    (["--jobs", "0"], "jobs"),
    (["--jobs", "x"], "jobs"),
])
def test_bad_jobs_is_a_usage_error(capsys, tmp_path, argv, match):
    code, _, err = cli(capsys, "compress", DIGITS_MLP, "--rate", "0.5", *argv,
                       "-o", tmp_path / "m.onnx")
    assert code == 2 and match in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("correct", [True, False])
def test_bias_correction_cancels_the_output_mean_shift_of_quantization(correct, tmp_path):
    """One Gemm with a bias, 2-bit values: with bias correction the quantized model's output
    mean over the calibration data equals the original's per output row (and the artifact
    holds the corrected bias); without it, quantization shifts the means."""
    rng = np.random.default_rng(21)
    w = rng.standard_normal((16, 12)).astype(np.float32)
    proto = make_model([helper.make_node("Gemm", ["x", "W", "c"], ["y"], transB=1)],
                       [vi("x", TensorProto.FLOAT, ["N", 12])],
                       [vi("y", TensorProto.FLOAT, ["N", 16])],
                       {"W": w, "c": rng.standard_normal(16).astype(np.float32)})
    x = (rng.standard_normal((64, 12)) + 1.5).astype(np.float32)
    config = CompressConfig.of(value_bits=2, min_params=100, layer_distortion=False,
                               bias_correction=correct, holdout=0.0)  # E[x] of all the data
    result = rdonnx.compress(proto, rate=1.0, calib={"x": x}, config=config)
    assert ("c" in result.weights) == correct
    path = tmp_path / "m.rdonnx"
    result.save(path)
    got = rdonnx.open_session(path).run(None, {"x": x})[0].astype(np.float64)
    import onnxruntime as ort
    ref = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]
                               ).run(None, {"x": x})[0].astype(np.float64)
    shift = np.abs((got - ref).mean(axis=0)).max()
    if correct:
        assert shift < 1e-4
    else:
        assert shift > 1e-2


def test_a_bound_chooses_the_width_of_an_unpruned_table(tmp_path):
    """An embedding table is coded, not pruned; at 8 bits it alone misses the bound. The bound
    search chooses its width with the pruned weight's (wider than 8 bits) instead of keeping
    every value exact."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((64, 32)).astype(np.float32)
    weight = rng.standard_normal((32, 16)).astype(np.float32)
    model = make_model([helper.make_node("Gather", ["table", "ids"], ["e"]),
                        helper.make_node("MatMul", ["e", "W"], ["y"])],
                       [vi("ids", TensorProto.INT64, ["N", 4])],
                       [vi("y", TensorProto.FLOAT, ["N", 4, 16])],
                       {"table": table, "W": weight})
    calib = {"ids": rng.integers(0, 64, (64, 4)).astype(np.int64)}
    config = FAST.updated(format="rdonnx")
    eight = rdonnx.compress(model, rate=1.0, calib=calib, config=config.updated(value_bits=8))
    bound = eight.report.calibration.nmse / 10
    result = rdonnx.compress(model, max_distortion=bound, calib=calib, config=config)
    assert not any("kept exact" in n for n in result.report.notices)
    assert result.report.calibration.nmse <= bound
    levels = np.abs(result.quantized["table"].q).max()
    assert levels > 127  # wider than 8 bits
    assert result.report.unpruned_bits["table"] > 8
    assert f"not pruned: 1 tensor {result.report.unpruned_bits['table']}-bit" in \
        render(result.report)
