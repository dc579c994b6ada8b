"""Bounds that hold on data the tool has not seen: the holdout split, confidence-bounded checks,
calibration diagnostics, reconstruction kept only where it generalises, task metrics from the
user (--eval), and bad data refused before anything is measured."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLED, assert_usage_error

import rdonnx
from rdonnx import CompressConfig, DataOptions, UsageError
from rdonnx.algo import obs
from rdonnx.flow.calibration import calibrate_model, make_data
from rdonnx.flow.pipeline import make_realizer
from rdonnx.runtime.data import split_holdout

DIGITS_MLP = BUNDLED / "digits_mlp.onnx"
DIGITS_CNN = BUNDLED / "digits_cnn.onnx"
DIGITS_CALIB = BUNDLED / "digits_calib.npz"
DIGITS_TEST = BUNDLED / "digits_test.npz"
GRID = (1.0, 0.5, 0.2, 0.1, 0.05)
FAST = CompressConfig.of(grid=GRID, layer_distortion=False, format="dense")



# ---------------------------------------------------------------------------------------------
# The split


def _batches(samples: int, batch: int = 16):
    from rdonnx.graph.model import load_model

    model = load_model(DIGITS_MLP)
    x = np.load(DIGITS_CALIB)["input"][:samples]
    return make_data(model, {"input": x}, DataOptions(batch_size=batch))[0], x


def _rows(batches) -> np.ndarray:
    return np.concatenate([f["input"] for f in batches])


def test_holdout_split_is_seeded_disjoint_and_complete():
    batches, x = _batches(100)
    fit, held = split_holdout(batches, 0.25, seed=0)
    assert (fit.samples, held.samples) == (75, 25)
    rows = np.concatenate([_rows(fit), _rows(held)])
    key = lambda a: sorted(map(bytes, a.reshape(len(a), -1)))  # noqa: E731
    assert key(rows) == key(x)  # every sample once
    again = split_holdout(batches, 0.25, seed=0)[1]
    assert np.array_equal(_rows(again), _rows(held))
    other = split_holdout(batches, 0.25, seed=1)[1]
    assert not np.array_equal(_rows(other), _rows(held))
    # not simply the tail: the held-out samples come from all over the data
    assert not np.array_equal(_rows(held), x[-25:])


def test_holdout_default_needs_enough_samples():
    batches, _ = _batches(15)
    assert split_holdout(batches, None, seed=0)[1] is None
    batches, _ = _batches(16)
    assert split_holdout(batches, None, seed=0)[1].samples == 4
    assert split_holdout(batches, 0.0, seed=0)[1] is None
    with pytest.raises(UsageError, match="leaves one part empty"):
        split_holdout(_batches(2)[0], 0.1, seed=0)
    # reconstructing runs hold out a quarter from 4 samples on
    assert split_holdout(_batches(8)[0], None, seed=0, least=4)[1].samples == 2
    assert split_holdout(_batches(3)[0], None, seed=0, least=4)[1] is None


def test_holdout_of_an_npz_file_reads_the_same_rows(tmp_path):
    from rdonnx.graph.model import load_model

    x = np.load(DIGITS_CALIB)["input"][:64]
    path = tmp_path / "calib.npz"
    np.savez(path, input=x)
    model = load_model(DIGITS_MLP)
    from_file = split_holdout(make_data(model, path, DataOptions())[0], 0.25, 0)[1]
    in_memory = split_holdout(make_data(model, {"input": x}, DataOptions())[0], 0.25, 0)[1]
    assert np.array_equal(_rows(from_file), _rows(in_memory))


# ---------------------------------------------------------------------------------------------
# Bounds checked on the held-out part, against confidence bounds


def test_a_bound_is_checked_on_the_held_out_part(tmp_path):
    result = rdonnx.compress(DIGITS_MLP, calib=DIGITS_CALIB, max_distortion=0.05,
                             config=FAST.updated(method="uniform"))
    r = result.report
    assert (r.calibration.samples, r.holdout.samples) == (192, 64)
    assert r.data.fit_samples == 192 and r.data.holdout_samples == 64
    k = r.check
    assert k.data == "held-out" and k.samples == 64 and k.met
    assert k.measured == pytest.approx(r.holdout.distortion)
    assert k.measured <= k.limit <= 0.05  # the bootstrap upper bound is what was checked
    # every search step rests on the held-out samples and says so
    assert r.search and all(s.samples == 64 for s in r.search)
    assert all(s.meets == (s.limit <= 0.05) for s in r.search)
    # the figure checked is what the held-out samples give for the written model
    path = tmp_path / "m.onnx"
    result.save(path)
    full = rdonnx.evaluate(DIGITS_MLP, path, DIGITS_CALIB)
    assert full.samples == 256
    text = rdonnx.report_text(r) if hasattr(rdonnx, "report_text") else None
    assert text is None or "held-out" in text


def test_confidence_none_checks_the_figure_as_measured():
    config = FAST.updated(method="uniform", confidence=0.0)
    r = rdonnx.compress(DIGITS_MLP, calib=DIGITS_CALIB, max_distortion=0.05, config=config).report
    assert r.check.limit == r.check.measured
    strict = rdonnx.compress(DIGITS_MLP, calib=DIGITS_CALIB, max_distortion=0.05,
                             config=FAST.updated(method="uniform")).report
    assert strict.rate >= r.rate  # the confidence margin never allows a smaller model


def test_holdout_zero_checks_on_the_calibration_data():
    config = FAST.updated(method="uniform", holdout=0.0)
    r = rdonnx.compress(DIGITS_MLP, calib=DIGITS_CALIB, max_distortion=0.05, config=config).report
    assert r.holdout is None and r.calibration.samples == 256
    assert r.check.data == "calibration" and r.check.samples == 256


def test_verify_data_is_the_held_out_part(tmp_path):
    verify = tmp_path / "verify.npz"
    np.savez(verify, input=np.load(DIGITS_TEST)["input"])
    r = rdonnx.compress(DIGITS_MLP, calib=DIGITS_CALIB, max_distortion=0.05,
                        config=FAST.updated(method="uniform"), verify=verify).report
    assert r.calibration.samples == 256 and r.holdout.samples == 360
    assert "--verify verify.npz" in r.data.holdout


def test_agreement_bound_the_samples_cannot_show_is_refused(cli, tmp_path):
    # 64 held-out samples: even 64 of 64 only show 95.4% at 95% confidence; 99% needs 299
    with pytest.raises(UsageError, match="needs at least 299"):
        rdonnx.compress(DIGITS_MLP, calib=DIGITS_CALIB, min_agreement=0.99, config=FAST)
    assert_usage_error(cli("compress", DIGITS_MLP, "--min-agreement", "0.99", "--calib",
                           DIGITS_CALIB, "-o", tmp_path / "x.onnx"), "needs at least 299")
    assert not (tmp_path / "x.onnx").exists()
    # lowering the confidence is the user's choice, and then it runs
    config = FAST.updated(method="uniform", confidence=0.0)
    r = rdonnx.compress(DIGITS_MLP, calib=DIGITS_CALIB, min_agreement=0.99, config=config)
    assert r.report.check.measured >= 0.99


def test_agreement_bound_uses_the_lower_confidence_bound():
    r = rdonnx.compress(DIGITS_MLP, calib=DIGITS_CALIB, min_agreement=0.9,
                        config=FAST.updated(method="uniform")).report
    k = r.check
    assert k.limit < k.measured and k.limit >= 0.9 and k.met
    assert r.holdout.top1_lower == pytest.approx(k.limit)


# ---------------------------------------------------------------------------------------------
# Diagnostics


def test_synthetic_data_gets_a_notice_and_bounds_are_refused(cli, tmp_path):
    r = rdonnx.compress(DIGITS_MLP, rate=0.5, config=FAST).report
    assert r.data.synthetic
    assert any("SYNTHETIC" in n for n in r.notices)
    with pytest.raises(UsageError, match="synthetic"):
        rdonnx.compress(DIGITS_MLP, max_distortion=0.1, config=FAST)
    assert_usage_error(cli("compress", DIGITS_MLP, "--max-distortion", "0.1", "-o",
                           tmp_path / "x.onnx"), "synthetic")
    allowed = FAST.updated(method="uniform", allow_synthetic=True)
    assert rdonnx.compress(DIGITS_MLP, max_distortion=0.1, config=allowed).report.data.synthetic


def test_synthetic_integer_inputs_print_the_notice(cli, int64_model, tmp_path):
    run = cli("compress", int64_model.path, "--rate", "0.5", "--input-range", "input=0:49",
              "-o", tmp_path / "x.onnx", "--format", "dense")
    assert run.code == 0 and "SYNTHETIC" in run.err
    assert_usage_error(cli("compress", int64_model.path, "--max-distortion", "0.1",
                           "--input-range", "input=0:49", "-o", tmp_path / "y.onnx"), "synthetic")


def test_outputs_that_barely_vary_are_reported(tmp_path):
    one = np.repeat(np.load(DIGITS_CALIB)["input"][:1], 32, axis=0)
    r = rdonnx.compress(DIGITS_MLP, calib={"input": one}, rate=0.5, config=FAST).report
    stats = r.data.outputs[0]
    assert stats.distinct_top1 == 1 and stats.constant_nmse == pytest.approx(0, abs=1e-9)
    assert any("cannot discriminate" in w for w in r.data.warnings)
    varied = rdonnx.compress(DIGITS_MLP, calib=DIGITS_CALIB, rate=0.5, config=FAST).report
    assert varied.data.outputs[0].distinct_top1 == 10
    assert not any("cannot discriminate" in w for w in varied.data.warnings)
    assert "outputs" in varied.to_json() and "constant_nmse" in varied.to_json()


def test_rank_deficient_layer_inputs_are_reported():
    few = np.load(DIGITS_CALIB)["input"][:20]  # 15 fit samples for 64 inputs of the MLP
    r = rdonnx.compress(DIGITS_MLP, calib={"input": few}, rate=0.5,
                        config=FAST.updated(reconstruct=True)).report
    name, width, columns = r.data.widest_input
    assert columns == 15 and width >= 64
    assert name in r.data.rank_deficient
    assert any("rank-deficient" in w for w in r.data.warnings)
    assert not any("--holdout 0.25" in w for w in r.data.warnings)  # 5 of 20 are held out
    eight = rdonnx.compress(DIGITS_MLP, calib={"input": few[:8]}, rate=0.5,
                            config=FAST.updated(reconstruct=True)).report
    assert eight.data.holdout_samples == 2  # reconstruction holds out a quarter from 4 on
    assert not any("--holdout 0.25" in w for w in eight.data.warnings)
    plain = rdonnx.compress(DIGITS_MLP, calib={"input": few[:8]}, rate=0.5, config=FAST).report
    assert plain.data.holdout_samples is None  # without it, from 16 on
    three = rdonnx.compress(DIGITS_MLP, calib={"input": few[:3]}, rate=0.5,
                            config=FAST.updated(reconstruct=True)).report
    assert three.data.holdout_samples is None
    assert any("rank-deficient" in w and "--holdout 0.25" in w for w in three.data.warnings)


# ---------------------------------------------------------------------------------------------
# Reconstruction that generalises


@pytest.mark.parametrize("sequential", [False, True])
def test_reconstruction_never_loses_to_the_mask_on_held_out_data(sequential):
    config = FAST.updated(rate=0.3, method="uniform", reconstruct=True, sequential=sequential,
                          values="exact")
    cal = calibrate_model(DIGITS_CNN, config, DIGITS_CALIB)
    rz = make_realizer(cal, config)
    keep = {w.name: int(0.3 * w.size) for w in cal.weights}
    values, _ = rz.compress_all(keep)
    masked = make_realizer(cal, config.updated(reconstruct=False, sequential=False))
    plain = {w.name: masked.compress_weight(w, keep[w.name])[0] for w in cal.weights}
    for w in cal.weights:
        if not rz.reconstructs(w.name):
            continue
        earlier = {v.name: values[v.name] for v in cal.weights[:cal.weights.index(w)]} \
            if sequential else None
        held = rz.hessians.hessian(w.name, earlier, held_out=True)
        entry, original = cal.inputs[w.name], cal.originals[w.name]
        mine = obs.weight_error(original, values[w.name], entry, held)
        alone = obs.weight_error(original, plain[w.name], entry, held)
        assert mine <= alone * (1 + 1e-6)
        assert rz.reconstruction[(w.name, keep[w.name])]


def test_reconstruction_notes_are_in_the_report():
    r = rdonnx.compress(DIGITS_CNN, calib=DIGITS_CALIB, rate=0.3,
                        config=FAST.updated(method="uniform", reconstruct=True)).report
    notes = [w.reconstruction for w in r.weights if w.reconstruction]
    assert notes and all("held-out layer error" in n for n in notes)


# ---------------------------------------------------------------------------------------------
# --eval


EVAL = '''
import numpy as np
import onnxruntime as ort

_ref = {}

def agreement(session, data):
    """Top-1 agreement with the original digits MLP (a task metric written by a user)."""
    if "s" not in _ref:
        _ref["s"] = ort.InferenceSession(%r, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    same = total = 0
    for feed in data:
        mine = session.run(None, {name: feed["input"]})[0].argmax(1)
        theirs = _ref["s"].run(None, {name: feed["input"]})[0].argmax(1)
        same += int((mine == theirs).sum())
        total += len(mine)
    return same / total

def agreement_pair(session, data):
    share = agreement(session, data)
    return share, sum(len(f["input"]) for f in data)

def broken(session, data):
    raise RuntimeError("no")

NOT_A_FUNCTION = 3
'''


@pytest.fixture()
def eval_file(tmp_path) -> Path:
    path = tmp_path / "digits_eval.py"
    path.write_text(EVAL % str(DIGITS_MLP))
    return path


def test_eval_drives_a_min_score_search(eval_file, tmp_path):
    config = FAST.updated(method="uniform", eval=f"{eval_file}:agreement")
    result = rdonnx.compress(DIGITS_MLP, calib=DIGITS_CALIB, config=config.updated(min_score=0.9))
    r = result.report
    assert r.check.target == "min_score" and r.check.met and r.check.measured >= 0.9
    assert r.check.reference_score == 1.0
    assert r.rate < 1.0
    assert any(s.score is not None and s.score < 0.9 and not s.meets for s in r.search)
    # the score is the callable's figure for the written model on the held-out samples
    assert r.check.measured == pytest.approx(r.holdout.top1_agreement)
    drop = rdonnx.compress(DIGITS_MLP, calib=DIGITS_CALIB,
                           config=config.updated(max_drop=0.1)).report
    assert drop.check.target == "max_drop" and 1.0 - drop.check.measured <= 0.1


def test_eval_share_of_samples_is_checked_on_its_lower_bound(eval_file):
    from rdonnx.runtime.confidence import agreement_lower

    config = FAST.updated(method="uniform", min_score=0.9, eval=f"{eval_file}:agreement_pair")
    r = rdonnx.compress(DIGITS_MLP, calib=DIGITS_CALIB, config=config).report
    k = r.check
    assert k.samples == 64 and k.met
    assert k.limit == pytest.approx(agreement_lower(round(k.measured * 64), 64, 0.95))
    assert k.limit < k.measured or k.measured == 1.0
    assert all(s.meets == (s.limit >= 0.9) for s in r.search)


def test_eval_with_a_rate_reports_the_score(eval_file, cli, tmp_path):
    run = cli("compress", DIGITS_MLP, "--rate", "0.5", "--calib", DIGITS_CALIB, "--eval",
              f"{eval_file}:agreement", "--format", "dense", "-o", tmp_path / "x.onnx", "--grid",
              "1,0.5,0.2")
    assert run.code == 0 and "score " in run.err and "--eval; original 1" in run.err


@pytest.mark.parametrize("spec, message", [
    ("nocolon", "MODULE:FUNCTION"),
    ("no_such_module_xyz:f", "importing"),
    ("{file}:missing", "no function"),
    ("{file}:NOT_A_FUNCTION", "no function"),
    ("{file}:broken", "raised RuntimeError"),
    ("/no/such/file.py:f", "file not found"),
])
def test_bad_eval_is_one_line(spec, message, eval_file, cli, tmp_path):
    assert_usage_error(cli("compress", DIGITS_MLP, "--min-score", "0.9", "--calib",
                           DIGITS_CALIB, "--eval", spec.format(file=eval_file), "-o",
                           tmp_path / "x.onnx", "--method", "uniform"), re.escape(message))
    assert not (tmp_path / "x.onnx").exists()


def test_min_score_needs_eval(cli, tmp_path):
    assert_usage_error(cli("compress", DIGITS_MLP, "--min-score", "0.9", "--calib",
                           DIGITS_CALIB, "-o", tmp_path / "x.onnx"), "--eval")


# ---------------------------------------------------------------------------------------------
# Bad data is refused, never measured


def test_nan_in_calibration_or_test_data_is_refused(cli, tmp_path):
    x = np.load(DIGITS_CALIB)["input"][:40].copy()
    x[7, 0, 0, 0] = np.nan
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=x)
    assert_usage_error(cli("compress", DIGITS_MLP, "--rate", "0.5", "--calib", bad, "-o",
                           tmp_path / "x.onnx"), "NaN or inf")
    assert not (tmp_path / "x.onnx").exists()
    t = dict(np.load(DIGITS_TEST))
    t["input"] = t["input"].copy()
    t["input"][3, 0, 1, 1] = np.inf
    bad_test = tmp_path / "bad_test.npz"
    np.savez(bad_test, **t)
    assert_usage_error(cli("compress", DIGITS_MLP, "--rate", "0.5", "--calib", DIGITS_CALIB,
                           "--test", bad_test, "--labels", "label", "-o", tmp_path / "y.onnx"),
                       "NaN or inf")
    assert_usage_error(cli("evaluate", DIGITS_MLP, DIGITS_MLP, "--data", bad), "NaN or inf")


@pytest.mark.parametrize("args, message", [
    (("--rate", "0.5", "--value-budget", "nan"), "--value-budget"),
    (("--max-distortion", "nan"), "--max-distortion"),
    (("--bits-per-weight", "inf"), "--bits-per-weight"),
    (("--rate", "0.5", "--min-params", "-1"), "--min-params"),
    (("--rate", "0.5", "--holdout", "1.5"), "--holdout"),
    (("--rate", "0.5", "--confidence", "lots"), "--confidence"),
    (("--rate", "0.5", "--input-shape", "input=100000x100000x100000x1"), "memory"),
])
def test_bad_settings_are_one_line(args, message, cli, tmp_path):
    assert_usage_error(cli("compress", DIGITS_MLP, *args, "-o", tmp_path / "x.onnx"),
                       re.escape(message))


# ---------------------------------------------------------------------------------------------
# evaluate says what its figures rest on


def test_evaluate_says_how_many_samples(cli, tmp_path):
    result = rdonnx.compress(DIGITS_MLP, calib=DIGITS_CALIB, rate=0.3, config=FAST)
    path = tmp_path / "m.onnx"
    result.save(path)
    run = cli("evaluate", DIGITS_MLP, path, "--data", DIGITS_TEST, "--labels", "label")
    assert run.code == 0
    out = run.out
    assert "(360 samples" in out and "lower bound" in out and "360 labelled samples" in out


def _greedy_decoder(seed: int = 0):
    """Two greedy steps: scores h1 = x W1, their ArgMax picks a row of E added to x, scores
    h2 = (x + E[argmax h1]) W2; outputs h1 and h2 (a flipped first decision changes h2)."""
    from _graphs import make_model, vi
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"]),
             helper.make_node("ArgMax", ["h1"], ["a1"], axis=1, keepdims=0),
             helper.make_node("Gather", ["E", "a1"], ["e"], axis=0),
             helper.make_node("Add", ["x", "e"], ["x2"]),
             helper.make_node("MatMul", ["x2", "W2"], ["h2"])]
    arrays = {"W1": rng.standard_normal((32, 16)).astype(np.float32),
              "E": 3 * rng.standard_normal((16, 32)).astype(np.float32),
              "W2": rng.standard_normal((32, 16)).astype(np.float32)}
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 32])],
                       [vi("h1", TensorProto.FLOAT, ["N", 16]),
                        vi("h2", TensorProto.FLOAT, ["N", 16])], arrays)
    return model, {"x": rng.standard_normal((256, 32)).astype(np.float32)}


def test_a_greedy_decoder_adds_the_flips_its_held_out_part_does_not_show():
    """The graph's own ArgMax: its scores are recorded on the held-out part, and a pruned
    candidate's nmse bound adds the flips its margin changes predict (none for the original),
    from the same runs that give its outputs; the report gives them. Without a held-out part
    nothing is added."""
    model, calib = _greedy_decoder()
    config = FAST.updated(values="exact", holdout=0.25, confidence=0.0)
    cal = calibrate_model(model, config.updated(max_distortion=0.05), calib)
    assert dict(cal.decisions) == {"h1": 1}
    assert cal.distortion(cal.originals, 1).flips == 0.0
    pruned = {n: np.where(np.abs(w) > np.median(np.abs(w)), w, 0).astype(w.dtype)
              for n, w in cal.originals.items()}
    runs = []
    run = cal.runner.run
    cal.runner.run = lambda *a, **k: runs.append(1) or run(*a, **k)
    d = cal.distortion(pruned, 1)
    cal.runner.run = run
    assert len(runs) == len(cal.check)  # outputs and decision scores from the same runs
    assert d.flips > 0 and d.upper("nmse", 0.0) == pytest.approx(d.nmse + d.flips)
    result = rdonnx.compress(model, max_distortion=0.05, calib=calib,
                             config=config.updated(exclude=("W2",)))  # W1: the decision's
    check = result.report.check
    assert check.flips > 0 and check.limit == pytest.approx(check.measured + check.flips)
    assert check.limit <= 0.05 and "decision" in rdonnx.report.records.render(result.report)
    plain = calibrate_model(model, config.updated(max_distortion=0.05, holdout=0.0), calib)
    assert not plain.decisions and plain.distortion(pruned, 1).flips == 0.0
