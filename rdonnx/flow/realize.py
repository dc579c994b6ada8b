"""Realizing a candidate: each weight pruned to its kept count (N:M patterns, reconstruction
with the layer-input Hessians), quantized (the configured quantizer, GPTQ error feedback when
reconstructed) and measured against the replayed reference outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from rdonnx.algo import grids, obs
from rdonnx.algo.kmeans import kmeans_quantize
from rdonnx.algo.quantize import Quantized, choose_bits
from rdonnx.errors import UsageError
from rdonnx.flow.calibration import Calibration
from rdonnx.flow.config import Coding, Measurement, Pruning
from rdonnx.flow.hessians import Hessians
from rdonnx.flow.target import Realized
from rdonnx.graph.weights import Weight
from rdonnx.runtime.distortion import Distortion

CLIP_SCALES = (1.0, 0.9, 0.8, 0.7)  # error-compensated quantization: exact spans tried


def pattern_mask(cal: Calibration, name: str, n_m: tuple[int, int]) -> np.ndarray:
    """N of every M consecutive inputs kept per output row, by the in-layer scores."""
    entry = cal.inputs[name]
    n, m = n_m
    mats = obs.to_matrices(cal.scores[name].values, entry)
    masks = []
    for mat in mats:
        rows, cols = mat.shape
        full = cols - cols % m
        mask = np.ones(mat.shape, dtype=bool)
        groups = mat[:, :full].reshape(rows, -1, m)
        order = np.argsort(-groups, axis=2, kind="stable")
        keep = np.zeros(groups.shape, dtype=bool)
        np.put_along_axis(keep, order[:, :, :n], True, axis=2)
        mask[:, :full] = keep.reshape(rows, full)
        if cols % m:  # a last partial group keeps min(N, its width) entries
            tail = mat[:, full:]
            tail_keep = np.zeros(tail.shape, dtype=bool)
            np.put_along_axis(tail_keep, np.argsort(-tail, axis=1, kind="stable")
                              [:, :min(n, tail.shape[1])], True, axis=1)
            mask[:, full:] = tail_keep
        masks.append(mask)
    return obs.from_matrices(masks, entry, cal.originals[name].shape).astype(bool)


@dataclass
class Realizer:
    """Realizes candidates of one run: its measured state, its Hessians, and the options it
    prunes, codes and measures with. `notices` collects what realizing had to decide (shared
    by the copies `with_coding` and `on` make, as are the caches)."""

    cal: Calibration
    hessians: Hessians
    prune: Pruning
    coding: Coding
    measure: Measurement
    n_m: tuple[int, int] | None = None  # the --pattern target
    notices: list[str] = field(default_factory=list)
    reconstructed: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # cache

    def with_coding(self, coding: Coding) -> Realizer:
        """The same realizer coding values with `coding` (caches and notices shared)."""
        return replace(self, coding=coding)

    def on(self, cal: Calibration) -> Realizer:
        """The same realizer on a calibration a method changed (its reconstructions are kept
        while the rankings are the same)."""
        same = cal.rankings is self.cal.rankings and cal.scores is self.cal.scores
        return replace(self, cal=cal, reconstructed=self.reconstructed if same else {})

    def distortion(self, values: Mapping[str, np.ndarray], only: str | None = None
                   ) -> Distortion:
        return self.cal.distortion(values, self.measure.channel_axis, only)

    def reconstructs(self, name: str) -> bool:
        """Whether this weight is reconstructed."""
        return self.prune.reconstructs and self.cal.supports(name)

    def quantize(self, name: str, array: np.ndarray, bits: int) -> Quantized:
        """`array` quantized with the configured quantizer: a uniform grid (one step per
        output channel where that pays, clipped by measured error, RD-optimised rounding when
        configured), or a k-means codebook; both weighted by the layer-input moments where
        they are seen."""
        importance = self.cal.importance.get(name)
        if self.coding.quantizer == "kmeans":
            return kmeans_quantize(array, bits, importance)
        grid = grids.choose(array, bits, self.cal.axes.get(name), importance)
        q = grids.round_to(array, grid, bits)
        if self.coding.rdoq:
            q = grids.rdoq(array, q, grid, bits, importance)
        steps = grid.steps
        return Quantized(q, float(steps[0]) if grid.axis is None else steps, axis=grid.axis)

    def compress_weight(self, w: Weight, keep: int, bits: int | None = None,
                        hessian: obs.Hessian | None = None) -> tuple[np.ndarray, Quantized | None]:
        """One weight pruned to `keep` entries (reconstructed when configured), quantized to
        `bits` when given (with error feedback when reconstructed)."""
        cal = self.cal
        original = cal.originals[w.name]
        n_m = self.n_m
        if not self.reconstructs(w.name):
            patterned = n_m is not None and cal.supports(w.name)
            mask = pattern_mask(cal, w.name, n_m) if patterned else cal.rankings[w.name].mask(keep)
            pruned = np.where(mask, original, np.zeros((), original.dtype)).astype(
                original.dtype, copy=False)
            if bits is None:
                return pruned, None
            q = self.quantize(w.name, pruned, bits)
            # a survivor never rounds to 0 (k-means never maps one to 0): N:M is kept
            if patterned and q.codebook is None:
                lost = mask & (q.q == 0) & (pruned != 0)
                q.q[lost] = np.sign(pruned[lost]).astype(np.int32)
            return q.values(original.dtype), q
        sequential = hessian is not None
        hessian = hessian or self.hessians.hessian(w.name)
        options: dict = {"percdamp": self.prune.damp}
        criterion = self.prune.criterion
        if criterion == "obs" and n_m is None:
            options["sparsity"] = 1.0 - keep / max(original.size, 1)
        elif n_m is not None and criterion == "obs":
            options["n_m"] = n_m
        else:
            options["keep"] = cal.rankings[w.name].mask(keep) if n_m is None else \
                pattern_mask(cal, w.name, n_m)
            if n_m is not None:
                options["n_m"] = n_m
        key = (w.name, keep)
        exact = None if sequential else self.reconstructed.get(key)
        if exact is None:
            exact = obs.reconstruct_weight(original, cal.inputs[w.name], hessian, **options)
            if not sequential:
                self.reconstructed[key] = exact
        if bits is None:
            return exact, None
        # candidate grids (`gptq_grids`) fitted to the reconstructed survivors (updates can
        # outgrow the original range); the grid with the least layer error after error feedback
        # wins, its per-row steps' coded bits charged at the high-rate slope (one bit per weight
        # buys 4x less error)
        entry, levels = cal.inputs[w.name], 2 ** (bits - 1) - 1
        best = None
        for grid in self.gptq_grids(w.name, exact, bits):
            step = grid.broadcast(exact.ndim)
            new = obs.reconstruct_weight(original, entry, hessian, step=step, levels=levels,
                                         **options)
            side = grids.steps_bits(grid) / max(original.size, 1)
            error = obs.weight_error(original, new, entry, hessian) * 4.0 ** side
            if best is None or error < best[0]:
                best = (error, grid, step, new)
        _, grid, step, new = best
        q = Quantized(np.rint(new.astype(np.float32) / step).astype(np.int32),
                      float(grid.steps[0]) if grid.axis is None else grid.steps, axis=grid.axis)
        return q.values(original.dtype), q

    def gptq_grids(self, name: str, exact: np.ndarray, bits: int) -> list[grids.Grid]:
        """The grids error-compensated quantization tries: the exact span of each output row
        and of the tensor times each of `CLIP_SCALES` (GPTQ's scale search). (The log-scale
        per-row grids of plain rounding cost fewer side bits, so the layer-error objective
        took them more often and their finer levels cost more bits than they saved: the
        README's main job grew from 7,995 to 8,531-8,610 B and lost 0.55 points of test
        accuracy; an objective with the levels' rate is needed first.)"""
        levels = np.float32(2 ** (bits - 1) - 1)
        row_axis = self.cal.inputs[name].row_axis
        rows = np.moveaxis(np.abs(exact.astype(np.float32)), row_axis, 0)
        span = rows.reshape(rows.shape[0], -1).max(axis=1) if rows.size else \
            np.zeros(rows.shape[0], np.float32)
        per_row = np.where(span > 0, span / levels, 1.0).astype(np.float32)
        largest = float(span.max()) if span.size else 0.0
        tensor = np.float32(largest / levels) if largest > 0 else np.float32(1.0)
        return [grids.Grid((per_row * np.float32(c)).astype(np.float32), row_axis)
                for c in CLIP_SCALES] + \
            [grids.Grid(np.array([tensor * np.float32(c)], np.float32), None)
             for c in CLIP_SCALES]

    def compress_all(self, keep: Mapping[str, int],
                     widths: Mapping[str, int] | Callable[[str], int | None] | None = None,
                     ) -> tuple[dict[str, np.ndarray], dict[str, Quantized]]:
        """Every weight compressed, in graph order (later layers see earlier ones compressed
        in sequential mode)."""
        values: dict[str, np.ndarray] = {}
        quantized: dict[str, Quantized] = {}
        for w in self.cal.weights:
            bits = widths(w.name) if callable(widths) else (widths or {}).get(w.name)
            hessian = None
            if self.prune.sequential and self.reconstructs(w.name):
                hessian = self.hessians.hessian(w.name, values)
            values[w.name], q = self.compress_weight(w, keep[w.name], bits, hessian)
            if q is not None:
                quantized[w.name] = q
        return values, quantized

    def variant(self) -> Callable[[Weight, int], dict[str, np.ndarray]]:
        """Pruning of one weight to `keep` entries, for R-D curves (reconstructed when
        configured; see `_aim_next`)."""
        return lambda w, keep: self._aim_next(w, self.compress_weight(w, keep)[0])

    def value_variant(self) -> Callable[[Weight, int], dict[str, np.ndarray]]:
        """Quantization of one whole weight to `bits`, for the value curves (see
        `_aim_next`)."""
        def weights(w: Weight, bits: int) -> dict[str, np.ndarray]:
            original = self.cal.originals[w.name]
            quantized = self.quantize(w.name, original, bits).values(original.dtype)
            return self._aim_next(w, quantized)

        return weights

    def _aim_next(self, w: Weight, changed: np.ndarray) -> dict[str, np.ndarray]:
        """{w: changed}; in sequential mode also the next weight in graph order, aimed at the
        original output (dense), as the sequential pass will do: a curve then measures what
        that layer cannot undo."""
        out = {w.name: changed}
        if not self.prune.sequential:
            return out
        weights = self.cal.weights
        at = next(i for i, v in enumerate(weights) if v.name == w.name) + 1
        if at < len(weights) and self.reconstructs(weights[at].name):
            name = weights[at].name
            out[name] = obs.reconstruct_weight(self.cal.originals[name], self.cal.inputs[name],
                                               self.hessians.hessian(name, out),
                                               percdamp=self.prune.damp)
        return out

    def realize(self, rate: float, keep: dict[str, int],
                widths: Mapping[str, int] | None = None) -> Realized:
        """Prune to `keep`, quantize (when configured: at `widths` per weight, or the fewest
        bits within the value budget) and measure the result."""
        coding, metric = self.coding, self.measure.metric
        pruned, _ = self.compress_all(keep)
        if not coding.quantized:
            return Realized(rate, keep, pruned, pruned, {}, {}, self.distortion(pruned))
        extra = {} if coding.lossless_unpruned else self.cal.extra

        def make(bits_for) -> tuple[dict, dict]:
            values, quantized = self.compress_all(keep, bits_for)
            for name, array in extra.items():
                quantized[name] = self.quantize(name, array, bits_for(name) or 8)
                values[name] = quantized[name].values(array.dtype)
            return values, quantized

        if widths is not None:  # extras (not pruned, no curves) get 8 bits
            values, quantized = make(lambda n: widths.get(n, 8))
            return Realized(rate, keep, pruned, values, quantized,
                            {n: widths.get(n, 8) for n in quantized}, self.distortion(values))
        limit = None
        if coding.value_bits is None:
            base = self.distortion(pruned, metric).value(metric)
            limit = base * (1 + coding.value_budget) + coding.value_budget * 1e-2

        def measure(values):
            d = self.distortion(values)
            return d.value(metric), d

        try:
            choice = choose_bits(lambda b: make(lambda _: b), measure, limit, coding.value_bits)
        except ValueError as exc:
            raise UsageError(f"cannot quantize: {exc}; pass --values exact") from None
        if choice is None:  # no width up to 16 bits stays within the value budget
            notice = "values kept exact where 16 bits would exceed the --value-budget"
            if notice not in self.notices:
                self.notices.append(notice)
            return Realized(rate, keep, pruned, pruned, {}, {}, self.distortion(pruned))
        return Realized(rate, keep, pruned, choice.values, choice.quantized,
                        {n: choice.bits for n in choice.quantized}, choice.distortion)
