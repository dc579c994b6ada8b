"""The settings of a compress run, as one versioned dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .allocate import ALLOCATORS, SOLVERS
from .calibrate import DEFAULT_GRID, check_grid
from .data import DataOptions
from .distortion import METRICS
from .errors import UsageError
from .hsic import BUDGETS
from .hsic import DEFAULT_SAMPLES as HSIC_SAMPLES
from .pqi import GRANULARITIES, PQI_MODES, PQIOptions
from .prune import CRITERIA
from .quantize import QUANTIZERS, VALUE_BITS
from .weights import DEFAULT_MIN_PARAMS

CONFIG_VERSION = 1
FORMATS = ("rdonnx", "dense", "sparse")
VALUES = ("auto", "quantized", "exact")
# allocators, plus methods with their own flow: gao (uniform densities, activation scores),
# surp (successive-refinement encoder)
METHODS = (*ALLOCATORS, "gao", "surp")


@dataclass(frozen=True)
class CompressConfig:
    """Every setting of a compress run; serialised into the report.

    Exactly one target: `rate` (fraction of prunable weights kept), `max_distortion` (the
    smallest rate whose measured distortion is at most this), `min_agreement` (the smallest
    rate whose measured top-1 agreement is at least this) or `bits_per_weight` (the largest
    rate whose coded size is at most this many bits per prunable weight).
    """

    rate: float | None = None
    max_distortion: float | None = None
    min_agreement: float | None = None
    bits_per_weight: float | None = None  # coded bits per prunable weight, positions + values
    method: str = "rd"
    criterion: str = "magnitude"
    solver: str = "lagrange"  # rd: "lagrange" (convex hulls) or "dp" (grid points only)
    normalize: bool = False  # global: scores divided by each tensor's RMS
    metric: str = "nmse"
    channel_axis: int = 1  # nmse-channel: the channel axis of every output
    grid: tuple[float, ...] = DEFAULT_GRID
    min_params: int = DEFAULT_MIN_PARAMS
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    simplify: bool = True
    device: str = "auto"
    layer_distortion: bool = True  # measure each weight pruned alone at its chosen density
    replay_mb: int = 512  # calibration batches + reference outputs held in memory; rest on disk
    format: str = "rdonnx"  # what the result is for: "rdonnx", "dense" or "sparse"
    values: str = "auto"  # "quantized", "exact", or "auto": quantized for rdonnx only
    value_bits: int | None = None  # None: the fewest bits within value_budget
    value_budget: float = 0.02  # quantization may add this share to the measured distortion
    quantizer: str = "uniform"  # "uniform" grid, or "kmeans": activation-weighted codebook
    rdoq: bool = False  # uniform grid: rate-distortion-optimised rounding (grids.rdoq)
    lossless_unpruned: bool = False  # keep large unpruned tensors exact instead of quantized
    reconstruct: bool = False  # update survivors to reconstruct each layer's output (OBS)
    sequential: bool = False  # reconstruct in graph order from already-compressed inputs
    pattern: str | None = None  # "N:M": keep N of every M consecutive inputs per output row
    damp: float = 0.01  # reconstruction: dampening, share of the mean diagonal of H
    pqi_p: float = 0.5  # pqi: PQ index exponents, 0 < p < q
    pqi_q: float = 1.0
    pqi_eta: float = 0.0  # pqi: the bound's eta (>= 0)
    pqi_gamma: float = 1.0  # pqi: SAP step size gamma (rho = gamma * (1 - r), at most 0.9)
    pqi_mode: str = "fixed"  # pqi: "fixed" point of the iterated SAP step, or "single" bound
    granularity: str = "layer"  # pqi: one density per "layer" (weight) or per "neuron" (row)
    budget: str = "params"  # hsic: the rate counts "params" or "flops" (MACs per sample)
    hsic_samples: int = HSIC_SAMPLES  # hsic: calibration samples whose activations are compared
    hsic_beta: float | None = None  # hsic: importance exp(-beta s_i); None: 10 * layers
    data: DataOptions = field(default_factory=DataOptions)
    version: int = CONFIG_VERSION

    def check(self) -> None:
        targets = [t for t in (self.rate, self.max_distortion, self.min_agreement,
                               self.bits_per_weight) if t is not None]
        if self.pattern is not None:
            if targets:
                raise UsageError("--pattern N:M fixes the density; drop --rate and the other "
                                 "targets")
            self.n_m  # noqa: B018 - validates the pattern
        elif len(targets) != 1:
            raise UsageError("give exactly one target: --rate, --max-distortion, "
                             "--min-agreement or --bits-per-weight")
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
            from .surp import check_config

            check_config(self)
        self._check_methods()

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
            assert 1 <= n < m <= 32
        except (ValueError, AssertionError):
            raise UsageError(f"--pattern {self.pattern!r}: write N:M with 1 <= N < M <= 32, "
                             "e.g. 2:4") from None
        return n, m

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
        return settings
