"""Output paths, checked before any work: never replace what is not a regular file, refuse
`-` (rdonnx writes no output to stdout), and prove the target folder writable by creating and
removing a file there. Also: the one-line message for an OSError the user can act on."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from rdonnx.errors import UsageError
from rdonnx.fs import temp_beside

STDOUT = "-"

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISSOCK, "a socket"))

# Errors of the file system or the environment, not of rdonnx: exit 2 with one line.
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES,
                         errno.EPERM, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR,
                         errno.EMFILE, errno.ENFILE})


def kind_of(path: str | os.PathLike) -> str | None:
    """What `path` is when it exists and is not a regular file ("a FIFO (named pipe)", ...);
    None for a regular file (or a link to one) and for a path that does not exist."""
    try:
        mode = os.stat(path).st_mode  # follows links: a link to /dev/null is a device
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"output {path}: {exc.strerror}") from None
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_target(path: str | os.PathLike) -> None:
    """Refuse `-` and any existing path that is not a regular file, with or without --force
    (replacing a device node, FIFO or socket with a file is never what was meant)."""
    if str(path) == STDOUT:
        raise UsageError("'-' (stdout) is not supported for outputs: rdonnx writes binary "
                         "files and prints its report on stderr; give a file name")
    kind = kind_of(path)
    if kind == "a folder":
        raise UsageError(f"output {path} is a folder; give a file name")
    if kind is not None:
        raise UsageError(f"output {path} is {kind}, not a regular file; rdonnx never replaces "
                         "it (not even with --force); give a file name")


def probe_writable(path: str | os.PathLike) -> None:
    """Create and remove a temporary file beside `path`, so an output that cannot be written
    fails now, before any work, with the reason."""
    path = Path(path)
    folder = path.parent
    try:
        temp_beside(path).unlink()  # the file an atomic write would create, at once removed
    except OSError as exc:
        raise UsageError(f"cannot create files in {folder} ({exc.strerror}) to write "
                         f"{path.name}; choose another location") from None


def check_writable_output(path: str | os.PathLike) -> None:
    """Both checks: the path may be replaced, and its folder takes new files."""
    check_target(path)
    probe_writable(path)


def user_error(exc: OSError) -> str | None:
    """A one-line message for an OSError the user can act on (disk full, read-only, no
    permission...), or None when it is not one of those."""
    if exc.errno not in USER_ERRNOS:
        return None
    where = exc.filename
    reason = exc.strerror or os.strerror(exc.errno)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason += "; free some space or choose another location"
    return f"cannot write {where}: {reason}" if where else f"cannot write an output: {reason}"
