"""The settings vocabulary as plain Python: option choices, defaults and the small settings
dataclasses that lower layers share. Each name is written here once; the module that owns its
meaning imports it from here (`rdonnx.algo.prune.CRITERIA` is this `CRITERIA`), and
`rdonnx.flow.config` builds the CLI's options from them. No numpy, onnx, onnxruntime or torch
is imported, so `rdonnx --help` stays fast (tests/test_help.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rdonnx.errors import UsageError
from rdonnx.option import option

# --method: the allocators (rdonnx.allocate.allocators.ALLOCATORS, in this order), then the
# methods with their own flow: gao (uniform densities, activation scores), surp (encoder)
ALLOCATOR_NAMES = ("rd", "uniform", "global", "lamp", "pqi", "hsic")
METHODS = (*ALLOCATOR_NAMES, "gao", "surp")
FORMATS = ("rdonnx", "dense", "sparse")
VALUES = ("auto", "quantized", "exact")
SOLVERS = ("lagrange", "dp")  # rd: convex hulls or grid points (allocate.allocators.SOLVERS)
METRICS = ("nmse", "nmse-channel", "kl", "cosine")  # runtime.distortion
CRITERIA = ("magnitude", "activation", "obs")  # obs: SparseGPT's selection (algo.obs)
QUANTIZERS = ("uniform", "kmeans")  # what --quantizer accepts
VALUE_BITS = range(2, 17)  # what --value-bits accepts
BUDGETS = ("params", "flops")  # hsic: what --rate counts
PQI_MODES = ("single", "fixed")
GRANULARITIES = ("layer", "neuron")
DEVICES = ("auto", "cpu", "cuda")

DEFAULT_MIN_PARAMS = 256  # smallest prunable weight (elements)
DEFAULT_CHANNEL_AXIS = 1  # nmse-channel: the channel axis of every output
DEFAULT_CRITERION = "magnitude"  # |w|
DEFAULT_QUANTIZER = "uniform"  # a uniform grid
DEFAULT_DEVICE = "auto"  # CUDA where its execution provider really works, else CPU
DEFAULT_DAMP = 0.01  # dampening: share of the mean diagonal of H added to it (SparseGPT's 1%)
DEFAULT_REPLAY_MB = 512  # MiB of batches and reference outputs a Replay keeps in memory
DEFAULT_SYNTHETIC_SAMPLES = 64
HSIC_SAMPLES = 64  # hsic: calibration samples whose layer outputs are compared
# 20 densities from 1 down to 0.002, log-spaced, 3 significant digits
DEFAULT_GRID = tuple(float(f"{0.002 ** (i / 19):.3g}") for i in range(20))


def check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    """Grid densities sorted descending, with 1.0 first (its distortion is 0 by definition)."""
    values = sorted({float(d) for d in grid} | {1.0}, reverse=True)
    if any(not 0 < d <= 1 for d in values):
        raise UsageError(f"--grid densities must be in (0, 1], got {list(grid)}")
    return tuple(values)


@dataclass(frozen=True)
class PQIOptions:
    """`--method pqi`: the PQ index exponents and the SAP step's eta and gamma (the paper's
    defaults), the bound's mode and its granularity."""

    p: float = option(0.5, "pqi: PQ index exponent p (0 < p < q).", key="pqi_p")
    q: float = option(1.0, "pqi: PQ index exponent q.", key="pqi_q")
    eta: float = option(
        0.0, "pqi: eta of the retained-fraction bound (>= 0; larger keeps fewer).",
        key="pqi_eta")
    gamma: float = option(
        1.0, "pqi: SAP step size (each step prunes gamma * (1 - r), at most 0.9).",
        key="pqi_gamma")
    mode: str = option(
        "fixed", "pqi: fixed: each weight's kept share where the iterated SAP step stops "
        "(prunes < 1% of survivors); single: one PQI bound.", choices=PQI_MODES, key="pqi_mode")
    granularity: str = option(
        "layer", "pqi: one PQI density per weight, or per output row (neuron).",
        choices=GRANULARITIES)

    def check(self) -> None:
        if not 0 < self.p < self.q:
            raise UsageError(f"--pqi-p and --pqi-q need 0 < p < q, got p={self.p}, q={self.q}")
        if self.eta < 0:
            raise UsageError(f"--pqi-eta must be >= 0, got {self.eta}")
        if self.gamma <= 0:
            raise UsageError(f"--pqi-gamma must be > 0, got {self.gamma}")
        for value, options, what in ((self.mode, PQI_MODES, "--pqi-mode"),
                                     (self.granularity, GRANULARITIES, "--granularity")):
            if value not in options:
                raise UsageError(f"unknown {what} {value!r}; choose one of {', '.join(options)}")


