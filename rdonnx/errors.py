"""Error types. A `UsageError` is the user's to fix: the CLI prints it as one line, exit 2."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input or usage: the message names the problem and what to do."""
