"""The calibrated state of one compress run: the model, its weights, one ONNX Runtime session,
the replayed calibration batches, in-layer rankings, and (for reconstruction) layer Hessians.

Every candidate (a kept count per weight, optionally value widths) is realized here: pruned,
reconstructed, quantized and measured against the replayed reference outputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from rdonnx.algo import grids, obs
from rdonnx.algo.kmeans import kmeans_quantize
from rdonnx.algo.layout import LayerInput
from rdonnx.algo.prune import Ranking, Scores
from rdonnx.algo.quantize import Quantized, choose_bits
from rdonnx.artifact.io import load_any
from rdonnx.errors import UsageError
from rdonnx.flow.config import CompressConfig
from rdonnx.flow.curves import (
    Curves,
    Fingerprint,
    check_grid,
    digest,
    exposed_tensors,
    measure_curves,
    model_digest,
    record,
    scores_for,
)
from rdonnx.flow.target import Realized, check_supported
from rdonnx.graph.layers import consumer_outputs, layer_inputs, output_axes
from rdonnx.graph.model import Model, simplify
from rdonnx.graph.weights import Weight, find_codable, find_weights, read_weights
from rdonnx.report.records import DataReport
from rdonnx.runtime.data import (
    Batches,
    DataOptions,
    input_specs,
    make_batches,
    open_npz,
    split_holdout,
)
from rdonnx.runtime.diagnose import describe_outputs
from rdonnx.runtime.distortion import Distortion, is_class_scores
from rdonnx.runtime.measure import Replay
from rdonnx.runtime.session import Runner

ModelSource = str | os.PathLike | onnx.ModelProto | bytes
CLIP_SCALES = (1.0, 0.9, 0.8, 0.7)  # error-compensated quantization: exact spans tried
ORIGINAL_INPUTS_MB = 256  # sequential mode: the last layer's original inputs kept up to this
DataSource = str | os.PathLike | Mapping[str, np.ndarray] | None
DAMPS = (0.01, 0.1, 1.0)  # dampening tried per layer (with --damp), chosen on held-out data


@dataclass
class Calibration:
    """Everything measured once on the calibration data, reused by every probe."""

    model: Model
    weights: list[Weight]  # in graph order
    originals: dict[str, np.ndarray]
    runner: Runner
    replay: Replay
    scores: dict[str, Scores]
    rankings: dict[str, Ranking]
    fingerprint: Fingerprint
    data_name: str
    data: DataReport | None = None
    check: Replay | None = None  # the held-out reference outputs (None: no holdout)
    inputs: dict[str, LayerInput] = field(default_factory=dict)  # where layer inputs are seen
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # coded, not pruned
    notices: list[str] = field(default_factory=list)
    importance: dict[str, np.ndarray] = field(default_factory=dict)  # E[x^2] vs each weight
    axes: dict[str, int | None] = field(default_factory=dict)  # output axis: a step each
    # (weight, kept count): how it was reconstructed, and why an update was dropped
    reconstruction: dict[tuple[str, int], str] = field(default_factory=dict)
    _hessians: dict[tuple[str, bool], obs.Hessian] = field(default_factory=dict)
    _reconstructed: dict[tuple[str, int], tuple[np.ndarray, float | None, str | None]] = \
        field(default_factory=dict)
    _original_inputs: dict[bool, tuple[str, list[list[np.ndarray]]]] = \
        field(default_factory=dict)  # fit / held-out: the last layer's original inputs per
    # batch (sequential mode), while at most ORIGINAL_INPUTS_MB

    def run_with(self, values: Mapping[str, np.ndarray]) -> Callable:
        prepared = {n: self.runner.weight_value(n, a) for n, a in values.items()}
        return lambda feed: self.runner.run(feed, prepared)

    def distortion(self, values: Mapping[str, np.ndarray], config: CompressConfig,
                   only: str | None = None) -> Distortion:
        """Distortion on the data bounds are checked on: the held-out part when there is one
        (with per-sample terms of the metric, for its confidence bound)."""
        replay = self.check if self.check is not None else self.replay
        terms = config.metric if config.verify.confidence > 0 and config.target.kind == \
            "distortion" else None
        return replay.distortion(self.run_with(values), config.channel_axis, only, terms)

    def fit_distortion(self, values: Mapping[str, np.ndarray],
                       config: CompressConfig) -> Distortion:
        """Distortion on the fit part (the data the curves and reconstruction saw)."""
        return self.replay.distortion(self.run_with(values), config.channel_axis)

    def supports(self, name: str) -> bool:
        """Whether the weight's layer input is seen and its layout known (matrix views)."""
        entry = self.inputs.get(name)
        return entry is not None and obs.supports(entry, self.originals[name].shape)

    def reconstructs(self, name: str, config: CompressConfig) -> bool:
        """Whether this weight is reconstructed."""
        return config.reconstructs and self.supports(name)

    def hessian(self, name: str, earlier: Mapping[str, np.ndarray] | None = None,
                held_out: bool = False) -> obs.Hessian:
        """E[x x^T] of the weight's layer input: from the original model (cached), or with
        the `earlier` weights already compressed (sequential mode), paired with the original
        input so that reconstruction aims at the original output (`obs.Target`). On the fit
        part of the data, or with `held_out` on the held-out part."""
        earlier = earlier or None  # nothing compressed yet: the original inputs
        key = (name, held_out)
        if earlier is None and key in self._hessians:
            return self._hessians[key]
        entry = self.inputs[name]
        h = obs.Hessian(entry)
        prepared = {n: self.runner.weight_value(n, a) for n, a in (earlier or {}).items()}
        last = self._original_inputs.get(held_out)
        held = last[1] if earlier and last is not None and last[0] == name else None
        kept: list[list[np.ndarray]] | None = [] if earlier and held is None else None
        size = 0
        for i, (feed, _) in enumerate(self.check if held_out else self.replay):
            missing = [t for t in entry.tensors if t not in feed]
            computed = dict(zip(missing, self.runner.run(feed, prepared, outputs=missing))) \
                if missing else {}
            original = computed
            if earlier and missing:  # the original model's input of this layer
                arrays = held[i] if held is not None else \
                    self.runner.run(feed, {}, outputs=missing)
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
            self._hessians[key] = h
        elif kept is not None:  # sequential curves ask for the same layer many times
            self._original_inputs[held_out] = (name, kept)
        return h

    def quantize(self, name: str, array: np.ndarray, bits: int,
                 config: CompressConfig) -> Quantized:
        """`array` quantized with the configured quantizer: a uniform grid (one step per
        output channel where that pays, clipped by measured error, RD-optimised rounding when
        configured), or a k-means codebook; both weighted by the layer-input moments where
        they are seen."""
        importance = self.importance.get(name)
        if config.quantizer == "kmeans":
            return kmeans_quantize(array, bits, importance)
        grid = grids.choose(array, bits, self.axes.get(name), importance)
        q = grids.round_to(array, grid, bits)
        if config.rdoq:
            q = grids.rdoq(array, q, grid, bits, importance)
        steps = grid.steps
        return Quantized(q, float(steps[0]) if grid.axis is None else steps, axis=grid.axis)

    def compress_weight(self, w: Weight, keep: int, config: CompressConfig,
                        bits: int | None = None,
                        earlier: Mapping[str, np.ndarray] | None = None
                        ) -> tuple[np.ndarray, Quantized | None]:
        """One weight pruned to `keep` entries (reconstructed when configured), quantized to
        `bits` when given (with error feedback when reconstructed). `earlier`: the weights
        before it already compressed (sequential mode)."""
        original = self.originals[w.name]
        if not self.reconstructs(w.name, config):
            patterned = config.n_m is not None and self.supports(w.name)
            mask = self.pattern_mask(w.name, config.n_m) if patterned else \
                self.rankings[w.name].mask(keep)
            return self._masked(w.name, mask, bits, config, patterned)
        sequential = earlier is not None
        hessian = self.hessian(w.name, earlier)
        options: dict = {}
        n_m = config.n_m
        if config.criterion == "obs" and n_m is None:
            options["sparsity"] = 1.0 - keep / max(original.size, 1)
        elif n_m is not None and config.criterion == "obs":
            options["n_m"] = n_m
        else:
            options["keep"] = self.rankings[w.name].mask(keep) if n_m is None else \
                self.pattern_mask(w.name, n_m)
            if n_m is not None:
                options["n_m"] = n_m
        key = (w.name, keep)
        found = None if sequential else self._reconstructed.get(key)
        held = self.hessian(w.name, earlier, held_out=True) if self.check is not None and \
            (found is None or bits is not None) else None
        if found is None:
            found = self._reconstruct(w.name, hessian, held, options, config)
            if not sequential:
                self._reconstructed[key] = found
        exact, damp, note = found
        if note is not None:
            self.reconstruction[key] = note
        if damp is None:  # the update does not generalise: the mask alone
            return self._masked(w.name, options.get("keep", exact != 0), bits, config,
                                n_m is not None)
        if bits is None:
            return exact, None
        # candidate grids (`gptq_grids`) fitted to the reconstructed survivors (updates can
        # outgrow the original range); the grid with the least layer error after error feedback
        # wins, its per-row steps' coded bits charged at the high-rate slope (one bit per weight
        # buys 4x less error)
        entry, levels = self.inputs[w.name], 2 ** (bits - 1) - 1
        best = None
        for grid in self.gptq_grids(w.name, exact, bits):
            step = grid.broadcast(exact.ndim)
            new = obs.reconstruct_weight(original, entry, hessian, step=step, levels=levels,
                                         percdamp=damp, **options)
            side = grids.steps_bits(grid) / max(original.size, 1)
            error = obs.weight_error(original, new, entry, hessian) * 4.0 ** side
            if best is None or error < best[0]:
                best = (error, grid, step, new)
        _, grid, step, new = best
        q = Quantized(np.rint(new.astype(np.float32) / step).astype(np.int32),
                      float(grid.steps[0]) if grid.axis is None else grid.steps, axis=grid.axis)
        if held is not None:  # error feedback kept only where it generalises
            plain = self._masked(w.name, options.get("keep", exact != 0), bits, config,
                                 n_m is not None)
            mine = obs.weight_error(original, q.values(original.dtype), entry, held)
            alone = obs.weight_error(original, plain[0], entry, held)
            if not mine < alone:
                self.reconstruction[key] = (
                    f"{note + '; ' if note else ''}GPTQ error feedback dropped at {bits} "
                    f"bits: held-out layer error {mine:.3g}, plain rounding {alone:.3g}")
                return plain
        return q.values(original.dtype), q

    def _masked(self, name: str, mask: np.ndarray, bits: int | None, config: CompressConfig,
                patterned: bool) -> tuple[np.ndarray, Quantized | None]:
        """The weight with `mask` applied (no update), quantized to `bits` when given."""
        original = self.originals[name]
        pruned = np.where(mask, original, np.zeros((), original.dtype)).astype(
            original.dtype, copy=False)
        if bits is None:
            return pruned, None
        q = self.quantize(name, pruned, bits, config)
        # a survivor never rounds to 0 (k-means never maps one to 0): N:M is kept
        if patterned and q.codebook is None:
            lost = mask & (q.q == 0) & (pruned != 0)
            q.q[lost] = np.sign(pruned[lost]).astype(np.int32)
        return q.values(original.dtype), q

    def _reconstruct(self, name: str, hessian: obs.Hessian, held: obs.Hessian | None,
                     options: dict, config: CompressConfig
                     ) -> tuple[np.ndarray, float | None, str | None]:
        """The reconstructed weight, its dampening and a note. Without held-out data: --damp.
        With it: the dampening (--damp and `DAMPS`) whose update has the least layer error on
        the held-out samples, or None (the mask alone) when no update beats the mask there."""
        original, entry = self.originals[name], self.inputs[name]
        if held is None:
            return obs.reconstruct_weight(original, entry, hessian, percdamp=config.damp,
                                          **options), config.damp, None
        best = None
        for damp in sorted({config.damp, *DAMPS}):
            new = obs.reconstruct_weight(original, entry, hessian, percdamp=damp, **options)
            error = obs.weight_error(original, new, entry, held)
            if best is None or error < best[0]:
                best = (error, damp, new)
        error, damp, new = best
        mask = options.get("keep", new != 0)
        plain = np.where(mask, original, np.zeros((), original.dtype)).astype(original.dtype)
        alone = obs.weight_error(original, plain, entry, held)
        if not error < alone:
            return new, None, (f"update dropped: held-out layer error {error:.3g} (best "
                               f"dampening {damp:g}), mask alone {alone:.3g}")
        return new, damp, (f"dampening {damp:g}: held-out layer error {error:.3g}, mask alone "
                           f"{alone:.3g}")

    def gptq_grids(self, name: str, exact: np.ndarray, bits: int) -> list[grids.Grid]:
        """The grids error-compensated quantization tries: the exact span of each output row
        and of the tensor times each of `CLIP_SCALES` (GPTQ's scale search). (The log-scale
        per-row grids of plain rounding cost fewer side bits, so the layer-error objective
        took them more often and their finer levels cost more bits than they saved: the
        README's main job grew from 7,995 to 8,531-8,610 B and lost 0.55 points of test
        accuracy; an objective with the levels' rate is needed first.)"""
        levels = np.float32(2 ** (bits - 1) - 1)
        row_axis = self.inputs[name].row_axis
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

    def pattern_mask(self, name: str, n_m: tuple[int, int]) -> np.ndarray:
        """N of every M consecutive inputs kept per output row, by the in-layer scores."""
        entry = self.inputs[name]
        n, m = n_m
        mats = obs.to_matrices(self.scores[name].values, entry)
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
        return obs.from_matrices(masks, entry, self.originals[name].shape).astype(bool)

    def compress_all(self, keep: Mapping[str, int], config: CompressConfig,
                     widths: Mapping[str, int] | Callable[[str], int | None] | None = None,
                     ) -> tuple[dict[str, np.ndarray], dict[str, Quantized]]:
        """Every weight compressed, in graph order (later layers see earlier ones compressed
        in sequential mode)."""
        values: dict[str, np.ndarray] = {}
        quantized: dict[str, Quantized] = {}
        for w in self.weights:
            bits = widths(w.name) if callable(widths) else (widths or {}).get(w.name)
            earlier = values if config.sequential and self.reconstructs(w.name, config) \
                else None
            values[w.name], q = self.compress_weight(w, keep[w.name], config, bits, earlier)
            if q is not None:
                quantized[w.name] = q
        return values, quantized

    def variant(self, config: CompressConfig
                ) -> Callable[[Weight, int], dict[str, np.ndarray]]:
        """Pruning of one weight to `keep` entries, for R-D curves (reconstructed when
        configured; see `_aim_next`)."""
        return lambda w, keep: self._aim_next(
            w, self.compress_weight(w, keep, config)[0], config)

    def value_variant(self, config: CompressConfig
                      ) -> Callable[[Weight, int], dict[str, np.ndarray]]:
        """Quantization of one whole weight to `bits`, for the value curves (see
        `_aim_next`)."""
        def weights(w: Weight, bits: int) -> dict[str, np.ndarray]:
            original = self.originals[w.name]
            quantized = self.quantize(w.name, original, bits, config).values(original.dtype)
            return self._aim_next(w, quantized, config)

        return weights

    def _aim_next(self, w: Weight, changed: np.ndarray, config: CompressConfig
                  ) -> dict[str, np.ndarray]:
        """{w: changed}; in sequential mode also the next weight in graph order, aimed at the
        original output (dense), as the sequential pass will do: a curve then measures what
        that layer cannot undo."""
        out = {w.name: changed}
        if not config.sequential:
            return out
        at = next(i for i, v in enumerate(self.weights) if v.name == w.name) + 1
        if at < len(self.weights) and self.reconstructs(self.weights[at].name, config):
            name = self.weights[at].name
            out[name] = obs.reconstruct_weight(self.originals[name], self.inputs[name],
                                               self.hessian(name, out), percdamp=config.damp)
        return out

    def realize(self, rate: float, keep: dict[str, int], config: CompressConfig,
                widths: Mapping[str, int] | None = None) -> Realized:
        """Prune to `keep`, quantize (when configured: at `widths` per weight, or the fewest
        bits within the value budget) and measure the result."""
        pruned, _ = self.compress_all(keep, config)
        if not config.quantized:
            return Realized(rate, keep, pruned, pruned, {}, {}, self.distortion(pruned, config))
        extra = {} if config.lossless_unpruned else self.extra

        def make(bits_for) -> tuple[dict, dict]:
            values, quantized = self.compress_all(keep, config, bits_for)
            for name, array in extra.items():
                quantized[name] = self.quantize(name, array, bits_for(name) or 8, config)
                values[name] = quantized[name].values(array.dtype)
            return values, quantized

        if widths is not None:  # extras (not pruned, no curves) get 8 bits
            values, quantized = make(lambda n: widths.get(n, 8))
            return Realized(rate, keep, pruned, values, quantized,
                            {n: widths.get(n, 8) for n in quantized},
                            self.distortion(values, config))
        limit = None
        if config.value_bits is None:
            base = self.distortion(pruned, config, config.metric).value(config.metric)
            limit = base * (1 + config.value_budget) + config.value_budget * 1e-2

        def measure(values):
            d = self.distortion(values, config)
            return d.value(config.metric), d

        try:
            choice = choose_bits(lambda b: make(lambda _: b), measure, limit, config.value_bits)
        except ValueError as exc:
            raise UsageError(f"cannot quantize: {exc}; pass --values exact") from None
        if choice is None:  # no width up to 16 bits stays within the value budget
            notice = "values kept exact where 16 bits would exceed the --value-budget"
            if notice not in self.notices:
                self.notices.append(notice)
            return Realized(rate, keep, pruned, pruned, {}, {}, self.distortion(pruned, config))
        return Realized(rate, keep, pruned, choice.values, choice.quantized,
                        {n: choice.bits for n in choice.quantized}, choice.distortion)


