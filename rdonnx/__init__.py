"""rdonnx: rate-distortion-optimised pruning and compression of any ONNX model."""

__version__ = "0.1.0"

import importlib  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

from .errors import UsageError  # noqa: E402

# The public API, imported on first use, so `import rdonnx.cli` (and `rdonnx --help`) does not
# import torch, onnx or onnxruntime. name -> the module that defines it.
_LAZY = {
    "CompressConfig": "api", "CompressResult": "api", "Curves": "api", "Inspection": "api",
    "calibrate": "api", "compress": "api", "evaluate": "api", "inspect": "api",
    "decompress": "artifact", "load": "artifact", "open_session": "artifact",
    "DataOptions": "data", "Evaluation": "report", "Report": "report",
    "WeightReport": "report",
}

__all__ = [
    "CompressConfig", "CompressResult", "Curves", "DataOptions", "Evaluation", "Inspection",
    "Report", "UsageError", "WeightReport", "__version__", "calibrate", "compress",
    "decompress", "evaluate", "inspect", "load", "open_session",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rdonnx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _Package(types.ModuleType):
    """Keeps `rdonnx.calibrate` the API function when the submodule of that name is imported
    (the import system would otherwise bind the submodule over it)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
