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


def test_split_groups_interleaves_groups_so_a_prefix_spans_them():
    groups = np.repeat(np.arange(12), 16)  # 12 photos of 16 crops, stored photo by photo
    split = split_groups(groups, {"calib": 8, "test": 4}, seed=0)
    calib = groups[split["calib"]]
    assert len(set(calib[:16].tolist())) == 8  # the first 16 crops: 2 of each calib photo
    assert len(set(calib[:8].tolist())) == 8
    assert sorted(split["calib"].tolist()) == sorted(np.flatnonzero(np.isin(groups, calib)))
    # singletons keep one sample per group, in the shuffled group order
    words = split_groups(["c", "a", "b", "d"], {"calib": 2, "test": 2}, seed=3)
    assert sorted(np.concatenate(list(words.values())).tolist()) == [0, 1, 2, 3]


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


def test_perplexity_ratio_and_its_interval_resample_whole_sequences():
    rng = np.random.default_rng(1)
    tokens = np.tile(rng.integers(0, 5, (1, 6)), (8, 1))
    ref = np.tile(rng.normal(size=(1, 6, 5)), (8, 1, 1))

    def ratio(cand):
        return metrics.perplexity_ratio(metrics.token_nll(ref, tokens),
                                        metrics.token_nll(cand, tokens))

    assert ratio(ref) == pytest.approx((1.0, 1.0, 1.0))
    # the same change in 8 copies of one sequence: every draw gives the point ratio
    worse = ref + rng.normal(size=(1, 6, 5))
    point = metrics.perplexity(worse, tokens) / metrics.perplexity(ref, tokens)
    assert point != pytest.approx(1.0) and ratio(worse) == pytest.approx((point, point, point))
    # only one sequence changed: the interval spans the point ratio and reaches 1
    one = ref.copy()
    one[0] = worse[0]
    point, low, high = ratio(one)
    assert point == pytest.approx(metrics.perplexity(one, tokens) /
                                  metrics.perplexity(ref, tokens))
    assert low <= point <= high and low < high
    assert 1.0 in (pytest.approx(low), pytest.approx(high))


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
                              skip_rdonnx=False, time_budget=None, nncodec_python="",
                              at_baseline=False)
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


def test_zstd_bytes_cached_by_content_and_level(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(np.arange(50_000, dtype=np.float32).tobytes())
    cache = tmp_path / "zstd.json"
    size, _, level, hit = zoo_bench.zstd_bytes([f, tmp_path / "absent"], cache)
    assert level == 19 and not hit and 0 < size < f.stat().st_size
    again = zoo_bench.zstd_bytes([f], cache)
    assert again[0] == size and again[3]
    f.write_bytes(f.read_bytes()[::-1])  # other content: measured again
    assert not zoo_bench.zstd_bytes([f], cache)[3]
    assert zoo_bench.zstd_level(zoo_bench.ZSTD_LARGE + 1) == zoo_bench.ZSTD_LARGE_LEVEL


def test_show_merges_saved_results(tmp_path, capsys):
    def saved(model, method, nbytes):
        row = zoo_bench.Row(model, method, nbytes, 1.0, 32.0, primary="top1")
        return {model: {"rows": [row.__dict__], "complete": True, "commit": "abc"}}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({**saved("g2p", "original", 10), **saved("crepe", "original", 5)}))
    later = saved("crepe", "original", 7)
    later["crepe"]["rows"].append(saved("crepe", "NNCodec", 3)["crepe"]["rows"][0])
    b.write_text(json.dumps(later))
    out = tmp_path / "all.json"
    zoo_bench.main(["--show", f"{a},{b}", "--json", str(out)])
    text = capsys.readouterr().out
    assert "| g2p | original | 10 |" in text and "| crepe | original | 7 |" in text
    assert "| crepe | NNCodec | 3 |" in text and "| crepe | original | 5 |" not in text
    merged = json.loads(out.read_text())
    assert list(merged) == ["g2p", "crepe"] and merged["crepe"]["rows"][0]["bytes"] == 7
    assert [r["methods"] for r in merged["crepe"]["runs"]] == [["original"],
                                                               ["original", "NNCodec"]]
    # a merged file merges again the same way
    zoo_bench.main(["--show", str(out), "--json", str(tmp_path / "again.json")])
    assert json.loads((tmp_path / "again.json").read_text()) == merged


def test_time_budget_skips_the_ladder_not_the_fallback(tmp_path):
    from dataclasses import replace

    root = tmp_path / "tiny"
    root.mkdir()
    _tiny_prepare({}, root, seed=0)
    ad = replace(TINY, fallback=(("--rate", "1", "--value-bits", "16"),), nncodec=False,
                 nncodec_note="not for the tiny model")
    args = argparse.Namespace(work=str(tmp_path), keep=False, skip_nncodec=False,
                              skip_rdonnx=False, time_budget=1e-6, nncodec_python="",
                              at_baseline=False)
    rows = {r.method: r for r in zoo_bench.bench_model(ad, tmp_path, args)}
    rd = rows["rdonnx"]
    assert rd.setting == "--rate 1 --value-bits 16" and rd.transparent, rd.note
    assert rd.note.count("skipped (time budget spent)") == len(TINY.ladder)
    assert rows["NNCodec"].note == "not for the tiny model"


def test_ladder_from_the_command_line():
    ad = zoo_bench.with_ladder(TINY, "--rate 0.5; --max-distortion 1e-3")
    assert ad.ladder == (("--rate", "0.5"), ("--max-distortion", "1e-3"))
    assert "command line" in ad.notes and ad.fallback == TINY.fallback
    assert zoo_bench.with_ladder(TINY, "none").ladder == ()
    assert zoo_bench.with_ladder(TINY, None) is TINY



def test_calibration_from_the_command_line():
    ad = zoo_bench.with_calibration(TINY, "--calib-samples 32 --grid 1,0.5 --metric kl")
    assert ad.calib_samples == 32 and ad.extra_args == ("--grid", "1,0.5", "--metric", "kl")
    assert "calibration from the command line" in ad.notes and ad.ladder == TINY.ladder
    kept = zoo_bench.with_calibration(TINY, "--metric cosine")  # the model's sample count kept
    assert kept.calib_samples == TINY.calib_samples and kept.extra_args == ("--metric", "cosine")
    assert zoo_bench.with_calibration(TINY, None) is TINY

def test_at_baseline_keeps_the_first_rung_no_worse_than_quantize_dynamic():
    from dataclasses import replace

    rows = [zoo_bench.Row("tiny", "original", 100),
            zoo_bench.Row("tiny", "quantize_dynamic int8/ch", 30, test={"top1": 0.9})]
    ad = zoo_bench.at_baseline(TINY, rows)
    assert ad.transparent({"top1": 0.9}) and not ad.transparent({"top1": 0.899})
    assert "top1 >= 0.9000 (quantize_dynamic's)" in ad.notes
    lower = zoo_bench.at_baseline(replace(TINY, lower_is_better=True), rows)
    assert lower.transparent({"top1": 0.5}) and not lower.transparent({"top1": 0.95})
    assert zoo_bench.at_baseline(TINY, rows[:1]) is TINY  # no baseline metric: unchanged
    rungs = zoo_bench.with_fallback(TINY, "--rate 1 --value-bits 5 --reconstruct;--rate 1")
    assert rungs.fallback == (("--rate", "1", "--value-bits", "5", "--reconstruct"),
                              ("--rate", "1"))
    assert zoo_bench.with_fallback(TINY, "none").fallback == ()