def graph_order(model: Model, weights: list[Weight]) -> list[Weight]:
    """Weights sorted by their first consumer in the (topologically sorted) main graph."""
    first: dict[str, int] = {}
    for index, node in enumerate(model.proto.graph.node):
        for name in node.input:
            first.setdefault(name, index)
    return sorted(weights, key=lambda w: first.get(w.name, len(first) + 1))


def load_and_find(model: ModelSource, config: CompressConfig) -> tuple[Model, list[Weight],
                                                                        list[str]]:
    """Load (and simplify when that exposes more prunable weights); find the weights."""
    loaded = load_any(model)
    notices: list[str] = []
    weights = find_weights(loaded, config.min_params, config.include, config.exclude)
    if config.simplify:
        simplified, notice = simplify(loaded)
        if notice:
            notices.append(notice)
        elif simplified is not loaded:
            more = find_weights(simplified, config.min_params, config.include, config.exclude)
            if sum(w.size for w in more) > sum(w.size for w in weights):
                loaded, weights = simplified, more
                notices.append("simplified with onnxsim: constant folding exposed more weights")
    if not weights:
        raise UsageError("no prunable weight found (float tensors of at least --min-params "
                         f"{config.min_params} elements feeding Conv, ConvTranspose, Gemm, "
                         "MatMul, LSTM, GRU or RNN); lower --min-params or --include NAME")
    return loaded, weights, notices


