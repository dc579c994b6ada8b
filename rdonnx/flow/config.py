"""The settings of a compress run as types: a `Target`, shared option groups (`Selection`,
`Measurement`, `Pruning`, `Coding`, `DataOptions`) and the method's own options
(`rdonnx.flow.methods.options`), collected in one versioned `CompressConfig`.

Every field is declared once with its default and its command-line spec (`rdonnx.option`):
the CLI's options are generated from these classes. `CompressConfig.of(rate=0.5, metric="kl")`
builds a config from the options' keywords (the CLI's parameter names); functions take the
group they use (`config.measure`, `config.prune`...), not the whole config.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from rdonnx.choices import (  # plain data: importing this module (the CLI does) stays light
    CRITERIA,
    DEFAULT_CHANNEL_AXIS,
    DEFAULT_CRITERION,
    DEFAULT_DAMP,
    DEFAULT_DEVICE,
    DEFAULT_GRID,
    DEFAULT_MIN_PARAMS,
    DEFAULT_QUANTIZER,
    DEFAULT_REPLAY_MB,
    DEVICES,
    FORMATS,
    METHODS,
    METRICS,
    QUANTIZERS,
    VALUE_BITS,
    VALUES,
    DataOptions,
    VerifyOptions,
    check_grid,
)
from rdonnx.errors import UsageError
from rdonnx.flow.methods.options import METHOD_OPTIONS, MethodOptions
from rdonnx.option import key_of, option

CONFIG_VERSION = 2  # 1: flat settings; 2: grouped as below (docs/FORMAT.md, "Settings")
TARGETS = ("rate", "distortion", "agreement", "bits", "pattern", "score", "drop")


def _check_choice(value: str, options, what: str) -> None:
    if value not in options:
        raise UsageError(f"unknown {what} {value!r}; choose one of {', '.join(options)}")


@dataclass(frozen=True)
class Target:
    """What a compress run aims at: exactly one of its fields (`kind` says which, `value` is
    its value).

    rate: the fraction of prunable weights kept; distortion: the smallest rate whose measured
    distortion is at most `value`; agreement: the smallest rate whose measured top-1
    agreement is at least `value`; bits: the largest rate whose coded positions + values
    take at most `value` bits per prunable weight; pattern: N of every M inputs per row,
    `value` = (N, M); score / drop: the smallest rate whose task score (--eval) is at least
    `value` / at most `value` below the original's.
    """

    rate: float | None = option(
        None, "Fraction of prunable weights kept (density), 0 < R <= 1.", value_type=float)
    max_distortion: float | None = option(
        None, "Instead of --rate: the smallest rate whose measured distortion (--metric) on the "
        "calibration data is at most D.", value_type=float)
    min_agreement: float | None = option(
        None, "Instead of --rate: the smallest rate whose measured top-1 agreement with the "
        "original is at least A (0..1).", value_type=float)
    bits_per_weight: float | None = option(  # coded bits per prunable weight, positions + values
        None, "Instead of --rate: the largest rate whose coded positions + values take at most "
        "B bits per prunable weight.", value_type=float)
    pattern: str | None = option(
        None, "Structured sparsity instead of a rate: keep N of every M consecutive inputs per "
        "output row (2:4 is what GPUs accelerate).", value_type=str, metavar="N:M")
    min_score: float | None = option(
        None, "Instead of --rate: the smallest rate whose task score (--eval) on the held-out "
        "data is at least S.", value_type=float)
    max_drop: float | None = option(
        None, "Instead of --rate: the smallest rate whose task score (--eval) on the held-out "
        "data is at most D below the original model's.", value_type=float)

    def _given(self) -> list[tuple[str, float]]:
        return [(kind, value) for kind, value in (
            ("rate", self.rate), ("distortion", self.max_distortion),
            ("agreement", self.min_agreement), ("bits", self.bits_per_weight),
            ("score", self.min_score), ("drop", self.max_drop))
            if value is not None]

    def check_one(self) -> None:
        """Exactly one target (a pattern alone, or one of the four others)."""
        if self.pattern is not None:
            if self._given():
                raise UsageError("--pattern N:M fixes the density; drop --rate and the other "
                                 "targets")
            self.n_m  # noqa: B018 - validates the pattern
        elif len(self._given()) != 1:
            raise UsageError("give exactly one target: --rate, --max-distortion, "
                             "--min-agreement, --bits-per-weight, --min-score or --max-drop")

    def check_values(self) -> None:
        """Each given target within its range."""
        for kind, value in self._given():
            if not math.isfinite(value):
                name = next(k for k, v in TARGET_FLAGS.items() if v == kind)
                raise UsageError(f"--{name} must be a finite number, got {value}")
        if self.max_drop is not None and self.max_drop < 0:
            raise UsageError(f"--max-drop must be >= 0, got {self.max_drop}")
        if self.bits_per_weight is not None and self.bits_per_weight <= 0:
            raise UsageError(f"--bits-per-weight must be > 0, got {self.bits_per_weight}")
        if self.rate is not None and not 0 < self.rate <= 1:
            raise UsageError(f"--rate must be in (0, 1] (the fraction of prunable weights kept), "
                             f"got {self.rate}")
        if self.max_distortion is not None and self.max_distortion < 0:
            raise UsageError(f"--max-distortion must be >= 0, got {self.max_distortion}")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            raise UsageError(f"--min-agreement must be in [0, 1], got {self.min_agreement}")

    @property
    def n_m(self) -> tuple[int, int] | None:
        """The N:M pattern as two integers (None without --pattern)."""
        if self.pattern is None:
            return None
        try:
            n, m = (int(v) for v in self.pattern.split(":"))
        except ValueError:
            n, m = 0, 0
        if not 1 <= n < m <= 32:
            raise UsageError(f"--pattern {self.pattern!r}: write N:M with 1 <= N < M <= 32, "
                             "e.g. 2:4")
        return n, m

    @property
    def kind(self) -> str:
        """One of `TARGETS` (`check_one` makes sure there is exactly one)."""
        if self.pattern is not None:
            return "pattern"
        given = self._given()
        if not given:
            raise UsageError("give exactly one target: --rate, --max-distortion, "
                             "--min-agreement, --bits-per-weight, --min-score or --max-drop")
        return given[0][0]

    @property
    def value(self) -> float | tuple[int, int]:
        return self.n_m if self.kind == "pattern" else self._given()[0][1]

    @property
    def bound(self) -> bool:
        """Whether the rate is searched for by measuring (a distortion, agreement or score
        bound; False without a target, as for `rdonnx calibrate`)."""
        given = self._given()
        return self.pattern is None and bool(given) and given[0][0] in (
            "distortion", "agreement", "score", "drop")


TARGET_FLAGS = {"rate": "rate", "max-distortion": "distortion", "min-agreement": "agreement",
                "bits-per-weight": "bits", "min-score": "score", "max-drop": "drop"}


@dataclass(frozen=True)
class Selection:
    """Which weights are pruned."""

    min_params: int = option(DEFAULT_MIN_PARAMS, "Smallest weight (elements) that is pruned.")
    include: tuple[str, ...] = option((), "Also prune these.", multiple=True, metavar="GLOB")
    exclude: tuple[str, ...] = option((), "Never prune these.", multiple=True, metavar="GLOB")
    simplify: bool = option(True, "Skip onnxsim simplification.", flag="--no-simplify",
                            negate=True)


@dataclass(frozen=True)
class Measurement:
    """How distortion is measured: the metric, the curves' grid, where and with what memory."""

    metric: str = option(
        "nmse", "Output distortion: nmse (sum over outputs of ||y-y'||^2/||y||^2), "
        "nmse-channel (per channel along --channel-axis, averaged), kl of class scores (along "
        "the last axis: [batch, classes], or a classifier head's [..., classes]), cosine.",
        choices=METRICS)
    channel_axis: int = option(
        DEFAULT_CHANNEL_AXIS, "Channel axis of the outputs for --metric nmse-channel.")
    grid: tuple[float, ...] = option(
        DEFAULT_GRID, "Densities of the R-D curves [default: 20 from 1 down to 0.002, "
        "log-spaced].", value_type=str, metavar="D1,D2,..", show_default=False)
    device: str = option(
        DEFAULT_DEVICE, "auto: CUDA when its execution provider really works, else CPU.",
        choices=DEVICES)
    replay_mb: int = option(  # calibration batches + reference outputs in memory; rest on disk
        DEFAULT_REPLAY_MB, "MiB of calibration batches and reference outputs kept in memory for "
        "the probes; the rest is spilled to a temporary folder.", range=(0, None))
    jobs: int = option(  # probe threads; results do not depend on it
        1, "Probe threads, one ONNX Runtime session each (with N > 1 each session runs on "
        "cores/N threads); the results do not depend on N.", range=(1, 256))
    adaptive: bool = option(  # coarse grid, refined where the allocation lands (rd at a rate
        # or a distortion bound, grids of more than ADAPTIVE_MIN_POINTS points)
        True, "Measure every density of the grid instead of a coarse pass refined around the "
        "densities the allocation chooses.", flag="--full-grid", negate=True)
    downstream: bool = option(  # probes run only the graph downstream of the changed weight
        True, "Run every probe on the whole graph instead of only the part downstream of the "
        "changed weight (fed with tensors recorded by the reference pass, within --replay-mb, "
        "spilled past it).", flag="--whole-graph-probes", negate=True)
    layer_distortion: bool = option(  # measure each weight pruned alone at its chosen density
        True, "Skip measuring each weight pruned alone (one pass per weight).",
        flag="--no-layer-distortion", negate=True)

    def check(self) -> None:
        _check_choice(self.metric, METRICS, "metric")
        if self.channel_axis < 0:
            raise UsageError(f"--channel-axis must be >= 0, got {self.channel_axis}")
        if not 1 <= self.jobs <= 256:
            raise UsageError(f"--jobs must be in 1..256, got {self.jobs}")


