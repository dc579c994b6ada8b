"""The real-model zoo's own logic (bench/zoo), on a tiny model built here: no downloads."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.zoo import metrics  # noqa: E402
from bench.zoo.common import Adapter, Prepared, cache_dir, save_splits, split_groups  # noqa: E402

# bench/zoo.py (the table) sits beside the bench/zoo/ package, which shadows it as a module name
_spec = importlib.util.spec_from_file_location("zoo_bench", ROOT / "bench" / "zoo.py")
zoo_bench = importlib.util.module_from_spec(_spec)
sys.modules["zoo_bench"] = zoo_bench
_spec.loader.exec_module(zoo_bench)


# ---------------------------------------------------------------- splits

def test_split_groups_disjoint_whole_groups_and_deterministic():
    groups = np.repeat(np.arange(20), 3)  # 20 groups of 3 samples
    counts = {"calib": 5, "val": 5, "test": 10}
    a = split_groups(groups, counts, seed=1)
    b = split_groups(groups, counts, seed=1)
    c = split_groups(groups, counts, seed=2)
    for s in counts:
        assert np.array_equal(a[s], b[s])
        assert len(a[s]) == 3 * counts[s]
        assert set(groups[a[s]].tolist()).__len__() == counts[s]
    assert not set(a["calib"]) & set(a["val"])
    assert not set(a["calib"]) & set(a["test"])
    assert not set(a["val"]) & set(a["test"])
    # no group straddles two splits
    owner = {}
    for s, idx in a.items():
        for g in groups[idx].tolist():
            assert owner.setdefault(g, s) == s
    assert any(not np.array_equal(a[s], c[s]) for s in counts)


def test_split_groups_refuses_too_few_groups():
    with pytest.raises(ValueError):
        split_groups([0, 1, 2], {"calib": 2, "test": 2}, seed=0)


def test_cache_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv("RDONNX_ZOO_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "opt") == tmp_path / "opt"
    monkeypatch.delenv("RDONNX_ZOO_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "rdonnx-zoo"


# ---------------------------------------------------------------- metrics

def test_topk_agreement_known_case():
    ref = np.array([[3.0, 1, 0], [0, 2, 1], [1, 0, 5], [2, 1, 0]])
    cand = np.array([[3.0, 1, 0], [0, 1, 2], [5, 0, 1], [0, 1, 2]])
    assert metrics.topk_agreement(ref, cand, 1) == 0.25
    assert metrics.topk_agreement(ref, cand, 2) == 0.75  # row 3: class 0 not in top 2


def test_detection_agreement_known_case():
    ref = [np.array([[0, 0, 10, 10], [20, 20, 30, 30.0]]), np.zeros((0, 4))]
    cand = [np.array([[0, 0, 10, 10], [50, 50, 60, 60.0]]), np.array([[0, 0, 5, 5.0]])]
    m = metrics.detection_agreement(ref, cand)
    # tp 1, fp 2 (one per image), fn 1: F1 = 2 / (2 + 2 + 1)
    assert m["f1"] == pytest.approx(0.4)
    assert m["matched_iou"] == pytest.approx(1.0)
    assert metrics.box_iou(np.array([[0, 0, 2, 2.0]]), np.array([[1, 0, 3, 2.0]]))[0, 0] == \
        pytest.approx(1 / 3)


def test_sequence_metrics_known_cases():
    assert metrics.edit_distance("kitten", "sitting") == 3
    assert metrics.error_rate([[1, 2, 3], [4]], [[1, 3], [4]]) == pytest.approx(0.25)
    assert metrics.ctc_greedy(np.array([0, 5, 5, 0, 5, 7, 7, 0])) == [5, 5, 7]
    assert metrics.sequence_agreement([[1], [2, 3]], [[1], [2]]) == 0.5


def test_embedding_metrics_known_cases():
    a = np.array([[1.0, 0], [0, 1], [1, 1]])
    assert metrics.cosine_rows(a, a) == pytest.approx(np.ones(3))
    assert metrics.cosine_rows(a, -a) == pytest.approx(-np.ones(3))
    keys = np.eye(3)
    queries = np.array([[0.9, 0.1, 0], [0.1, 0.9, 0], [0.8, 0, 0.3]])  # the last one misses
    assert metrics.paraphrase_recall(queries, keys) == pytest.approx(2 / 3)
    assert metrics.retrieval_agreement(a, a) == 1.0


def test_pitch_metrics_known_cases():
    assert metrics.hz_to_cents(np.array([10.0, 20.0])) == pytest.approx([0.0, 1200.0])
    probs = np.zeros((2, 360))
    probs[0, 100] = 1.0
    probs[1, 50], probs[1, 51] = 1.0, 1.0
    cents = metrics.crepe_cents(probs)
    assert cents[0] == pytest.approx(20 * 100 + metrics.CREPE_CENTS_OFFSET)
    assert cents[1] == pytest.approx(20 * 50.5 + metrics.CREPE_CENTS_OFFSET)
    assert metrics.raw_pitch_accuracy(np.array([0, 40, 60.0]), np.zeros(3)) == pytest.approx(2 / 3)


def test_perplexity_known_cases():
    v = 4
    tokens = np.array([[0, 1, 2, 3]])
    uniform = np.zeros((1, 4, v))
    assert metrics.perplexity(uniform, tokens) == pytest.approx(v)
    sure = np.full((1, 4, v), -50.0)
    for t in range(3):
        sure[0, t, tokens[0, t + 1]] = 50.0
    assert metrics.perplexity(sure, tokens) == pytest.approx(1.0)


# ---------------------------------------------------------------- the table, end to end

def _tiny_prepare(src, out: Path, seed: int) -> None:
    """A 2-layer MLP classifier (16 -> 32 -> 4) with a clear margin, and its splits."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.5, (16, 32)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (32, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(out / "model.onnx"))
    x = rng.normal(size=(300, 16)).astype(np.float32)
    save_splits(out, {"x": x}, {"id": np.arange(300)},
                split_groups(np.arange(300), {"calib": 64, "val": 36, "test": 200}, seed))


