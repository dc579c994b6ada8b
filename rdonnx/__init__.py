"""rdonnx: rate-distortion-optimised pruning and compression of any ONNX model."""

import importlib
from typing import TYPE_CHECKING

from rdonnx.errors import UsageError
from rdonnx.version import __version__

if TYPE_CHECKING:
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
    from rdonnx.choices import DataOptions, PQIOptions
    from rdonnx.flow.config import Coding, Measurement, Pruning, Selection, Target
    from rdonnx.flow.methods.options import GlobalOptions, HSICOptions, RDOptions
    from rdonnx.report.records import Evaluation, Report, WeightReport

# The public API, imported on first use, so `import rdonnx.cli` (and `rdonnx --help`) does not
# import torch, onnx, onnxruntime or numpy. name -> the module that defines it.
_LAZY = {
    "CompressConfig": "rdonnx.api", "CompressResult": "rdonnx.api", "Curves": "rdonnx.api",
    "Inspection": "rdonnx.api", "calibrate": "rdonnx.api", "compress": "rdonnx.api",
    "evaluate": "rdonnx.api", "inspect": "rdonnx.api",
    "decompress": "rdonnx.artifact.io", "load": "rdonnx.artifact.io",
    "open_session": "rdonnx.artifact.io", "DataOptions": "rdonnx.choices",
    "Evaluation": "rdonnx.report.records", "Report": "rdonnx.report.records",
    "WeightReport": "rdonnx.report.records",
    # the option groups of a CompressConfig (light: plain dataclasses)
    "Target": "rdonnx.flow.config", "Selection": "rdonnx.flow.config",
    "Measurement": "rdonnx.flow.config", "Pruning": "rdonnx.flow.config",
    "Coding": "rdonnx.flow.config", "PQIOptions": "rdonnx.choices",
    "RDOptions": "rdonnx.flow.methods.options", "GlobalOptions": "rdonnx.flow.methods.options",
    "HSICOptions": "rdonnx.flow.methods.options",
}

__all__ = [
    "Coding", "CompressConfig", "CompressResult", "Curves", "DataOptions", "Evaluation",
    "GlobalOptions", "HSICOptions", "Inspection", "Measurement", "PQIOptions", "Pruning",
    "RDOptions", "Report", "Selection", "Target", "UsageError", "WeightReport", "__version__",
    "calibrate", "compress", "decompress", "evaluate", "inspect", "load", "open_session",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rdonnx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