@dataclass(frozen=True)
class Pruning:
    """How entries are chosen within a weight, and whether survivors are reconstructed."""

    criterion: str = option(
        DEFAULT_CRITERION, "In-layer criterion: |w|; w^2 * E[x^2] of the layer input compared "
        "within output rows (Wanda / Gao et al.); or obs, SparseGPT's selection during "
        "reconstruction (implies --reconstruct).", choices=CRITERIA)
    reconstruct: bool = option(
        False, "Update surviving weights to reconstruct each layer's output on the calibration "
        "data (OBS / SparseGPT; GPTQ error feedback when quantizing).")
    sequential: bool = option(
        False, "Reconstruct layers in graph order, each from the inputs the already-compressed "
        "earlier layers produce, aimed at the original model's layer output, so later layers "
        "undo earlier layers' error (implies --reconstruct).")
    damp: float = option(
        DEFAULT_DAMP, "Reconstruction dampening: share of the mean diagonal of X X^T.")
    hessian_mb: int = option(  # CREPE's 65,536-feature convolutions need about 140 GiB
        4096, "MiB one layer's reconstruction may hold in Hessians (X X^T of its input; float64 "
        "while inverting); a larger layer is pruned by its mask alone, with a notice.",
        range=(1, None))

    @property
    def reconstructs(self) -> bool:
        """Survivors are updated (--reconstruct, --sequential or the obs criterion)."""
        return self.reconstruct or self.sequential or self.criterion == "obs"


