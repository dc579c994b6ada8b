"""rdonnx.algo.pqi, rdonnx.flow.methods.pqi and `--method pqi`: the PQ index, its retained-fraction
bound, the SAP step, the fixed point, layer / neuron densities that meet the rate, and `rdonnx
inspect` PQI columns."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BUNDLED, assert_usage_error

import rdonnx
from rdonnx.algo.pqi import (
    PQIOptions,
    neuron_scores,
    pq_index,
    prune_ratio,
    retained_fraction,
    row_bounds,
    suggest_rate,
)
from rdonnx.algo.prune import Ranking, magnitude
from rdonnx.allocate.allocators import ALLOCATORS, Allocation, fill_factor, pqi, target_count
from rdonnx.errors import UsageError
from rdonnx.flow.config import CompressConfig

MLP = BUNDLED / "digits_mlp.onnx"
CNN = BUNDLED / "digits_cnn.onnx"
CALIB = BUNDLED / "digits_calib.npz"
TEST = BUNDLED / "digits_test.npz"
N = 400_000


@pytest.fixture(scope="module")
def laplace() -> np.ndarray:
    return np.random.default_rng(0).laplace(size=N)


@pytest.fixture(scope="module")
def gauss() -> np.ndarray:
    return np.random.default_rng(1).standard_normal(N)


def test_bound_on_known_distributions(laplace, gauss):
    assert retained_fraction(laplace, PQIOptions(0.5, 1)) == pytest.approx(np.pi / 4, rel=0.01)
    assert retained_fraction(laplace, PQIOptions(1, 2)) == pytest.approx(0.5, rel=0.01)
    assert retained_fraction(gauss, PQIOptions(1, 2)) == pytest.approx(2 / np.pi, rel=0.01)
    assert retained_fraction(gauss, PQIOptions(0.5, 1)) == pytest.approx(0.847, rel=0.01)
    # PQI = 1 - M_p / M_q and r = (M_p/M_q)^(pq/(q-p)) for eta = 0
    assert pq_index(laplace, 1, 2) == pytest.approx(1 - np.sqrt(0.5), rel=0.01)
    # eta scales the bound by (1 + eta)^(-q/(q-p)); gamma scales the SAP step
    r = retained_fraction(laplace, PQIOptions(0.5, 1))
    assert retained_fraction(laplace, PQIOptions(0.5, 1, eta=0.1)) == pytest.approx(r / 1.1 ** 2)
    assert prune_ratio(laplace, PQIOptions(0.5, 1)) == pytest.approx(1 - r)
    assert prune_ratio(laplace, PQIOptions(0.5, 1, gamma=9)) == 0.9  # capped at beta


def test_pq_index_properties():
    dense = np.ones(100)
    assert pq_index(dense) == pytest.approx(0.0, abs=1e-12)
    sparse = np.zeros(100)
    sparse[:5] = 1.0
    sparse[5:] = 1e-3
    assert pq_index(sparse) > 0.5 > pq_index(np.random.default_rng(0).standard_normal(100))
    w = np.random.default_rng(0).standard_normal(1000)
    assert pq_index(w) == pytest.approx(pq_index(7.5 * w))  # scale invariant
    padded = np.concatenate([w, np.zeros(500)])  # zeros are pruned entries: not counted
    assert pq_index(padded) == pytest.approx(pq_index(w))
    with pytest.raises(UsageError, match="0 < p < q"):
        pq_index(w, 1.0, 0.5)


def test_row_bounds_single_and_fixed(laplace, gauss):
    options = PQIOptions(0.5, 1)
    single = row_bounds(laplace, options, "single")
    assert single.shape == (1,) and single[0] == pytest.approx(np.pi / 4, rel=0.01)
    # half the entries already zero: the kept share is of the row's entries
    half = laplace[: N // 2].copy()
    half[::2] = 0
    assert row_bounds(half, options, "single")[0] == pytest.approx(np.pi / 8, rel=0.02)
    fixed_l = row_bounds(laplace, options, "fixed")[0]
    fixed_g = row_bounds(gauss, options, "fixed")[0]
    assert 0 < fixed_l < single[0] and fixed_l < fixed_g < 1  # heavier tails: sparser
    # the stopping rule: one more SAP step would prune < 1% of the survivors
    survivors = np.sort(np.abs(laplace))[::-1][: int(round(fixed_l * N))]
    assert prune_ratio(survivors, options) < 0.01
    # uniform magnitudes are incompressible by this measure
    assert row_bounds(np.ones(1000), options, "fixed")[0] == 1.0


def test_fill_factor_is_exact():
    rng = np.random.default_rng(0)
    shares, costs = rng.uniform(0.01, 1, 50), rng.integers(1, 100, 50).astype(float)
    for budget in (1.0, 100.0, 0.5 * costs.sum(), 0.99 * costs.sum()):
        c = fill_factor(shares, costs, budget)
        assert np.sum(np.minimum(c * shares, 1) * costs) == pytest.approx(budget)
    c = fill_factor(shares, costs, 2 * costs.sum())  # past the reachable budget: all kept
    assert np.all(c * shares >= 1 - 1e-12)


@pytest.mark.parametrize("rate", [0.013, 0.1, 0.3, 0.77, 1.0])
def test_layer_densities_follow_the_bound_and_meet_the_rate(rate):
    rng = np.random.default_rng(0)
    arrays = {"heavy": rng.laplace(size=(40, 50)) ** 3, "light": rng.standard_normal((60, 30))}
    bounds = {n: row_bounds(a, PQIOptions(), "fixed") for n, a in arrays.items()}
    inputs = Allocation({n: np.abs(a) for n, a in arrays.items()}, bounds=bounds)
    keep = pqi(inputs, rate)
    sizes = inputs.sizes()
    assert sum(keep.values()) == target_count(sizes, rate)
    assert all(0 <= keep[n] <= sizes[n] for n in sizes)
    c = fill_factor([bounds["heavy"][0], bounds["light"][0]],
                    [sizes["heavy"], sizes["light"]], target_count(sizes, rate))
    for name in sizes:  # min(c r_l, 1) n_l, up to rounding
        assert abs(keep[name] - min(c * bounds[name][0], 1) * sizes[name]) <= 1
    if rate < 1:  # the heavier-tailed weight is sparser
        assert keep["heavy"] / sizes["heavy"] < keep["light"] / sizes["light"]
    assert ALLOCATORS["pqi"] is pqi


def test_neuron_ranking_keeps_rows_in_proportion():
    rng = np.random.default_rng(0)
    rows, width = 6, 400
    scale = np.array([0.2, 0.5, 1, 2, 4, 8])[:, None]
    w = rng.laplace(size=(rows, width)) * np.abs(rng.standard_normal((rows, width))) ** \
        np.linspace(0, 3, rows)[:, None] * scale  # rows with different sparsity and scale
    bounds = row_bounds(w, PQIOptions(), "single", row_axis=0)
    assert bounds.shape == (rows,) and len(set(np.round(bounds, 3))) == rows
    ranking = Ranking(neuron_scores(magnitude(w), bounds, row_axis=0))
    for rate in (0.05, 0.1, 0.2, 0.3):
        keep = pqi(Allocation({"w": np.abs(w)}, bounds={"w": bounds}), rate)
        assert keep["w"] == target_count({"w": w.size}, rate)
        mask = ranking.mask(keep["w"])
        per_row = mask.sum(axis=1)
        c = fill_factor(bounds, np.full(rows, width), keep["w"])
        expected = np.minimum(c * bounds, 1) * width
        assert np.all(np.abs(per_row - expected) <= 1), (per_row, expected)
        # within each row, the largest magnitudes are kept
        for i in range(rows):
            kept = np.abs(w[i])[mask[i]]
            dropped = np.abs(w[i])[~mask[i]]
            assert kept.size == 0 or dropped.size == 0 or kept.min() >= dropped.max()
    # the row axis of a Conv-like layout (rows on axis 1 here) is honoured
    moved = np.moveaxis(w, 0, 1)
    rb = row_bounds(moved, PQIOptions(), "single", row_axis=1)
    np.testing.assert_allclose(rb, bounds)


def test_suggest_rate_is_size_weighted_fixed_point(laplace, gauss):
    arrays = {"a": laplace[:20000], "b": gauss[:60000]}
    expected = (row_bounds(arrays["a"], PQIOptions(), "fixed")[0] * 20000 +
                row_bounds(arrays["b"], PQIOptions(), "fixed")[0] * 60000) / 80000
    assert suggest_rate(arrays) == pytest.approx(expected)


def _cfg(**kw) -> CompressConfig:
    return CompressConfig.of(values="exact", layer_distortion=False, format="dense", **kw)


@pytest.mark.parametrize("kw", [dict(), dict(pqi_mode="single"), dict(granularity="neuron"),
                                dict(granularity="neuron", criterion="activation")])
def test_compress_pqi_meets_the_rate_deterministically(mlp, kw):
    first = rdonnx.compress(mlp.path, calib=mlp.calib, config=_cfg(rate=0.3, method="pqi",
                                                                   **kw))
    again = rdonnx.compress(mlp.path, calib=mlp.calib, config=_cfg(rate=0.3, method="pqi",
                                                                   **kw))
    total = first.report.params_total
    assert first.report.params_kept == round(0.3 * total)
    for name, value in first.weights.items():
        assert np.array_equal(value, again.weights[name])
        assert np.count_nonzero(value) == next(w.kept for w in first.report.weights
                                               if w.name == name)
    assert first.report.settings["method"] == "pqi"


def test_config_refuses_bad_pqi_settings():
    for kw, pattern in ((dict(method="pqi", pqi_p=1.0, pqi_q=0.5), "0 < p < q"),
                        (dict(method="pqi", pqi_eta=-1), "--pqi-eta"),
                        (dict(method="pqi", pqi_gamma=0), "--pqi-gamma"),
                        (dict(method="pqi", pqi_mode="twice"), "--pqi-mode"),
                        (dict(method="uniform", granularity="neuron"), "--method pqi only"),
                        (dict(method="rd", pqi_p=0.3), "--method pqi only"),
                        (dict(method="pqi", granularity="neuron", criterion="obs"), "neuron")):
        with pytest.raises(UsageError, match=pattern):
            CompressConfig.of(rate=0.5, **kw).check()


def test_cli_compress_pqi_bundled_and_test_models(cli, tmp_path, cnn):
    run = cli("compress", CNN, "--method", "pqi", "--rate", "0.2", "--calib", CALIB, "--test",
              TEST, "--labels", "label", "--format", "dense", "--no-layer-distortion",
              "-o", tmp_path / "c.onnx", "--report", tmp_path / "c.json")
    assert run.code == 0, run.err
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["method"] == "pqi" and report["settings"]["method_options"]["mode"] == "fixed"
    assert abs(report["rate"] - 0.2) < 1e-3
    run = cli("compress", MLP, "--method", "pqi", "--granularity", "neuron", "--max-distortion",
              "0.2", "--calib", CALIB, "--calib-samples", "64", "--format", "dense",
              "--no-layer-distortion", "--grid", "1,0.5,0.2,0.1", "-o", tmp_path / "m.onnx",
              "--report", tmp_path / "m.json")
    assert run.code == 0, run.err
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["calibration"]["distortion"] <= 0.2
    run = cli("compress", cnn.path, "--method", "pqi", "--pqi-p", "1", "--pqi-q", "2",
              "--pqi-mode", "single", "--rate", "0.3", "--calib", cnn.calib,
              "--no-layer-distortion", "-q", "-o", tmp_path / "t.rdonnx")
    assert run.code == 0, run.err


def test_cli_refuses_pqi_options_elsewhere(cli, tmp_path):
    assert_usage_error(cli("compress", MLP, "--rate", "0.2", "--method", "uniform",
                           "--granularity", "neuron", "-o", tmp_path / "x.onnx"),
                       "--granularity applies to --method pqi only")
    assert_usage_error(cli("compress", MLP, "--rate", "0.2", "--method", "pqi", "--pqi-p",
                           "2", "-o", tmp_path / "x.onnx"), "0 < p < q")
    assert not (tmp_path / "x.onnx").exists()


def test_cli_inspect_reports_pqi(cli):
    run = cli("inspect", CNN)
    assert run.code == 0, run.err
    assert "PQI(0.5,1)" in run.out and "PQI(1,2)" in run.out and "suggested" not in run.out
    data = json.loads(cli("inspect", CNN, "--json", "--suggest-rate").out)
    found = rdonnx.inspect(CNN)
    for w, values in zip(data["weights"], found.pqi):
        assert w["pqi_0.5_1"] == pytest.approx(values[0])
        assert 0 < w["pqi_0.5_1"] < w["pqi_1_2"] < 1
    pooled = np.concatenate([np.asarray(a).reshape(-1) for a in _weights(CNN).values()])
    assert data["pqi_0.5_1"] == pytest.approx(pq_index(pooled, 0.5, 1))
    assert data["pqi_1_2"] == pytest.approx(pq_index(pooled, 1, 2))
    assert data["suggested_rate"] == pytest.approx(suggest_rate(_weights(CNN)))
    assert 0 < data["suggested_rate"] < 1
    text = cli("inspect", CNN, "--suggest-rate").out
    assert f"suggested --rate {data['suggested_rate']:.4f}" in text


def _weights(path) -> dict[str, np.ndarray]:
    from rdonnx.graph.model import load_model
    from rdonnx.graph.weights import find_weights, read_weights

    model = load_model(path)
    return read_weights(model, find_weights(model))
