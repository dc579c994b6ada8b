"""The layer-input engine: E[x x^T] of each weight's layer input, accumulated batch by batch
over the replayed calibration data (SparseGPT's `add_batch`), from the original model (cached;
the layers asked `together` share one run per batch) or with earlier weights already compressed
(sequential reconstruction).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from rdonnx.algo import obs
from rdonnx.flow.calibration import Calibration

ORIGINAL_INPUTS_MB = 256  # sequential mode: the last layer's original inputs kept up to this


class Hessians:
    """Layer-input Hessians of one calibration, with their caches."""

    def __init__(self, cal: Calibration) -> None:
        self.cal = cal
        self._cache: dict[tuple[str, bool], obs.Hessian] = {}
        # fit / held-out: the last layer's original inputs per batch (sequential mode), while
        # at most ORIGINAL_INPUTS_MB
        self._original_inputs: dict[bool, tuple[str, list[list[np.ndarray]]]] = {}

    def hessian(self, name: str, earlier: Mapping[str, np.ndarray] | None = None,
                held_out: bool = False, together: Sequence[str] = ()) -> obs.Hessian:
        """E[x x^T] of the weight's layer input: from the original model (cached), or with
        the `earlier` weights already compressed (sequential mode), paired with the original
        input so that reconstruction aims at the original output (`obs.Target`). On the fit
        part of the data, or with `held_out` on the held-out part (`Calibration.check`).
        `together`: layers whose original-input Hessians are filled in the same runs (ONNX
        Runtime runs the whole graph whichever outputs are asked, so one run per batch serves
        them all; the reference pass fetched the same tensors at once)."""
        earlier = earlier or None  # nothing compressed yet: the original inputs
        key = (name, held_out)
        if earlier is None:
            if key not in self._cache:
                self._originals([name, *(n for n in together if n != name)], held_out)
            return self._cache[key]
        cal = self.cal
        entry = cal.inputs[name]
        h = obs.Hessian(entry, obs.torch_device(cal.runner.device.ort_device))  # CUDA: GPU
        prepared = {n: cal.runner.weight_value(n, a) for n, a in earlier.items()}
        last = self._original_inputs.get(held_out)
        held = last[1] if last is not None and last[0] == name else None
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
        return h

    def _originals(self, names: Sequence[str], held_out: bool) -> None:
        """Cache the original-input Hessians of `names` (those not cached yet), one run of
        the original model per batch for all of them."""
        cal = self.cal
        todo = [n for n in dict.fromkeys(names) if (n, held_out) not in self._cache]
        device = obs.torch_device(cal.runner.device.ort_device)  # CUDA: on the GPU
        hs = {n: obs.Hessian(cal.inputs[n], device) for n in todo}
        for feed, _ in cal.check if held_out else cal.replay:
            missing = sorted({t for n in todo for t in cal.inputs[n].tensors} - set(feed))
            values = {**feed, **dict(zip(missing, cal.runner.run(feed, outputs=missing)))} \
                if missing else feed
            for n in todo:
                for tensor in cal.inputs[n].tensors:  # every consumer of a shared weight
                    hs[n].add_batch(values[tensor])
        self._cache.update({(n, held_out): h for n, h in hs.items()})
