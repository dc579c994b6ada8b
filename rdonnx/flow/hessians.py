"""The layer-input engine: E[x x^T] of each weight's layer input, accumulated batch by batch
over the replayed calibration data (SparseGPT's `add_batch`), from the original model (cached;
the layers asked `together` share one run per batch) or with earlier weights already compressed
(sequential reconstruction).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

from rdonnx.algo import obs
from rdonnx.flow.calibration import Calibration

ORIGINAL_INPUTS_MB = 256  # sequential mode: the last layer's original inputs kept up to this


class Hessians:
    """Layer-input Hessians of one calibration, with their caches."""

    def __init__(self, cal: Calibration) -> None:
        self.cal = cal
        # original inputs: one Hessian per distinct layer input (`obs.input_key`), held out or
        # not (cached)
        self._inputs: dict[tuple[obs.LayerInput, bool], obs.Hessian] = {}
        # sequential mode, held out or not: the last layer's input key, the weights compressed
        # then, and its Hessian (the next layer reading the same input gets it again)
        self._last: dict[bool, tuple[obs.LayerInput, dict[str, np.ndarray], obs.Hessian]] = {}
        # fit / held-out: the last layer's original inputs per batch (sequential mode), while
        # at most ORIGINAL_INPUTS_MB
        self._original_inputs: dict[bool, tuple[str, list[list[np.ndarray]]]] = {}

    def hessian(self, name: str, earlier: Mapping[str, np.ndarray] | None = None,
                held_out: bool = False,
                together: Callable[[], Iterable[str]] | None = None) -> obs.Hessian:
        """E[x x^T] of the weight's layer input: from the original model (cached), or with
        the `earlier` weights already compressed (sequential mode), paired with the original
        input so that reconstruction aims at the original output (`obs.Target`). On the fit
        part of the data, or with `held_out` on the held-out part (`Calibration.check`).
        `together`: on a miss, the layers whose original-input Hessians are filled in the same
        runs (ONNX Runtime runs the whole graph whichever outputs are asked, so one run per
        batch serves them all; the reference pass fetched the same tensors at once)."""
        earlier = earlier or None  # nothing compressed yet: the original inputs
        cal = self.cal
        entry = cal.inputs[name]
        key = obs.input_key(entry)
        if earlier is None:
            if (key, held_out) not in self._inputs:
                self._originals([name, *(together() if together else ())], held_out)
            return self._inputs[key, held_out]
        last = self._last.get(held_out)
        if last is not None and last[0] == key and self._same_input(last[1], earlier, key):
            return last[2]
        h = obs.Hessian(entry, obs.torch_device(cal.runner.device.ort_device))  # CUDA: GPU
        prepared = {n: cal.runner.weight_value(n, a) for n, a in earlier.items()}
        inputs = self._original_inputs.get(held_out)
        held = inputs[1] if inputs is not None and inputs[0] == name else None
        kept: list[list[np.ndarray]] | None = [] if held is None else None
        size = 0
        for i, (feed, _) in enumerate(cal.check if held_out else cal.replay):
            missing = [t for t in entry.tensors if t not in feed]
            computed = dict(zip(missing, cal.runner.run(feed, prepared, outputs=missing))) \
                if missing else {}
            original = computed
            if missing:  # the original model's input of this layer
                arrays = held[i] if held is not None else \
                    cal.runner.run(feed, {}, outputs=missing)
                original = dict(zip(missing, arrays))
                if kept is not None:
                    kept.append(arrays)
                    size += sum(a.nbytes for a in arrays)
                    kept = kept if size <= ORIGINAL_INPUTS_MB << 20 else None
            elif kept is not None:
                kept.append([])
            for tensor in entry.tensors:  # every consumer of a shared weight
                h.add_pair(feed[tensor] if tensor in feed else original[tensor],
                           feed[tensor] if tensor in feed else computed[tensor])
        if kept is not None:  # sequential curves ask for the same layer many times
            self._original_inputs[held_out] = (name, kept)
        self._last[held_out] = (key, dict(earlier), h)
        return h

    def _same_input(self, before: Mapping[str, np.ndarray], now: Mapping[str, np.ndarray],
                    key: obs.LayerInput) -> bool:
        """Whether the layer input `key` is the same with the weights `now` compressed as with
        those `before`: the same arrays for the weights compressed then, and nothing else
        compressed but weights whose one consumer reads that very input (a node's output
        cannot change its own input)."""
        if any(now.get(n) is not a for n, a in before.items()):
            return False
        inputs = self.cal.inputs
        return all(n in inputs and not inputs[n].others and obs.input_key(inputs[n]) == key
                   for n in now.keys() - before.keys())

    def _originals(self, names: Iterable[str], held_out: bool) -> None:
        """Cache the original-input Hessians of `names` (those of inputs not cached yet), one
        run of the original model per batch for all of them."""
        cal = self.cal
        device = obs.torch_device(cal.runner.device.ort_device)  # CUDA: on the GPU
        new: dict[tuple[obs.LayerInput, bool], obs.Hessian] = {}
        for n in names:
            key = (obs.input_key(cal.inputs[n]), held_out)
            if key not in self._inputs and key not in new:
                new[key] = obs.Hessian(cal.inputs[n], device)
        for feed, _ in cal.check if held_out else cal.replay:
            missing = sorted({t for h in new.values() for t in h.entry.tensors} - set(feed))
            values = {**feed, **dict(zip(missing, cal.runner.run(feed, outputs=missing)))} \
                if missing else feed
            for h in new.values():
                for tensor in h.entry.tensors:  # every consumer of a shared weight
                    h.add_batch(values[tensor])
        self._inputs.update(new)  # filled: kept only now (an interrupted pass leaves nothing)
