"""The settings of a compress run, as one versioned dataclass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from rdonnx.choices import (  # plain data: importing this module (the CLI does) stays light
    BUDGETS,
    CRITERIA,
    DEFAULT_DAMP,
    DEFAULT_GRID,
    DEFAULT_MIN_PARAMS,
    DEFAULT_REPLAY_MB,
    DEVICES,
    FORMATS,
    GRANULARITIES,
    HSIC_SAMPLES,
    METHODS,
    METRICS,
    PQI_MODES,
    QUANTIZERS,
    SOLVERS,
    VALUE_BITS,
    VALUES,
    DataOptions,
    PQIOptions,
    VerifyOptions,
    check_grid,
)
from rdonnx.errors import UsageError
from rdonnx.option import option

CONFIG_VERSION = 1


@dataclass(frozen=True)
class Target:
    """What a compress run aims at: one of `TARGETS` and its value.

    rate: the fraction of prunable weights kept; distortion: the smallest rate whose measured
    distortion is at most `value`; agreement: the smallest rate whose measured top-1
    agreement is at least `value`; bits: the largest rate whose coded positions + values
    take at most `value` bits per prunable weight; pattern: N of every M inputs per row,
    `value` = (N, M); score / drop: the smallest rate whose task score (--eval) is at least
    `value` / at most `value` below the original's.
    """

    kind: str
    value: float | tuple[int, int]

    @property
    def bound(self) -> bool:
        """Whether the rate is searched for by measuring (a distortion, agreement or score
        bound)."""
        return self.kind in ("distortion", "agreement", "score", "drop")


TARGETS = ("rate", "distortion", "agreement", "bits", "pattern", "score", "drop")


@dataclass(frozen=True)
class CompressConfig:
    """Every setting of a compress run; serialised into the report.

    Exactly one target: `rate` (fraction of prunable weights kept), `max_distortion` (the
    smallest rate whose measured distortion is at most this), `min_agreement` (the smallest
    rate whose measured top-1 agreement is at least this) or `bits_per_weight` (the largest
    rate whose coded size is at most this many bits per prunable weight).
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
    min_score: float | None = option(
        None, "Instead of --rate: the smallest rate whose task score (--eval) on the held-out "
        "data is at least S.", value_type=float)
    max_drop: float | None = option(
        None, "Instead of --rate: the smallest rate whose task score (--eval) on the held-out "
        "data is at most D below the original model's.", value_type=float)
    method: str = option(
        "rd", "How the densities are chosen: one of the methods listed below.",
        choices=METHODS)
    criterion: str = option(
        "magnitude", "In-layer criterion: |w|; w^2 * E[x^2] of the layer input compared within "
        "output rows (Wanda / Gao et al.); or obs, SparseGPT's selection during reconstruction "
        "(implies --reconstruct).", choices=CRITERIA)
    solver: str = option(  # rd: "lagrange" (convex hulls) or "dp" (grid points only)
        "lagrange", "rd: equal-slope search on convex hulls, or DP over the grid points.",
        choices=tuple(SOLVERS))
    normalize: bool = option(  # global: scores divided by each tensor's RMS
        False, "global: compare scores divided by each tensor's RMS.")
    metric: str = option(
        "nmse", "Output distortion: nmse (sum over outputs of ||y-y'||^2/||y||^2), "
        "nmse-channel (per channel along --channel-axis, averaged), kl of class scores, cosine.",
        choices=METRICS)
    channel_axis: int = option(  # nmse-channel: the channel axis of every output
        1, "Channel axis of the outputs for --metric nmse-channel.")
    grid: tuple[float, ...] = option(
        DEFAULT_GRID, "Densities of the R-D curves [default: 20 from 1 down to 0.002, "
        "log-spaced].", value_type=str, metavar="D1,D2,..", show_default=False)
    min_params: int = option(
        DEFAULT_MIN_PARAMS, "Smallest weight (elements) that is pruned.")
    include: tuple[str, ...] = option((), "Also prune these.", multiple=True, metavar="GLOB")
    exclude: tuple[str, ...] = option((), "Never prune these.", multiple=True, metavar="GLOB")
    simplify: bool = option(True, "Skip onnxsim simplification.", flag="--no-simplify",
                            negate=True)
    device: str = option(
        "auto", "auto: CUDA when its execution provider really works, else CPU.",
        choices=DEVICES)
    layer_distortion: bool = option(  # measure each weight pruned alone at its chosen density
        True, "Skip measuring each weight pruned alone (one pass per weight).",
        flag="--no-layer-distortion", negate=True)
    replay_mb: int = option(  # calibration batches + reference outputs in memory; rest on disk
        DEFAULT_REPLAY_MB, "MiB of calibration batches and reference outputs kept in memory for "
        "the probes; the rest is spilled to a temporary folder.", range=(0, None))
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
        "uniform", "Quantized values: a uniform grid (a step per output channel where that "
        "pays, clipped by measured error), or a k-means codebook of 2^b - 1 centroids weighted "
        "by E[x^2] of the layer input (Gao et al.; plain k-means where no input is seen). Not "
        "with --reconstruct.", choices=QUANTIZERS)
    rdoq: bool = option(
        False, "Uniform grid: round each value to the neighbouring level (or zero) that lowers "
        "distortion + lambda x coded bits (lambda: the grid's own slope); smaller files, but "
        "more output distortion per bit saved on the digits models.")
    lossless_unpruned: bool = option(
        False, "Keep large unpruned tensors (embeddings...) exact instead of quantized.")
    reconstruct: bool = option(
        False, "Update surviving weights to reconstruct each layer's output on the calibration "
        "data (OBS / SparseGPT; GPTQ error feedback when quantizing).")
    sequential: bool = option(
        False, "Reconstruct layers in graph order, each from the inputs the already-compressed "
        "earlier layers produce, aimed at the original model's layer output, so later layers "
        "undo earlier layers' error (implies --reconstruct).")
    pattern: str | None = option(
        None, "Structured sparsity instead of a rate: keep N of every M consecutive inputs per "
        "output row (2:4 is what GPUs accelerate).", value_type=str, metavar="N:M")
    damp: float = option(
        DEFAULT_DAMP, "Reconstruction dampening: share of the mean diagonal of X X^T.")
    pqi_p: float = option(PQIOptions.p, "pqi: PQ index exponent p (0 < p < q).")
    pqi_q: float = option(PQIOptions.q, "pqi: PQ index exponent q.")
    pqi_eta: float = option(
        PQIOptions.eta, "pqi: eta of the retained-fraction bound (>= 0; larger keeps fewer).")
    pqi_gamma: float = option(
        PQIOptions.gamma, "pqi: SAP step size (each step prunes gamma * (1 - r), at most 0.9).")
    pqi_mode: str = option(
        "fixed", "pqi: fixed: each weight's kept share where the iterated SAP step stops "
        "(prunes < 1% of survivors); single: one PQI bound.", choices=PQI_MODES)
    granularity: str = option(
        "layer", "pqi: one PQI density per weight, or per output row (neuron).",
        choices=GRANULARITIES)
    budget: str = option(
        "params", "hsic: what --rate counts: parameters, or multiply-accumulates per sample "
        "(flops).", choices=BUDGETS)
    hsic_samples: int = option(
        HSIC_SAMPLES, "hsic: calibration samples whose layer outputs are compared.")
    hsic_beta: float | None = option(
        None, "hsic: importance exp(-beta * s_i) [default: 10 * number of layers].",
        value_type=float)
    data: DataOptions = field(default_factory=DataOptions)
    verify: VerifyOptions = field(default_factory=VerifyOptions)
    version: int = CONFIG_VERSION

    def check(self) -> None:
        for name in ("rate", "max_distortion", "min_agreement", "bits_per_weight", "min_score",
                     "max_drop", "value_budget", "damp", "pqi_p", "pqi_q", "pqi_eta",
                     "pqi_gamma", "hsic_beta"):
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got "
                                 f"{value}")
        if self.min_params < 1:
            raise UsageError(f"--min-params must be >= 1, got {self.min_params}")
        self.verify.check()
        if (self.min_score is not None or self.max_drop is not None) and not self.verify.eval:
            raise UsageError("--min-score and --max-drop need --eval MODULE:FUNCTION (the task "
                             "metric they bound)")
        if self.max_drop is not None and self.max_drop < 0:
            raise UsageError(f"--max-drop must be >= 0, got {self.max_drop}")
        targets = [t for t in (self.rate, self.max_distortion, self.min_agreement,
                               self.bits_per_weight, self.min_score, self.max_drop)
                   if t is not None]
        if self.pattern is not None:
            if targets:
                raise UsageError("--pattern N:M fixes the density; drop --rate and the other "
                                 "targets")
            self.n_m  # noqa: B018 - validates the pattern
        elif len(targets) != 1:
            raise UsageError("give exactly one target: --rate, --max-distortion, "
                             "--min-agreement, --bits-per-weight, --min-score or --max-drop")
        if not 0 <= self.damp < 10:
            raise UsageError(f"--damp must be in [0, 10), got {self.damp}")
        if self.bits_per_weight is not None and self.bits_per_weight <= 0:
            raise UsageError(f"--bits-per-weight must be > 0, got {self.bits_per_weight}")
        if self.value_bits is not None and self.value_bits not in VALUE_BITS:
            raise UsageError(f"--value-bits must be in 2..16, got {self.value_bits}")
        if self.value_budget < 0:
            raise UsageError(f"--value-budget must be >= 0, got {self.value_budget}")
        if self.rate is not None and not 0 < self.rate <= 1:
            raise UsageError(f"--rate must be in (0, 1] (the fraction of prunable weights kept), "
                             f"got {self.rate}")
        if self.max_distortion is not None and self.max_distortion < 0:
            raise UsageError(f"--max-distortion must be >= 0, got {self.max_distortion}")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            raise UsageError(f"--min-agreement must be in [0, 1], got {self.min_agreement}")
        for value, options, what in ((self.format, FORMATS, "format"),
                                     (self.values, VALUES, "values"),
                                     (self.method, METHODS, "method"),
                                     (self.criterion, CRITERIA, "criterion"),
                                     (self.solver, SOLVERS, "solver"),
                                     (self.metric, METRICS, "metric"),
                                     (self.quantizer, QUANTIZERS, "quantizer")):
            if value not in options:
                raise UsageError(f"unknown {what} {value!r}; choose one of {', '.join(options)}")
        if self.quantizer == "kmeans" and self.quantized and self.reconstructs:
            raise UsageError("k-means values (--quantizer kmeans, --method gao) do not combine "
                             "with --reconstruct, --sequential or --criterion obs (GPTQ error "
                             "feedback needs a uniform grid); drop one of them")
        if self.channel_axis < 0:
            raise UsageError(f"--channel-axis must be >= 0, got {self.channel_axis}")
        if self.method == "surp":
            self._check_surp()
        self._check_methods()

    def _check_surp(self) -> None:
        """Refuse settings that do not apply to SuRP (it codes its own values)."""
        if self.values != "auto" or self.value_bits is not None:
            raise UsageError("--method surp codes its own values: drop --values and --value-bits")
        if self.reconstructs:
            raise UsageError("--method surp does not reconstruct: drop --reconstruct, "
                             "--sequential and --criterion obs")
        if self.pattern is not None:
            raise UsageError("--method surp does not support --pattern")

    def _check_methods(self) -> None:
        """The pqi and hsic settings: valid, and given only with their method."""
        defaults = CompressConfig()
        pqi = ("pqi_p", "pqi_q", "pqi_eta", "pqi_gamma", "pqi_mode", "granularity")
        hsic = ("budget", "hsic_samples", "hsic_beta")
        for fields, method in ((pqi, "pqi"), (hsic, "hsic")):
            changed = [f for f in fields if getattr(self, f) != getattr(defaults, f)]
            if changed and self.method != method:
                raise UsageError(f"--{changed[0].replace('_', '-')} applies to --method "
                                 f"{method} only")
        PQIOptions(self.pqi_p, self.pqi_q, self.pqi_eta, self.pqi_gamma).check()
        for value, options, what in ((self.pqi_mode, PQI_MODES, "--pqi-mode"),
                                     (self.granularity, GRANULARITIES, "--granularity"),
                                     (self.budget, BUDGETS, "--budget")):
            if value not in options:
                raise UsageError(f"unknown {what} {value!r}; choose one of {', '.join(options)}")
        if self.granularity == "neuron" and self.criterion == "obs":
            raise UsageError("--granularity neuron orders entries itself; use --criterion "
                             "magnitude or activation")
        if self.hsic_samples < 2:
            raise UsageError(f"--hsic-samples must be >= 2, got {self.hsic_samples}")
        if self.hsic_beta is not None and self.hsic_beta < 0:
            raise UsageError(f"--hsic-beta must be >= 0, got {self.hsic_beta}")

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
    def target(self) -> Target:
        """The one target of the run (`check` makes sure there is exactly one)."""
        if self.pattern is not None:
            return Target("pattern", self.n_m)
        for kind, value in (("rate", self.rate), ("distortion", self.max_distortion),
                            ("agreement", self.min_agreement), ("bits", self.bits_per_weight),
                            ("score", self.min_score), ("drop", self.max_drop)):
            if value is not None:
                return Target(kind, value)
        raise UsageError("give exactly one target: --rate, --max-distortion, --min-agreement "
                         "or --bits-per-weight")

    @property
    def reconstructs(self) -> bool:
        """Survivors are updated (--reconstruct, --sequential or the obs criterion)."""
        return self.reconstruct or self.sequential or self.criterion == "obs"

    @property
    def quantized(self) -> bool:
        """Whether surviving values are quantized (`values`, or for `auto`, the format)."""
        return self.values == "quantized" or (self.values == "auto" and self.format == "rdonnx")

    def curve_settings(self) -> dict[str, Any]:
        """The settings that R-D curves depend on (part of their fingerprint)."""
        return {"criterion": self.criterion, "metric": self.metric,
                "reconstruct": self.reconstructs, "sequential": self.sequential,
                "damp": self.damp,
                "channel_axis": self.channel_axis, "grid": list(check_grid(self.grid)),
                "min_params": self.min_params, "include": list(self.include),
                "exclude": list(self.exclude), "simplify": self.simplify}

    def as_dict(self) -> dict[str, Any]:
        settings = asdict(self)
        settings["data"] = {k: (dict(v) if isinstance(v, dict) or hasattr(v, "items") else v)
                            for k, v in settings["data"].items()}
        settings["verify"] = dict(settings["verify"])
        return settings


DEFAULTS = CompressConfig()  # every default, read where a function needs one
