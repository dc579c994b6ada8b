"""Probes: the output distortion of the model with a few weights replaced, measured against the
replayed reference outputs.

A probe runs only the part of the graph downstream of the replaced weights (a slice of the
measurement model, built once per set of weights), fed with the tensors that cross the cut,
which the reference pass recorded; outputs that do not depend on the weights are the reference
outputs. Probes run in `jobs` threads (ONNX Runtime releases the GIL), one session per slice and
thread-safe counters; every probe's figure is computed the same way whatever the number of
threads, so results do not depend on it. Probes measuring nmse alone stop at the input of an
output's linear tail (`rdonnx.graph.tail`) and take the output's squared error from there
(`(h - h_ref) @ F` in the slice): an LM's lm_head or a classifier's Gemm is not run by the
probes upstream of it.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx

from rdonnx.choices import DEFAULT_CHANNEL_AXIS
from rdonnx.graph.cut import Cut, downstream, without
from rdonnx.graph.model import fit_ir_version, tensor_array
from rdonnx.graph.tail import LinearTail, error_graph, error_name, gram_factor, reference_name
from rdonnx.runtime.distortion import DistortionMeter, SquaredError
from rdonnx.runtime.measure import Replay
from rdonnx.runtime.session import (
    CUDA,
    Runner,
    create_session,
    max_runtime_ir_version,
    ortvalue,
    run_session,
)

SESSIONS_PER_JOB = 2  # slice sessions kept per worker thread (a weight's sweep reuses one)
FOLD_MB = 128  # a slice folds the weights it does not change while they hold at most this:
# ORT's optimisations and pre-packing of more (an LM's 540 MB) cost 7-15 s a slice build and
# saved an LM probe nothing measurable


def cut_tensors(proto: onnx.ModelProto, weights: Sequence[str]) -> dict[str, Cut]:
    """Per weight, what its downstream slice reads from the rest of the measurement model."""
    return {name: downstream(proto.graph, [name]) for name in weights}


def slice_model(proto: onnx.ModelProto, cut: Cut, types: Mapping[str, np.dtype],
                constants: Mapping[str, Sequence[int]] | None = None,
                tails: Sequence[tuple[LinearTail, np.ndarray]] = ()) -> onnx.ModelProto:
    """The nodes of `cut` as a model: cut tensors (typed from the recorded arrays), graph inputs
    and weights in, the graph outputs they produce out, the initializers they read copied.
    `constants` (name: shape): weights declared as initializers instead of inputs, their data
    left to the session (`create_session(initializers=...)`), so ORT can fold and pre-pack
    them. `tails` (tail, Gram factor): each adds the output `error_name(tail)` computed from
    the tail's input and the input `reference_name(tail)`."""
    constants = constants or {}
    graph = proto.graph
    declared = {v.name: v for v in graph.input}
    inputs = [declared[n] for n in cut.inputs if n not in constants] + [
        onnx.helper.make_tensor_value_info(
            n, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(types[n])), None)
        for n in cut.tensors]
    wanted = set(cut.initializers)
    nodes = [graph.node[i] for i in cut.nodes]
    initializers = [t for t in graph.initializer if t.name in wanted] + \
        [_placeholder(n, declared[n].type.tensor_type.elem_type, shape)
         for n, shape in sorted(constants.items())]
    for tail, factor in tails:
        added, made, reference = error_graph(
            tail, factor, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(types[tail.input])))
        nodes += added
        initializers += made
        inputs.append(reference)
    sliced = onnx.helper.make_graph(
        nodes, f"{graph.name}-slice", inputs,
        [onnx.ValueInfoProto(name=n) for n in cut.outputs] +
        [onnx.ValueInfoProto(name=error_name(t)) for t, _ in tails], initializers)
    model = onnx.helper.make_model(sliced, opset_imports=list(proto.opset_import))
    model.functions.extend(proto.functions)
    fit_ir_version(model, max_runtime_ir_version())
    return model


