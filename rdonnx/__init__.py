"""rdonnx: rate-distortion-optimised pruning and compression of any ONNX model."""

__version__ = "0.1.0"

from .api import (  # noqa: E402
    CompressConfig,
    CompressResult,
    Curves,
    Inspection,
    calibrate,
    compress,
    evaluate,
    inspect,
)
from .artifact import decompress, load, open_session  # noqa: E402
from .data import DataOptions  # noqa: E402
from .errors import UsageError  # noqa: E402
from .report import Evaluation, Report, WeightReport  # noqa: E402

__all__ = [
    "CompressConfig", "CompressResult", "Curves", "DataOptions", "Evaluation", "Inspection",
    "Report", "UsageError", "WeightReport", "__version__", "calibrate", "compress",
    "decompress", "evaluate", "inspect", "load", "open_session",
]
