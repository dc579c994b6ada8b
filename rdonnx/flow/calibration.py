"""The measured state of one compress run (`Calibration`): the model, its weights, one ONNX
Runtime session, the replayed calibration batches with their reference outputs, in-layer scores
and rankings, layer-input moments. Measured once by `calibrate_model`, then only read: the
layer-input Hessians are `rdonnx.flow.hessians`, the realizing of candidates
`rdonnx.flow.realize`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from rdonnx.algo import grids, obs
from rdonnx.algo.layout import LayerInput
from rdonnx.algo.prune import Ranking, Scores
from rdonnx.algo.unread import COMPETE_GAP, PROBE_BITS, UnreadRows, plan
from rdonnx.artifact.io import load_any
from rdonnx.errors import UsageError
from rdonnx.flow.config import CompressConfig, Measurement, Selection, Target
from rdonnx.flow.curves import (
    Curves,
    Fingerprint,
    digest,
    exposed_tensors,
    model_digest,
    record,
    scores_for,
)
from rdonnx.flow.target import check_supported
from rdonnx.graph.layers import (
    class_heads,
    consumer_outputs,
    decision_inputs,
    head_outputs,
    layer_biases,
    layer_inputs,
    lookup_indices,
    output_axes,
)
from rdonnx.graph.model import Model, simplify
from rdonnx.graph.tail import linear_tails
from rdonnx.graph.weights import Weight, find_codable, find_weights, read_weights
from rdonnx.report.records import DataReport
from rdonnx.runtime.confidence import FLIP_COST, SampleTerms, decision_change, flip_nmse
from rdonnx.runtime.data import (
    AUTO_HOLDOUT_MIN,
    AUTO_HOLDOUT_MIN_RECONSTRUCT,
    Batches,
    DataOptions,
    input_specs,
    make_batches,
    open_npz,
    split_holdout,
)
from rdonnx.runtime.diagnose import describe_outputs
from rdonnx.runtime.distortion import Distortion, has_class_axis, is_class_scores, log_probs
from rdonnx.runtime.measure import Replay
from rdonnx.runtime.probe import Prober, cut_tensors
from rdonnx.runtime.session import Runner, measurement_model

ModelSource = str | os.PathLike | onnx.ModelProto | bytes
DataSource = str | os.PathLike | Mapping[str, np.ndarray] | None
PROBE_OPTIMIZE = True  # slices fold the weights they do not change, ORT optimisations on
# (docs/SPEED.md)
PROBE_TAILS = True  # nmse probes stop at the input of an output's linear tail (docs/SPEED.md)


@dataclass(frozen=True)
class Calibration:
    """Everything measured once on the calibration data, reused by every probe (read only:
    a method that changes scores or rankings returns a new `Calibration`)."""

    model: Model
    weights: list[Weight]  # in graph order
    originals: dict[str, np.ndarray]
    runner: Runner
    replay: Replay
    scores: dict[str, Scores]
    rankings: dict[str, Ranking]
    fingerprint: Fingerprint
    data_name: str
    inputs: dict[str, LayerInput]  # where layer inputs are seen
    extra: dict[str, np.ndarray]  # coded, not pruned
    notices: tuple[str, ...]
    importance: dict[str, np.ndarray]  # E[x^2] of the layer input against each weight
    axes: dict[str, int | None]  # each tensor's output axis: a quantization step each
    means: dict[str, np.ndarray]  # E[x] of the layer input against each weight
    biases: dict[str, str]  # weight -> the bias of its layer (bias correction)
    bias_values: dict[str, np.ndarray]  # those biases' original values
    prober: Prober | None = None  # downstream-only, threaded probes (None: whole graph); it
    # keeps its own notices (which probes run the whole graph)
    data: DataReport | None = None  # what the calibration data is and can show
    check: Replay | None = None  # the held-out reference outputs (None: no holdout)
    extra_weights: tuple[Weight, ...] = ()  # the records of `extra`
    unread: Mapping[str, UnreadRows] = field(default_factory=dict)  # lookup tables whose rows
    # the fit part never reads, classifier heads whose classes it never brings near the top
    # (coded coarser: `algo.unread`)
    decisions: Mapping[str, int] = field(default_factory=dict)  # scores behind the graph's
    # own ArgMax decisions (and their axes), recorded on the held-out part: `unseen_flips`
    sequences: bool = False  # KL is the metric: measured on sequence outputs too

    @property
    def extra_matrices(self) -> list[Weight]:
        """The coded tensors that are not pruned and not treated as vectors (their widths are
        chosen; vectors and small tables get `realize.VECTOR_BITS` or more)."""
        return matrices(self.extra_weights)

    def run_with(self, values: Mapping[str, np.ndarray]) -> Callable:
        prepared = {n: self.runner.weight_value(n, a) for n, a in values.items()}
        return lambda feed: self.runner.run(feed, prepared)

    @property
    def checked(self) -> Replay:
        """The data bounds are checked on: the held-out part when there is one."""
        return self.check if self.check is not None else self.replay

    def distortion(self, values: Mapping[str, np.ndarray], channel_axis: int,
                   only: str | None = None, terms: str | None = None) -> Distortion:
        """The distortion of the model with `values` in place of its weights, on the data
        bounds are checked on (`checked`; `terms`: per-sample sums of that metric too, for
        its confidence bound)."""
        if not self.decisions:
            return self.checked.distortion(self.run_with(values), channel_axis, only, terms,
                                           self.sequences)
        # the same runs give the outputs and the scores behind the graph's own decisions
        prepared = {n: self.runner.weight_value(n, a) for n, a in values.items()}
        outputs, names = self.runner.output_names, list(self.decisions)
        scores: list[list[np.ndarray]] = []

        def run(feed):
            got = self.runner.run(feed, prepared, outputs=[*outputs, *names])
            scores.append(got[len(outputs):])
            return got[:len(outputs)]

        d = self.checked.distortion(run, channel_axis, only, terms, self.sequences)
        return replace(d, flips=self.unseen_flips(scores, d.terms))

    def unseen_flips(self, scores: list[list[np.ndarray]], terms: SampleTerms | None) -> float:
        """The nmse that the graph's own decisions, flipped in a candidate (`scores`: its
        decision scores per held-out batch), add beyond what the held-out part shows
        (`confidence.flip_nmse`): margins of every held-out decision, changes of those in
        samples where none flipped; a flip costs what the held-out samples with one cost on
        average (their nmse terms: `terms`), else twice a sample's share of the output
        energy."""
        names = list(self.decisions)
        margins, changes, flipped, count = [], [], [], 0
        for got, ref in zip(scores, self.check.cuts(names)):
            rows = len(next(iter(ref.values())))
            kept = np.ones(rows, bool)
            gaps = []
            for name, new in zip(names, got):
                margin, change, turned = decision_change(ref[name], new, self.decisions[name])
                kept &= ~turned.reshape(rows, -1).any(axis=1)
                gaps.append((margin.reshape(rows, -1), change.reshape(rows, -1)))
                count += margin.size
            margins.extend(m.ravel() for m, _ in gaps)
            changes.extend(c[kept].ravel() for _, c in gaps)
            flipped.append(~kept)
        flipped = np.concatenate(flipped)
        cost = FLIP_COST
        if flipped.any() and terms is not None and terms.num.shape[0] == flipped.size:
            # the prior counts as one flipped sample: one or two observed flips that cost little
            # (g2p at rate 0.98: 5x less than the test split's) do not make flips cheap
            costs = terms.num[flipped].sum(axis=1) / terms.den.sum(axis=1).mean()
            cost = float((FLIP_COST + costs.sum()) / (1 + costs.size))
        return flip_nmse(np.concatenate(margins), np.concatenate(changes), count / flipped.size,
                         cost)

    def fit_distortion(self, values: Mapping[str, np.ndarray], channel_axis: int,
                       only: str | None = None) -> Distortion:
        """The distortion on the fit part (the data the curves and reconstruction saw)."""
        return self.replay.distortion(self.run_with(values), channel_axis, only,
                                      sequences=self.sequences)

    def probe(self, values: Mapping[str, np.ndarray], channel_axis: int,
              only: str | None = None) -> Distortion:
        """The distortion on the fit part of a variant that changes a few weights (R-D
        curves), through the prober (only the graph downstream of them runs)."""
        if self.prober is None:
            return self.replay.distortion(self.run_with(values), channel_axis, only,
                                          sequences=self.sequences)
        return self.prober.probe(values, only, channel_axis)

    def supports(self, name: str) -> bool:
        """Whether the weight's layer input is seen and its layout known (matrix views)."""
        entry = self.inputs.get(name)
        return entry is not None and obs.supports(entry, self.originals[name].shape)


