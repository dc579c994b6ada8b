"""Local English text for the text models: /usr/share/common-licenses and /usr/share/doc."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

ROOTS = (Path("/usr/share/common-licenses"), Path("/usr/share/doc"))


def _read(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", errors="ignore") as f:
                return f.read(200_000)
        return path.read_text(errors="ignore")[:200_000]
    except OSError:
        return ""


def documents(limit_bytes: int = 4_000_000) -> list[tuple[str, str]]:
    """(path, text) of the local documents, sorted by path, up to ``limit_bytes`` of text."""
    out: list[tuple[str, str]] = []
    total = 0
    for root in ROOTS:
        if not root.exists():
            continue
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.is_symlink():
                continue
            name = path.name.lower()
            if not (name in {"copyright", "readme", "changelog.gz", "news.gz"} or
                    root.name == "common-licenses" or name.startswith("readme")):
                continue
            text = _read(path)
            if text.count(" ") < 20:
                continue
            out.append((str(path), text))
            total += len(text)
            if total >= limit_bytes:
                return out
    return out


def sentences(min_words: int = 6, max_words: int = 40) -> list[tuple[str, str]]:
    """Deduplicated English-looking sentences as (source path, sentence)."""
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for path, text in documents():
        flat = re.sub(r"\s+", " ", text)
        for s in re.split(r"(?<=[.!?])\s+", flat):
            s = s.strip()
            words = s.split()
            if not (min_words <= len(words) <= max_words):
                continue
            letters = sum(c.isalpha() for c in s)
            if letters < 0.7 * len(s.replace(" ", "")) or s.lower() in seen:
                continue
            seen.add(s.lower())
            out.append((path, s))
    return out
