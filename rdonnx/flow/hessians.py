"""The layer-input engine: E[x x^T] of each weight's layer input, accumulated batch by batch
over the replayed calibration data (SparseGPT's `add_batch`), from the original model (cached)
or with earlier weights already compressed (sequential reconstruction).
"""

from __future__ import annotations

from collections.abc import Mapping

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
                held_out: bool = False) -> obs.Hessian:
        """E[x x^T] of the weight's layer input: from the original model (cached), or with
        the `earlier` weights already compressed (sequential mode), paired with the original
        input so that reconstruction aims at the original output (`obs.Target`). On the fit
        part of the data, or with `held_out` on the held-out part (`Calibration.check`)."""
        earlier = earlier or None  # nothing compressed yet: the original inputs
        key = (name, held_out)
        if earlier is None and key in self._cache:
            return self._cache[key]
        cal = self.cal
        entry = cal.inputs[name]
        h = obs.Hessian(entry, obs.torch_device(cal.runner.device.ort_device))  # CUDA: GPU
        prepared = {n: cal.runner.weight_value(n, a) for n, a in (earlier or {}).items()}
        last = self._original_inputs.get(held_out)
        held = last[1] if earlier and last is not None and last[0] == name else None
        kept: list[list[np.ndarray]] | None = [] if earlier and held is None else None
        size = 0
        for i, (feed, _) in enumerate(cal.check if held_out else cal.replay):
            missing = [t for t in entry.tensors if t not in feed]
            computed = dict(zip(missing, cal.runner.run(feed, prepared, outputs=missing))) \
                if missing else {}
            original = computed
            if earlier and missing:  # the original model's input of this layer
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
                if earlier is None:
                    h.add_batch(feed[tensor] if tensor in feed else computed[tensor])
                else:
                    h.add_pair(feed[tensor] if tensor in feed else original[tensor],
                               feed[tensor] if tensor in feed else computed[tensor])
        if earlier is None:
            self._cache[key] = h
        elif kept is not None:  # sequential curves ask for the same layer many times
            self._original_inputs[held_out] = (name, kept)
        return h
