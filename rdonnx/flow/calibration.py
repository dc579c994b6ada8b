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
from rdonnx.algo.layout import LayerInput, output_shift
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
from rdonnx.flow.target import Realized
from rdonnx.graph.layers import consumer_outputs, layer_biases, layer_inputs, output_axes
from rdonnx.graph.model import Model, simplify
from rdonnx.graph.weights import Weight, find_codable, find_weights, read_weights
from rdonnx.runtime.data import Batches, DataOptions, input_specs, make_batches, open_npz
from rdonnx.runtime.distortion import Distortion, is_class_scores
from rdonnx.runtime.measure import Replay
from rdonnx.runtime.session import Runner

ModelSource = str | os.PathLike | onnx.ModelProto | bytes
CLIP_SCALES = (1.0, 0.9, 0.8, 0.7)  # error-compensated quantization: exact spans tried
VECTOR_BITS = 16  # coded vectors (biases) get at least this width (`extra_bits`)
ORIGINAL_INPUTS_MB = 256  # sequential mode: the last layer's original inputs kept up to this
DataSource = str | os.PathLike | Mapping[str, np.ndarray] | None


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
    inputs: dict[str, LayerInput] = field(default_factory=dict)  # where layer inputs are seen
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # coded, not pruned
    notices: list[str] = field(default_factory=list)
    importance: dict[str, np.ndarray] = field(default_factory=dict)  # E[x^2] vs each weight
    axes: dict[str, int | None] = field(default_factory=dict)  # output axis: a step each
    means: dict[str, np.ndarray] = field(default_factory=dict)  # E[x] vs each weight
    biases: dict[str, str] = field(default_factory=dict)  # weight -> its layer's bias
    bias_values: dict[str, np.ndarray] = field(default_factory=dict)  # the biases' originals
    _hessians: dict[str, obs.Hessian] = field(default_factory=dict)
    _reconstructed: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    _original_inputs: tuple[str, list[list[np.ndarray]]] | None = None  # the last layer's
    # original inputs per batch (sequential mode), while at most ORIGINAL_INPUTS_MB

    def run_with(self, values: Mapping[str, np.ndarray]) -> Callable:
        prepared = {n: self.runner.weight_value(n, a) for n, a in values.items()}
        return lambda feed: self.runner.run(feed, prepared)

    def distortion(self, values: Mapping[str, np.ndarray], config: CompressConfig,
                   only: str | None = None) -> Distortion:
        return self.replay.distortion(self.run_with(values), config.channel_axis, only)

    def supports(self, name: str) -> bool:
        """Whether the weight's layer input is seen and its layout known (matrix views)."""
        entry = self.inputs.get(name)
        return entry is not None and obs.supports(entry, self.originals[name].shape)

    def reconstructs(self, name: str, config: CompressConfig) -> bool:
        """Whether this weight is reconstructed."""
        return config.reconstructs and self.supports(name)

    def hessian(self, name: str, earlier: Mapping[str, np.ndarray] | None = None) -> obs.Hessian:
        """E[x x^T] of the weight's layer input: from the original model (cached), or with
        the `earlier` weights already compressed (sequential mode), paired with the original
        input so that reconstruction aims at the original output (`obs.Target`)."""
        earlier = earlier or None  # nothing compressed yet: the original inputs
        if earlier is None and name in self._hessians:
            return self._hessians[name]
        entry = self.inputs[name]
        h = obs.Hessian(entry)
        prepared = {n: self.runner.weight_value(n, a) for n, a in (earlier or {}).items()}
        held = self._original_inputs[1] if earlier and self._original_inputs is not None \
            and self._original_inputs[0] == name else None
        kept: list[list[np.ndarray]] | None = [] if earlier and held is None else None
        size = 0
        for i, (feed, _) in enumerate(self.replay):
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
            self._hessians[name] = h
        elif kept is not None:  # sequential curves ask for the same layer many times
            self._original_inputs = (name, kept)
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

    def corrected_biases(self, before: Mapping[str, np.ndarray],
                         after: Mapping[str, np.ndarray], config: CompressConfig
                         ) -> dict[str, np.ndarray]:
        """Bias correction: the bias of each layer whose weight went from `before` to `after`
        (quantization), less the shift of the layer's output mean that the change causes on
        the calibration data (`output_shift`, E[x] measured in the reference pass). Weights
        that are reconstructed (their update already aims at the original output), without a
        bias or without measured means get none."""
        if not config.bias_correction:
            return {}
        out = {}
        for name, value in after.items():
            bias = self.biases.get(name)
            if bias is None or name not in self.means or name not in before or \
                    self.reconstructs(name, config):
                continue
            delta = value.astype(np.float64) - np.asarray(before[name], np.float64)
            shift = output_shift(delta, self.means[name], self.inputs[name].row_axis)
            original = self.bias_values[bias]
            out[bias] = (original.astype(np.float64) - shift.reshape(original.shape)).astype(
                original.dtype)
        return out

    def compress_weight(self, w: Weight, keep: int, config: CompressConfig,
                        bits: int | None = None,
                        hessian: obs.Hessian | None = None) -> tuple[np.ndarray, Quantized | None]:
        """One weight pruned to `keep` entries (reconstructed when configured), quantized to
        `bits` when given (with error feedback when reconstructed)."""
        original = self.originals[w.name]
        if not self.reconstructs(w.name, config):
            patterned = config.n_m is not None and self.supports(w.name)
            mask = self.pattern_mask(w.name, config.n_m) if patterned else \
                self.rankings[w.name].mask(keep)
            pruned = np.where(mask, original, np.zeros((), original.dtype)).astype(
                original.dtype, copy=False)
            if bits is None:
                return pruned, None
            q = self.quantize(w.name, pruned, bits, config)
            # a survivor never rounds to 0 (k-means never maps one to 0): N:M is kept
            if patterned and q.codebook is None:
                lost = mask & (q.q == 0) & (pruned != 0)
                q.q[lost] = np.sign(pruned[lost]).astype(np.int32)
            return q.values(original.dtype), q
        sequential = hessian is not None
        hessian = hessian or self.hessian(w.name)
        options: dict = {"percdamp": config.damp}
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
        exact = None if sequential else self._reconstructed.get(key)
        if exact is None:
            exact = obs.reconstruct_weight(original, self.inputs[w.name], hessian, **options)
            if not sequential:
                self._reconstructed[key] = exact
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
            hessian = None
            if config.sequential and self.reconstructs(w.name, config):
                hessian = self.hessian(w.name, values)
            values[w.name], q = self.compress_weight(w, keep[w.name], config, bits, hessian)
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
            out = self._aim_next(w, quantized, config)
            out.update(self.corrected_biases({w.name: original}, {w.name: quantized}, config))
            return out

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
            biases = self.corrected_biases(pruned, values, config)
            for name, array in extra.items():
                array = biases.pop(name, array)  # a corrected bias is quantized as corrected
                quantized[name] = self.quantize(name, array, extra_bits(array, bits_for(name)),
                                                config)
                values[name] = quantized[name].values(array.dtype)
            values.update(biases)
            return values, quantized

        if widths is not None:  # extras (not pruned, no curves) get 8 bits
            values, quantized = make(lambda n: widths.get(n, 8))
            return Realized(rate, keep, pruned, values, quantized,
                            {n: widths.get(n, 8) if n not in extra else
                             extra_bits(extra[n], widths.get(n, 8)) for n in quantized},
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
                        {n: choice.bits if n not in extra else
                         extra_bits(extra[n], choice.bits) for n in choice.quantized},
                        choice.distortion)


