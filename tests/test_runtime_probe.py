"""rdonnx.runtime.probe and rdonnx.graph.cut: downstream-only probes give the whole graph's
outputs, on every test model (subgraph weights included), spilled or not, in any number of
threads."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _graphs import if_model, make_model, tailed_model, vi
from conftest import PRUNABLE_CASES
from onnx import TensorProto, helper

import rdonnx
import rdonnx.runtime.probe as probe_module
from rdonnx.flow.calibration import calibrate_model
from rdonnx.flow.config import CompressConfig
from rdonnx.graph.cut import downstream, subgraph_reads
from rdonnx.runtime.probe import Prober
from rdonnx.runtime.session import Device, bound_run, create_session

CONFIG = CompressConfig.of(rate=0.5, min_params=1, device="cpu")


def _variant(array: np.ndarray, seed: int) -> np.ndarray:
    """Half the entries zeroed, the rest scaled: a change every output depending on it sees."""
    rng = np.random.default_rng(seed)
    changed = np.where(rng.random(array.shape) < 0.5, 0, array * 1.5)
    return changed.astype(array.dtype)


def _whole(cal) -> Prober:
    return Prober(cal.runner, cal.replay)


def _exact(cal) -> Prober:
    """Downstream slices as they are (weights fed, ORT optimisations off)."""
    return Prober(cal.runner, cal.replay, cal.prober.cuts)


def _assert_same_outputs(sliced: Prober, whole: Prober, arrays) -> None:
    got, expected = sliced.outputs(arrays), whole.outputs(arrays)
    assert len(got) == len(expected) > 0
    for batch_got, batch_expected in zip(got, expected):
        assert len(batch_got) == len(batch_expected)
        for a, b in zip(batch_got, batch_expected):
            np.testing.assert_array_equal(a, b)  # bit for bit: the same kernels, same inputs


@pytest.mark.parametrize("case", PRUNABLE_CASES, indirect=True)
def test_downstream_probes_give_the_whole_graphs_outputs(case):
    cal = calibrate_model(case.path, CONFIG, case.calib)
    assert cal.prober is not None and cal.prober.cuts
    exact, whole = _exact(cal), _whole(cal)
    changed_any = False
    for i, w in enumerate(cal.weights):
        arrays = {w.name: _variant(cal.originals[w.name], i)}
        _assert_same_outputs(exact, whole, arrays)
        sliced = exact.probe(arrays, None)
        reference = whole.probe(arrays, None)
        assert sliced == reference  # every metric, exactly
        changed_any |= sliced.nmse > 0
    assert changed_any
    assert not [n for n in cal.notices if "whole graph" in n]  # none fell back


@pytest.mark.parametrize("case", PRUNABLE_CASES, indirect=True)
def test_optimized_slices_fold_the_other_weights_and_match_up_to_rounding(case):
    """calibrate's prober: the weights a slice does not change are constants of an optimized
    session (the first weight's whole cut too); figures equal the whole graph's up to float
    rounding, an unchanged weight measures (next to) nothing, a changed one its change."""
    cal = calibrate_model(case.path, CONFIG, case.calib)
    optimized, whole = cal.prober, _whole(cal)
    assert optimized.optimize
    for i, w in enumerate(cal.weights):
        arrays = {w.name: _variant(cal.originals[w.name], i)}
        got, expected = optimized.outputs(arrays), whole.outputs(arrays)
        for batch_got, batch_expected in zip(got, expected, strict=True):
            for a, b in zip(batch_got, batch_expected, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        part = optimized._slice(frozenset(arrays))
        assert part.session is not None, optimized.notices
        others = {n for n in part.cut.inputs if n in cal.runner.weights} - {w.name}
        assert part.constants == others
        d, reference = optimized.probe(arrays, "nmse").nmse, whole.probe(arrays, "nmse").nmse
        assert d == pytest.approx(reference, rel=1e-3, abs=1e-9)
        same = optimized.probe({w.name: cal.originals[w.name]}, "nmse").nmse
        assert same <= 1e-9 * max(reference, 1e-3)


@pytest.mark.parametrize("case", ["cnn", "attention", "subgraph"], indirect=True)
def test_two_weights_at_once_and_spilled_cuts_give_the_same_outputs(case):
    """A variant that changes two weights (sequential mode's probes) slices their union; with
    no replay memory every recorded tensor comes back from disk."""
    spilled = calibrate_model(case.path, CONFIG.updated(replay_mb=0), case.calib)
    cal = calibrate_model(case.path, CONFIG, case.calib)
    names = [w.name for w in cal.weights]
    arrays = {n: _variant(cal.originals[n], k) for k, n in enumerate(names[-2:])}
    exact = Prober(spilled.runner, spilled.replay, spilled.prober.cuts)
    _assert_same_outputs(exact, _whole(cal), arrays)
    assert exact.probe(arrays, "nmse") == _whole(cal).probe(arrays, "nmse")


def test_a_slice_that_does_not_load_falls_back_to_the_whole_graph_and_says_so(mlp,
                                                                             monkeypatch):
    cal = calibrate_model(mlp.path, CONFIG, mlp.calib)

    def broken(*args, **kwargs):
        raise RuntimeError("no slice today")

    monkeypatch.setattr(probe_module, "slice_model", broken)
    w = cal.weights[-1]
    arrays = {w.name: _variant(cal.originals[w.name], 3)}
    assert cal.prober.probe(arrays, "nmse") == _whole(cal).probe(arrays, "nmse")
    assert any(w.name in n and "whole graph" in n and "no slice today" in n
               for n in cal.prober.notices)


def test_a_fallback_notice_reaches_the_report(mlp, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no slice today")

    monkeypatch.setattr(probe_module, "slice_model", broken)
    result = rdonnx.compress(mlp.path, calib=mlp.calib,
                             config=CONFIG.updated(format="dense", layer_distortion=False))
    assert any("whole graph" in n and "no slice today" in n for n in result.report.notices)


@pytest.mark.parametrize("case", ["cnn", "subgraph"], indirect=True)
def test_probes_in_threads_give_identical_figures(case):
    one = calibrate_model(case.path, CONFIG, case.calib)
    three = calibrate_model(case.path, CONFIG.updated(jobs=3), case.calib)
    assert three.prober.jobs == 3

    def sweep(cal):
        groups = [[((w.name, k), lambda w=w, k=k: {w.name: _variant(cal.originals[w.name], k)})
                   for k in range(3)] for w in cal.weights]
        return {key: d.nmse for key, d in cal.prober.sweep(groups, "nmse").items()}

    assert sweep(one) == sweep(three)


def test_whole_graph_probes_when_downstream_is_off(cnn):
    cal = calibrate_model(cnn.path, CONFIG.updated(downstream=False), cnn.calib)
    assert cal.prober.cuts == {}
    w = cal.weights[0]
    arrays = {w.name: _variant(cal.originals[w.name], 0)}
    on = calibrate_model(cnn.path, CONFIG, cnn.calib)
    assert cal.prober.probe(arrays, "nmse") == _exact(on).probe(arrays, "nmse")
    assert not [n for n in cal.notices if "whole graph" in n]


def test_nmse_probes_stop_at_linear_tails_and_measure_the_outputs_error():
    """A Gemm classifier and a MatMul head with more columns than rows: nmse probes upstream of
    them run up to their input and take the outputs' error from the Gram factor (equal to the
    slice's figure up to float rounding); a probe changing a tail's own constant, and every
    other metric, runs the plain slice."""
    x = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    cal = calibrate_model(tailed_model(), CONFIG.updated(min_params=16), {"x": x})
    assert set(cal.prober.tails) == {"y", "z"}
    exact = _exact(cal)
    names = {w.name for w in cal.weights}
    assert {"W1", "Wc", "M"} <= names
    graph = cal.runner.proto.graph
    for i, w in enumerate(cal.weights):
        arrays = {w.name: _variant(cal.originals[w.name], i)}
        part = cal.prober._slice(frozenset(arrays), True)
        stopped = {t.output for t in part.tails}
        assert stopped == {o for o, t in cal.prober.tails.items()
                           if w.name not in t.reads and o in exact.cuts[w.name].outputs}
        ops = [graph.node[k].op_type for k in part.cut.nodes]
        if w.name == "W1":
            assert stopped == {"y", "z"} and ops == ["MatMul", "Relu"]
        tailed, plain = cal.prober.probe(arrays, "nmse"), exact.probe(arrays, "nmse")
        assert tailed.nmse == pytest.approx(plain.nmse, rel=1e-5) and plain.nmse > 0
        cosine = cal.prober.probe(arrays, "cosine").cosine
        assert cosine == pytest.approx(exact.probe(arrays, "cosine").cosine, rel=1e-4)
    unchanged = cal.prober.probe({"W1": cal.originals["W1"]}, "nmse").nmse
    assert unchanged < 1e-12


def test_a_tailed_slice_that_cannot_run_is_the_plain_slice_found_again(monkeypatch):
    """No usable tail (a probe of the Gemm's own matrix), or a tailed slice that does not build:
    the plain slice, kept under the tailed key too (not rebuilt at every probe), no notice."""
    x = np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)
    cal = calibrate_model(tailed_model(), CONFIG.updated(min_params=16), {"x": x})
    own = frozenset({"Wc"})
    assert cal.prober._slice(own, True) is cal.prober._slice(own)
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("no error graph today")

    monkeypatch.setattr(probe_module, "error_graph", broken)
    arrays = {"W1": _variant(cal.originals["W1"], 0)}
    first = cal.prober._slice(frozenset(arrays), True)
    assert first.tails == () and first.session is not None
    assert cal.prober._slice(frozenset(arrays), True) is first and len(calls) == 1
    assert cal.prober.probe(arrays, "nmse").nmse == pytest.approx(
        _exact(cal).probe(arrays, "nmse").nmse, rel=1e-5)
    assert not [n for n in cal.prober.notices if "whole graph" in n]


def test_tails_are_kept_for_nmse_alone():
    x = np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)
    cal = calibrate_model(tailed_model(), CONFIG.updated(min_params=16, metric="cosine"),
                          {"x": x})
    assert cal.prober.tails == {}


def test_io_binding_run_equals_a_plain_run():
    """The CUDA path's run (I/O binding), exercised on the CPU."""
    proto, _ = if_model()
    from rdonnx.graph.model import load_model

    session, device = create_session(proto.SerializeToString(), load_model(proto),
                                     Device("CPUExecutionProvider"))
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    feed = {"x": x, "c": np.array(True)}
    np.testing.assert_array_equal(bound_run(session, ["y"], feed, "cpu")[0],
                                  session.run(["y"], feed)[0])


# ---------------------------------------------------------------------------------------------
# graph.cut


def _chain() -> onnx.ModelProto:
    """x -> MatMul A -> h1 -> Relu -> h2 -> MatMul B -> y1; h2 + skip(h1) -> Add -> y2;
    Shape(x) feeds a Reshape downstream of B; a Constant feeds the Add."""
    nodes = [
        helper.make_node("MatMul", ["x", "A"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("MatMul", ["h2", "B"], ["m"]),
        helper.make_node("Reshape", ["m", "shape"], ["y1"]),
        helper.make_node("Constant", [], ["k"],
                         value=onnx.numpy_helper.from_array(np.float32(2.0))),
        helper.make_node("Mul", ["h1", "k"], ["h3"]),
        helper.make_node("Add", ["h2", "h3"], ["y2"]),
    ]
    return make_model(nodes, [vi("x", TensorProto.FLOAT, ["N", 4]),
                              vi("A", TensorProto.FLOAT, [4, 4]),
                              vi("B", TensorProto.FLOAT, [4, 4])],
                      [vi("y1", TensorProto.FLOAT, ["N", 4]), vi("y2", TensorProto.FLOAT,
                                                                  ["N", 4])])


def test_downstream_of_a_late_weight_reads_the_cut_and_produces_its_outputs():
    graph = _chain().graph
    cut = downstream(graph, ["B"])
    assert [graph.node[i].op_type for i in cut.nodes] == ["MatMul", "Reshape"]
    assert cut.tensors == ("h2", "shape")  # computed upstream: recorded by the reference
    assert cut.inputs == ("B",)
    assert cut.outputs == ("y1",)  # y2 does not depend on B
    assert not cut.whole


def test_downstream_of_the_first_weight_is_everything_but_what_does_not_depend_on_it():
    graph = _chain().graph
    cut = downstream(graph, ["A"])
    ops = [graph.node[i].op_type for i in cut.nodes]
    assert "Shape" not in ops  # reads only x
    assert "Constant" in ops  # input-free producers run in the slice
    assert cut.tensors == ("shape",)
    assert set(cut.inputs) == {"x", "A", "B"}
    assert cut.outputs == ("y1", "y2")
    assert not cut.whole


def test_subgraph_reads_are_what_the_branches_take_from_outside():
    proto, _ = if_model()
    node = proto.graph.node[0]
    assert subgraph_reads(node) == {"x", "W"}  # Wt is the then-branch's own initializer
    cut = downstream(proto.graph, ["W"])
    assert cut.nodes == (0,) and cut.whole and "x" in cut.inputs


def test_slices_whose_constants_pass_the_fold_budget_run_unoptimised(cnn, monkeypatch):
    """Past FOLD_MB a slice keeps every weight an input and ORT's optimisations off (building
    an optimised slice of an LM's 540 MB cost more than its probes saved): exact figures."""
    monkeypatch.setattr(probe_module, "FOLD_MB", 0)
    cal = calibrate_model(cnn.path, CONFIG, cnn.calib)
    whole = _whole(cal)
    for i, w in enumerate(cal.weights):
        arrays = {w.name: _variant(cal.originals[w.name], i)}
        part = cal.prober._slice(frozenset(arrays))
        assert part.constants == frozenset()
        assert cal.prober.probe(arrays, None) == whole.probe(arrays, None)
