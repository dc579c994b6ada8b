"""Atomic file writes: every output appears whole or not at all, and the input is never touched.

A temporary file is written beside the output (same folder, so the rename stays on one file
system), flushed to disk, and renamed over the output with `os.replace`. The temporary file gets
the mode a newly created file would get (0o666 minus the umask), not `mkstemp`'s 0o600. The
temporary file is removed on every exit path: an exception (Ctrl-C, and SIGTERM, which the CLI
turns into one) unwinds through the helper, and it is registered with `rdonnx.signals` for
whatever does not unwind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rdonnx.signals import removing


def normal_mode() -> int:
    """The permissions of a newly created regular file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temp_beside(path: str | os.PathLike) -> Path:
    """A new, empty temporary file in the folder of `path`, with a normal file's mode."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, normal_mode())
    return Path(tmp)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a normal exit its content is synced to disk and
    renamed to `path`, on an exception it is removed and `path` is left as it was."""
    tmp = temp_beside(path)
    with removing(tmp):  # gone afterwards, whether renamed, failed or interrupted
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


def write_bytes(path: str | os.PathLike, data: bytes) -> int:
    """Write `data` to `path` atomically; returns the number of bytes written."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return len(data)


def write_text(path: str | os.PathLike, text: str) -> int:
    """Write `text` (UTF-8) to `path` atomically; returns the number of bytes written."""
    return write_bytes(path, text.encode())
