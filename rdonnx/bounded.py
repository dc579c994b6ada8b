"""Bounded decoding: every zstd frame is decompressed against an explicit output limit, and
declared sizes are checked against the file and the limits before anything is allocated.

zstandard's `max_output_size` only applies to frames that do not declare their size; a frame
that does is decoded into one buffer of the declared size. So the declared size is checked
against the limit first, and the frame is then read in chunks, never past the limit.
"""

from __future__ import annotations

import zstandard

RATIO = 1024  # a section may expand at most this many times its compressed size ...
FLOOR = 32 * 2**20  # ... or to this many bytes, whichever is larger (and never past its cap)
MANIFEST_FLOOR = 4 * 2**20  # the manifest's floor (JSON objects cost ~20x their text)
CHUNK = 2**20


class LimitError(zstandard.ZstdError):
    """A frame that is larger than its limit, or not what it declares (caught wherever zstd
    errors are, and reported as a damaged file)."""


def limit(compressed: int, cap: int, floor: int = FLOOR) -> int:
    """The most bytes a section of `compressed` bytes may decompress to under `cap`."""
    return min(cap, max(floor, RATIO * compressed))


def decompress(frame: bytes, cap: int, what: str, exact: bool = False) -> bytes:
    """The content of one zstd frame of at most `cap` bytes (`exact`: of exactly `cap`)."""
    try:
        declared = zstandard.frame_content_size(frame)  # -1: not declared
    except zstandard.ZstdError:
        raise LimitError(f"{what} is not a zstd frame") from None
    if declared > cap:
        raise LimitError(f"{what} declares {declared:,} bytes, over its limit of {cap:,}")
    if exact and declared not in (-1, cap):
        raise LimitError(f"{what} declares {declared:,} bytes, not {cap:,}")
    reader = zstandard.ZstdDecompressor().stream_reader(frame, read_across_frames=False)
    chunks, total = [], 0
    while True:
        chunk = reader.read(min(CHUNK, cap + 1 - total))
        if not chunk:
            break
        total += len(chunk)
        if total > cap:
            raise LimitError(f"{what} holds more than its limit of {cap:,} bytes")
        chunks.append(chunk)
    if declared not in (-1, total) or (exact and total != cap):
        raise LimitError(f"{what} holds {total:,} bytes, not the {max(declared, cap):,} "
                         "it declares")
    return b"".join(chunks)


def layout_problem(sections: list[tuple[str, int, int]], size: int) -> str | None:
    """What is wrong with sections (name, offset, length) that should tile a data area of
    `size` bytes up to its end: one outside it, or bytes after the last one; None if fine."""
    end = 0
    for name, offset, length in sections:
        if offset < 0 or length < 0 or offset + length > size:
            return f"{name} lies outside the file (offset {offset:,}, length {length:,}, " \
                   f"{size:,} data bytes; truncated?)"
        end = max(end, offset + length)
    if end != size:
        return f"{size - end:,} bytes after the last section (damaged or appended file)"
    return None


def npz_problem(shape: tuple[int, ...], itemsize: int, available: int) -> str | None:
    """Why an .npy member whose header declares `shape` cannot hold its data in `available`
    bytes; None when it can."""
    count = 1
    for d in shape:
        count *= int(d)
    need = count * itemsize
    if need > available:
        return f"its header declares shape {tuple(shape)} ({need:,} bytes) but it holds " \
               f"{available:,} bytes (truncated or damaged file?)"
    return None
