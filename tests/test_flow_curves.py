"""rdonnx.flow.curves: the density grid, curves files, measured R-D curves and the replay buffer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from _graphs import ort_run, tiny_mlp
from onnx import numpy_helper

import rdonnx
from rdonnx.algo.prune import Ranking, magnitude, prune
from rdonnx.errors import UsageError
from rdonnx.flow.config import CompressConfig
from rdonnx.flow.curves import (
    CURVES_FORMAT,
    CURVES_VERSION,
    Curves,
    check_grid,
    coarse_indices,
    interpolated,
    measure_curves,
    record,
    refinement,
)
from rdonnx.graph.model import load_model
from rdonnx.graph.weights import find_weights
from rdonnx.runtime.data import DataOptions, input_specs, make_batches
from rdonnx.runtime.measure import Replay
from rdonnx.runtime.probe import Prober
from rdonnx.runtime.session import Runner

GRID = (1.0, 0.5, 0.2, 0.05)
ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# check_grid


def _variant(originals, rankings):
    """Magnitude pruning of one weight alone, as the pipeline measures curves without
    reconstruction."""
    return lambda w, keep: {w.name: rankings[w.name].apply(originals[w.name], keep)}


@pytest.mark.parametrize("grid,expected", [
    ((0.1, 0.5), (1.0, 0.5, 0.1)),
    ([0.2, 1.0, 0.05, 0.5], (1.0, 0.5, 0.2, 0.05)),
    ((0.5, 0.5, 0.25, 1, 1.0), (1.0, 0.5, 0.25)),
    ((1.0,), (1.0,)),
    ((), (1.0,)),
    (np.array([0.3, 0.03]), (1.0, 0.3, 0.03)),
])
def test_check_grid_sorts_descending_and_adds_one(grid, expected):
    result = check_grid(grid)
    assert result == expected
    assert all(type(d) is float for d in result)


@pytest.mark.parametrize("bad", [(0.0,), (0.5, -0.1), (1.5,), (0.5, 2), (math.nan,),
                                 (math.inf,), (0.5, -math.inf)])
def test_check_grid_rejects_densities_outside_the_unit_interval(bad):
    with pytest.raises(UsageError, match="--grid"):
        check_grid(bad)


# ---------------------------------------------------------------------------------------------
# Measured curves on a tiny model, checked against onnxruntime run by hand


@pytest.fixture(scope="module")
def tiny():
    """The tiny MLP (W1 [8, 32], W2 [32, 4]) with 20 samples in uneven batches of 6."""
    proto, arrays = tiny_mlp(seed=5)
    x = np.random.default_rng(6).standard_normal((20, 8)).astype(np.float32)
    model = load_model(proto)
    weights = find_weights(model, min_params=1)
    assert [w.name for w in weights] == ["W1", "W2"]
    runner = Runner(model, weights, "cpu")
    batches = make_batches({"x": x}, input_specs(model), DataOptions(batch_size=6))
    replay, moments, data_digest = record(runner, batches, {})
    originals = {n: arrays[n] for n in ("W1", "W2")}
    rankings = {n: Ranking(magnitude(a)) for n, a in originals.items()}
    curves = measure_curves(Prober(runner, replay), weights, _variant(originals, rankings), GRID,
                            "nmse")
    return dict(proto=proto, arrays=arrays, x=x, replay=replay, moments=moments,
                digest=data_digest, curves=curves, weights=weights, runner=runner,
                originals=originals, rankings=rankings)


def _with(proto: onnx.ModelProto, name: str, value: np.ndarray) -> onnx.ModelProto:
    changed = onnx.ModelProto()
    changed.CopyFrom(proto)
    for i, tensor in enumerate(changed.graph.initializer):
        if tensor.name == name:
            changed.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
    return changed


def test_record_replays_every_batch_with_the_reference_outputs(tiny):
    replay = tiny["replay"]
    assert len(replay) == 4  # 6 + 6 + 6 + 2 samples
    feeds = [feed["x"] for feed, _ in replay]
    np.testing.assert_array_equal(np.concatenate(feeds), tiny["x"])
    outputs = np.concatenate([out[0] for _, out in replay])
    np.testing.assert_allclose(outputs, ort_run(tiny["proto"], {"x": tiny["x"]})[0], rtol=1e-5,
                               atol=1e-5)
    assert tiny["moments"] == {}
    assert isinstance(tiny["digest"], str) and len(tiny["digest"]) == 32


def test_curve_is_zero_at_density_one_and_never_negative(tiny):
    for curve in tiny["curves"].values():
        assert len(curve) == len(GRID)
        assert curve[0] == 0.0
        assert all(v >= 0 for v in curve)
        assert curve[-1] > 0  # keeping 5% of a dense random weight costs something


def test_curve_equals_the_distortion_of_pruning_that_weight_alone(tiny):
    """Each point: prune only that weight with rdonnx.prune.prune, run ORT, nmse by hand."""
    proto, x = tiny["proto"], tiny["x"]
    reference = ort_run(proto, {"x": x})[0].astype(np.float64)
    for name in ("W1", "W2"):
        original = tiny["arrays"][name]
        for density, measured in zip(GRID, tiny["curves"][name]):
            pruned = prune(original, int(round(density * original.size)))
            assert np.count_nonzero(pruned) == int(round(density * original.size))
            out = ort_run(_with(proto, name, pruned), {"x": x})[0].astype(np.float64)
            nmse = float(np.sum((reference - out) ** 2) / np.sum(reference**2))
            assert measured == pytest.approx(nmse, rel=1e-4, abs=1e-9), (name, density)


def test_curves_on_another_metric(tiny):
    """The metric argument is the one measured: cosine differs from nmse at the same points."""
    cosine = measure_curves(Prober(tiny["runner"], tiny["replay"]), tiny["weights"],
                            _variant(tiny["originals"], tiny["rankings"]), GRID, "cosine")
    assert cosine["W1"][0] == 0.0
    assert cosine["W1"][1:] != tiny["curves"]["W1"][1:]
    x, proto = tiny["x"], tiny["proto"]
    ref = ort_run(proto, {"x": x})[0].astype(np.float64)
    pruned = prune(tiny["arrays"]["W2"], int(round(0.2 * tiny["arrays"]["W2"].size)))
    out = ort_run(_with(proto, "W2", pruned), {"x": x})[0].astype(np.float64)
    cos = np.sum(ref * out, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    assert cosine["W2"][GRID.index(0.2)] == pytest.approx(float(np.mean(1 - cos)), rel=1e-4,
                                                          abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Curves files


@pytest.fixture(scope="module")
def curves():
    proto, arrays = tiny_mlp(seed=7)
    x = np.random.default_rng(8).standard_normal((12, 8)).astype(np.float32)
    return rdonnx.calibrate(proto, calib={"x": x},
                            config=CompressConfig.of(grid=GRID, min_params=1))


def test_curves_json_round_trip(curves, tmp_path):
    assert set(curves.distortion) == {"W1", "W2"}
    assert curves.params == {"W1": 256, "W2": 128}
    text = curves.to_json()
    data = json.loads(text)
    assert data["format"] == CURVES_FORMAT and data["version"] == CURVES_VERSION
    assert set(data) >= {"format", "version", "fingerprint", "grid", "weights", "settings"}
    assert set(data["fingerprint"]) == {"model", "data", "settings"}
    path = tmp_path / "curves.json"
    path.write_text(text)
    loaded = Curves.load(path)
    assert loaded == curves
    assert loaded.to_json() == text
    assert loaded.curve("W2").densities == curves.grid
    assert loaded.curve("W2").distortions == curves.distortion["W2"]
    assert loaded.fingerprint.mismatch(curves.fingerprint) == []


def test_loading_a_file_that_is_not_curves_is_a_usage_error(curves, tmp_path):
    good = json.loads(curves.to_json())
    cases = {
        "report.json": json.dumps({"model": "m.onnx", "schema_version": 1, "weights": []}),
        "broken.json": "{not json",
        "empty.json": "",
        "other_version.json": json.dumps({**good, "version": 99}),
        "other_format.json": json.dumps({**good, "format": "something-else"}),
        "no_weights.json": json.dumps({k: v for k, v in good.items() if k != "weights"}),
        "bad_params.json": json.dumps({**good, "weights": {"W1": {"distortion": [0.0]}}}),
        "bad_fingerprint.json": json.dumps({**good, "fingerprint": {"model": "x"}}),
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(UsageError, match="curves"):
            Curves.load(path)
    with pytest.raises(UsageError, match="curves"):
        Curves.load(tmp_path / "missing.json")
    with pytest.raises(UsageError, match="curves"):
        Curves.load(tmp_path)  # a folder


@pytest.mark.parametrize("text", ["[1, 2]", "null", '"curves"', "3",
                                  '{"format": "rdonnx-curves", "version": 1, "grid": [1.0], '
                                  '"settings": {}, "weights": [], "fingerprint": {"model": "a", '
                                  '"data": "b", "settings": "c"}}'])
def test_loading_json_that_is_not_an_object_of_curves_is_a_usage_error(tmp_path, text):
    """Valid JSON of another shape (a list, null, a string; weights as a list) is refused
    with the same one-line UsageError, not an AttributeError."""
    path = tmp_path / "odd.json"
    path.write_text(text)
    with pytest.raises(UsageError, match="curves"):
        Curves.load(path)


# ---------------------------------------------------------------------------------------------
# The replay buffer: memory-bounded, identical after spilling to disk


def _feeds(count: int):
    rng = np.random.default_rng(9)
    for i in range(count):
        n = 3 + i % 4
        feed = {"input:0": rng.standard_normal((n, 5)).astype(np.float32),
                "ids/tokens": rng.integers(0, 100, (n, 2)).astype(np.int64),
                "mask": rng.random((n, 2)) > 0.5}
        outputs = [rng.standard_normal((n, 3)).astype(np.float32),
                   rng.standard_normal((n,)).astype(np.float16),
                   np.array(float(i), dtype=np.float64)]
        yield feed, outputs


def test_replay_spills_beyond_its_budget_and_replays_identically():
    items = list(_feeds(9))
    first = sum(a.nbytes for a in items[0][0].values()) + sum(o.nbytes for o in items[0][1])
    replay = Replay(budget=first)  # room for the first batch only
    for feed, outputs in items:
        replay.append(feed, outputs)
    assert len(replay) == len(items)
    assert replay._bytes <= replay.budget
    assert replay._folder is not None  # something went to disk
    spilled = list(Path(replay._folder.name).glob("*.npz"))
    assert len(spilled) == len(items) - 1
    for _ in range(2):  # re-iterable
        got = list(replay)
        assert len(got) == len(items)
        for (feed, outputs), (want_feed, want_outputs) in zip(got, items):
            assert set(feed) == set(want_feed)
            for key, value in want_feed.items():
                assert feed[key].dtype == value.dtype
                np.testing.assert_array_equal(feed[key], value)
            assert len(outputs) == len(want_outputs)
            for a, b in zip(outputs, want_outputs):
                assert a.dtype == b.dtype and a.shape == b.shape
                np.testing.assert_array_equal(a, b)


def test_spilled_and_in_memory_replays_measure_the_same_distortion():
    items = list(_feeds(7))
    memory, disk = Replay(), Replay(budget=0)
    for feed, outputs in items:
        memory.append(feed, outputs)
        disk.append(feed, outputs)
    assert disk._bytes == 0 and memory._folder is None
    def run(feed):  # a deterministic candidate computed from the (replayed) feed
        n = feed["input:0"].shape[0]
        return [feed["input:0"][:, :3] * 0.1, np.zeros(n, np.float16),
                np.array(1.0, dtype=np.float64)]

    a = memory.distortion(run)
    b = disk.distortion(run)
    assert a == b
    assert a.nmse > 0


def test_record_with_a_small_budget_spills_and_curves_do_not_change(tiny):
    """The replay's budget decides memory only: curves measured from spilled batches are the
    same numbers."""
    model = load_model(tiny["proto"])
    weights = find_weights(model, min_params=1)
    runner = Runner(model, weights, "cpu")
    batches = make_batches({"x": tiny["x"]}, input_specs(model), DataOptions(batch_size=6))
    replay, _, data_digest = record(runner, batches, {}, replay_bytes=100)
    assert replay._folder is not None and replay._bytes <= 100
    assert data_digest == tiny["digest"]
    curves = measure_curves(Prober(runner, replay), weights,
                            _variant(tiny["originals"], tiny["rankings"]), GRID, "nmse")
    assert curves == tiny["curves"]


def test_compress_with_no_replay_memory_gives_identical_results(tmp_path):
    """replay_mb=0 spills every batch; the pruned model and its report do not change."""
    proto, _ = tiny_mlp(seed=11)
    x = np.random.default_rng(12).standard_normal((40, 8)).astype(np.float32)
    config = CompressConfig.of(grid=GRID, min_params=1, layer_distortion=False,
                            data=DataOptions(batch_size=8), format="dense")
    outputs = []
    for mb in (512, 0):
        result = rdonnx.compress(proto, calib={"x": x}, rate=0.3,
                                 config=config.updated(replay_mb=mb))
        result.save(tmp_path / f"{mb}.onnx")
        outputs.append(((tmp_path / f"{mb}.onnx").read_bytes(), result.report.calibration,
                        result.curves.distortion))
    assert outputs[0] == outputs[1]


# ---------------------------------------------------------------------------------------------
# The adaptive grid


TWENTY = tuple(float(f"{0.002 ** (i / 19):.3g}") for i in range(20))


def test_coarse_pass_takes_every_third_point_and_both_ends():
    assert coarse_indices(TWENTY, 3) == [0, 3, 6, 9, 12, 15, 18, 19]
    assert coarse_indices((1.0, 0.5), 3) == [0, 1]


def test_unmeasured_points_are_linear_in_density_between_measured_neighbours():
    grid = (1.0, 0.8, 0.5, 0.2)
    curve = interpolated(grid, {0: 0.0, 2: 0.3, 3: 0.9})
    assert curve[0] == 0.0 and curve[2] == 0.3 and curve[3] == 0.9
    assert curve[1] == pytest.approx(0.3 * (1.0 - 0.8) / (1.0 - 0.5))


@pytest.mark.parametrize("density,expected", [
    (0.3, [4, 5]),  # between measured 3 (0.4) and 6 (0.1): the points between
    (0.4, [1, 2, 4, 5]),  # on a measured point: both neighbouring gaps
    (1.0, [1, 2]),
    (0.05, []),  # below the last gap's points, all measured
])
def test_refinement_measures_the_points_around_the_chosen_density(density, expected):
    grid = (1.0, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05)
    assert refinement(grid, [0, 3, 6, 7], density) == expected


@pytest.fixture(scope="module")
def adaptive_pair():
    """digits_cnn at rate 0.3 on the default 20-point grid: adaptive and full."""
    config = CompressConfig.of(rate=0.3, layer_distortion=False, format="dense")
    model, calib = ROOT / "models/digits_cnn.onnx", ROOT / "models/digits_calib.npz"
    return (rdonnx.compress(model, calib=calib, config=config),
            rdonnx.compress(model, calib=calib, config=config.updated(adaptive=False)))


def test_adaptive_grid_measures_fewer_points_and_lands_within_5_percent(adaptive_pair):
    adaptive, full = adaptive_pair
    assert full.curves.measured == {}
    measured = sum(len(v) for v in adaptive.curves.measured.values())
    assert 0 < measured < 0.7 * len(TWENTY) * len(full.curves.distortion)
    for name, indices in adaptive.curves.measured.items():  # measured points are exact
        for i in indices:
            assert adaptive.curves.distortion[name][i] == full.curves.distortion[name][i]
    a, f = adaptive.report.calibration.nmse, full.report.calibration.nmse
    assert abs(a - f) <= 0.05 * f


def test_adaptive_curves_round_trip_with_their_measured_points(adaptive_pair, tmp_path):
    curves = adaptive_pair[0].curves
    (tmp_path / "c.json").write_text(curves.to_json())
    assert Curves.load(tmp_path / "c.json").measured == curves.measured