def _placeholder(name: str, data_type: int, shape: Sequence[int]) -> onnx.TensorProto:
    """An initializer without data (external, in no file): the session supplies it."""
    tensor = onnx.TensorProto(name=name, data_type=data_type, dims=list(shape),
                              data_location=onnx.TensorProto.EXTERNAL)
    tensor.external_data.add(key="location", value="supplied-by-the-session")
    return tensor


@dataclass(frozen=True)
class _Slice:
    session: object | None  # None: the whole graph (the runner's session)
    cut: Cut
    constants: frozenset[str] = frozenset()  # weights baked into the slice (not fed)
    tails: tuple[LinearTail, ...] = ()  # outputs the slice gives as `error_name(tail)`


class Prober:
    """Measures weight variants against the reference: downstream-only when `cuts` are given,
    over `jobs` threads; with `optimize` the slices hold the weights they do not change as
    constants and run with ORT's graph optimisations (outputs equal to the whole graph's up
    to float rounding); with `tails` (output name: its linear tail, recorded inputs), nmse probes
    stop at the tails' inputs."""

    def __init__(self, runner: Runner, replay: Replay, cuts: Mapping[str, Cut] | None = None,
                 jobs: int = 1, optimize: bool = False, notices: list[str] | None = None,
                 tails: Mapping[str, LinearTail] | None = None):
        """`notices`: where to say which probes run the whole graph (a caller's list)."""
        self.runner, self.replay = runner, replay
        self.cuts = dict(cuts or {})
        self.tails = dict(tails or {}) if self.cuts else {}
        self._factors: dict[str, np.ndarray | None] = {}  # per tail output, made on first use
        self.jobs = max(int(jobs), 1)
        self.optimize = optimize
        self.threads = 0 if self.jobs == 1 else max(1, (os.cpu_count() or 1) // self.jobs)
        self.notices = notices if notices is not None else []
        self.full: set[str] = set()  # weights probed on the whole graph (and why, in notices)
        self._sessions: OrderedDict[tuple[frozenset[str], bool], _Slice] = OrderedDict()
        self._lock = threading.Lock()
        self._types: dict[str, np.dtype] = {}

    @classmethod
    def tensors(cls, cuts: Mapping[str, Cut],
                tails: Mapping[str, LinearTail] | None = None) -> list[str]:
        """The tensors the reference pass must record for these cuts (and tails)."""
        return sorted({t for c in cuts.values() if not c.whole for t in c.tensors} |
                      ({t.input for t in (tails or {}).values()} if cuts else set()))

    def _slice(self, names: frozenset[str], tailed: bool = False) -> _Slice:
        """The slice probing `names`; `tailed`: stopping at the inputs of the linear tails it
        can (the plain slice when none)."""
        key = (names, tailed)
        with self._lock:
            found = self._sessions.get(key)
            if found is not None:
                self._sessions.move_to_end(key)
                return found
        single = next(iter(names)) if len(names) == 1 else None
        cut = self.cuts[single] if single in self.cuts else \
            downstream(self.runner.proto.graph, sorted(names))
        tails = self._usable(cut, names) if tailed else ()
        # a tailed key with no usable tail (or whose tailed slice cannot run) aliases the plain
        # slice, so later probes find it instead of trying again
        made = self._slice(names) if tailed and not tails else self._build(names, cut, tails)
        with self._lock:
            self._sessions[key] = made
            while len(self._sessions) > SESSIONS_PER_JOB * self.jobs:
                self._sessions.popitem(last=False)
        return made

    def _build(self, names: frozenset[str], cut: Cut, tails: tuple[LinearTail, ...]) -> _Slice:
        """The slice of `cut` probing `names` (stopping short of `tails`), its session built;
        the whole graph when it cannot run (with a notice), the plain slice for a tailed one."""
        if tails:
            cut = without(self.runner.proto.graph, cut, {i for t in tails for i in t.nodes},
                          [n for n in cut.outputs if n not in {t.output for t in tails}])
        recorded = self.replay.recorded or frozenset()
        made = _Slice(None, cut)
        constants = self._constants(cut, names) if self.cuts else []
        if not self.cuts:  # downstream probes are off: the whole graph, silently
            pass
        elif (not cut.whole or constants or tails) and \
                set(cut.tensors) | {t.input for t in tails} <= recorded:
            # a whole cut still gains a session of its own when it can fold constants
            try:
                if not self._types:
                    self._types = {n: a.dtype for n, a in next(self.replay.cuts(sorted(recorded)),
                                                                {}).items()}
                payload = slice_model(self.runner.proto, cut, self._types,
                                      {n: self.runner.weights[n].shape() for n in constants},
                                      [(t, self._factors[t.output]) for t in tails]
                                      ).SerializeToString()
                session, _ = create_session(payload, self.runner.model, self.runner.device,
                                            bool(constants), self.threads,
                                            {n: self.runner.weights[n] for n in constants})
                made = _Slice(session, cut, frozenset(constants), tails)
            except Exception as exc:  # noqa: BLE001 - any refusal: the whole graph instead
                if tails:
                    return self._slice(names)
                self._fall_back(names, f"its slice does not load ({str(exc)[:400]})")
        elif tails:  # what the tailed slice reads was not recorded
            return self._slice(names)
        elif not cut.whole:
            self._fall_back(names, "the reference pass did not record its cut")
        return made

    def _usable(self, cut: Cut, names: frozenset[str]) -> tuple[LinearTail, ...]:
        """The linear tails of `cut`'s outputs that a probe of `names` can stop short of: it
        changes none of the tail's constants, the cut computes the tail's input, and the
        tail's matrix has more columns than its Gram factor."""
        graph = self.runner.proto.graph
        produced = {o for i in cut.nodes for o in graph.node[i].output}
        return tuple(t for o, t in sorted(self.tails.items())
                     if o in cut.outputs and not names & t.reads and t.input in produced and
                     self._factor(t) is not None)

    def _factor(self, tail: LinearTail) -> np.ndarray | None:
        """The tail's `gram_factor` (None: it saves nothing), computed once."""
        with self._lock:
            if tail.output not in self._factors:
                runner = self.runner
                if tail.matrix in runner.weights:
                    matrix = runner.weights[tail.matrix].numpy()
                else:
                    matrix = tensor_array(runner.model, next(
                        t for t in runner.proto.graph.initializer if t.name == tail.matrix))
                self._factors[tail.output] = gram_factor(matrix, tail.transposed, tail.scale)
            return self._factors[tail.output]

    def _constants(self, cut: Cut, names: frozenset[str]) -> list[str]:
        """With `optimize`, the weights a slice reads but never changes (constants there), when
        they hold at most `FOLD_MB`; else none (the slice then runs unoptimised)."""
        if not self.optimize:
            return []
        found = [n for n in cut.inputs if n in self.runner.weights and n not in names]
        held = sum(self.runner.weight_bytes(n) for n in found)
        return found if held <= FOLD_MB << 20 else []

    def _fall_back(self, names: frozenset[str], why: str) -> None:
        with self._lock:
            if not names <= self.full:
                self.full.update(names)
                self.notices.append(f"probes of {', '.join(sorted(names))} run the whole graph: "
                                    f"{why}")

    def probe(self, arrays: Mapping[str, np.ndarray], metric: str | None,
              channel_axis: int = DEFAULT_CHANNEL_AXIS) -> object:
        """The `Distortion` of the model with `arrays` in place of those weights (`metric`:
        the one figure to compute, None for all)."""
        return self.sweep([[(0, lambda: arrays)]], metric, channel_axis)[0]

    def sweep(self, groups: Sequence[Sequence[tuple[Hashable, Callable[
            [], Mapping[str, np.ndarray]]]]], metric: str | None,
              channel_axis: int = DEFAULT_CHANNEL_AXIS,
              done: Callable[[int], None] | None = None) -> dict[Hashable, object]:
        """Every probe of every group, as {label: `Distortion`}: a group lists (label, make
        the variant) pairs that mostly replace the same weights (one weight's curve), so
        they share a slice and its recorded cut. Groups run in parallel over `jobs`
        threads; `done(n)` counts probes as they finish."""
        tailed = metric == "nmse" and bool(self.tails)

        def run(group) -> dict[Hashable, object]:
            out, part, cuts = {}, None, None
            for label, make in group:
                arrays = make()
                wanted = self._slice(frozenset(arrays), tailed)
                if wanted is not part:
                    part = wanted
                    cuts = self._recorded(part)
                out[label] = self._measure(part, arrays, cuts, metric, channel_axis)
                if done is not None:
                    done(1)
            return out

        results: dict[Hashable, object] = {}
        if self.jobs == 1 or len(groups) <= 1:
            for group in groups:
                results.update(run(group))
            return results
        with ThreadPoolExecutor(self.jobs) as pool:
            for part in pool.map(run, groups):
                results.update(part)
        return results

    def outputs(self, arrays: Mapping[str, np.ndarray]) -> list[list[np.ndarray]]:
        """The model's outputs with `arrays` in place of those weights, batch by batch, as
        the probes compute them (the slice's outputs, the reference for the others)."""
        part = self._slice(frozenset(arrays))
        cuts = self._recorded(part)
        return [candidate for _, candidate, _ in self._runs(part, arrays, cuts)]

    def _recorded(self, part: _Slice) -> list[dict[str, object]] | None:
        """The slice's cut tensors of every batch, and its tails' references (on CUDA uploaded
        once, for all the probes of a group)."""
        if part.session is None:
            return None
        heads = sorted({t.input for t in part.tails})
        cuts = [dict(c) for c in self.replay.cuts(list(part.cut.tensors) + heads)]
        for c in cuts:  # a tail's input's reference value is fed under its own name
            c.update({reference_name(t): c[t.input] for t in part.tails})
            for name in heads:
                del c[name]
        if self.runner.device.provider == CUDA:
            cuts = [{n: ortvalue(a, onnx.helper.np_dtype_to_tensor_dtype(a.dtype),
                                 self.runner.device.ort_device) for n, a in c.items()}
                    for c in cuts]
        return cuts

    def _measure(self, part: _Slice, arrays: Mapping[str, np.ndarray],
                 cuts: list[dict[str, object]] | None, metric: str | None,
                 channel_axis: int) -> object:
        meter = DistortionMeter(channel_axis, metric, fast=True)
        for expected, candidate, energy in self._runs(part, arrays, cuts):
            meter.add(expected, candidate, energy)
        return meter.result()

    def _runs(self, part: _Slice, arrays: Mapping[str, np.ndarray],
              cuts: list[dict[str, object]] | None) -> Iterator[tuple[list, list, list]]:
        """(reference outputs, candidate outputs, reference energies) of every batch; a tail's
        output as its `SquaredError`."""
        runner = self.runner
        values = {n: runner.weight_value(n, a) for n, a in arrays.items()}
        if part.session is None:
            for (feed, expected), energy in zip(self.replay, self.replay.energies):
                yield expected, runner.run(feed, values), energy
            return
        cut = part.cut
        weights = {n: values.get(n, runner.weights[n]) for n in cut.inputs
                   if n in runner.weights and n not in part.constants}
        names = list(cut.outputs) + [error_name(t) for t in part.tails]
        for (feed, expected), energy, recorded in zip(self.replay, self.replay.energies, cuts):
            inputs = {n: feed[n] for n in cut.inputs if n in feed}
            inputs.update(weights)
            inputs.update(recorded)
            produced = dict(zip(names, run_session(part.session, names, inputs, runner.device)))
            for tail in part.tails:  # the error's sum of squares, in float64
                error = produced.pop(error_name(tail)).ravel()
                produced[tail.output] = SquaredError(float(np.square(error, dtype=np.float64)
                                                           .sum()))
            yield expected, [produced.get(n, expected[i]) for i, n in
                             enumerate(runner.output_names)], energy
