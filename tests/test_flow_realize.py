"""Realizing candidates (`rdonnx.flow.realize`): survivor reconstruction through the
`Realizer`, the public API and the CLI: --reconstruct (SparseGPT / OBS
updates), --criterion obs, --sequential, --pattern N:M and GPTQ error-compensated quantization
(--reconstruct --value-bits B).

The math of `rdonnx.algo.obs` is unit-tested in test_algo_obs.py; here its defining properties
are checked where users meet them: on whole models, through `rdonnx.compress` and `rdonnx
compress`. Every mode runs on every test model with prunable weights; its output must load
(onnxruntime for dense ONNX, `rdonnx.open_session` for .rdonnx) and reproduce exactly what
compress measured.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from _graphs import make_model, vi
from conftest import PRUNABLE_CASES, Case, assert_usage_error, calib_feed
from onnx import TensorProto, helper

import rdonnx
from rdonnx import CompressConfig, DataOptions, UsageError
from rdonnx.algo.layout import LayerInput
from rdonnx.algo.obs import Hessian, supports, to_matrices, weight_error
from rdonnx.algo.quantize import row_view
from rdonnx.artifact.format import read_artifact
from rdonnx.artifact.parallel import decode_all
from rdonnx.flow.calibration import Calibration, calibrate_model
from rdonnx.flow.hessians import Hessians
from rdonnx.flow.realize import QuantizedCache, Realizer, pattern_mask

GRID = (1.0, 0.5, 0.2, 0.1)
SAMPLES = 64  # calibration samples (the bundled models have 256; the fixtures 32)
DATA = DataOptions(samples=SAMPLES)
# the reconstruction itself, on the data it fits: no holdout here (tests/test_flow_verify.py
# checks what the held-out part changes)
FAST = ["--no-layer-distortion", "--grid", ",".join(map(str, GRID)),
        "--calib-samples", str(SAMPLES), "-q", "--holdout", "0"]

# mode -> (CLI flags, CompressConfig fields); every mode prunes with method uniform (no curves)
MODES: dict[str, tuple[list[str], dict]] = {
    "reconstruct": (["--reconstruct", "--rate", "0.5"], {"reconstruct": True, "rate": 0.5}),
    "obs": (["--criterion", "obs", "--rate", "0.5"], {"criterion": "obs", "rate": 0.5}),
    "sequential": (["--sequential", "--rate", "0.5"], {"sequential": True, "rate": 0.5}),
    "pattern": (["--pattern", "2:4"], {"pattern": "2:4"}),
    "pattern-reconstruct": (["--pattern", "2:4", "--reconstruct"],
                            {"pattern": "2:4", "reconstruct": True}),
    "gptq": (["--reconstruct", "--value-bits", "4", "--rate", "0.5"],
             {"reconstruct": True, "value_bits": 4, "rate": 0.5}),
    "sequential-gptq": (["--sequential", "--value-bits", "4", "--rate", "0.5"],
                        {"sequential": True, "value_bits": 4, "rate": 0.5}),
}


def config(**fields) -> CompressConfig:
    """Small grid, no per-layer passes, 64 samples; dense exact values unless told."""
    base = {"grid": GRID, "layer_distortion": False, "data": DATA, "method": "uniform",
            "format": "dense", "holdout": 0.0}
    return CompressConfig.of(**{**base, **fields})


def mode_config(mode: str, **fields) -> CompressConfig:
    kw = dict(MODES[mode][1])
    if kw.get("value_bits"):
        kw["format"] = "rdonnx"
    return config(**{**kw, **fields})


def ort_outputs(model: onnx.ModelProto | Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def output_of(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a written output: .rdonnx through rdonnx.open_session, ONNX through onnxruntime."""
    if path.suffix == ".rdonnx":
        return rdonnx.open_session(path).run(None, feed)
    return ort_outputs(path, feed)


def kept(array: np.ndarray) -> np.ndarray:
    return np.asarray(array) != 0


# ---------------------------------------------------------------------------------------------
# Cached runs: one compress and one calibration per (model, settings), shared by the tests


_RESULTS: dict = {}
_CALIBRATIONS: dict = {}
_HESSIANS: dict = {}


def compressed(case: Case, cfg: CompressConfig) -> rdonnx.CompressResult:
    key = (case.name, repr(cfg))
    if key not in _RESULTS:
        _RESULTS[key] = rdonnx.compress(case.path, calib=case.calib, config=cfg)
    return _RESULTS[key]


def calibration(case: Case, cfg: CompressConfig) -> Calibration:
    """The Calibration compress builds for these settings (rankings, layer inputs, Hessians)."""
    key = (case.name, cfg.prune.criterion, cfg.prune.reconstructs, cfg.target.pattern)
    if key not in _CALIBRATIONS:
        _CALIBRATIONS[key] = calibrate_model(case.path, cfg, case.calib)
        _HESSIANS[key] = Hessians(_CALIBRATIONS[key])
    return _CALIBRATIONS[key]


def realizer(case: Case, cfg: CompressConfig) -> Realizer:
    """The Realizer compress builds for these settings (Hessians shared per calibration)."""
    cal = calibration(case, cfg)
    key = (case.name, cfg.prune.criterion, cfg.prune.reconstructs, cfg.target.pattern)
    return Realizer(cal, _HESSIANS[key], cfg.prune, cfg.coding, cfg.measure, cfg.target.n_m)


# ---------------------------------------------------------------------------------------------
# Every mode on every model: the CLI exits 0, its output loads and reproduces what the API
# measured (the same run through compress); the API's measured distortion is that of its model


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", PRUNABLE_CASES, indirect=True)
def test_every_mode_runs_and_reproduces_what_compress_measured(case, mode, cli, tmp_path):
    flags, _ = MODES[mode]
    cfg = mode_config(mode)
    out = tmp_path / ("out.rdonnx" if cfg.coding.format == "rdonnx" else "out.onnx")
    report = tmp_path / "report.json"
    run = cli("compress", case.path, "--calib", case.calib, "--method", "uniform",
              "--format", cfg.coding.format, *FAST, *flags, "-o", out, "--report", report)
    assert run.code == 0, run.err
    assert out.is_file() and report.is_file()

    result = compressed(case, cfg)
    for name, value in result.weights.items():
        assert np.isfinite(value).all(), name
    feed = calib_feed(case)
    expected = ort_outputs(result.model, feed)
    got = output_of(out, feed)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    # the CLI reports the same run; the file's distortion is the one compress measured
    measured = result.report.calibration.distortion
    assert json.loads(report.read_text())["calibration"]["distortion"] == pytest.approx(
        measured, rel=2e-5, abs=1e-12)
    evaluation = rdonnx.evaluate(case.path, out if cfg.coding.format == "dense" else result.model,
                                 case.calib, options=DATA)
    assert evaluation.distortion == pytest.approx(measured, rel=1e-4, abs=1e-9)
    if cfg.coding.format == "rdonnx":  # the artifact decodes to exactly the measured weights
        decoded = decode_all(read_artifact(out))
        for name, value in result.weights.items():
            np.testing.assert_array_equal(decoded[name], value, err_msg=name)