@dataclass(frozen=True)
class DataOptions:
    """How to read or make calibration / evaluation data."""

    batch_size: int = option(
        16, "Samples per ONNX Runtime run (a fixed batch axis overrides it).")
    samples: int | None = option(  # at most this many samples (files, for a folder)
        None, "Use at most N samples (N files for a folder). Synthetic default: "
        f"{DEFAULT_SYNTHETIC_SAMPLES}.", flag="--calib-samples", value_type=int)
    shapes: Mapping[str, tuple[int, ...]] = option(
        factory=dict, help="Shape for synthetic inputs with dynamic dimensions (repeatable).",
        flag="--input-shape", multiple=True, metavar="NAME=AxBx..")
    ranges: Mapping[str, tuple[float, float]] = option(
        factory=dict, help="Uniform range for synthetic inputs; required for integer inputs.",
        flag="--input-range", multiple=True, metavar="NAME=LO:HI")
    seed: int = option(0, "Seed for synthetic data; same seed, same output.")


@dataclass(frozen=True)
class VerifyOptions:
    """How a compress run checks what it promises: the held-out part of the calibration data,
    the confidence of the bound checks, synthetic data, and a task metric from the user."""

    holdout: float | None = option(
        None, "Share of the calibration samples held out: curves, statistics and "
        "reconstruction use the rest, every bound and search step is measured on the held-out "
        "part [default: 0.25 with at least 16 samples, or 4 when reconstructing, else 0]; 0: "
        "no holdout.",
        value_type=float, metavar="F")
    confidence: float = option(
        0.95, "Bounds are checked on one-sided confidence bounds at this level: top-1 "
        "agreement's Clopper-Pearson lower bound, the distortion's bootstrap upper bound "
        "(none or 0: on the figures as measured).", value_type=str, metavar="C|none")
    allow_synthetic: bool = option(
        False, "Allow a bound (--max-distortion, --min-agreement, --min-score, --max-drop) "
        "measured on synthetic inputs, which say nothing about real data.")
    eval: str | None = option(
        None, "A task metric: MODULE:FUNCTION or FILE.py:FUNCTION, called as f(session, data) "
        "with an onnxruntime.InferenceSession and the held-out feeds (a list of dicts of "
        "arrays), returning a score (higher is better); --min-score / --max-drop search on it.",
        value_type=str, metavar="MODULE:FUNCTION")

    def check(self) -> None:
        if self.holdout is not None and not 0 <= self.holdout < 1:
            raise UsageError(f"--holdout must be in [0, 1), got {self.holdout}")
        if not 0 <= self.confidence < 1:
            raise UsageError(f"--confidence must be in [0, 1) or none, got {self.confidence}")


def parse_confidence(text: str | float | None) -> float | None:
    """--confidence: a level in [0, 1), or none (0: bounds checked as measured)."""
    if text is None or isinstance(text, float):
        return text
    if text.strip().lower() == "none":
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--confidence {text!r}: give a level such as 0.95, or none") from None
    if not 0 <= value < 1:
        raise UsageError(f"--confidence must be in [0, 1) or none, got {text}")
    return value


METHOD_HELP = {  # one line per --method, in METHODS order (tests/test_help.py)
    "rd": "densities from measured per-weight R-D curves, equal slopes (default)",
    "uniform": "one density for every weight",
    "global": "one |w| threshold over all weights (--normalize: divided by each RMS)",
    "lamp": "LAMP scores, one threshold over all weights",
    "pqi": "data-free PQ-index density per weight or row (--pqi-*, --granularity)",
    "hsic": "ITPruner: layer widths from the HSIC of layer outputs (--budget, --hsic-*)",
    "gao": "one density, w^2 * E[x^2] scores, activation-weighted k-means values",
    "surp": "SuRP successive refinement: an embedded stream (rdonnx truncate cuts it)",
}

EXIT_CODES = {  # the exit codes of every command
    0: "success",
    1: "internal error (a bug: rerun with --debug and report it)",
    2: "bad input or usage: one line on stderr",
    3: "a --fail-above bound was exceeded (evaluate)",
    130: "interrupted (Ctrl-C)",
    143: "terminated (SIGTERM); temporary files are removed",
}


def block(title: str, rows: Mapping) -> str:
    """A click help paragraph that is not rewrapped: a title, then one line per row."""
    width = max(len(str(key)) for key in rows)
    return "\b\n" + title + "\n" + "\n".join(f"  {str(k).ljust(width)}  {v}"
                                               for k, v in rows.items())


METHODS_EPILOG = block("Methods (--method):", METHOD_HELP)
EXIT_CODES_EPILOG = block("Exit codes:", EXIT_CODES)
