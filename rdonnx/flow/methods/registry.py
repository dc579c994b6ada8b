"""The methods of `--method`, each registered with its options class and its implementation:
the one table the pipeline dispatches on (the names are written in `rdonnx.choices`, the
options classes in `rdonnx.flow.methods.options`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rdonnx.allocate.allocators import Allocation
from rdonnx.choices import PQIOptions
from rdonnx.flow.calibration import Calibration
from rdonnx.flow.config import METHODS as NAMES
from rdonnx.flow.config import CompressConfig
from rdonnx.flow.methods import gao, hsic, pqi, surp
from rdonnx.flow.methods.options import METHOD_OPTIONS, GlobalOptions, HSICOptions, RDOptions


@dataclass(frozen=True)
class Method:
    """How `compress` runs one method."""

    allocator: str | None  # key of ALLOCATORS ("rd": the --solver); None: its own flow
    options: type | None = None  # its own options class (`CompressConfig.method_options`)
    curves: bool = False  # measures R-D curves even at a rate
    consumers: bool = False  # calibration also records each weight's consumer output
    settings: Callable[[CompressConfig], CompressConfig] | None = None  # settings it imposes
    prepare: Callable[[Calibration, object, Allocation],
                      tuple[Calibration, Allocation]] | None = None  # (cal, its options,
    # allocation) -> new values
    run: Callable | None = None  # its own flow after calibration (replaces allocation)


METHODS: dict[str, Method] = {
    "rd": Method("rd", RDOptions, curves=True),
    "uniform": Method("uniform"),
    "global": Method("global", GlobalOptions),
    "lamp": Method("lamp"),
    "pqi": Method("pqi", PQIOptions, prepare=pqi.prepare),  # weight-only bounds
    "hsic": Method("hsic", HSICOptions, consumers=True, prepare=hsic.prepare),  # activations
    "gao": Method("uniform", settings=gao.settings),
    "surp": Method(None, run=surp.compress_surp),
}
if set(METHODS) != set(NAMES) or any(  # pragma: no cover - a method added to one table only
        METHOD_OPTIONS.get(name) is not m.options for name, m in METHODS.items()):
    raise RuntimeError(f"methods registered {sorted(METHODS)} differ from {sorted(NAMES)} or "
                       "from their options classes")
