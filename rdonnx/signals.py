"""Clean aborts: SIGTERM ends the CLI the way Ctrl-C does (an exception, so every `finally`
runs), and temporary files and folders registered here are removed on every exit path."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM

_registered: dict[str, None] = {}  # paths to remove, in registration order
_owner: int | None = None  # the process that installed the SIGTERM handler


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, handled like Ctrl-C (a KeyboardInterrupt)."""


def register(path: str | os.PathLike) -> None:
    """Remove `path` (a file or a folder) when the CLI exits, however it exits."""
    _registered[str(path)] = None


def unregister(path: str | os.PathLike) -> None:
    _registered.pop(str(path), None)


def registered() -> tuple[str, ...]:
    """The paths registered now, oldest first."""
    return tuple(_registered)


def remove_registered(keep: frozenset[str] = frozenset()) -> None:
    """Remove every registered path (but those in `keep`) that still exists, newest first."""
    for path in reversed([p for p in _registered if p not in keep]):
        target = Path(path)
        with contextlib.suppress(OSError):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
        _registered.pop(path, None)


atexit.register(remove_registered)


@contextlib.contextmanager
def removing(path: str | os.PathLike) -> Iterator[None]:
    """While the block runs, `path` (a temporary file) is registered; after it, it is gone
    whether the block finished, failed or was interrupted (after an `os.replace` it is
    already gone)."""
    register(path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            Path(path).unlink(missing_ok=True)
        unregister(path)


def _on_sigterm(signum: int, frame: object) -> None:
    if os.getpid() != _owner:  # a forked worker: die the way SIGTERM asks
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Terminated()


@contextlib.contextmanager
def clean_aborts() -> Iterator[None]:
    """Around a CLI run: SIGTERM raises `Terminated`; on the way out, the paths registered
    during the run are removed and the previous SIGTERM handler is restored."""
    global _owner
    earlier = frozenset(_registered)  # an embedding program's own, still in use
    installed = threading.current_thread() is threading.main_thread()
    previous = None
    if installed:
        _owner = os.getpid()
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        try:
            remove_registered(keep=earlier)
        finally:
            if installed:
                signal.signal(signal.SIGTERM, previous if previous is not None
                              else signal.SIG_DFL)


def was_terminated(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from, as click's Abort) is a SIGTERM."""
    while exc is not None:
        if isinstance(exc, Terminated):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
