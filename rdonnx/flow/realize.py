"""Realizing a candidate: each weight pruned to its kept count (N:M patterns, reconstruction
with the layer-input Hessians), quantized (the configured quantizer, GPTQ error feedback when
reconstructed) and measured against the replayed reference outputs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from rdonnx.algo import grids, obs
from rdonnx.algo.kmeans import kmeans_quantize
from rdonnx.algo.layout import output_shift
from rdonnx.algo.quantize import Quantized, choose_bits
from rdonnx.errors import UsageError
from rdonnx.flow.calibration import Calibration, like_vector
from rdonnx.flow.config import Coding, Measurement, Pruning
from rdonnx.flow.hessians import Hessians
from rdonnx.flow.target import Realized
from rdonnx.graph.weights import Weight
from rdonnx.runtime.confidence import lower_at
from rdonnx.runtime.distortion import Distortion

QUANTIZED_CACHE_MB = 1024  # weights quantized without reconstruction, kept for later candidates
CLIP_SCALES = (1.0, 0.9, 0.8, 0.7)  # error-compensated quantization: spans tried
VECTOR_BITS = 16  # coded vectors (biases) and small tables get at least this width (`extra_bits`)
DAMPS = (0.01, 0.1, 1.0)  # dampening tried per layer (with --damp), chosen on held-out data


def extra_bits(array: np.ndarray, bits: int | None) -> int:
    """The width of a coded tensor that is not pruned (`Calibration.extra`): `bits` (8 when
    None), but at least `VECTOR_BITS` for a vector or a small table (`like_vector`): a bias
    adds its error to every output of its channel, nothing averages it (8-bit biases alone
    cost EfficientNet-Lite0 5.7 points of top-1 agreement on the zoo's test split)."""
    bits = 8 if bits is None else bits
    return max(bits, VECTOR_BITS) if like_vector(np.shape(array)) else bits


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
class QuantizedCache:
    """Masked and quantized weights by (weight, kept count, bits, quantizer), least recently
    used first out past `limit` bytes: the candidates of a search mostly repeat each weight's
    choice, and quantizing (the clip search) costs more than measuring (OCR: 3 s of 3.5)."""

    limit: int = QUANTIZED_CACHE_MB << 20
    entries: OrderedDict = field(default_factory=OrderedDict)
    size: int = 0

    def get(self, key: tuple, make: Callable[[], tuple[np.ndarray, Quantized | None]]
            ) -> tuple[np.ndarray, Quantized | None]:
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
            return found
        found = make()
        arrays = [found[0]] + ([found[1].q] if found[1] is not None else [])
        for array in arrays:
            array.flags.writeable = False  # shared by every candidate that repeats the choice
        nbytes = sum(a.nbytes for a in arrays)
        if nbytes <= self.limit:
            self.entries[key] = found
            self.size += nbytes
            while self.size > self.limit:
                _, (values, q) = self.entries.popitem(last=False)
                self.size -= values.nbytes + (q.q.nbytes if q is not None else 0)
        return found


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
    # cache: (weight, kept count) -> reconstructed weight, its dampening (None: dropped), note
    reconstructed: dict[tuple[str, int], tuple[np.ndarray, float | None, str | None]] = \
        field(default_factory=dict)
    # (weight, kept count): how it was reconstructed, and why an update was dropped
    reconstruction: dict[tuple[str, int], str] = field(default_factory=dict)
    quantized: QuantizedCache = field(default_factory=QuantizedCache)
    terms: str | None = None  # a metric whose per-sample sums measurements keep (its bound)
    confidence: float = 0.0  # reconstruction is kept when it measures lower at this confidence

    def with_coding(self, coding: Coding) -> Realizer:
        """The same realizer coding values with `coding` (caches and notices shared)."""
        return replace(self, coding=coding)

    def on(self, cal: Calibration) -> Realizer:
        """The same realizer on a calibration a method changed (its reconstructions are kept
        while the rankings are the same)."""
        same = cal.rankings is self.cal.rankings and cal.scores is self.cal.scores
        return replace(self, cal=cal, reconstructed=self.reconstructed if same else {},
                       quantized=self.quantized if same else QuantizedCache())

    def distortion(self, values: Mapping[str, np.ndarray], only: str | None = None
                   ) -> Distortion:
        """The distortion on the data bounds are checked on (`Calibration.checked`)."""
        return self.cal.distortion(values, self.measure.channel_axis, only, self.terms)

    def reconstructs(self, name: str) -> bool:
        """Whether this weight is reconstructed: not when its Hessians would need more than
        --hessian-mb (then its mask alone, with a notice)."""
        if not (self.prune.reconstructs and self.cal.supports(name)):
            return False
        need = obs.hessian_bytes(self.cal.inputs[name], self.cal.originals[name].shape)
        if need <= self.prune.hessian_mb << 20:
            return True
        notice = (f"{name} is not reconstructed: its layer-input Hessians need "
                  f"{need / 2**30:.1f} GiB, over --hessian-mb {self.prune.hessian_mb}; its "
                  "mask alone")
        if notice not in self.notices:
            self.notices.append(notice)
        return False

    def quantize(self, name: str, array: np.ndarray, bits: int,
                 rows: np.ndarray | None = None) -> Quantized:
        """`array` quantized with the configured quantizer: a uniform grid (one step per
        output channel where that pays, clipped by measured error, RD-optimised rounding when
        configured), or a k-means codebook; both weighted by the layer-input moments where
        they are seen. `rows`: `array` holds only these indices along the weight's output
        axis (a sample, `allocate.joint.sample_rows`)."""
        importance = self.cal.importance.get(name)
        if rows is not None and importance is not None:
            axis = self.cal.axes[name]
            if importance.shape[axis] > 1:
                importance = np.take(importance, rows, axis)
        if self.coding.quantizer == "kmeans":
            return kmeans_quantize(array, bits, importance)
        unread, coarse = self.cal.unread.get(name), None
        if unread is not None:  # rows no fit sample reads (a lookup table's), or classes no
            # fit frame brings near the top (a classifier's): coded coarser
            coarse = unread.unread if rows is None else unread.unread[rows]
            grid, q = grids.fit_split(array, bits, self.cal.axes.get(name) or 0, coarse,
                                      unread.bits(bits), importance)
        else:
            grid = grids.choose(array, bits, self.cal.axes.get(name), importance)
            q = grids.round_to(array, grid, bits)
        if self.coding.rdoq:
            q = grids.rdoq(array, q, grid, bits, importance)
        steps = grid.steps
        return Quantized(q, float(steps[0]) if grid.axis is None else steps, axis=grid.axis,
                         classes=coarse)

    def corrected_biases(self, before: Mapping[str, np.ndarray],
                         after: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Bias correction: the bias of each layer whose weight went from `before` to `after`
        (quantization), less the shift of the layer's output mean that the change causes on
        the calibration data (`output_shift`, E[x] measured in the reference pass). Weights
        that are reconstructed (their update already aims at the original output), without a
        bias or without measured means get none."""
        if not self.coding.bias_correction:
            return {}
        cal, out = self.cal, {}
        for name, value in after.items():
            bias = cal.biases.get(name)
            if bias is None or name not in cal.means or name not in before or \
                    self.reconstructs(name):
                continue
            delta = value.astype(np.float64) - np.asarray(before[name], np.float64)
            shift = output_shift(delta, cal.means[name], cal.inputs[name].row_axis)
            original = cal.bias_values[bias]
            out[bias] = (original.astype(np.float64) - shift.reshape(original.shape)).astype(
                original.dtype)
        return out

    def compress_weight(self, w: Weight, keep: int, bits: int | None = None,
                        earlier: Mapping[str, np.ndarray] | None = None
                        ) -> tuple[np.ndarray, Quantized | None]:
        """One weight pruned to `keep` entries (reconstructed when configured), quantized to
        `bits` when given (with error feedback when reconstructed). `earlier`: the weights
        before it already compressed (sequential mode)."""
        cal = self.cal
        original = cal.originals[w.name]
        n_m = self.n_m
        if not self.reconstructs(w.name):
            return self._plain(w, keep, bits)
        sequential = earlier is not None
        # outside the sequential pass every reconstructed layer asks for its original
        # Hessians: all of them come from one run per batch
        together = None if sequential else \
            (lambda: [v.name for v in cal.weights if self.reconstructs(v.name)])
        hessian = self.hessians.hessian(w.name, earlier, together=together)
        options: dict = {}
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
        found = None if sequential else self.reconstructed.get(key)
        held = self.hessians.hessian(w.name, earlier, held_out=True, together=together) \
            if cal.check is not None and (found is None or bits is not None) else None
        if found is None:
            found = self._reconstruct(w.name, hessian, held, options)
            if not sequential:
                self.reconstructed[key] = found
        exact, damp, note = found
        if note is not None:
            self.reconstruction[key] = note

        def unchanged() -> tuple[np.ndarray, Quantized | None]:
            """The same mask without an update, plainly rounded (cached unless OBS chose
            the mask)."""
            if "keep" in options:  # the ranking's (or --pattern's) mask, as `_plain`'s
                return self._plain(w, keep, bits)
            return self._masked(w.name, exact != 0, bits, n_m is not None)

        if damp is None:  # the update does not generalise: the mask alone
            return unchanged()
        if bits is None:
            return exact, None
        # candidate grids (`gptq_grids`) fitted to the reconstructed survivors (updates can
        # outgrow the original range), on the axis plain rounding picks (both axes: 9
        # reconstructions a weight instead of 5, for files 0.6-1.7% smaller on g2p and the OCR
        # model at a given width); the grid with the least layer error after error feedback
        # wins, each row's error relative to its own output energy (as `grids.choose` counts
        # it), the rows' steps charged at the high-rate slope (one bit a survivor buys 4x less
        # error)
        entry, levels = cal.inputs[w.name], 2 ** (bits - 1) - 1
        best, factors = None, {}  # the Hessian's inverse factors, shared by the candidates
        energies = obs.row_energies(original, entry, hessian)
        for grid in self.gptq_grids(w.name, exact, bits):
            step = grid.broadcast(exact.ndim)
            new = obs.reconstruct_weight(original, entry, hessian, step=step, levels=levels,
                                         percdamp=damp, factors=factors, **options)
            q_new = np.rint(new.astype(np.float32) / step).astype(np.int32)
            rate = grids.steps_bits(grid) / max(int(np.count_nonzero(q_new)), 1)
            error = obs.relative_error(original, new, entry, hessian, energies) * 4.0 ** rate
            if best is None or error < best[0]:
                best = (error, grid, q_new)
        _, grid, q_new = best
        q = Quantized(q_new, float(grid.steps[0]) if grid.axis is None else grid.steps,
                      axis=grid.axis)
        if held is not None:  # error feedback kept only where it generalises
            plain = unchanged()
            mine = obs.weight_error(original, q.values(original.dtype), entry, held)
            alone = obs.weight_error(original, plain[0], entry, held)
            if not mine < alone:
                self.reconstruction[key] = (
                    f"{note + '; ' if note else ''}GPTQ error feedback dropped at {bits} "
                    f"bits: held-out layer error {mine:.3g}, plain rounding {alone:.3g}")
                return plain
        return q.values(original.dtype), q

    def _plain(self, w: Weight, keep: int, bits: int | None
               ) -> tuple[np.ndarray, Quantized | None]:
        """The weight's ranking mask of `keep` entries (or --pattern's) without an update,
        quantized to `bits` when given (kept in `quantized` for later candidates)."""
        cal, n_m = self.cal, self.n_m
        patterned = n_m is not None and cal.supports(w.name)

        def masked() -> tuple[np.ndarray, Quantized | None]:
            mask = pattern_mask(cal, w.name, n_m) if patterned else \
                cal.rankings[w.name].mask(keep)
            return self._masked(w.name, mask, bits, patterned)

        if bits is None:
            return masked()
        coding = self.coding
        return self.quantized.get((w.name, keep, bits, n_m if patterned else None,
                                   coding.quantizer, coding.rdoq), masked)

    def _masked(self, name: str, mask: np.ndarray, bits: int | None,
                patterned: bool) -> tuple[np.ndarray, Quantized | None]:
        """The weight with `mask` applied (no update), quantized to `bits` when given."""
        original = self.cal.originals[name]
        pruned = np.where(mask, original, np.zeros((), original.dtype)).astype(
            original.dtype, copy=False)
        if bits is None:
            return pruned, None
        q = self.quantize(name, pruned, bits)
        # a survivor never rounds to 0 (k-means never maps one to 0): N:M is kept
        if patterned and q.codebook is None:
            lost = mask & (q.q == 0) & (pruned != 0)
            q.q[lost] = np.sign(pruned[lost]).astype(np.int32)
        return q.values(original.dtype), q

    def _reconstruct(self, name: str, hessian: obs.Hessian, held: obs.Hessian | None,
                     options: dict) -> tuple[np.ndarray, float | None, str | None]:
        """The reconstructed weight, its dampening and a note. Without held-out data: --damp.
        With it: the dampening (--damp and `DAMPS`) whose update has the least layer error on
        the held-out samples, or None (the mask alone) when no update beats the mask there."""
        original, entry = self.cal.originals[name], self.cal.inputs[name]
        if held is None:
            return obs.reconstruct_weight(original, entry, hessian, percdamp=self.prune.damp,
                                          **options), self.prune.damp, None
        best = None
        for damp in sorted({self.prune.damp, *DAMPS}):
            new = obs.reconstruct_weight(original, entry, hessian, percdamp=damp, **options)
            error = obs.weight_error(original, new, entry, held)
            if best is None or error < best[0]:
                best = (error, damp, new)
        error, damp, new = best
        mask = options.get("keep", new != 0)
        plain = np.where(mask, original, np.zeros((), original.dtype)).astype(original.dtype)
        alone = obs.weight_error(original, plain, entry, held)
        if alone == 0:  # nothing pruned that the held-out inputs see: nothing to choose
            return new, damp, None
        if not error < alone:
            return new, None, (f"update dropped: held-out layer error {error:.3g} (best "
                               f"dampening {damp:g}), mask alone {alone:.3g}")
        return new, damp, (f"dampening {damp:g}: held-out layer error {error:.3g}, mask alone "
                           f"{alone:.3g}")

    def gptq_grids(self, name: str, exact: np.ndarray, bits: int) -> list[grids.Grid]:
        """The grids error-compensated quantization tries: plain rounding's grid
        (`grids.choose`, which also picks the axis: per output row or one step), and the span
        of each row (on the log scale of steps, a few coded bits a row) or of the tensor, on
        that axis, times each of `CLIP_SCALES` (GPTQ's scale search)."""
        levels = np.float32(2 ** (bits - 1) - 1)
        row_axis = self.cal.inputs[name].row_axis
        chosen = grids.choose(exact, bits, row_axis, self.cal.importance.get(name))
        rows = np.moveaxis(np.abs(exact.astype(np.float32)), row_axis, 0)
        span = rows.reshape(rows.shape[0], -1).max(axis=1) if rows.size else \
            np.zeros(rows.shape[0], np.float32)
        if chosen.axis is None:
            largest = np.float32(span.max()) if span.size else np.float32(0)
            tensor = largest / levels if largest > 0 else np.float32(1.0)
            return [chosen] + [grids.Grid(np.array([tensor * np.float32(c)], np.float32), None)
                               for c in CLIP_SCALES]
        return [chosen] + [
            grids.Grid(grids.step_of(grids.index_at_least(
                np.where(span > 0, span * np.float32(c) / levels, 1.0).astype(np.float32))),
                row_axis) for c in CLIP_SCALES]

    def compress_all(self, keep: Mapping[str, int],
                     widths: Mapping[str, int] | Callable[[str], int | None] | None = None,
                     ) -> tuple[dict[str, np.ndarray], dict[str, Quantized]]:
        """Every weight compressed, in graph order (later layers see earlier ones compressed
        in sequential mode)."""
        values: dict[str, np.ndarray] = {}
        quantized: dict[str, Quantized] = {}
        for w in self.cal.weights:
            bits = widths(w.name) if callable(widths) else (widths or {}).get(w.name)
            earlier = values if self.prune.sequential and self.reconstructs(w.name) else None
            values[w.name], q = self.compress_weight(w, keep[w.name], bits, earlier)
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
            out = self._aim_next(w, quantized)
            out.update(self.corrected_biases({w.name: original}, {w.name: quantized}))
            return out

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
        bits within the value budget) and measure the result. With reconstruction and held-out
        data, the result with the updates (and GPTQ's error feedback) is kept only when it
        measures lower on the held-out part at `confidence` (paired bootstrap over the held-out
        samples) than the masks alone, plainly rounded at the same widths; else the latter.
        Layer by layer the updates lower held-out layer error, yet together they can raise the
        output's (the zoo's detector at rate 0.3: held-out nmse 0.491 against 0.475, test 0.453
        against 0.436), and a held-out gain within the noise of a few samples need not hold on
        new data. Not for --criterion obs (its masks come from the reconstruction) or
        patterns."""
        prune, metric = self.prune, self.measure.metric
        if not prune.reconstructs or prune.criterion == "obs" or self.cal.check is None or \
                self.n_m is not None:
            return self._quantize_and_measure(rate, keep, widths, self.compress_all(keep)[0])
        mine = replace(self, terms=metric)._quantize_and_measure(
            rate, keep, widths, self.compress_all(keep)[0])
        plain = replace(self, prune=replace(prune, reconstruct=False, sequential=False),
                        terms=metric)
        if not mine.quantized:  # exact values (or none within the value budget)
            plain = plain.with_coding(replace(self.coding, values="exact"))
        theirs = plain._quantize_and_measure(rate, keep, mine.widths or None,
                                             plain.compress_all(keep)[0])
        if mine.values.keys() == theirs.values.keys() and \
                all(np.array_equal(v, theirs.values[n]) for n, v in mine.values.items()):
            return mine  # nothing updated (every weight whole and exact): nothing to choose
        updated, alone = mine.distortion, theirs.distortion
        if updated.terms is None or alone.terms is None:
            better = updated.value(metric) < alone.value(metric)
        else:
            better = lower_at(updated.terms, alone.terms, self.confidence)
        if better:
            return mine
        if not any(n.startswith("reconstruction dropped") for n in self.notices):
            self.notices.append(
                f"reconstruction dropped where it does not measure lower than the masks alone on "
                f"the held-out data ({updated.samples} samples, confidence {self.confidence:g}; "
                f"first at rate {rate:.4g}: {metric} {updated.value(metric):.4g} with it, "
                f"{alone.value(metric):.4g} without)")
        return theirs

    def _quantize_and_measure(self, rate: float, keep: dict[str, int],
                              widths: Mapping[str, int] | None, pruned: dict[str, np.ndarray]
                              ) -> Realized:
        """`realize` past the pruning."""
        coding, metric = self.coding, self.measure.metric
        if not coding.quantized:
            return Realized(rate, keep, pruned, pruned, {}, {}, self.distortion(pruned))
        extra = {} if coding.lossless_unpruned else self.cal.extra

        def make(bits_for) -> tuple[dict, dict]:
            values, quantized = self.compress_all(keep, bits_for)
            biases = self.corrected_biases(pruned, values)
            for name, array in extra.items():
                array = biases.pop(name, array)  # a corrected bias is quantized as corrected
                quantized[name] = self.quantize(name, array, extra_bits(array, bits_for(name)))
                values[name] = quantized[name].values(array.dtype)
            values.update(biases)
            return values, quantized

        if widths is not None:  # extras (not pruned, no curves) get 8 bits
            values, quantized = make(lambda n: widths.get(n, 8))
            return Realized(rate, keep, pruned, values, quantized,
                            {n: widths.get(n, 8) if n not in extra else
                             extra_bits(extra[n], widths.get(n, 8)) for n in quantized},
                            self.distortion(values))
        # the value width is fitted like the rest: on the fit part (the held-out part, smaller,
        # checks the chosen candidate; --value-budget is a share of a noisy figure there)
        axis = self.measure.channel_axis
        held_out = self.cal.check is not None
        limit = None
        if coding.value_bits is None:
            base = self.cal.fit_distortion(pruned, axis, metric).value(metric) if held_out \
                else self.distortion(pruned, metric).value(metric)
            limit = base * (1 + coding.value_budget) + coding.value_budget * 1e-2

        def measure(values):
            d = self.cal.fit_distortion(values, axis, metric) if held_out else \
                self.distortion(values)
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
                        {n: choice.bits if n not in extra else
                         extra_bits(extra[n], choice.bits) for n in choice.quantized},
                        self.distortion(choice.values) if held_out else choice.distortion)