@dataclass(frozen=True)
class Coding:
    """What the result is written as and how its surviving values are coded."""

    format: str = option(  # what the result is for
        "rdonnx", "rdonnx: entropy-coded artifact (rdonnx.open_session runs it in stock ONNX "
        "Runtime); dense: ONNX with zeros; sparse: ONNX sparse_initializer where smaller.",
        choices=FORMATS)
    values: str = option(  # "auto": quantized for rdonnx only
        "auto", "Surviving values: quantized, exact, or auto (quantized for rdonnx only).",
        choices=VALUES)
    value_bits: int | None = option(  # None: the fewest bits within value_budget
        None, "Quantize survivors to this many bits [default: the fewest bits that add at most "
        "--value-budget to the measured distortion].", value_type=int,
        range=(min(VALUE_BITS), max(VALUE_BITS)))
    value_budget: float = option(
        0.02, "Share of the measured distortion that quantization may add.")
    quantizer: str = option(
        DEFAULT_QUANTIZER, "Quantized values: a uniform grid (a step per output channel where that "
        "pays, clipped by measured error), or a k-means codebook of 2^b - 1 centroids weighted "
        "by E[x^2] of the layer input (Gao et al.; plain k-means where no input is seen). Not "
        "with --reconstruct.", choices=QUANTIZERS)
    rdoq: bool = option(
        False, "Uniform grid: round each value to the neighbouring level (or zero) that lowers "
        "distortion + lambda x coded bits (lambda: the grid's own slope); smaller files, but "
        "more output distortion per bit saved on the digits models.")
    bias_correction: bool = option(
        True, "Keep biases as they are. By default each layer's bias absorbs the shift of its "
        "output mean that quantizing its weight causes on the calibration data (bias "
        "correction; Conv, Gemm, MatMul + Add).", flag="--no-bias-correction", negate=True)
    lossless_unpruned: bool = option(
        False, "Keep large unpruned tensors (embeddings...) exact instead of quantized.")
    coarse_unread: bool = option(
        True, "Code every row of a lookup table alike. By default, under a bound with held-out "
        "data, the rows of an embedding table that the fit samples never read are coded a few "
        "bits coarser, at the share of reads they get predicted and the held-out part checking "
        "the result.", flag="--no-coarse-unread", negate=True)

    @property
    def quantized(self) -> bool:
        """Whether surviving values are quantized (`values`, or for `auto`, the format)."""
        return self.values == "quantized" or (self.values == "auto" and self.format == "rdonnx")

    def check(self) -> None:
        if self.value_bits is not None and self.value_bits not in VALUE_BITS:
            raise UsageError(f"--value-bits must be in 2..16, got {self.value_bits}")
        if not math.isfinite(self.value_budget):
            raise UsageError(f"--value-budget must be a finite number, got {self.value_budget}")
        if self.value_budget < 0:
            raise UsageError(f"--value-budget must be >= 0, got {self.value_budget}")
        for value, options, what in ((self.format, FORMATS, "format"),
                                     (self.values, VALUES, "values"),
                                     (self.quantizer, QUANTIZERS, "quantizer")):
            _check_choice(value, options, what)