def graph_order(model: Model, weights: list[Weight]) -> list[Weight]:
    """Weights sorted by their first consumer in the (topologically sorted) main graph."""
    first: dict[str, int] = {}
    for index, node in enumerate(model.proto.graph.node):
        for name in node.input:
            first.setdefault(name, index)
    return sorted(weights, key=lambda w: first.get(w.name, len(first) + 1))


def load_and_find(model: ModelSource, selection: Selection) -> tuple[Model, list[Weight],
                                                                        list[str]]:
    """Load (and simplify when that exposes more prunable weights); find the weights."""
    loaded = load_any(model)
    notices: list[str] = []
    weights = find_weights(loaded, selection.min_params, selection.include, selection.exclude)
    if selection.simplify:
        simplified, notice = simplify(loaded)
        if notice:
            notices.append(notice)
        elif simplified is not loaded:
            more = find_weights(simplified, selection.min_params, selection.include,
                                selection.exclude)
            if sum(w.size for w in more) > sum(w.size for w in weights):
                loaded, weights = simplified, more
                notices.append("simplified with onnxsim: constant folding exposed more weights")
    if not weights:
        raise UsageError("no prunable weight found (float tensors of at least --min-params "
                         f"{selection.min_params} elements feeding Conv, ConvTranspose, Gemm, "
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


SMALL_TABLE = 4096  # values: a coded table this small is coded as a vector (`like_vector`)


def like_vector(shape: Sequence[int]) -> bool:
    """Whether a coded tensor that is not pruned is treated as a vector (a bias): rank 0 or 1,
    or at most `SMALL_TABLE` values. Its rows reach every sample that uses them, nothing
    averages their error, and its cost is bytes: MiniLM's 2 x 384 token-type embedding, one row
    added to every token, cost the sentence embeddings 1 - cosine 1.5e-3 at 8 bits (all the
    other tensors at 8 bits together 3e-4)."""
    return len(shape) <= 1 or int(np.prod(shape)) <= SMALL_TABLE


def matrices(weights: Sequence[Weight]) -> list[Weight]:
    """The tensors not treated as vectors (`like_vector`: those get no width of their own)."""
    return [w for w in weights if not like_vector(w.shape)]


def calibrate_model(model: ModelSource, config: CompressConfig, calib: DataSource,
                    quiet: bool = True, consumers: bool = False,
                    verify: DataSource = None) -> Calibration:
    """Load, find weights, run the reference pass (outputs, layer-input moments) once. (It
    takes the whole config: what is recorded depends on the target, the pruning, the coding and
    the measurement.)

    The calibration data is split (`config.verify.holdout`) into a fit part (curves,
    statistics, reconstruction) and a held-out part (every bound check), unless `verify`
    names separate held-out data. `consumers`: also record the output of each weight's
    consumer (hsic compares them)."""
    loaded, weights, notices = load_and_find(model, config.selection)
    batches, data_name = make_data(loaded, calib, config.data)
    target = config.target
    bounds = (target.max_distortion, target.min_agreement, target.min_score, target.max_drop)
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
        least = AUTO_HOLDOUT_MIN_RECONSTRUCT if config.prune.reconstructs else AUTO_HOLDOUT_MIN
        fit, held = split_holdout(batches, config.verify.holdout, config.data.seed, least)
        how = f"{held.samples} of {batches.samples} samples of {data_name}, seeded" \
            if held is not None else "none"
    if target.min_agreement is not None and _declares_class_scores(loaded):  # refuse early
        check_supported(target, config.verify.confidence,
                        (held if held is not None else fit).samples)
    originals = read_weights(loaded, weights)
    weights = graph_order(loaded, weights)
    coding, prune = config.coding, config.prune
    kmeans = coding.quantized and coding.quantizer == "kmeans"
    correcting = coding.quantized and coding.bias_correction
    inputs = layer_inputs(loaded, weights) if prune.criterion == "activation" or \
        prune.reconstructs or config.target.pattern or kmeans or correcting else {}
    extra = find_codable(loaded, weights, config.selection.min_params) \
        if coding.quantized and not coding.lossless_unpruned else []
    biases = layer_biases(loaded, weights) if correcting else {}
    taken = {w.name for w in weights + extra}
    swapped = list({b.name: b for b in biases.values() if b.name not in taken}.values())
    exposed = exposed_tensors(loaded, inputs)
    if consumers:
        given = {v.name for v in loaded.proto.graph.output}
        exposed = sorted(set(exposed) | {t for t, _ in consumer_outputs(loaded, weights)
                                         .values()} - given)
    measure = config.measure
    proto = measurement_model(loaded, weights + extra + swapped)
    probed = weights + (matrices(extra) if config.target.bound and coding.value_bits is None
                        else [])
    cuts = cut_tensors(proto, [w.name for w in probed]) if measure.downstream else {}
    tails = linear_tails(proto.graph, [w.name for w in weights + extra + swapped]) \
        if PROBE_TAILS and measure.metric == "nmse" else {}
    recorded = Prober.tensors(cuts, tails)
    # a greedy decoder's decisions: their flips are estimated beyond the held-out part, for
    # the nmse bound it checks
    decisions = decision_inputs(loaded) \
        if config.target.bound and held is not None and measure.metric == "nmse" else {}
    given = {v.name for v in proto.graph.output} | {v.name for v in proto.graph.input}
    runner = Runner(loaded, weights + extra + swapped, measure.device,
                    sorted((set(exposed) | set(recorded) | set(decisions)) - given),
                    proto=proto)
    if runner.device.notice:
        notices.append(runner.device.notice)
    replay, moments, data_digest = record(runner, fit, inputs, quiet,
                                          measure.replay_mb * 2**20, recorded)
    check = record(runner, held, {}, quiet, measure.replay_mb * 2**20, list(decisions))[0] \
        if held is not None else None
    if config.measure.metric == "kl":
        refuse_kl(loaded, any(is_class_scores(o) for o in next(iter(replay))[1]))
    scores = scores_for(weights, originals, prune.criterion, inputs, moments)
    importance = {n: m.moments(originals[n].shape) for n, m in moments.items()}
    plain = [w.name for w in weights if w.name not in importance] + [w.name for w in extra]
    if kmeans and plain:
        notices.append(f"k-means without layer-input moments (importance 1, plain k-means) for "
                       f"{len(plain)} tensor(s): {', '.join(plain[:8])}"
                       f"{' ...' if len(plain) > 8 else ''}")
    fingerprint = Fingerprint(model_digest(loaded, originals), data_digest,
                              digest(repr(sorted(config.curve_settings().items()))))
    data = diagnose(config.target, config.measure, config.prune.reconstructs, data_name,
                    batches.synthetic, replay, check, how, moments, inputs)
    notices.extend(data.warnings)
    # rows the fit part never reads are coded coarser only where the joint allocation chooses
    # the widths and a held-out part checks the result (it alone reads such rows)
    split = config.target.bound and coding.value_bits is None and check is not None and \
        coding.quantizer == "uniform" and coding.coarse_unread
    unread = unread_rows(loaded, matrices(extra), replay, check, runner, measure) \
        if split else {}
    if split and measure.metric == "kl" and not config.prune.reconstructs:
        # classes that never compete barely move the KL (GPTQ's grids do not split rows)
        heads = matching_heads(loaded, weights, originals, next(iter(replay))[1])
        unread.update(cold_classes(heads, originals, replay, check, runner, measure))
    notices.extend(u.describe(n) for n, u in unread.items())
    return Calibration(loaded, weights, originals, runner, replay, scores,
                       {n: Ranking(s) for n, s in scores.items()}, fingerprint, data_name,
                       inputs, read_weights(loaded, extra), tuple(notices),
                       importance=importance, axes=output_axes(loaded, weights + extra),
                       means={n: m.means(originals[n].shape) for n, m in moments.items()},
                       biases={n: b.name for n, b in biases.items()},
                       bias_values=read_weights(loaded, list(biases.values())),
                       prober=Prober(runner, replay, cuts, measure.jobs, PROBE_OPTIMIZE,
                                     tails=tails),
                       data=data, check=check, extra_weights=tuple(extra), unread=unread,
                       decisions=decisions, sequences=measure.metric == "kl")


def unread_rows(model: Model, tables: Sequence[Weight], fit: Replay, held: Replay,
                runner: Runner, measure: Measurement) -> dict[str, UnreadRows]:
    """The lookup tables (`lookup_indices`) with rows the fit part never reads, and how they
    are coded (`algo.unread.plan`, from the reads of each row in both parts and the held-out
    distortion of each class of rows quantized alone)."""
    out = {}
    for name, key in lookup_indices(model, tables).items():
        table = read_weights(model, [w for w in tables if w.name == name])[name]
        rows = table.shape[0]
        fit_reads, held_reads = (sum(np.bincount(np.asarray(feed[key]).ravel() % rows,
                                                 minlength=rows) for feed, _ in part)
                                 for part in (fit, held))
        chosen = plan(np.asarray(fit_reads), np.asarray(held_reads),
                      lambda marked, n=name, t=table: rows_distortion(n, t, marked, runner, held,
                                                                      measure))
        if chosen is not None:
            out[name] = chosen
    return out


KL_REFUSAL = ("--metric kl needs class scores: an output [batch, classes], or a classifier "
              "layer's output with the classes on its last axis; use --metric nmse, "
              "nmse-channel or cosine")


def refuse_kl(model: Model, class_output: bool) -> None:
    """`--metric kl` reads class scores: a UsageError unless an output is [batch, classes]
    (`class_output`) or a classifier head's (`head_outputs`)."""
    if not class_output and not head_outputs(model):
        raise UsageError(KL_REFUSAL)


def matching_heads(model: Model, weights: Sequence[Weight],
                   originals: Mapping[str, np.ndarray], outputs: Sequence[np.ndarray]
                   ) -> dict[str, tuple[int, int]]:
    """The classifier heads (`class_heads`) whose output channels are the last axis of their
    graph output in `outputs` (one batch of the reference): weight -> (output index, its
    output axis)."""
    names = [o.name for o in model.proto.graph.output]
    axes = output_axes(model, weights)
    found = {}
    for name, output in class_heads(model, weights).items():
        index, axis = names.index(output), axes.get(name)
        if axis is not None and np.ndim(outputs[index]) >= 2 and \
                np.shape(outputs[index])[-1] == originals[name].shape[axis]:
            found[name] = (index, axis)
    return found


def cold_classes(heads: Mapping[str, tuple[int, int]], originals: Mapping[str, np.ndarray],
                 fit: Replay, held: Replay, runner: Runner, measure: Measurement
                 ) -> dict[str, UnreadRows]:
    """The classifier heads with classes that no fit frame brings within `COMPETE_GAP` nats of
    its top class, and how they are coded (`algo.unread.plan`: a class is read by a frame
    that brings it that near, in either part)."""
    out = {}
    for name, (index, axis) in heads.items():
        classes = originals[name].shape[axis]

        def near(part: Replay, index: int = index, classes: int = classes) -> np.ndarray:
            counts = np.zeros(classes)
            for _, outputs in part:
                lp = log_probs(outputs[index]).reshape(-1, classes)
                counts += (lp >= lp.max(axis=1, keepdims=True) - COMPETE_GAP).sum(axis=0)
            return counts

        chosen = plan(near(fit), near(held),
                      lambda marked, n=name, a=axis: rows_distortion(
                          n, originals[n], marked, runner, held, measure, a),
                      f"never come within {COMPETE_GAP:g} nats of the top class on a fit frame")
        if chosen is not None:
            out[name] = chosen
    return out


def rows_distortion(name: str, table: np.ndarray, marked: np.ndarray, runner: Runner,
                    held: Replay, measure: Measurement, axis: int = 0) -> float:
    """The distortion on `held` with the `marked` rows (along `axis`) of `table` quantized at
    `PROBE_BITS` (a step per row), the other rows exact."""
    rows = (slice(None),) * axis + (marked,)
    grid, _ = grids.fit(table[rows], PROBE_BITS, axis)
    values = table.copy()
    values[rows] = grids.round_to(table[rows], grid, PROBE_BITS) * grid.broadcast(table.ndim)
    prepared = {name: runner.weight_value(name, values)}
    return held.distortion(lambda feed: runner.run(feed, prepared), measure.channel_axis,
                           measure.metric).value(measure.metric)


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
KL_SEQUENCE_NOTICE = (
    "a KL bound on a sequence output is weak evidence on few held-out samples: a few positions "
    "whose decision moves (a CTC alignment shifted by a frame) can carry most of the KL on new "
    "data (the OCR model of docs/ZOO.md: 10 of 4,800 test frames, 94%; test KL 2-57x the "
    "bounds its 8 held-out lines met); check on more data (--verify) or bound nmse")
FEW_CLASSES_SHARE = 0.9  # a class given for this share of the samples makes agreement weak
FLAT_OUTPUT_NMSE = 1e-2  # a constant output scoring below this: the outputs barely vary


def diagnose(target: Target, measure: Measurement, reconstructs: bool, name: str,
             synthetic: bool, replay: Replay, check: Replay | None, how: str, moments: Mapping,
             inputs: Mapping[str, LayerInput]) -> DataReport:
    """What the calibration data can show: synthetic or not, how much the reference outputs
    vary (warnings when a metric cannot discriminate), and whether the layer inputs seen
    span the widest layer input (a rank-deficient Hessian otherwise)."""
    report = DataReport(name, synthetic, replay.samples,
                        check.samples if check is not None else None, how)
    if synthetic:
        report.warnings.append(SYNTHETIC_NOTICE)
    report.outputs = describe_outputs(replay, measure.channel_axis)
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
    metric = measure.metric
    if report.outputs and metric in ("nmse", "nmse-channel") and flat < FLAT_OUTPUT_NMSE:
        report.warnings.append(
            f"the reference outputs barely vary over the fit samples: a model that outputs "
            f"their mean scores nmse {flat:.3g}, so nmse cannot tell a broken model below that")
    cos = sum(o.constant_cosine for o in report.outputs)
    if report.outputs and measure.metric == "cosine" and cos < FLAT_OUTPUT_NMSE:
        report.warnings.append(
            f"the reference outputs barely vary over the fit samples: a model that outputs "
            f"their mean scores cosine distance {cos:.3g}")
    bound = target.max_distortion
    if bound is not None and metric == "kl" and \
            any(o.ndim >= 3 and has_class_axis(o) for o in next(iter(replay))[1]):
        report.warnings.append(KL_SEQUENCE_NOTICE)
    if bound is not None and measure.metric in ("nmse", "cosine") and report.outputs:
        constant = flat if measure.metric == "nmse" else cos
        if bound >= constant:
            report.warnings.append(
                f"--max-distortion {bound:g} is met by a model that outputs the mean "
                f"reference output ({measure.metric} {constant:.3g}): the bound cannot "
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
    if report.rank_deficient and reconstructs:
        w, width, columns = max(((n, wd, c) for n, wd, c in widths
                                 if n in report.rank_deficient), key=lambda t: t[1])
        report.warnings.append(
            f"{len(report.rank_deficient)} layer input(s) are wider than the positions x "
            f"samples seen (widest: {w}, {width} inputs, {columns} seen): their Hessians are "
            "rank-deficient and reconstruction can fit the calibration samples; give more "
            "data" + ("" if check is not None else
                      ", or --holdout 0.25 so that updates that do not hold on held-out "
                      f"samples are dropped (nothing is held out by default under "
                      f"{AUTO_HOLDOUT_MIN_RECONSTRUCT} samples)"))
    return report



def check_curves(curves: Curves, cal: Calibration) -> None:
    """Refuse curves measured on another model, other data or other settings."""
    differ = curves.fingerprint.mismatch(cal.fingerprint)
    if differ:
        raise UsageError(f"the curves do not match this run ({', '.join(differ)} differ); "
                         "rerun rdonnx calibrate with the same model, data (--holdout, "
                         "--verify) and settings")


