"""Run a reference and candidate variants over the same batches, one batch in memory at a time."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rdonnx.choices import DEFAULT_CHANNEL_AXIS, DEFAULT_REPLAY_MB
from rdonnx.progress import progress_bar
from rdonnx.runtime.data import Batches, Feed, split_labels
from rdonnx.runtime.distortion import AccuracyMeter, Distortion, DistortionMeter, energy_of
from rdonnx.signals import register

Predict = Callable[[Feed], list[np.ndarray]]


@dataclass(frozen=True)
class Measurement:
    """Distortion of each candidate against the reference, and accuracies when labelled."""

    distortions: list[Distortion]
    reference_accuracy: float | None
    accuracies: list[float | None]


def feed_rows(feed: Feed) -> int:
    """The samples a feed holds: rows along axis 0 (a scalar input counts one)."""
    return max((a.shape[0] if a.ndim else 1 for a in feed.values()), default=1)


def measure(reference: Predict, candidates: Sequence[Predict], batches: Batches,
            labels: str | None = None, description: str = "measuring",
            quiet: bool = True, channel_axis: int = DEFAULT_CHANNEL_AXIS,
            sequences: bool = False) -> Measurement:
    """Stream `batches` once: the reference runs once per batch, every candidate after it
    (`sequences`: KL of sequence outputs too, `DistortionMeter`)."""
    meters = [DistortionMeter(channel_axis, sequences=sequences) for _ in candidates]
    ref_acc = AccuracyMeter()
    accs = [AccuracyMeter() for _ in candidates]
    with progress_bar(len(batches) * (1 + len(candidates)), description, quiet) as bar:
        for batch in batches:
            feed, label = split_labels(batch, labels)
            expected = reference(feed)
            bar.update(1)
            if label is not None:
                ref_acc.add(expected, label)
            for meter, acc, candidate in zip(meters, accs, candidates):
                outputs = candidate(feed)
                meter.add(expected, outputs, rows=feed_rows(feed))
                if label is not None:
                    acc.add(outputs, label)
                bar.update(1)
    return Measurement([m.result() for m in meters], ref_acc.result(),
                       [a.result() for a in accs])


class Replay:
    """Calibration feeds with the original model's outputs, replayed for every probe, and the
    intermediate tensors that downstream-only probes start from (`cuts`).

    Up to `budget` bytes stay in memory; later batches are spilled to a temporary folder and
    read back one at a time, so memory does not grow with the number of samples.
    """

    def __init__(self, budget: int = DEFAULT_REPLAY_MB * 2**20):
        self.budget = budget
        self._held: list[tuple[Feed, list[np.ndarray], dict[str, np.ndarray]] | Path] = []
        self._bytes = 0
        self._folder: tempfile.TemporaryDirectory | None = None
        self._energy: list[list[float]] = []  # per batch: sum of squares of each float output
        self._keys: dict[str, int] = {}  # cut tensor name -> its key in spilled files
        self.recorded: frozenset[str] | None = None  # the cut tensors of every batch
        self._rows: list[int] = []  # per batch: samples

    def append(self, feed: Feed, outputs: list[np.ndarray],
               cuts: Mapping[str, np.ndarray] | None = None) -> None:
        """One batch: its feed, the reference outputs and the tensors named in `cuts`."""
        self._energy.append(energy_of(outputs))
        self._rows.append(feed_rows(feed))
        cuts = {k: v for k, v in (cuts or {}).items() if isinstance(v, np.ndarray)}  # tensors
        self.recorded = frozenset(cuts) if self.recorded is None else self.recorded & set(cuts)
        size = sum(a.nbytes for a in feed.values()) + \
            sum(np.asarray(o).nbytes for o in outputs) + sum(a.nbytes for a in cuts.values())
        if self._bytes + size <= self.budget:
            self._held.append((feed, [np.asarray(o) for o in outputs], cuts))
            self._bytes += size
            return
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="rdonnx-replay-")
            register(self._folder.name)  # removed on SIGTERM / Ctrl-C too (rdonnx.signals)
        for name in cuts:
            self._keys.setdefault(name, len(self._keys))
        path = Path(self._folder.name) / f"{len(self._held)}.npz"
        np.savez(path, **{f"in:{k}": v for k, v in feed.items()},
                 **{f"out:{i}": np.asarray(o) for i, o in enumerate(outputs)},
                 **{f"cut:{self._keys[k]}": v for k, v in cuts.items()})
        self._held.append(path)

    def cuts(self, names: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        """The recorded tensors `names` of every batch, in order (spilled ones read back)."""
        for item in self._held:
            if isinstance(item, Path):
                with np.load(item) as data:
                    yield {n: data[f"cut:{self._keys[n]}"] for n in names}
            else:
                yield {n: item[2][n] for n in names}

    def __iter__(self) -> Iterator[tuple[Feed, list[np.ndarray]]]:
        for item in self._held:
            if isinstance(item, Path):
                with np.load(item) as data:
                    feed = {k[3:]: data[k] for k in data.files if k.startswith("in:")}
                    outs = sorted((int(k[4:]), data[k]) for k in data.files if k.startswith("out:"))
                yield feed, [o for _, o in outs]
            else:
                yield item[0], item[1]

    def __len__(self) -> int:
        return len(self._held)

    @property
    def energies(self) -> list[list[float]]:
        """Per batch, the sum of squares of each float reference output."""
        return self._energy

    @property
    def samples(self) -> int:
        """Samples recorded (rows along axis 0 of the feeds; a scalar feed counts one)."""
        return sum(self._rows)

    def distortion(self, run: Predict, channel_axis: int = DEFAULT_CHANNEL_AXIS,
                   only: str | None = None, terms: str | None = None,
                   sequences: bool = False) -> Distortion:
        """Distortion of `run`'s outputs against the recorded ones (`only` one metric; `terms`:
        keep per-sample sums of that metric, for its confidence bound; `sequences`: KL of
        sequence outputs too)."""
        meter = DistortionMeter(channel_axis, only, terms, sequences=sequences)
        for (feed, expected), energy, rows in zip(self, self._energy, self._rows):
            meter.add(expected, run(feed), energy, rows)
        return meter.result()
