"""The layer-input engine: Hessians accumulated over the replayed batches, cached for the
original inputs, recomputed (with the original inputs kept) for compressed earlier layers."""

from __future__ import annotations

import numpy as np
import torch

from rdonnx import CompressConfig, DataOptions
from rdonnx.algo.obs import Hessian
from rdonnx.flow.calibration import calibrate_model
from rdonnx.flow.hessians import Hessians

SEQUENTIAL = CompressConfig.of(sequential=True, rate=0.5, method="uniform",
                               grid=(1.0, 0.5), data=DataOptions(samples=64))


def test_original_hessians_are_the_replayed_batches_and_cached(bundled_cnn):
    cal = calibrate_model(bundled_cnn.path, SEQUENTIAL, bundled_cnn.calib)
    hessians = Hessians(cal)
    w = cal.weights[1]
    first = hessians.hessian(w.name)
    assert hessians.hessian(w.name) is first  # cached
    entry, again = cal.inputs[w.name], Hessian(cal.inputs[w.name])
    for feed, _ in cal.replay:  # the layer input of every replayed batch, once
        missing = [t for t in entry.tensors if t not in feed]
        values = {**feed, **dict(zip(missing, cal.runner.run(feed, outputs=missing)))}
        for tensor in entry.tensors:
            again.add_batch(values[tensor])
    for a, b in zip(first.matrices, again.matrices):
        assert torch.equal(a, b)
    assert hessians.hessian(w.name, {}) is first  # nothing compressed: the original inputs


def test_sequential_hessians_reuse_the_original_inputs_exactly(bundled_cnn):
    """The original inputs of the layer last asked for are kept: asking again with other
    compressed weights (as every probe of a sequential curve does) runs only the compressed
    model; with the very same ones, nothing runs and the Hessian is the same."""
    cal = calibrate_model(bundled_cnn.path, SEQUENTIAL, bundled_cnn.calib)
    hessians = Hessians(cal)  # fresh: no layer asked for before
    first, second = cal.weights[0], cal.weights[1]
    pruned = {first.name: cal.rankings[first.name].apply(cal.originals[first.name], 100)}
    calls = []
    run = cal.runner.run

    def counted(feed, weights=None, outputs=None):
        calls.append(bool(weights))
        return run(feed, weights, outputs)

    cal.runner.run = counted
    try:
        fresh = hessians.hessian(second.name, pruned)
        assert calls.count(False) == len(cal.replay)  # original inputs: one pass
        calls.clear()
        assert hessians.hessian(second.name, dict(pruned)) is fresh  # the same arrays
        assert calls == []
        again = hessians.hessian(second.name, {first.name: pruned[first.name].copy()})
        assert calls == [True] * len(cal.replay)  # only the compressed model runs again
    finally:
        del cal.runner.run
    assert fresh is not again  # another array: measured again
    for a, b in zip(fresh.matrices + [t for p in fresh.targets for t in p],
                    again.matrices + [t for p in again.targets for t in p]):
        assert torch.equal(a, b)
    plain = hessians.hessian(second.name)
    assert not all(np.allclose(a.numpy(), b.numpy()) for a, b in
                   zip(plain.matrices, fresh.matrices))  # compressed inputs differ


def test_layers_asked_together_share_one_run_per_batch(bundled_cnn):
    """Original-input Hessians of the layers asked `together` come from one run per batch
    (ONNX Runtime runs the whole graph for any output) and equal those asked one by one."""
    cal = calibrate_model(bundled_cnn.path, SEQUENTIAL, bundled_cnn.calib)
    names = [w.name for w in cal.weights if w.name in cal.inputs]
    assert len(names) >= 3
    alone = Hessians(cal)
    singles = [alone.hessian(n) for n in names]
    hessians = Hessians(cal)
    calls = []
    run = cal.runner.run

    def counted(feed, weights=None, outputs=None):
        calls.append(len(outputs or ()))
        return run(feed, weights, outputs)

    cal.runner.run = counted
    try:
        first = hessians.hessian(names[1], together=lambda: names)
        runs = len(calls)
        rest = [hessians.hessian(n) for n in names]  # cached: no further run
    finally:
        del cal.runner.run
    assert runs == len(calls) <= len(cal.replay)
    assert rest[1] is first
    for single, together in zip(singles, rest):
        for a, b in zip(single.matrices, together.matrices):
            assert torch.equal(a, b)


def test_layers_reading_one_input_share_its_hessian(attention):
    """q, k and v read the same input: one Hessian serves all three, from the original model
    and in the sequential pass, where compressing q cannot change k's input (a node's output
    cannot change its own input); a layer reading another input is measured anew."""
    config = CompressConfig.of(sequential=True, rate=0.5, method="uniform", grid=(1.0, 0.5),
                               data=DataOptions(samples=32))
    cal = calibrate_model(attention.path, config, attention.calib)
    by_input: dict = {}
    for w in cal.weights:
        by_input.setdefault(cal.inputs[w.name].tensors, []).append(w.name)
    q, k, v = next(names for names in by_input.values() if len(names) == 3)
    other = next(w.name for w in cal.weights if w.name not in (q, k, v))
    hessians = Hessians(cal)
    shared = hessians.hessian(q, together=lambda: [q, k, v, other])
    assert hessians.hessian(k) is shared and hessians.hessian(v) is shared
    assert hessians.hessian(other) is not shared
    pruned = {n: cal.rankings[n].apply(cal.originals[n], 100) for n in (q, k)}
    after_q = hessians.hessian(k, {q: pruned[q]})
    assert hessians.hessian(v, {q: pruned[q], k: pruned[k]}) is after_q
    fresh = Hessians(cal).hessian(v, {q: pruned[q], k: pruned[k]})
    for a, b in zip(after_q.matrices, fresh.matrices):
        assert torch.equal(a, b)
    assert hessians.hessian(other, {q: pruned[q], k: pruned[k]}) is not after_q
