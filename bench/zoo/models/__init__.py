"""The zoo's adapters, one module per model, in order of the cost of compressing them."""

from __future__ import annotations

from importlib import import_module

from ..common import Adapter

NAMES = ("g2p", "efficientnet", "minilm", "detector", "ocr", "crepe", "smollm2")
MODULES = {"g2p": "g2p", "efficientnet": "efficientnet", "minilm": "minilm",
           "detector": "ddddocr_det", "ocr": "ddddocr_ocr", "crepe": "crepe",
           "smollm2": "smollm2"}


def adapter(name: str) -> Adapter:
    """The adapter called ``name`` (imported on demand: each pulls its own packages)."""
    if name not in MODULES:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(NAMES)}")
    return import_module(f"{__name__}.{MODULES[name]}").ADAPTER
