"""The CLI's option choices and help texts as plain data, so `rdonnx --help` imports neither
torch, onnx nor onnxruntime. Each tuple mirrors the constant its module owns (named beside it);
tests/test_help.py checks they are equal."""

from __future__ import annotations

METHODS = ("rd", "uniform", "global", "lamp", "pqi", "hsic", "gao", "surp")  # config.METHODS
FORMATS = ("rdonnx", "dense", "sparse")  # config.FORMATS
VALUES = ("auto", "quantized", "exact")  # config.VALUES
SOLVERS = ("lagrange", "dp")  # allocate.SOLVERS (keys)
METRICS = ("nmse", "nmse-channel", "kl", "cosine")  # distortion.METRICS
BUDGETS = ("params", "flops")  # hsic.BUDGETS
GRANULARITIES = ("layer", "neuron")  # pqi.GRANULARITIES
PQI_MODES = ("single", "fixed")  # pqi.PQI_MODES
CRITERIA = ("magnitude", "activation", "obs")  # prune.CRITERIA
QUANTIZERS = ("uniform", "kmeans")  # quantize.QUANTIZERS
DEVICES = ("auto", "cpu", "cuda")  # runtime.DEVICES
DEFAULT_MIN_PARAMS = 256  # weights.DEFAULT_MIN_PARAMS
HSIC_SAMPLES = 64  # hsic.DEFAULT_SAMPLES

METHOD_HELP = {  # one line per --method, in METHODS order
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


def block(title: str, rows: dict) -> str:
    """A click help paragraph that is not rewrapped: a title, then one line per row."""
    width = max(len(str(key)) for key in rows)
    return "\b\n" + title + "\n" + "\n".join(f"  {str(k).ljust(width)}  {v}"
                                               for k, v in rows.items())


METHODS_EPILOG = block("Methods (--method):", METHOD_HELP)
EXIT_CODES_EPILOG = block("Exit codes:", EXIT_CODES)
