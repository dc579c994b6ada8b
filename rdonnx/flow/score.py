"""Task metrics from the user (`--eval MODULE:FUNCTION` or `--eval FILE.py:FUNCTION`).

The callable is called as `f(session, data)`: `session` an `onnxruntime.InferenceSession` of
the candidate (the original model with some weights replaced), `data` the held-out feeds, a
list of dicts of arrays keyed by input name (one per batch). It returns a score, higher is
better (return the negative of an error rate), or a pair (share, samples) for a share of
samples in [0, 1] (an agreement, an accuracy): that one is checked on its Clopper-Pearson lower
confidence bound. `--min-score S` / `--max-drop D` make the bound
searches look for the smallest rate whose score is at least S / at most D below the original's.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rdonnx.errors import UsageError
from rdonnx.graph.model import Model, write_model
from rdonnx.runtime.data import Feed
from rdonnx.runtime.session import CPU, CUDA, import_onnxruntime, max_runtime_ir_version


def load_callable(spec: str) -> Callable:
    """The function named by MODULE:FUNCTION or FILE.py:FUNCTION (a UsageError otherwise)."""
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name.isidentifier():
        raise UsageError(f"--eval {spec!r}: write MODULE:FUNCTION or FILE.py:FUNCTION")
    try:
        if source.endswith(".py") or "/" in source:
            path = Path(source)
            if not path.is_file():
                raise UsageError(f"--eval {spec!r}: file not found: {path}")
            key = "rdonnx_eval_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            module = sys.modules.get(key)
            if module is None:
                found = importlib.util.spec_from_file_location(key, path)
                module = importlib.util.module_from_spec(found)
                found.loader.exec_module(module)
                sys.modules[key] = module
        else:
            module = importlib.import_module(source)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's module: any error is theirs
        raise UsageError(f"--eval {spec!r}: importing {source} failed "
                         f"({type(exc).__name__}: {exc})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UsageError(f"--eval {spec!r}: {source} has no function {name!r}")
    return function


@dataclass
class Scorer:
    """The user's task metric of a candidate: the model written with the candidate's weights,
    opened in a stock ONNX Runtime session, scored on `data`."""

    function: Callable
    spec: str
    model: Model
    data: Sequence[Feed]
    provider: str = CPU

    def __call__(self, values: Mapping[str, np.ndarray]) -> tuple[float, int | None]:
        """The score of the model with `values`, and the samples it is a share of (None: a
        plain score)."""
        ort = import_onnxruntime()
        with tempfile.TemporaryDirectory(prefix="rdonnx-eval-") as tmp:
            path = Path(tmp) / "candidate.onnx"
            write_model(self.model, path, dict(values), ir_version=max_runtime_ir_version())
            providers = [CUDA, CPU] if self.provider == CUDA else [CPU]
            session = ort.InferenceSession(str(path), providers=providers)
            try:
                score = self.function(session, [dict(f) for f in self.data])
            except Exception as exc:  # noqa: BLE001 - the user's function
                raise UsageError(f"--eval {self.spec}: the function raised "
                                 f"{type(exc).__name__}: {exc}") from None
        samples = None
        if isinstance(score, tuple) and len(score) == 2:
            score, samples = score
            if not isinstance(samples, (int, np.integer)) or samples < 1 or \
                    not 0 <= float(score) <= 1:
                raise UsageError(f"--eval {self.spec}: a (share, samples) pair needs a share in "
                                 f"[0, 1] and a positive sample count, got ({score!r}, "
                                 f"{samples!r})")
            samples = int(samples)
        try:
            score = float(score)
        except (TypeError, ValueError):
            raise UsageError(f"--eval {self.spec}: the function returned {score!r}, not a "
                             "number") from None
        if not math.isfinite(score):
            raise UsageError(f"--eval {self.spec}: the function returned {score}")
        return score, samples
