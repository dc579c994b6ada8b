"""The methods of `--method`, each registered with its implementation: the one table the
pipeline dispatches on (the names are written in `rdonnx.choices`, their options in
`rdonnx.flow.config`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rdonnx.allocate.allocators import Allocation
from rdonnx.flow.calibration import Calibration
from rdonnx.flow.config import METHODS as NAMES
from rdonnx.flow.config import CompressConfig
from rdonnx.flow.methods import gao, hsic, pqi, surp


@dataclass(frozen=True)
class Method:
    """How `compress` runs one method."""

    allocator: str | None  # key of ALLOCATORS ("rd": the --solver); None: its own flow
    curves: bool = False  # measures R-D curves even at a rate
    consumers: bool = False  # calibration also records each weight's consumer output
    settings: Callable[[CompressConfig], CompressConfig] | None = None  # settings it imposes
    prepare: Callable[[Calibration, CompressConfig, Allocation],
                      tuple[Calibration, Allocation]] | None = None  # returns new values
    run: Callable | None = None  # its own flow after calibration (replaces allocation)


METHODS: dict[str, Method] = {
    "rd": Method("rd", curves=True),
    "uniform": Method("uniform"),
    "global": Method("global"),
    "lamp": Method("lamp"),
    "pqi": Method("pqi", prepare=pqi.prepare),  # weight-only bounds
    "hsic": Method("hsic", consumers=True, prepare=hsic.prepare),  # activation importances
    "gao": Method("uniform", settings=gao.settings),
    "surp": Method(None, run=surp.compress_surp),
}
if set(METHODS) != set(NAMES):  # pragma: no cover - a method added to one table only
    raise RuntimeError(f"methods registered {sorted(METHODS)} differ from {sorted(NAMES)}")
