"""Progress bars with time left, on stderr, shown only to a person at a terminal."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, description: str, quiet: bool = False) -> tqdm:
    """A tqdm bar, disabled with `quiet` or when stderr is not a terminal."""
    return tqdm(total=total, desc=description, unit="run", leave=False, file=sys.stderr,
                disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)