GROUPS = {"target": Target, "selection": Selection, "measure": Measurement,
          "prune": Pruning, "coding": Coding, "data": DataOptions,
          "verify": VerifyOptions}  # CompressConfig's groups


@dataclass(frozen=True)
class CompressConfig:
    """Every setting of a compress run; serialised into the report and the artifact.

    `method_options`: the options of `method` when it has its own (`METHOD_OPTIONS`; its
    defaults when not given), else None. Build one from keywords with `CompressConfig.of`.
    """

    target: Target = field(default_factory=Target)
    method: str = option(
        "rd", "How the densities are chosen: one of the methods listed below.",
        choices=METHODS)
    method_options: MethodOptions | None = None
    selection: Selection = field(default_factory=Selection)
    measure: Measurement = field(default_factory=Measurement)
    prune: Pruning = field(default_factory=Pruning)
    coding: Coding = field(default_factory=Coding)
    data: DataOptions = field(default_factory=DataOptions)
    verify: VerifyOptions = field(default_factory=VerifyOptions)  # holdout, confidence, --eval
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.method_options is None and self.method in METHOD_OPTIONS:
            object.__setattr__(self, "method_options", METHOD_OPTIONS[self.method]())

    @classmethod
    def of(cls, **options: Any) -> CompressConfig:
        """A config from option keywords (`rate=0.5, metric="kl", pqi_p=0.3`: the CLI's
        parameter names, `KEYS`) or whole groups (`measure=Measurement(...)`); the rest keep
        their defaults. The options of a method other than `method` are refused unless they
        keep their defaults."""
        groups = {name: options.pop(name) for name in (*GROUPS, "method_options")
                  if name in options}
        method = options.pop("method", cls.method)
        unknown = sorted(set(options) - set(KEYS))
        if unknown:
            raise TypeError(f"unknown option {unknown[0]!r} of CompressConfig")
        per_group: dict[str, dict[str, Any]] = {}
        for key, value in options.items():
            owner, name = KEYS[key]
            per_group.setdefault(owner, {})[name] = value
        for owner, given in per_group.items():
            if owner in GROUPS:
                base = groups.get(owner) or GROUPS[owner]()
                groups[owner] = replace(base, **given)
            elif owner != method:
                default = METHOD_OPTIONS[owner]()
                changed = [n for n, v in given.items() if v != getattr(default, n)]
                if changed:
                    key = next(k for k, (o, n) in KEYS.items() if o == owner and n == changed[0])
                    raise UsageError(f"--{key.replace('_', '-')} applies to --method {owner} "
                                     "only")
            else:
                base = groups.get("method_options") or METHOD_OPTIONS[owner]()
                groups["method_options"] = replace(base, **given)
        return cls(method=method, **groups)

    def updated(self, **options: Any) -> CompressConfig:
        """This config with some options changed (keywords as in `of`); a new method starts
        from its own default options."""
        current: dict[str, Any] = {name: getattr(self, name) for name in GROUPS}
        if "method" not in options or options["method"] == self.method:
            current["method_options"] = self.method_options
        current["method"] = self.method
        return CompressConfig.of(**{**current, **options})

    def check(self) -> None:
        self.target.check_one()
        if self.selection.min_params < 1:
            raise UsageError(f"--min-params must be >= 1, got {self.selection.min_params}")
        self.verify.check()
        if self.target.kind in ("score", "drop") and not self.verify.eval:
            raise UsageError("--min-score and --max-drop need --eval MODULE:FUNCTION (the task "
                             "metric they bound)")
        if not 0 <= self.prune.damp < 10:
            raise UsageError(f"--damp must be in [0, 10), got {self.prune.damp}")
        self.target.check_values()
        self.coding.check()
        _check_choice(self.method, METHODS, "method")
        _check_choice(self.prune.criterion, CRITERIA, "criterion")
        self.measure.check()
        if self.coding.quantizer == "kmeans" and self.coding.quantized and \
                self.prune.reconstructs:
            raise UsageError("k-means values (--quantizer kmeans, --method gao) do not combine "
                             "with --reconstruct, --sequential or --criterion obs (GPTQ error "
                             "feedback needs a uniform grid); drop one of them")
        if self.method == "surp":
            self._check_surp()
        expected = METHOD_OPTIONS.get(self.method)
        if type(self.method_options) is not (expected or type(None)):
            raise UsageError(f"--method {self.method} takes "
                             f"{expected.__name__ if expected else 'no options'}, got "
                             f"{type(self.method_options).__name__}")
        if self.method_options is not None:
            self.method_options.check()
            if getattr(self.method_options, "granularity", None) == "neuron" and \
                    self.prune.criterion == "obs":
                raise UsageError("--granularity neuron orders entries itself; use --criterion "
                                 "magnitude or activation")

    def _check_surp(self) -> None:
        """Refuse settings that do not apply to SuRP (it codes its own values)."""
        if self.coding.values != "auto" or self.coding.value_bits is not None:
            raise UsageError("--method surp codes its own values: drop --values and --value-bits")
        if self.prune.reconstructs:
            raise UsageError("--method surp does not reconstruct: drop --reconstruct, "
                             "--sequential and --criterion obs")
        if self.target.pattern is not None:
            raise UsageError("--method surp does not support --pattern")

    def curve_settings(self) -> dict[str, Any]:
        """The settings that R-D curves depend on (part of their fingerprint)."""
        return {"criterion": self.prune.criterion, "metric": self.measure.metric,
                "reconstruct": self.prune.reconstructs, "sequential": self.prune.sequential,
                "damp": self.prune.damp, "channel_axis": self.measure.channel_axis,
                "grid": list(check_grid(self.measure.grid)),
                "min_params": self.selection.min_params, "include": list(self.selection.include),
                "exclude": list(self.selection.exclude), "simplify": self.selection.simplify,
                **({"hessian_mb": self.prune.hessian_mb} if self.prune.reconstructs else {})}

    def as_dict(self) -> dict[str, Any]:
        """The settings as the report and the artifact manifest hold them (version 2)."""
        settings = {"version": self.version, "method": self.method,
                    "method_options": None if self.method_options is None
                    else asdict(self.method_options)}
        for name in GROUPS:
            settings[name] = asdict(getattr(self, name))
        settings["data"] = {k: (dict(v) if isinstance(v, Mapping) else v)
                            for k, v in settings["data"].items()}
        return settings

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> CompressConfig:
        """The config a report or artifact recorded: version 2 (grouped) or version 1 (flat,
        docs/FORMAT.md, "Settings"); keys this version does not know are ignored."""
        if settings.get("version", 1) == 1:
            method = settings.get("method", cls.method)
            flat = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()
                    if k in KEYS and KEYS[k][0] != "data"
                    and (KEYS[k][0] in GROUPS or KEYS[k][0] == method)}  # not other methods'
            return cls.of(method=method, data=_group(DataOptions, settings.get("data") or {}),
                          **flat)
        groups = {name: _group(GROUPS[name], settings.get(name) or {}) for name in GROUPS}
        method = settings.get("method", cls.method)
        given = settings.get("method_options")
        options = None if given is None or method not in METHOD_OPTIONS else \
            _group(METHOD_OPTIONS[method], given)
        return cls(method=method, method_options=options, **groups)


def _fields_of(cls: type) -> Iterator[tuple[str, str]]:
    """(keyword, field name) of every option field of a settings dataclass."""
    for f in fields(cls):
        if "option" in f.metadata:
            yield key_of(f), f.name


# every option keyword -> (its group in GROUPS, or the method whose options hold it; field)
KEYS: dict[str, tuple[str, str]] = {
    key: (owner, name)
    for owner, cls in (*GROUPS.items(), *METHOD_OPTIONS.items())
    for key, name in _fields_of(cls)}


def _group(cls: type, values: Mapping[str, Any]) -> Any:
    """A settings group from its recorded fields (lists back to tuples, shapes and ranges to
    tuples, unknown keys ignored)."""
    known = {f.name for f in fields(cls)}
    given = {}
    for name, value in values.items():
        if name not in known:
            continue
        if isinstance(value, list):
            value = tuple(value)
        elif isinstance(value, Mapping):
            value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        given[name] = value
    return cls(**given)


DEFAULTS = CompressConfig()  # every default, read where a function needs one
