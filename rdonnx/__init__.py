"""rdonnx: rate-distortion-optimised pruning and compression of any ONNX model."""

from rdonnx.api import (
    CompressConfig,
    CompressResult,
    Curves,
    Inspection,
    calibrate,
    compress,
    evaluate,
    inspect,
)
from rdonnx.artifact.io import decompress, load, open_session
from rdonnx.errors import UsageError
from rdonnx.report.records import Evaluation, Report, WeightReport
from rdonnx.runtime.data import DataOptions
from rdonnx.version import __version__

__all__ = [
    "CompressConfig", "CompressResult", "Curves", "DataOptions", "Evaluation", "Inspection",
    "Report", "UsageError", "WeightReport", "__version__", "calibrate", "compress",
    "decompress", "evaluate", "inspect", "load", "open_session",
]
