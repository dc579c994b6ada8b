"""Strict JSON: what rdonnx writes is always valid JSON (no NaN / Infinity tokens), and what
it reads may not hold them either."""

from __future__ import annotations

import json
import math
from typing import Any

NON_FINITE_KEY = "non_finite"  # top-level object: {path of a null: why it is null}


def finite(value: Any, path: str = "$") -> tuple[Any, dict[str, str]]:
    """`value` with every NaN or infinite float replaced by None, and the reason for each."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value, {}
        return None, {path: f"{value} is not a number JSON can hold; written as null"}
    if isinstance(value, dict):
        out, reasons = {}, {}
        for key, item in value.items():
            out[key], why = finite(item, f"{path}.{key}")
            reasons.update(why)
        return out, reasons
    if isinstance(value, (list, tuple)):
        out, reasons = [], {}
        for i, item in enumerate(value):
            clean, why = finite(item, f"{path}[{i}]")
            out.append(clean)
            reasons.update(why)
        return out, reasons
    return value, {}


def dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps` with `allow_nan=False`; non-finite numbers become null, and a top-level
    object lists why under "non_finite" (only when there are any)."""
    clean, reasons = finite(value)
    if reasons and isinstance(clean, dict):
        clean[NON_FINITE_KEY] = reasons
    return json.dumps(clean, allow_nan=False, **kwargs)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} (JSON has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def loads(text: str | bytes) -> Any:
    """`json.loads` that refuses NaN, Infinity and numbers that overflow to infinity."""
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
