"""The compress report: typed records, a table for people, versioned JSON for machines."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rdonnx import strictjson
from rdonnx.choices import DEFAULT_CRITERION
from rdonnx.runtime.diagnose import OutputStats
from rdonnx.runtime.distortion import Distortion

SCHEMA_VERSION = 2  # 1: `settings` flat (config version 1); 2: grouped (docs/FORMAT.md, "Settings")


@dataclass
class WeightReport:
    """One prunable weight: its size, what it keeps, and what pruning it alone costs."""

    name: str
    op: str
    shape: list[int]
    dtype: str
    params: int
    kept: int
    density: float
    distortion: float | None = None  # output distortion with only this weight pruned
    criterion: str = DEFAULT_CRITERION  # the in-layer criterion really used for this weight
    curve: list[float] | None = None  # measured D(d) on the report's grid
    bits_per_weight: float | None = None  # coded bits per entry in the .rdonnx artifact
    value_bits: int | None = None  # quantization width of its survivors (None: exact)
    reconstruction: str | None = None  # dampening chosen, or why an update was dropped


@dataclass
class RatePoint:
    """The model measured at one rate (a search probe, or a point of the frontier)."""

    rate: float
    distortion: float
    top1_agreement: float | None
    meets: bool | None = None  # search probes: whether the bound holds
    bits_per_weight: float | None = None  # coded bits per prunable weight (bits targets)
    samples: int | None = None  # the samples the figures rest on
    limit: float | None = None  # what the bound was checked against (confidence bound, score)
    score: float | None = None  # the task score (--eval)


@dataclass
class DataReport:
    """What the calibration data is and what it can show (the report's diagnostics)."""

    name: str
    synthetic: bool
    fit_samples: int  # samples the curves, statistics and reconstruction use
    holdout_samples: int | None  # samples every bound is checked on (None: no holdout)
    holdout: str  # how they were held out
    outputs: list[OutputStats] = field(default_factory=list)
    widest_input: tuple[str, int, int] | None = None  # weight, input width, columns seen
    rank_deficient: list[str] = field(default_factory=list)  # weights: columns < width
    warnings: list[str] = field(default_factory=list)


@dataclass
class BoundCheck:
    """The final check of a bound: what was measured, on how many samples, against what."""

    target: str  # max_distortion, min_agreement, min_score, max_drop
    bound: float
    data: str  # "held-out" or "calibration"
    samples: int
    measured: float  # the figure as measured (distortion, agreement or score)
    limit: float  # what the bound was checked against: the confidence bound, or the score
    confidence: float  # 0: checked as measured
    met: bool
    reference_score: float | None = None  # --eval: the original model's score
    flips: float = 0.0  # nmse in `limit` for flips of the graph's own decisions the samples
    # did not show (estimated from their margins: `confidence.flip_nmse`)


@dataclass
class Evaluation:
    """Distortion and accuracy of the compressed model against the original on one data set."""

    data: str
    samples: int
    metric: str
    distortion: float
    nmse: float
    nmse_channel: float
    cosine: float
    kl: float | None
    top1_agreement: float | None
    accuracy_original: float | None = None
    accuracy_compressed: float | None = None
    top1_lower: float | None = None  # one-sided lower confidence bound of the agreement
    confidence: float = 0.0  # its level
    labelled: int | None = None  # samples the accuracies rest on

    @classmethod
    def from_distortion(cls, data: str, metric: str, d: Distortion,
                        accuracy_original: float | None = None,
                        accuracy_compressed: float | None = None,
                        confidence: float = 0.95, labelled: int | None = None) -> Evaluation:
        return cls(data=data, samples=d.samples, metric=metric, distortion=d.value(metric),
                   nmse=d.nmse, nmse_channel=d.nmse_channel, cosine=d.cosine, kl=d.kl,
                   top1_agreement=d.top1_agreement,
                   accuracy_original=accuracy_original, accuracy_compressed=accuracy_compressed,
                   top1_lower=d.agreement_lower(confidence) if confidence > 0 else None,
                   confidence=confidence, labelled=labelled)

    def describe(self) -> str:
        """One line: the figures and the samples each rests on."""
        line = f"{self.data}: {self.metric} {self.distortion:.4g} ({self.samples} samples)"
        if self.top1_agreement is not None:
            line += f", top-1 agreement {_pct(self.top1_agreement)}"
            if self.top1_lower is not None:
                line += f" ({self.confidence:.0%} lower bound {_pct(self.top1_lower)})"
        if self.accuracy_original is not None:
            line += f", accuracy {_pct(self.accuracy_original)} -> " \
                    f"{_pct(self.accuracy_compressed)}"
            if self.labelled is not None:
                line += f" ({self.labelled} labelled samples)"
        return line


@dataclass
class CodingReport:
    """Sizes of the entropy-coded artifact, per prunable weight and against baselines."""

    bits_per_weight: float  # positions + values streams (their side information included)
    positions_bits_per_weight: float
    values_bits_per_weight: float
    side_bits_per_weight: float  # the part of the streams that is model parameters
    iid_entropy_bits_per_weight: float  # empirical i.i.d. entropy of what is coded
    artifact_bits_per_weight: float  # the whole file (graph, biases, manifest) per weight
    artifact_bytes: int
    dense_bytes: int  # the pruned model (exact values) as dense ONNX
    dense_zstd19_bytes: int | None  # that, compressed with zstd -19 (None: too large)
    sparse_bytes: int  # the pruned model (exact values) as sparse ONNX
    smaller_than_original: float  # ratios: other size / artifact size
    smaller_than_dense_zstd19: float | None
    smaller_than_sparse: float


@dataclass
class Report:
    """Everything `compress` measured; one source of truth for the table and the JSON."""

    model: str
    method: str
    criterion: str
    rate: float  # achieved: params_kept / params_total
    device: str
    simplified: bool
    params_total: int
    params_kept: int
    input_bytes: int
    calibration: Evaluation  # on the fit part of the calibration data
    weights: list[WeightReport]
    settings: dict[str, Any]
    rdonnx_version: str
    test: Evaluation | None = None
    holdout: Evaluation | None = None  # on the held-out part (None: no holdout)
    check: BoundCheck | None = None  # the final check of a bound target
    data: DataReport | None = None  # what the calibration data is and can show
    score: float | None = None  # --eval with a rate: the result's task score ...
    reference_score: float | None = None  # ... and the original model's
    value_bits: int | None = None  # quantization of surviving values (None: exact)
    unpruned_bits: dict[str, int] = field(default_factory=dict)  # widths of the coded tensors
    # that are not pruned (embedding tables, biases); empty when they are exact
    coding: CodingReport | None = None  # set when an .rdonnx artifact is written
    predicted_distortion: float | None = None  # sum of the curves at the chosen densities
    grid: list[float] | None = None
    search: list[RatePoint] = field(default_factory=list)
    frontier: list[RatePoint] = field(default_factory=list)  # the method at other rates
    output: str | None = None
    output_format: str | None = None
    output_bytes: int | None = None
    notices: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds of each stage
    schema_version: int = SCHEMA_VERSION

    @property
    def density(self) -> float:
        return self.params_kept / self.params_total if self.params_total else 1.0

    def to_json(self, timings: bool = True) -> str:
        """JSON with sorted keys and the schema version; deterministic but for `timings`
        (the seconds of each stage; left out with `timings=False`)."""
        data = asdict(self)
        if not timings:
            del data["timings"]
        data["density"] = self.density
        return strictjson.dumps(_rounded(data), indent=2, sort_keys=True) + "\n"


def _rounded(value: Any) -> Any:
    """Floats to 6 significant digits, so tiny runtime noise never changes the report."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _fmt(value: float | None, pattern: str = "{:.4g}") -> str:
    return "-" if value is None else pattern.format(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A plain text table, columns padded, numbers right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = []
    for row in [header, *rows]:
        cells = [str(c).rjust(w) if i and _numeric(str(c)) else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    return text[:1].isdigit() or text[:1] in "-." and text[1:2].isdigit()


def render(report: Report) -> str:
    """The human summary printed on stderr."""
    rows = [(w.name, w.op, "x".join(map(str, w.shape)), str(w.params), _pct(w.density),
             _fmt(w.distortion), _fmt(w.bits_per_weight, "{:.3f}")) for w in report.weights]
    metric = report.calibration.metric
    parts = [table(rows, ("weight", "op", "shape", "params", "kept", f"{metric} alone",
                          "bits/w")), ""]
    size = f"{report.input_bytes:,} B"
    if report.output_bytes is not None:
        size += f" -> {report.output_bytes:,} B ({report.output_format}, " \
                f"{report.output_bytes / max(report.input_bytes, 1):.1%})"
    parts.append(f"params kept   {report.params_kept:,} / {report.params_total:,} "
                 f"({report.density:.2%}), method {report.method}, criterion "
                 f"{report.criterion}, device {report.device}")
    parts.append(f"file size     {size}")
    widths = sorted({w.value_bits for w in report.weights if w.value_bits is not None})
    values = "exact" if not widths else f"{widths[0]}-bit" if len(widths) == 1 else \
        "per weight: " + ", ".join(f"{w.name} {w.value_bits}-bit" for w in report.weights)
    if report.unpruned_bits:
        counts = Counter(report.unpruned_bits.values())
        values += "; not pruned: " + ", ".join(
            f"{counts[b]} tensor{'s' if counts[b] > 1 else ''} {b}-bit" for b in sorted(counts))
    if report.method == "surp":
        values = "SuRP threshold staircase (sums of quanta; positions = indices, values = signs)"
    parts.append(f"values        {values}")
    c = report.coding
    if c is not None:
        parts.append(f"coded         {c.bits_per_weight:.3f} bits per prunable weight "
                     f"(positions {c.positions_bits_per_weight:.3f}, values "
                     f"{c.values_bits_per_weight:.3f}, of which side information "
                     f"{c.side_bits_per_weight:.3f}; i.i.d. entropy "
                     f"{c.iid_entropy_bits_per_weight:.3f}); whole file "
                     f"{c.artifact_bits_per_weight:.3f}")
        zstd = "-" if c.dense_zstd19_bytes is None else \
            f"{c.dense_zstd19_bytes:,} B ({c.smaller_than_dense_zstd19:.2f}x)"
        parts.append(f"baselines     original {c.smaller_than_original:.2f}x larger; dense ONNX "
                     f"+ zstd -19 {zstd}; sparse ONNX {c.sparse_bytes:,} B "
                     f"({c.smaller_than_sparse:.2f}x)")
    data = report.data
    if data is not None:
        parts.append(f"data          {data.name}{' (SYNTHETIC)' if data.synthetic else ''}: "
                     f"{data.fit_samples} fit samples, held out: {data.holdout}")
        for o in data.outputs:
            line = f"outputs       #{o.index}: a constant output scores nmse " \
                   f"{o.constant_nmse:.3g}, cosine {o.constant_cosine:.3g}; " \
                   f"{o.flat_channels} of {o.channels} channels flat"
            if o.classes is not None:
                line += f"; {o.distinct_top1} of {o.classes} classes seen as top-1 (most " \
                        f"frequent {o.top_class_share:.0%}), entropy {o.entropy:.2f} of " \
                        f"{o.max_entropy:.2f} bits"
            parts.append(line)
        if data.widest_input is not None:
            name, width, columns = data.widest_input
            parts.append(f"layer inputs  widest {name}: {width} inputs, {columns} positions x "
                         f"samples seen{' (rank-deficient)' if columns < width else ''}; "
                         f"{len(data.rank_deficient)} rank-deficient")
        for warning in data.warnings:
            parts.append(f"WARNING       {warning}")
    for ev in filter(None, (report.calibration, report.holdout, report.test)):
        parts.append(ev.describe())
    if report.check is not None:
        k = report.check
        upper = k.limit - k.flips
        against = "as measured" if k.confidence <= 0 or upper == k.measured \
            else f"{k.confidence:.0%} confidence bound {upper:.4g}"
        if k.flips:
            against += (f" + {k.flips:.3g} for flips of the graph's own decisions that the "
                        f"samples do not show = {k.limit:.4g}")
        parts.append(f"check         --{k.target.replace('_', '-')} {k.bound:g} on "
                     f"{k.samples} {k.data} samples: measured {k.measured:.4g}, {against}: "
                     f"{'met' if k.met else 'NOT met'}"
                     + (f" (original score {k.reference_score:.4g})"
                        if k.reference_score is not None else ""))
    if report.score is not None:
        parts.append(f"score         {report.score:.4g} (--eval; original "
                     f"{report.reference_score:.4g})")
    for w in report.weights:
        if w.reconstruction:
            parts.append(f"reconstruct   {w.name}: {w.reconstruction}")
    if report.predicted_distortion is not None:
        parts.append(f"additivity    {metric} predicted by the curves "
                     f"{report.predicted_distortion:.4g}, measured "
                     f"{report.calibration.distortion:.4g}")
    for step in report.search:
        extra = "" if step.score is None else f", score {step.score:.4g}"
        limit = "" if step.limit is None or step.score is not None else \
            f", bound checked on {step.limit:.4g}"
        parts.append(f"search        rate {step.rate:.4g}: {metric} {step.distortion:.4g}, "
                     f"top-1 agreement {_pct(step.top1_agreement)}{extra}{limit}"
                     f"{f' ({step.samples} samples)' if step.samples else ''}"
                     f"{' (meets the bound)' if step.meets else ''}")
    if report.output:
        parts.append(f"written       {report.output}")
    return "\n".join(parts)
