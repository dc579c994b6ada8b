"""Errors from other libraries (onnxruntime) as one line that keeps their cause: the first
line of their message, whole; `--debug` prints all of it."""

from __future__ import annotations

from rdonnx.errors import UsageError


class CausedError(UsageError):
    """A UsageError whose one line quotes the first line of another library's message;
    `detail` is the whole message (the CLI prints it with --debug)."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


def first_line(exc: BaseException) -> str:
    """The first non-empty line of `exc`'s message, whole (or its type name if empty)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def caused(prefix: str, exc: BaseException) -> CausedError:
    """`prefix: <first line of exc>`, keeping the whole message for --debug."""
    return CausedError(f"{prefix}: {first_line(exc)}", str(exc).strip())