def test_saved_result_formats_match_result_model(bundled_mlp, tmp_path):
    """result.save() in every format runs exactly like result.model (reconstructed values)."""
    result = compressed(bundled_mlp, mode_config("reconstruct"))
    feed = calib_feed(bundled_mlp)
    expected = ort_outputs(result.model, feed)
    for fmt, name in (("dense", "d.onnx"), ("sparse", "s.onnx")):
        result.save(tmp_path / name, fmt)
        for a, b in zip(output_of(tmp_path / name, feed), expected):
            np.testing.assert_array_equal(a, b)
    quantized = compressed(bundled_mlp, mode_config("gptq"))
    quantized.save(tmp_path / "q.rdonnx")
    for a, b in zip(output_of(tmp_path / "q.rdonnx", feed),
                    ort_outputs(quantized.model, feed)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Defining properties: the criterion's mask is kept, and no layer gets worse than that mask
# without updates


LAYER_CASES = ("mlp", "cnn", "attention", "int64_model", "bundled_mlp", "bundled_cnn")


@pytest.mark.parametrize("criterion", ["magnitude", "activation"])
@pytest.mark.parametrize("case", LAYER_CASES, indirect=True)
def test_reconstruction_keeps_the_mask_and_never_increases_layer_error(case, criterion):
    cfg = mode_config("reconstruct", criterion=criterion)
    result = compressed(case, cfg)
    rz = realizer(case, cfg)
    cal = rz.cal
    improved = 0
    reconstructed = 0
    for w, report in zip(cal.weights, result.report.weights):
        assert report.name == w.name
        original, new = cal.originals[w.name], result.weights[w.name]
        mask = cal.rankings[w.name].mask(report.kept)
        # the criterion's mask, exactly: pruned entries are 0, no survivor is lost
        assert not (kept(new) & ~mask).any(), f"{w.name}: nonzero outside the chosen mask"
        assert int(np.count_nonzero(new)) == report.kept == int(mask.sum()), w.name
        plain = np.where(mask, original, 0).astype(original.dtype)
        if not rz.reconstructs(w.name):
            np.testing.assert_array_equal(new, plain, err_msg=w.name)
            continue
        reconstructed += 1
        entry = cal.inputs[w.name]
        hessian = rz.hessians.hessian(w.name)
        e_new = weight_error(original, new, entry, hessian)
        e_plain = weight_error(original, plain, entry, hessian)
        assert e_new <= e_plain * (1 + 1e-6) + 1e-12, (w.name, e_new, e_plain)
        improved += e_new < 0.999 * e_plain
    assert reconstructed > 0
    assert improved > 0, "reconstruction changed no layer's error"


@pytest.mark.parametrize("case", ["bundled_mlp", "bundled_cnn"], indirect=True)
def test_gptq_never_increases_layer_error_over_plain_rounding(case, tmp_path):
    """Same mask, same grid (the stored per-row steps, +-7 levels at 4 bits): error feedback
    wins."""
    from rdonnx.algo import grids as grid_fits

    cfg = mode_config("gptq")
    result = compressed(case, cfg)
    rz = realizer(case, cfg)
    cal = rz.cal
    path = tmp_path / "q.rdonnx"
    result.save(path)
    stored = {e.name: e for e in read_artifact(path).tensors}
    for w, report in zip(cal.weights, result.report.weights):
        original, new = cal.originals[w.name], result.weights[w.name]
        mask = cal.rankings[w.name].mask(report.kept)
        assert not (kept(new) & ~mask).any(), w.name
        assert int(np.count_nonzero(new)) <= report.kept  # survivors may round to 0
        q = result.quantized[w.name]
        logged = q.axis is not None and np.array_equal(
            grid_fits.step_of(grid_fits.index_at_least(q.step)), q.step)
        assert stored[w.name].encoding == ("quantized" if q.axis is None else
                                           "quantized-channels" if logged else "quantized-rows")
        assert stored[w.name].step_axis == q.axis in (None, cal.inputs[w.name].row_axis)
        step = np.float32(q.step) if q.axis is None else row_view(q.step, original.ndim, q.axis)
        plain = np.where(mask, np.clip(np.rint(original / step), -7, 7) * step, 0)
        entry, hessian = cal.inputs[w.name], rz.hessians.hessian(w.name)
        e_new = weight_error(original, new, entry, hessian)
        e_plain = weight_error(original, plain.astype(np.float32), entry, hessian)
        assert e_new <= e_plain * (1 + 1e-6) + 1e-12, (w.name, e_new, e_plain)


def test_gptq_grid_is_the_best_candidate_on_plain_roundings_axis(bundled_cnn, bundled_mlp):
    """The stored grid is the candidate (plain rounding's grid, then the per-row or per-tensor
    span times each CLIP_SCALES, on the axis `grids.choose` picks for the reconstructed
    survivors) whose reconstruction has the least layer error relative to each row's output
    energy, the rows' steps charged at 4x the error per bit a survivor; both kinds of grid
    occur in these models."""
    from rdonnx.algo import grids as grid_fits
    from rdonnx.algo.obs import reconstruct_weight, relative_error

    cfg = mode_config("gptq")
    axes = set()
    for case in (bundled_cnn, bundled_mlp):
        rz = realizer(case, cfg)
        cal = rz.cal
        for w in cal.weights:
            keep, entry = int(0.5 * w.size), cal.inputs[w.name]
            original, hessian = cal.originals[w.name], rz.hessians.hessian(w.name)
            new, q = rz.compress_weight(w, keep, 4)
            exact, _ = rz.compress_weight(w, keep)
            candidates = rz.gptq_grids(w.name, exact, 4)
            axis = grid_fits.choose(exact, 4, entry.row_axis, cal.importance.get(w.name)).axis
            assert {g.axis for g in candidates} == {axis} and len(candidates) > 1
            axes.add(axis)
            costs, errors = [], []
            for g in candidates:
                step = g.broadcast(exact.ndim)
                rebuilt = reconstruct_weight(original, entry, hessian,
                                             keep=cal.rankings[w.name].mask(keep), step=step,
                                             levels=7, percdamp=cfg.prune.damp)
                survivors = max(np.count_nonzero(np.rint(rebuilt / step)), 1)
                errors.append(relative_error(original, rebuilt, entry, hessian))
                costs.append(errors[-1] * 4.0 ** (grid_fits.steps_bits(g) / survivors))
            best = int(np.argmin(costs))
            chosen = relative_error(original, new, entry, hessian)
            assert chosen == pytest.approx(errors[best], rel=1e-6), w.name
            assert q.axis == axis
            assert np.array_equal(q.values(np.float32), new)
    assert None in axes and len(axes) > 1


@pytest.mark.parametrize("case", ["bundled_mlp", "bundled_cnn"], indirect=True)
def test_reconstruction_lowers_measured_distortion_rd(case):
    plain = compressed(case, config(method="rd", rate=0.5))
    rebuilt = compressed(case, config(method="rd", rate=0.5, reconstruct=True))
    assert rebuilt.report.rate == pytest.approx(plain.report.rate, abs=1e-3)
    assert rebuilt.report.calibration.distortion < plain.report.calibration.distortion
    if case.name == "bundled_mlp":  # OBS's own selection, on curves measured with it
        obs = compressed(case, config(method="rd", rate=0.5, criterion="obs"))
        assert obs.report.rate == pytest.approx(0.5, abs=1e-3)
        assert obs.report.calibration.distortion < plain.report.calibration.distortion
    # the curves the rd allocation used were measured with reconstruction
    assert rebuilt.report.settings["prune"]["reconstruct"] is True
    assert rebuilt.curves.settings["reconstruct"] is True
    assert plain.curves.settings["reconstruct"] is False


@pytest.mark.parametrize("case", ["mlp", "bundled_mlp", "bundled_cnn"], indirect=True)
def test_every_reconstructing_mode_beats_plain_pruning(case):
    plain = compressed(case, config(rate=0.5)).report.calibration.distortion
    for mode in ("reconstruct", "obs", "sequential"):
        d = compressed(case, mode_config(mode)).report.calibration.distortion
        assert d < plain, (mode, d, plain)


# ---------------------------------------------------------------------------------------------
# --criterion obs: SparseGPT chooses the mask; the density is still the one asked for


@pytest.mark.parametrize("case", ["mlp", "cnn", "bundled_mlp", "bundled_cnn"], indirect=True)
def test_obs_criterion_prunes_to_the_rate(case):
    result = compressed(case, mode_config("obs"))
    assert result.report.criterion == "obs"
    total = sum(w.params for w in result.report.weights)
    nonzero = sum(int(np.count_nonzero(result.weights[w.name])) for w in result.report.weights)
    assert nonzero / total == pytest.approx(0.5, abs=0.02)
    for w in result.report.weights:  # the report counts what the weight really keeps
        assert int(np.count_nonzero(result.weights[w.name])) == pytest.approx(
            w.kept, rel=0.01, abs=2), w.name


def test_obs_criterion_is_reported_per_weight(tmp_path):
    """WeightReport.criterion is "the in-layer criterion really used for this weight": OBS
    for the weights it selected, magnitude for those it could not reconstruct."""
    path = _unsupported_model(tmp_path / "unsupported.onnx")
    result = rdonnx.compress(path, config=config(min_params=16, rate=0.5, criterion="obs"))
    used = {w.name: w.criterion for w in result.report.weights}
    assert used == {"W": "obs", "CT": "magnitude", "B3": "magnitude"}


# ---------------------------------------------------------------------------------------------
# A weight shared by two layers: both layers' inputs count


def _shared_weight_model(folder: Path, seed: int = 0) -> tuple[Path, Path, np.ndarray]:
    """y = x1 @ W + x2 @ W. x1 is small and its two halves are copies (reconstruction can move
    every pruned entry onto its twin); x2 carries the output."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x1", "W"], ["y1"]),
             helper.make_node("MatMul", ["x2", "W"], ["y2"]),
             helper.make_node("Add", ["y1", "y2"], ["y"])]
    proto = make_model(nodes, [vi("x1", TensorProto.FLOAT, ["N", 16]),
                               vi("x2", TensorProto.FLOAT, ["N", 16])],
                       [vi("y", TensorProto.FLOAT, ["N", 16])], {"W": w})
    path = folder / "shared.onnx"
    onnx.save(proto, str(path))
    half = rng.standard_normal((256, 8)).astype(np.float32)
    x1 = 0.1 * np.concatenate([half, half], axis=1)
    x2 = rng.standard_normal((256, 16)).astype(np.float32)
    calib = folder / "shared.npz"
    np.savez(calib, x1=x1, x2=x2)
    return path, calib, w


def test_shared_weight_is_reconstructed_for_every_consumer(tmp_path):
    path, calib, w = _shared_weight_model(tmp_path)
    cfg = CompressConfig.of(rate=0.5, method="uniform", min_params=16, grid=GRID,
                         layer_distortion=False, format="dense")
    plain = rdonnx.compress(path, calib=calib, config=cfg)
    rebuilt = rdonnx.compress(path, calib=calib, config=cfg.updated(reconstruct=True))
    # the error summed over both consumers never exceeds that of the same mask without update
    mask = kept(plain.weights["W"])
    assert not (kept(rebuilt.weights["W"]) & ~mask).any()
    with np.load(calib) as data:
        errors = {"plain": 0.0, "rebuilt": 0.0}
        for tensor in ("x1", "x2"):
            entry = LayerInput("W", tensor, "MatMul", 0, 1, -1)
            hessian = Hessian(entry)
            hessian.add_batch(data[tensor])
            errors["plain"] += weight_error(w, plain.weights["W"], entry, hessian)
            errors["rebuilt"] += weight_error(w, rebuilt.weights["W"], entry, hessian)
    assert errors["rebuilt"] <= errors["plain"] * (1 + 1e-6), errors
    assert rebuilt.report.calibration.distortion <= \
        plain.report.calibration.distortion * (1 + 1e-3), "--reconstruct made the model worse"


# ---------------------------------------------------------------------------------------------
# N:M patterns


def assert_n_m(weight: np.ndarray, entry, n: int, m: int, name: str) -> None:
    """Every full group of m consecutive inputs of every output row keeps exactly n."""
    for mat in to_matrices(kept(weight), entry):
        rows, cols = mat.shape
        full = cols - cols % m
        counts = mat[:, :full].reshape(rows, -1, m).sum(axis=2)
        assert (counts == n).all(), f"{name}: groups keep {np.unique(counts)} of {m}, not {n}"
        if cols % m:
            tail = mat[:, full:].sum(axis=1)
            assert (tail == min(n, cols % m)).all(), f"{name}: partial group keeps {tail}"


PATTERN_MODES = ("pattern", "pattern-reconstruct", "pattern-obs")


def pattern_config(mode: str) -> CompressConfig:
    if mode == "pattern-obs":
        return config(pattern="2:4", criterion="obs")
    return mode_config(mode)


@pytest.mark.parametrize("mode", PATTERN_MODES)
@pytest.mark.parametrize("case", PRUNABLE_CASES, indirect=True)
def test_pattern_2_4_in_every_supported_weight(case, mode):
    cfg = pattern_config(mode)
    result = compressed(case, cfg)
    cal = calibration(case, cfg)
    for w, report in zip(cal.weights, result.report.weights):
        new = result.weights[w.name]
        entry = cal.inputs.get(w.name)
        if entry is None or not supports(entry, w.shape):
            np.testing.assert_array_equal(new, cal.originals[w.name], err_msg=w.name)
            assert report.kept == w.size
            continue
        assert_n_m(new, entry, 2, 4, w.name)
        assert int(np.count_nonzero(new)) == report.kept, w.name
        if mode != "pattern-obs":  # the in-layer scores pick the 2 of 4
            mask = pattern_mask(cal, w.name, (2, 4))
            assert not (kept(new) & ~mask).any(), w.name
        if mode == "pattern":  # no update: survivors keep their values
            np.testing.assert_array_equal(new, np.where(kept(new), cal.originals[w.name], 0),
                                          err_msg=w.name)
    if case.name != "subgraph":  # every weight supported
        assert result.report.rate == pytest.approx(0.5, abs=0.01)
    else:  # the If-branch weight has no layer input and stays dense
        assert 0.5 < result.report.rate < 1.0


@pytest.mark.parametrize("case", ["mlp", "bundled_mlp", "bundled_cnn"], indirect=True)
def test_pattern_reconstruction_beats_pattern_alone(case):
    alone = compressed(case, mode_config("pattern")).report.calibration.distortion
    rebuilt = compressed(case, mode_config("pattern-reconstruct")).report.calibration.distortion
    assert rebuilt < alone


def _unsupported_model(path: Path) -> Path:
    """A supported MatMul weight W [16, 32], a ConvTranspose weight CT and a batched
    (rank-3) MatMul weight B3: the last two have layer inputs but no reconstructable layout."""
    rng = np.random.default_rng(7)
    arrays = {"W": rng.standard_normal((16, 32)).astype(np.float32),
              "CT": rng.standard_normal((32, 4, 3, 3)).astype(np.float32),
              "B3": rng.standard_normal((2, 8, 16)).astype(np.float32),
              "shape": np.array([-1, 32, 1, 1], np.int64)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Reshape", ["h", "shape"], ["h4"]),
             helper.make_node("ConvTranspose", ["h4", "CT"], ["y1"]),
             helper.make_node("MatMul", ["x3", "B3"], ["y2"])]
    proto = make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 16]),
                               vi("x3", TensorProto.FLOAT, ["N", 2, 4, 8])],
                       [vi("y1", TensorProto.FLOAT, ["N", 4, 3, 3]),
                        vi("y2", TensorProto.FLOAT, ["N", 2, 4, 16])], arrays)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize("fields", [{"pattern": "2:4"},
                                    {"pattern": "2:4", "reconstruct": True},
                                    {"pattern": "2:4", "criterion": "obs"}],
                         ids=["pattern", "pattern-reconstruct", "pattern-obs"])
def test_pattern_leaves_unsupported_layouts_dense(tmp_path, fields):
    path = _unsupported_model(tmp_path / "unsupported.onnx")
    cfg = config(min_params=16, **fields)
    result = rdonnx.compress(path, config=cfg)
    cal = calibrate_model(path, cfg, None)
    assert {"CT", "B3"} <= set(cal.inputs)  # seen, yet not reconstructable
    for name in ("CT", "B3"):
        assert not supports(cal.inputs[name], cal.originals[name].shape)
        np.testing.assert_array_equal(result.weights[name], cal.originals[name])
    assert_n_m(result.weights["W"], cal.inputs["W"], 2, 4, "W")


def test_reconstruct_prunes_unsupported_layouts_without_update(tmp_path):
    path = _unsupported_model(tmp_path / "unsupported.onnx")
    cfg = config(min_params=16, reconstruct=True, rate=0.5)
    result = rdonnx.compress(path, config=cfg)
    cal = calibrate_model(path, cfg, None)
    rz = Realizer(cal, Hessians(cal), cfg.prune, cfg.coding, cfg.measure)
    for w, report in zip(cal.weights, result.report.weights):
        mask = cal.rankings[w.name].mask(report.kept)
        plain = np.where(mask, cal.originals[w.name], 0)
        if w.name == "W":
            assert rz.reconstructs(w.name)
            assert not (kept(result.weights[w.name]) & ~mask).any()
        else:
            assert not rz.reconstructs(w.name)
            np.testing.assert_array_equal(result.weights[w.name], plain, err_msg=w.name)


def _artifact_tensors(cli, case: Case, out: Path, *flags: str) -> dict[str, dict]:
    run = cli("compress", case.path, "--calib", case.calib, *FAST, "--pattern", "2:4", *flags,
              "-o", out)
    assert run.code == 0, run.err
    run = cli("inspect", out, "--json")
    assert run.code == 0, run.err
    return {t["name"]: t for t in json.loads(run.out)["tensors"]}


@pytest.mark.parametrize("case", ["mlp", "bundled_mlp"], indirect=True)
def test_pattern_2_4_artifact_uses_n_m_positions(case, cli, tmp_path):
    tensors = _artifact_tensors(cli, case, tmp_path / "out.rdonnx", "--reconstruct")
    gemms = [w for w in rdonnx.inspect(case.path).weights if w.op == "Gemm"]
    assert gemms
    for w in gemms:  # Gemm weights [out, in]: groups of 4 consecutive inputs are flat groups
        bits = tensors[w.name]["bits"]
        assert bits["positions_model"] == "n:m", (w.name, bits)
        assert tensors[w.name]["nnz"] == w.params // 2, w.name
        # log2(C(4, 2)) / 4 = 0.646 bits per weight, plus a header (and a pattern table)
        assert (bits["positions"] - bits["side"]) / w.params < 0.7, (w.name, bits)
        if w.params >= 4096:
            assert bits["positions"] / w.params < 0.7, (w.name, bits)


@pytest.mark.parametrize("flags", [["--value-bits", "8"], ["--reconstruct", "--value-bits", "8"]],
                         ids=["8-bit", "gptq-8-bit"])
def test_quantized_pattern_keeps_every_survivor(bundled_mlp, cli, tmp_path, flags):
    """Quantizing a 2:4 weight must not round a pattern survivor to 0: the weight would keep
    fewer than 2 of 4 somewhere, lose the "n:m" positions model (about 1 bit per weight instead
    of 0.66) and no longer be the 2:4 pattern the report describes."""
    out = tmp_path / "out.rdonnx"
    tensors = _artifact_tensors(cli, bundled_mlp, out, *flags)
    decoded = decode_all(read_artifact(out))
    for w in rdonnx.inspect(bundled_mlp.path).weights:
        value = decoded[w.name]
        groups = kept(value).reshape(-1, 4).sum(axis=1)  # Gemm [out, in], in % 4 == 0
        assert (groups <= 2).all(), w.name
        assert (groups == 2).all(), (f"{w.name}: {int((groups < 2).sum())} groups lost a "
                                     f"survivor to rounding")
        assert tensors[w.name]["bits"]["positions_model"] == "n:m", tensors[w.name]["bits"]


# ---------------------------------------------------------------------------------------------
# --pattern usage errors


def test_pattern_with_a_target_is_a_usage_error(mlp, cli, tmp_path):
    out = tmp_path / "out.onnx"
    for target in (["--rate", "0.5"], ["--max-distortion", "0.1"]):
        run = cli("compress", mlp.path, "--calib", mlp.calib, *FAST, "--format", "dense",
                  "--pattern", "2:4", *target, "-o", out)
        assert_usage_error(run, "--pattern")
        assert not out.exists()
    with pytest.raises(UsageError, match="--pattern"):
        rdonnx.compress(mlp.path, calib=mlp.calib, rate=0.5, config=config(pattern="2:4"))


@pytest.mark.parametrize("pattern", ["2:2", "5:4", "x", "0:4", "2:40", "2:4:8", ":4", "-1:4",
                                     "2.0:4", ""])
def test_bad_pattern_is_a_usage_error(mlp, cli, tmp_path, pattern):
    out = tmp_path / "out.onnx"
    run = cli("compress", mlp.path, "--calib", mlp.calib, *FAST, "--format", "dense",
              "--pattern", pattern, "-o", out)
    assert_usage_error(run, "--pattern")
    assert not out.exists()


@pytest.mark.parametrize("damp", ["-0.1", "10", "nan"])
def test_bad_damp_is_a_usage_error(mlp, cli, tmp_path, damp):
    out = tmp_path / "out.onnx"
    run = cli("compress", mlp.path, "--calib", mlp.calib, *FAST, "--format", "dense",
              "--reconstruct", "--rate", "0.5", "--damp", damp, "-o", out)
    assert_usage_error(run, "--damp")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# --sequential: later layers are reconstructed from the compressed earlier layers' outputs


@pytest.mark.parametrize("case", ["mlp", "bundled_mlp", "bundled_cnn"], indirect=True)
def test_sequential_differs_from_parallel_and_both_are_valid(case):
    parallel = compressed(case, mode_config("reconstruct"))
    sequential = compressed(case, mode_config("sequential"))
    cal = calibration(case, mode_config("sequential"))
    names = [w.name for w in cal.weights]  # graph order
    assert len(names) >= 2
    # the first layer sees the original input either way; a later one does not
    np.testing.assert_array_equal(sequential.weights[names[0]], parallel.weights[names[0]])
    assert any(not np.array_equal(sequential.weights[n], parallel.weights[n])
               for n in names[1:])
    for n in names:  # same criterion, same masks: only the survivors' values differ
        assert np.array_equal(kept(sequential.weights[n]), kept(parallel.weights[n])), n
    assert sequential.report.settings["prune"]["sequential"] is True
    for result in (parallel, sequential):
        assert result.report.rate == pytest.approx(0.5, abs=1e-3)
        assert np.isfinite(result.report.calibration.distortion)
        for out in ort_outputs(result.model, calib_feed(case)):
            assert np.isfinite(out).all()


@pytest.mark.parametrize("case, factor", [("bundled_cnn", 0.1), ("bundled_mlp", 0.75)],
                         indirect=["case"])
def test_sequential_layers_undo_the_earlier_layers_error(case, factor):
    """Uniform 50% halves the CNN's 9-input first convolution, which no update of that layer
    can repair; aimed at the original outputs, the later layers undo most of the damage."""
    parallel = compressed(case, mode_config("reconstruct"))
    sequential = compressed(case, mode_config("sequential"))
    assert sequential.report.calibration.distortion < \
        factor * parallel.report.calibration.distortion


def test_sequential_curves_let_the_next_layer_compensate(bundled_cnn):
    """In sequential mode a curve's probe prunes one weight and aims the next one (dense) at
    the original output, as the sequential pass will: the curve measures what is left."""
    cfg = mode_config("sequential")
    rz = realizer(bundled_cnn, cfg)
    cal = rz.cal
    first, second, last = cal.weights[0], cal.weights[1], cal.weights[-1]
    variant = rz.variant()
    probe = variant(first, first.size // 4)
    assert set(probe) == {first.name, second.name}
    original, entry = cal.originals[second.name], cal.inputs[second.name]
    hessian = rz.hessians.hessian(second.name, {first.name: probe[first.name]})
    assert weight_error(original, probe[second.name], entry, hessian) < \
        0.5 * weight_error(original, original, entry, hessian)
    alone = rz.distortion({first.name: probe[first.name]}).nmse
    assert rz.distortion(probe).nmse < 0.5 * alone
    assert set(variant(last, last.size // 2)) == {last.name}  # nothing after the last one
    quantized = rz.value_variant()(first, 3)  # the value curves aim the next one too
    assert set(quantized) == {first.name, second.name}
    assert rz.distortion(quantized).nmse < \
        rz.distortion({first.name: quantized[first.name]}).nmse
    per_layer = realizer(bundled_cnn, mode_config("reconstruct"))
    assert set(per_layer.variant()(first, first.size // 4)) == {first.name}
    # such curves are not those of per-layer reconstruction: their fingerprints differ
    assert cfg.curve_settings() != mode_config("reconstruct").curve_settings()


def test_sequential_layer_error_not_worse_on_compressed_inputs(bundled_mlp):
    """Each layer's guarantee holds for the Hessian of the inputs it really sees."""
    cfg = mode_config("sequential")
    result = compressed(bundled_mlp, cfg)
    rz = realizer(bundled_mlp, cfg)
    cal = rz.cal
    earlier: dict[str, np.ndarray] = {}
    for w, report in zip(cal.weights, result.report.weights):
        original, new = cal.originals[w.name], result.weights[w.name]
        mask = cal.rankings[w.name].mask(report.kept)
        plain = np.where(mask, original, 0).astype(original.dtype)
        hessian = rz.hessians.hessian(w.name, earlier)
        entry = cal.inputs[w.name]
        assert weight_error(original, new, entry, hessian) <= \
            weight_error(original, plain, entry, hessian) * (1 + 1e-6) + 1e-12, w.name
        earlier[w.name] = new


# ---------------------------------------------------------------------------------------------
# GPTQ: error-compensated quantization


def test_gptq_survivors_are_multiples_of_the_stored_step(bundled_mlp, bundled_cnn, tmp_path):
    for case in (bundled_mlp, bundled_cnn):
        result = compressed(case, mode_config("gptq"))
        path = tmp_path / f"{case.name}.rdonnx"
        result.save(path)
        artifact = read_artifact(path)
        entries = {e.name: e for e in artifact.tensors}
        assert result.report.value_bits == 4
        for w in result.report.weights:
            entry, q = entries[w.name], result.quantized[w.name]
            values = artifact.decode(entry)
            np.testing.assert_array_equal(values, result.weights[w.name], err_msg=w.name)
            if entry.encoding == "quantized":
                step = np.float32(entry.step)
                assert q.axis is None and q.step == entry.step
            else:  # one step per output row (float32, or log-scale indices), own section
                assert entry.encoding in ("quantized-rows", "quantized-channels")
                assert entry.step_axis == q.axis
                step = row_view(q.step, values.ndim, q.axis)
            levels = np.rint(values.astype(np.float32) / step)
            np.testing.assert_array_equal(levels * step, values, err_msg=w.name)  # q * step
            assert np.abs(levels).max() <= 7, w.name  # 4 bits: +-7 levels
            np.testing.assert_array_equal(q.q, levels, err_msg=w.name)


@pytest.mark.parametrize("case", ["bundled_mlp", "bundled_cnn"], indirect=True)
def test_gptq_beats_plain_rounding_of_the_same_pruning(case):
    rounded = compressed(case, config(rate=0.5, value_bits=4, format="rdonnx"))
    gptq = compressed(case, mode_config("gptq"))
    assert gptq.report.rate == rounded.report.rate
    for a, b in zip(gptq.report.weights, rounded.report.weights):
        assert a.kept == b.kept  # same allocation (uniform)
    assert gptq.report.calibration.distortion < rounded.report.calibration.distortion


# ---------------------------------------------------------------------------------------------
# R-D curves measured with reconstruction


def test_reconstructed_curves_are_lower_and_fingerprinted(bundled_mlp):
    plain_cfg = CompressConfig.of(grid=GRID, data=DATA, holdout=0.0)
    rebuilt_cfg = plain_cfg.updated(reconstruct=True)
    plain = rdonnx.calibrate(bundled_mlp.path, calib=bundled_mlp.calib, config=plain_cfg)
    rebuilt = rdonnx.calibrate(bundled_mlp.path, calib=bundled_mlp.calib, config=rebuilt_cfg)
    assert list(plain.grid) == list(rebuilt.grid)
    assert set(plain.distortion) == set(rebuilt.distortion)
    lower = 0
    for name, curve in rebuilt.distortion.items():
        for d, (r, p) in zip(plain.grid, zip(curve, plain.distortion[name])):
            assert r <= p * 1.01 + 1e-9, (name, d, r, p)
            lower += r < 0.99 * p
    assert lower > 0
    assert plain.fingerprint != rebuilt.fingerprint
    assert plain.fingerprint.mismatch(rebuilt.fingerprint) == ["settings"]
    # curves of one are refused for the other
    for curves, cfg in ((plain, rebuilt_cfg), (rebuilt, plain_cfg)):
        with pytest.raises(UsageError, match="settings"):
            rdonnx.compress(bundled_mlp.path, calib=bundled_mlp.calib, curves=curves,
                            config=cfg.updated(rate=0.5, layer_distortion=False,
                                           format="dense"))
    # and accepted for their own settings, with the same result as measuring them anew
    reused = rdonnx.compress(bundled_mlp.path, calib=bundled_mlp.calib, curves=rebuilt,
                             config=config(method="rd", rate=0.5, reconstruct=True))
    fresh = compressed(bundled_mlp, config(method="rd", rate=0.5, reconstruct=True))
    assert [w.kept for w in reused.report.weights] == [w.kept for w in fresh.report.weights]


def test_reconstructed_curves_refused_on_the_cli(bundled_mlp, cli, tmp_path):
    curves = tmp_path / "curves.json"
    run = cli("calibrate", bundled_mlp.path, "--calib", bundled_mlp.calib, "--reconstruct",
              "--grid", ",".join(map(str, GRID)), "--calib-samples", str(SAMPLES), "-q",
              "--holdout", "0", "-o", curves)
    assert run.code == 0, run.err
    out = tmp_path / "out.onnx"
    run = cli("compress", bundled_mlp.path, "--calib", bundled_mlp.calib, *FAST, "--format",
              "dense", "--rate", "0.5", "--curves", curves, "-o", out)
    assert_usage_error(run, "settings")
    assert not out.exists()
    run = cli("compress", bundled_mlp.path, "--calib", bundled_mlp.calib, *FAST, "--format",
              "dense", "--rate", "0.5", "--reconstruct", "--curves", curves, "-o", out)
    assert run.code == 0, run.err
    assert re.search(r"reconstruct", json.dumps(json.loads(curves.read_text())))


def test_per_row_grid_wins_on_rows_of_very_different_scales(tmp_path):
    """A 512 x 64 MatMul whose output columns differ 100x in scale: the per-row grid (0.06
    bits per weight of steps) beats one grid for the tensor; the artifact stores
    "quantized-channels" (log-scale step indices) and decodes to exactly the measured
    weights."""
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((512, 64)) * np.logspace(-2, 0, 64)[None, :]).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "wide",
        [vi("x", TensorProto.FLOAT, ["n", 512])], [vi("y", TensorProto.FLOAT, ["n", 64])],
        [onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.standard_normal((128, 512)).astype(np.float32)
    result = rdonnx.compress(model.SerializeToString(), calib={"x": x},
                             config=config(rate=0.5, reconstruct=True, value_bits=4,
                                           format="rdonnx", simplify=False))
    q = result.quantized["w"]
    assert q.axis == 1 and np.size(q.step) == 64  # MatMul [in, out]: rows along axis 1
    path = tmp_path / "rows.rdonnx"
    result.save(path)
    artifact = read_artifact(path)
    assert artifact.tensors[0].encoding == "quantized-channels"
    assert decode_all(artifact)["w"].tobytes() == result.weights["w"].tobytes()


def test_gptq_keeps_per_row_steps_where_small_channels_are_scaled_back_up():
    """A 3x3 depthwise convolution whose channels differ 100x in scale, each scaled back to
    one range by the next node (a folded normalisation): one step for the tensor would save
    the rows' steps (a few bits a row, 9 weights) but round the small channels to zero. The
    error-compensated grid is per row, as plain rounding's, and the output is no further from
    the original than plain rounding's."""
    rng = np.random.default_rng(12)
    scales = np.logspace(-2, 0, 16).astype(np.float32)
    w = (rng.standard_normal((16, 1, 3, 3)) * scales[:, None, None, None]).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], group=16, pads=[1, 1, 1, 1]),
         helper.make_node("Mul", ["c", "s"], ["y"])], "depthwise",
        [vi("x", TensorProto.FLOAT, ["n", 16, 8, 8])],
        [vi("y", TensorProto.FLOAT, ["n", 16, 8, 8])],
        [onnx.numpy_helper.from_array(w, "w"),
         onnx.numpy_helper.from_array((1 / scales).reshape(1, 16, 1, 1), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.standard_normal((32, 16, 8, 8)).astype(np.float32)
    cfg = config(rate=1.0, value_bits=4, format="rdonnx", simplify=False, min_params=16)
    plain = rdonnx.compress(model.SerializeToString(), calib={"x": x}, config=cfg)
    gptq = rdonnx.compress(model.SerializeToString(), calib={"x": x},
                           config=cfg.updated(reconstruct=True))
    assert plain.quantized["w"].axis == 0
    assert gptq.quantized["w"].axis == 0 and np.size(gptq.quantized["w"].step) == 16
    assert gptq.report.calibration.distortion <= plain.report.calibration.distortion


def test_quantized_weights_are_kept_for_later_candidates_read_only(bundled_mlp):
    """A search's candidates repeat most weights' (kept count, width): the second is the same
    arrays, read-only, and equal to quantizing afresh; a full cache drops the oldest first."""
    cfg = CompressConfig.of(max_distortion=0.1, min_params=1)
    rz = realizer(bundled_mlp, cfg)
    rz.quantized = QuantizedCache()
    w = rz.cal.weights[0]
    values, q = rz.compress_weight(w, w.size // 3, 6)
    again, q_again = rz.compress_weight(w, w.size // 3, 6)
    assert again is values and q_again is q
    assert not values.flags.writeable and not q.q.flags.writeable
    fresh = Realizer(rz.cal, rz.hessians, rz.prune, rz.coding, rz.measure)
    np.testing.assert_array_equal(fresh.compress_weight(w, w.size // 3, 6)[0], values)
    assert rz.compress_weight(w, w.size // 3, 5)[0] is not values  # another width
    small = QuantizedCache(limit=values.nbytes * 3 // 2)
    small.get(("a",), lambda: (values.copy(), None))
    small.get(("b",), lambda: (values.copy(), None))
    assert list(small.entries) == [("b",)] and small.size <= small.limit


def test_a_layer_whose_hessians_pass_the_budget_keeps_its_mask_alone(bundled_cnn):
    """--hessian-mb: the CNN's 64x32x3x3 and 64x64x3x3 convolutions (288 and 576 features,
    3.0 and 11.9 MB of Hessians) pass 1 MiB: they are pruned by their masks, exactly as
    without --reconstruct, and said so; the 288-weight first convolution is reconstructed."""
    base = CompressConfig.of(rate=0.3, method="uniform", values="exact", format="dense",
                             layer_distortion=False)
    plain = rdonnx.compress(bundled_cnn.path, calib=bundled_cnn.calib, config=base)
    capped = rdonnx.compress(bundled_cnn.path, calib=bundled_cnn.calib,
                             config=base.updated(reconstruct=True, hessian_mb=1))
    full = rdonnx.compress(bundled_cnn.path, calib=bundled_cnn.calib,
                           config=base.updated(reconstruct=True))
    skipped = [n for n in capped.report.notices if "is not reconstructed" in n]
    assert [n.split()[0] for n in skipped] == ["3.weight", "7.weight"]
    assert "over --hessian-mb 1" in skipped[0]
    assert not [n for n in full.report.notices if "is not reconstructed" in n]
    for name in ("3.weight", "7.weight"):
        np.testing.assert_array_equal(capped.weights[name], plain.weights[name])
        assert not np.array_equal(full.weights[name], plain.weights[name])
    assert not np.array_equal(capped.weights["0.weight"], plain.weights["0.weight"])


def test_reconstruction_that_raises_held_out_distortion_is_dropped(bundled_mlp, monkeypatch):
    """Updates that lower no layer's error but are kept anyway (here: forced, and harmful) lose
    to the masks alone on the held-out part: the result is the masks', with a notice."""
    base = CompressConfig.of(rate=0.5, method="uniform", values="exact", format="dense",
                             layer_distortion=False, holdout=0.25)
    plain = rdonnx.compress(bundled_mlp.path, calib=bundled_mlp.calib, config=base)
    good = rdonnx.compress(bundled_mlp.path, calib=bundled_mlp.calib,
                           config=base.updated(reconstruct=True))
    assert not [n for n in good.report.notices if n.startswith("reconstruction dropped")]
    import rdonnx.flow.realize as realize_module

    def harmful(self, name, hessian, held, options):
        exact = np.where(options["keep"], self.cal.originals[name] * 3.0, 0).astype(np.float32)
        return exact, 0.01, None  # "generalises": the layer check is bypassed

    monkeypatch.setattr(realize_module.Realizer, "_reconstruct", harmful)
    bad = rdonnx.compress(bundled_mlp.path, calib=bundled_mlp.calib,
                          config=base.updated(reconstruct=True))
    assert any(n.startswith("reconstruction dropped") for n in bad.report.notices)
    for name, array in plain.weights.items():
        np.testing.assert_array_equal(bad.weights[name], array)


def test_error_feedback_is_checked_on_held_out_data_at_rate_1(bundled_mlp):
    """At rate 1 nothing is pruned, yet quantized values still get GPTQ's error feedback: the
    held-out check compares the quantized results (with it, and plainly rounded at the same
    widths), not the unquantized weights (equal at rate 1, which dropped the feedback)."""
    base = CompressConfig.of(rate=1.0, method="uniform", value_bits=4, format="rdonnx",
                             layer_distortion=False, holdout=0.25)
    plain = rdonnx.compress(bundled_mlp.path, calib=bundled_mlp.calib, config=base)
    gptq = rdonnx.compress(bundled_mlp.path, calib=bundled_mlp.calib,
                           config=base.updated(reconstruct=True))
    assert not [n for n in gptq.report.notices if n.startswith("reconstruction dropped")]
    assert any(not np.array_equal(gptq.weights[n], plain.weights[n]) for n in plain.weights)
    assert gptq.report.holdout.distortion < plain.report.holdout.distortion


def test_a_small_table_is_coded_like_a_bias():
    """A token-type-like table (2 x 160, one row added to every token) and a 40 x 160 token
    table, both read by Gather and not pruned: at 8 bits the large table gets 8-bit levels and
    the small one at least 16 bits, as a bias does (its row reaches every token; its cost is
    bytes), so its error is far below an 8-bit grid's."""
    rng = np.random.default_rng(21)
    small = rng.standard_normal((2, 160)).astype(np.float32)
    small[0, 7] = 40.0  # an outlier sets an 8-bit step of about 0.3
    tables = {"small": small, "big": rng.standard_normal((40, 160)).astype(np.float32),
              "w": rng.standard_normal((160, 32)).astype(np.float32)}
    graph = helper.make_graph(
        [helper.make_node("Gather", ["big", "ids"], ["e"], axis=0),
         helper.make_node("Gather", ["small", "types"], ["t"], axis=0),
         helper.make_node("Add", ["e", "t"], ["s"]),
         helper.make_node("MatMul", ["s", "w"], ["h"]),
         helper.make_node("ReduceMean", ["h"], ["y"], axes=[1], keepdims=0)], "tables",
        [vi("ids", TensorProto.INT64, ["n", 6]), vi("types", TensorProto.INT64, ["n", 6])],
        [vi("y", TensorProto.FLOAT, ["n", 32])],
        [onnx.numpy_helper.from_array(v, k) for k, v in tables.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    calib = {"ids": rng.integers(0, 40, (64, 6)).astype(np.int64),
             "types": np.zeros((64, 6), np.int64)}
    result = rdonnx.compress(model.SerializeToString(), calib=calib,
                             config=config(rate=1.0, value_bits=8, format="rdonnx",
                                           simplify=False))
    assert "small" in result.quantized and "big" in result.quantized  # coded, not pruned
    assert np.abs(result.quantized["big"].q).max() <= 127
    assert np.abs(result.quantized["small"].q).max() > 127
    error = np.abs(result.quantized["small"].values(np.float32) - small).max()
    assert error < 40.0 / 127 / 100


def test_rows_no_fit_sample_reads_are_coded_coarser_under_a_bound():
    """A 400-row table read by token ids that follow a Zipf law: under a bound with a held-out
    part, the rows the fit part never reads get levels `coarser` bits narrower than the table's
    width (the report says how many and why), the rows read often the whole width, and the
    held-out check (which reads rows the fit part does not) holds. Without held-out data, or
    with --no-coarse-unread, every row is coded alike."""
    rng = np.random.default_rng(5)
    rows = 400
    model = make_model([helper.make_node("Gather", ["table", "ids"], ["e"], axis=0),
                        helper.make_node("MatMul", ["e", "W"], ["h"]),
                        helper.make_node("ReduceMean", ["h"], ["y"], axes=[1], keepdims=0)],
                       [vi("ids", TensorProto.INT64, ["N", 8])],
                       [vi("y", TensorProto.FLOAT, ["N", 16])],
                       {"table": rng.standard_normal((rows, 32)).astype(np.float32),
                        "W": rng.standard_normal((32, 16)).astype(np.float32)})
    ids = ((rng.zipf(1.4, (128, 8)) - 1) % rows).astype(np.int64)
    config = CompressConfig.of(grid=GRID, layer_distortion=False, format="rdonnx",
                               holdout=0.25, confidence=0.0)
    result = rdonnx.compress(model, max_distortion=1e-3, calib={"ids": ids}, config=config)
    split = [n for n in result.report.notices if "never read by the fit part" in n]
    assert len(split) == 1 and split[0].startswith("table: ")
    coarser = int(re.search(r"coded (\d) bit", split[0]).group(1))
    width = result.report.unpruned_bits["table"]
    q = np.abs(result.quantized["table"].q).max(axis=1)
    reads = np.bincount(ids.ravel(), minlength=rows)
    narrow = 2 ** (max(2, width - coarser) - 1) - 1
    assert coarser >= 1 and np.all(q[reads == 0] <= narrow)
    assert np.all(q[reads >= 8] > narrow)
    assert result.report.check.met
    for other in (config.updated(coarse_unread=False), config.updated(holdout=0.0)):
        alike = rdonnx.compress(model, max_distortion=1e-3, calib={"ids": ids}, config=other)
        assert not any("never read" in n for n in alike.report.notices)


def test_classes_no_fit_frame_brings_near_the_top_are_coded_coarser_under_kl(tmp_path):
    """A sequence classifier ([N, T, 200] logits from a MatMul head [32, 200] and its bias)
    whose bias keeps 170 classes far below the others: under a KL bound with a held-out part,
    those classes' columns get levels `coarser` bits narrower than the head's width (the
    report says why), the competing ones the whole width, the held-out check holds and the
    .rdonnx file decodes to the measured values. Under nmse (which counts every logit's error),
    with --no-coarse-unread or with GPTQ (whose grids do not split rows), every class is coded
    alike."""
    rng = np.random.default_rng(8)
    classes = 200
    bias = np.where(np.arange(classes) < 30, 0.0, -40.0).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["h"]),
                        helper.make_node("Relu", ["h"], ["r"]),
                        helper.make_node("MatMul", ["r", "H"], ["z"]),
                        helper.make_node("Add", ["z", "b"], ["logits"])],
                       [vi("x", TensorProto.FLOAT, ["N", 5, 16])],
                       [vi("logits", TensorProto.FLOAT, ["N", 5, classes])],
                       {"W": rng.standard_normal((16, 32)).astype(np.float32) * 0.5,
                        "H": rng.standard_normal((32, classes)).astype(np.float32),
                        "b": bias})
    x = rng.standard_normal((64, 5, 16)).astype(np.float32)
    config = CompressConfig.of(grid=GRID, layer_distortion=False, format="rdonnx",
                               holdout=0.25, confidence=0.0, metric="kl")
    result = rdonnx.compress(model, max_distortion=1e-3, calib={"x": x}, config=config)
    split = [n for n in result.report.notices if "never come within 10 nats" in n]
    assert len(split) == 1 and split[0].startswith("H: 170 of 200 rows")
    coarser = int(re.search(r"coded (\d) bit", split[0]).group(1))
    width = result.report.unpruned_bits.get("H") or next(
        w.value_bits for w in result.report.weights if w.name == "H")
    q = np.abs(result.quantized["H"].q).max(axis=0)  # per class (a column)
    narrow = 2 ** (max(2, width - coarser) - 1) - 1
    assert coarser >= 1 and np.all(q[30:] <= narrow) and np.all(q[:30] > narrow)
    assert result.report.check.met
    assert any(n.startswith("a KL bound on a sequence output") for n in result.report.notices)
    # value curves measured with the split are not reused by a run without it
    assert result.curves.values_quantizer == "uniform (coarse rows: H)"
    out = tmp_path / "m.rdonnx"
    result.save(out)
    np.testing.assert_array_equal(decode_all(read_artifact(out))["H"], result.weights["H"])
    assert "quantized-classes" in {e.encoding for e in read_artifact(out).tensors}
    for other in (config.updated(coarse_unread=False), config.updated(metric="nmse"),
                  config.updated(reconstruct=True)):
        alike = rdonnx.compress(model, max_distortion=1e-3, calib={"x": x}, config=other)
        assert not any("never come within" in n for n in alike.report.notices)
        assert alike.quantized["H"].classes is None