def extra_bits(array: np.ndarray, bits: int | None) -> int:
    """The width of a coded tensor that is not pruned (`Calibration.extra`): `bits` (8 when
    None), but at least `VECTOR_BITS` for a vector: a bias adds its error to every output of
    its channel, nothing averages it (8-bit biases alone cost EfficientNet-Lite0 5.7 points of
    top-1 agreement on the zoo's test split)."""
    bits = 8 if bits is None else bits
    return max(bits, VECTOR_BITS) if np.ndim(array) <= 1 else bits


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
    name = "synthetic" if source is None else (
        "arrays" if isinstance(source, Mapping) else Path(source).name)
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
                    quiet: bool = True, consumers: bool = False) -> Calibration:
    """Load, find weights, run the reference pass (outputs, layer-input moments) once.

    `consumers`: also record the output of each weight's consumer (hsic compares them)."""
    loaded, weights, notices = load_and_find(model, config)
    batches, data_name = make_data(loaded, calib, config.data)
    originals = read_weights(loaded, weights)
    weights = graph_order(loaded, weights)
    kmeans = config.quantized and config.quantizer == "kmeans"
    correcting = config.quantized and config.bias_correction
    inputs = layer_inputs(loaded, weights) if config.criterion == "activation" or \
        config.reconstructs or config.pattern or kmeans or correcting else {}
    extra = find_codable(loaded, weights, config.min_params) \
        if config.quantized and not config.lossless_unpruned else []
    biases = layer_biases(loaded, weights) if correcting else {}
    taken = {w.name for w in weights + extra}
    swapped = list({b.name: b for b in biases.values() if b.name not in taken}.values())
    exposed = exposed_tensors(loaded, inputs)
    if consumers:
        given = {v.name for v in loaded.proto.graph.output}
        exposed = sorted(set(exposed) | {t for t, _ in consumer_outputs(loaded, weights)
                                         .values()} - given)
    runner = Runner(loaded, weights + extra + swapped, config.device, exposed)
    if runner.device.notice:
        notices.append(runner.device.notice)
    replay, moments, data_digest = record(runner, batches, inputs, quiet,
                                          config.replay_mb * 2**20)
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
    return Calibration(loaded, weights, originals, runner, replay, scores,
                       {n: Ranking(s) for n, s in scores.items()}, fingerprint, data_name,
                       inputs, read_weights(loaded, extra), notices,
                       importance=importance, axes=output_axes(loaded, weights + extra),
                       means={n: m.means(originals[n].shape) for n, m in moments.items()},
                       biases={n: b.name for n, b in biases.items()},
                       bias_values=read_weights(loaded, list(biases.values())))


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
                         "rerun rdonnx calibrate with the same model, data and settings")