def _tiny_score(ref, cand, truth):
    return {"top1": metrics.topk_agreement(ref[0], cand[0])}


TINY = Adapter(name="tiny", wheels=(), member="", prepare=_tiny_prepare, score=_tiny_score,
               primary="top1", transparent=lambda m: m["top1"] >= 0.999, threshold=">= 99.9%",
               # 12-bit values at rate 1: the 8-bit ones flip 1 of the 200 random decisions
               # with per-channel steps (0.5%, over the 0.1% allowed), which is not the point here
               ladder=(("--rate", "0.25"), ("--rate", "1", "--value-bits", "12")), batch=64,
               extra_args=("--grid", "1,0.5,0.25"), fallback=())


def test_bench_model_rows_on_a_tiny_model(tmp_path):
    root = tmp_path / "tiny"
    root.mkdir()
    _tiny_prepare({}, root, seed=0)
    prep = Prepared(root)
    index = {s: len(np.load(prep.inputs(s))["x"]) for s in ("calib", "val", "test")}
    assert index == {"calib": 64, "val": 36, "test": 200}
    args = argparse.Namespace(work=str(tmp_path), keep=False, skip_nncodec=True,
                              skip_rdonnx=False, time_budget=None, nncodec_python="")
    rows = {r.method: r for r in zoo_bench.bench_model(TINY, tmp_path, args)}
    original = (root / "model.onnx").stat().st_size
    assert rows["original"].bytes == original
    assert rows["zstd -19"].transparent and rows["zstd -19"].test["top1"] == 1.0
    q = rows["quantize_dynamic int8/ch"]
    assert q.bytes and q.bytes < original and 0 <= q.test["top1"] <= 1
    rd = rows["rdonnx"]
    # rate 0.25 changes some of the 200 test decisions: the ladder moves on to rate 1
    assert rd.setting == "--rate 1 --value-bits 12", rd.note
    assert rd.note.startswith("--rate 0.25: ")
    assert rd.transparent and rd.test["top1"] >= 0.999 and "top1" in rd.calib
    assert rd.bytes < original and rd.ratio == pytest.approx(original / rd.bytes)
    assert rd.seconds > 0 and rd.peak_rss_mb > 10
    text = zoo_bench.table(list(rows.values()))
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows)
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert f"| tiny | original | {original:,} | 1.00 |" in text
    json.dumps([r.__dict__ for r in rows.values()])  # the JSON record is serialisable