def make_data(model: Model, source: DataSource, options: DataOptions,
              labels: str | None = None) -> tuple[Batches, str]:
    """Batches for `model` and a short name of where they come from."""
    name = make_data_name(source)
    if labels and source is not None:
        if isinstance(source, Mapping):
            keys = set(source)
        elif Path(source).is_file():
            keys = set(open_npz(Path(source)))
        else:
            keys = {k for f in Path(source).glob("*.npz") for k in open_npz(f)}
        if labels not in keys:
            raise UsageError(f"labels key {labels!r} not found in {source}; keys: "
                             f"{sorted(keys)}")
    batches = make_batches(source, input_specs(model), options, (labels,) if labels else ())
    return batches, name


def calibrate_model(model: ModelSource, config: CompressConfig, calib: DataSource,
                    quiet: bool = True, consumers: bool = False,
                    verify: DataSource = None) -> Calibration:
    """Load, find weights, run the reference pass (outputs, layer-input moments) once.

    The calibration data is split (`config.verify.holdout`) into a fit part (curves,
    statistics, reconstruction) and a held-out part (every bound check), unless `verify`
    names separate held-out data. `consumers`: also record the output of each weight's
    consumer (hsic compares them)."""
    loaded, weights, notices = load_and_find(model, config)
    batches, data_name = make_data(loaded, calib, config.data)
    bounds = (config.max_distortion, config.min_agreement, config.min_score, config.max_drop)
    if batches.synthetic and any(b is not None for b in bounds) and \
            not config.verify.allow_synthetic:
        raise UsageError("a bound measured on synthetic inputs says nothing about real data: "
                         "give --calib DATA (or --allow-synthetic to measure it anyway)")
    if verify is not None:
        if config.verify.holdout:
            raise UsageError("--verify DATA replaces --holdout: give one of them")
        fit, held = batches, make_data(loaded, verify, config.data)[0]
        how = f"--verify {make_data_name(verify)}"
    else:
        fit, held = split_holdout(batches, config.verify.holdout, config.data.seed)
        how = f"{held.samples} of {batches.samples} samples of {data_name}, seeded" \
            if held is not None else "none"
    if config.min_agreement is not None and _declares_class_scores(loaded):  # refuse early
        check_supported(config.target, config.verify.confidence,
                        (held if held is not None else fit).samples)
    originals = read_weights(loaded, weights)
    weights = graph_order(loaded, weights)
    kmeans = config.quantized and config.quantizer == "kmeans"
    inputs = layer_inputs(loaded, weights) if config.criterion == "activation" or \
        config.reconstructs or config.pattern or kmeans else {}
    extra = find_codable(loaded, weights, config.min_params) \
        if config.quantized and not config.lossless_unpruned else []
    exposed = exposed_tensors(loaded, inputs)
    if consumers:
        given = {v.name for v in loaded.proto.graph.output}
        exposed = sorted(set(exposed) | {t for t, _ in consumer_outputs(loaded, weights)
                                         .values()} - given)
    runner = Runner(loaded, weights + extra, config.device, exposed)
    if runner.device.notice:
        notices.append(runner.device.notice)
    replay, moments, data_digest = record(runner, fit, inputs, quiet,
                                          config.replay_mb * 2**20)
    check = record(runner, held, {}, quiet, config.replay_mb * 2**20)[0] \
        if held is not None else None
    if config.metric == "kl" and not any(is_class_scores(o) for o in next(iter(replay))[1]):
        raise UsageError("--metric kl needs an output of class scores [batch, classes]; "
                         "use --metric nmse, nmse-channel or cosine")
    scores = scores_for(weights, originals, config.criterion, inputs, moments)
    importance = {n: m.moments(originals[n].shape) for n, m in moments.items()}
    plain = [w.name for w in weights if w.name not in importance] + [w.name for w in extra]
    if kmeans and plain:
        notices.append(f"k-means without layer-input moments (importance 1, plain k-means) for "
                       f"{len(plain)} tensor(s): {', '.join(plain[:8])}"
                       f"{' ...' if len(plain) > 8 else ''}")
    fingerprint = Fingerprint(model_digest(loaded, originals), data_digest,
                              digest(repr(sorted(config.curve_settings().items()))))
    data = diagnose(config, data_name, batches.synthetic, replay, check, how, moments, inputs)
    notices.extend(data.warnings)
    return Calibration(loaded, weights, originals, runner, replay, scores,
                       {n: Ranking(s) for n, s in scores.items()}, fingerprint, data_name,
                       data, check, inputs, read_weights(loaded, extra), notices,
                       importance=importance, axes=output_axes(loaded, weights + extra))


def _declares_class_scores(model: Model) -> bool:
    """Whether the graph declares a float output of rank 2 ([batch, classes])."""
    return any(o.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                onnx.TensorProto.DOUBLE,
                                                onnx.TensorProto.BFLOAT16)
               and len(o.type.tensor_type.shape.dim) == 2 for o in model.proto.graph.output)


def make_data_name(source: DataSource) -> str:
    """How a data source is named in the report."""
    return "synthetic" if source is None else (
        "arrays" if isinstance(source, Mapping) else Path(source).name)


SYNTHETIC_NOTICE = ("CALIBRATION INPUTS ARE SYNTHETIC (random values from the input specs): "
                    "the figures below say nothing about real data; give --calib DATA")
FEW_CLASSES_SHARE = 0.9  # a class given for this share of the samples makes agreement weak
FLAT_OUTPUT_NMSE = 1e-2  # a constant output scoring below this: the outputs barely vary


def diagnose(config: CompressConfig, name: str, synthetic: bool, replay: Replay,
             check: Replay | None, how: str, moments: Mapping, inputs: Mapping[str, LayerInput]
             ) -> DataReport:
    """What the calibration data can show: synthetic or not, how much the reference outputs
    vary (warnings when a metric cannot discriminate), and whether the layer inputs seen
    span the widest layer input (a rank-deficient Hessian otherwise)."""
    report = DataReport(name, synthetic, replay.samples,
                        check.samples if check is not None else None, how)
    if synthetic:
        report.warnings.append(SYNTHETIC_NOTICE)
    report.outputs = describe_outputs(replay, config.channel_axis)
    class_outputs = [o for o in report.outputs if o.classes is not None]
    if class_outputs:
        o = class_outputs[0]
        if o.distinct_top1 == 1:
            report.warnings.append(
                f"top-1 agreement cannot discriminate: the original model gives class "
                f"{o.top_class} for all {o.samples} fit samples (output entropy "
                f"{o.entropy:.2f} of {o.max_entropy:.2f} bits)")
        elif o.top_class_share >= FEW_CLASSES_SHARE:
            report.warnings.append(
                f"top-1 agreement says little: the original model gives class {o.top_class} "
                f"for {o.top_class_share:.0%} of the fit samples ({o.distinct_top1} distinct "
                "classes); a model that always answers it would agree as often")
    flat = sum(o.constant_nmse for o in report.outputs)
    if report.outputs and config.metric in ("nmse", "nmse-channel") and flat < FLAT_OUTPUT_NMSE:
        report.warnings.append(
            f"the reference outputs barely vary over the fit samples: a model that outputs "
            f"their mean scores nmse {flat:.3g}, so nmse cannot tell a broken model below that")
    cos = sum(o.constant_cosine for o in report.outputs)
    if report.outputs and config.metric == "cosine" and cos < FLAT_OUTPUT_NMSE:
        report.warnings.append(
            f"the reference outputs barely vary over the fit samples: a model that outputs "
            f"their mean scores cosine distance {cos:.3g}")
    bound = config.max_distortion
    if bound is not None and config.metric in ("nmse", "cosine") and report.outputs:
        constant = flat if config.metric == "nmse" else cos
        if bound >= constant:
            report.warnings.append(
                f"--max-distortion {bound:g} is met by a model that outputs the mean "
                f"reference output ({config.metric} {constant:.3g}): the bound cannot "
                "discriminate")
    widths = []
    for weight, m in moments.items():
        if m.mean is None:
            continue
        entry = inputs[weight]
        width = int(m.mean.numel()) // (entry.groups if entry.op == "Conv" else 1)
        widths.append((weight, width, int(m.count)))
        if m.count < width:
            report.rank_deficient.append(weight)
    if widths:
        report.widest_input = max(widths, key=lambda t: t[1])
    if report.rank_deficient and config.reconstructs:
        w, width, columns = max(((n, wd, c) for n, wd, c in widths
                                 if n in report.rank_deficient), key=lambda t: t[1])
        report.warnings.append(
            f"{len(report.rank_deficient)} layer input(s) are wider than the positions x "
            f"samples seen (widest: {w}, {width} inputs, {columns} seen): their Hessians are "
            "rank-deficient and reconstruction can fit the calibration samples; give more "
            "data")
    return report


def measure_all_curves(cal: Calibration, config: CompressConfig, quiet: bool = True) -> Curves:
    """Per-weight R-D curves on the configured grid."""
    grid = check_grid(config.grid)
    measured = measure_curves(cal.runner, cal.replay, cal.weights, cal.variant(config), grid,
                              config.metric, config.channel_axis, quiet)
    return Curves(grid, measured, {w.name: w.size for w in cal.weights},
                  config.curve_settings(), cal.fingerprint)


def check_curves(curves: Curves, cal: Calibration) -> None:
    """Refuse curves measured on another model, other data or other settings."""
    differ = curves.fingerprint.mismatch(cal.fingerprint)
    if differ:
        raise UsageError(f"the curves do not match this run ({', '.join(differ)} differ); "
                         "rerun rdonnx calibrate with the same model, data (--holdout, "
                         "--verify) and settings")


