"""Run a reference and candidate variants over the same batches, one batch in memory at a time."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rdonnx.choices import DEFAULT_REPLAY_MB
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


def measure(reference: Predict, candidates: Sequence[Predict], batches: Batches,
            labels: str | None = None, description: str = "measuring",
            quiet: bool = True, channel_axis: int = 1) -> Measurement:
    """Stream `batches` once: the reference runs once per batch, every candidate after it."""
    meters = [DistortionMeter(channel_axis) for _ in candidates]
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
                meter.add(expected, outputs)
                if label is not None:
                    acc.add(outputs, label)
                bar.update(1)
    return Measurement([m.result() for m in meters], ref_acc.result(),
                       [a.result() for a in accs])


class Replay:
    """Calibration feeds with the original model's outputs, replayed for every probe.

    Up to `budget` bytes stay in memory; later batches are spilled to a temporary folder and
    read back one at a time, so memory does not grow with the number of samples.
    """

    def __init__(self, budget: int = DEFAULT_REPLAY_MB * 2**20):
        self.budget = budget
        self._held: list[tuple[Feed, list[np.ndarray]] | Path] = []
        self._bytes = 0
        self._folder: tempfile.TemporaryDirectory | None = None
        self._energy: list[list[float]] = []  # per batch: sum of squares of each float output
        self._rows: list[int] = []  # per batch: samples

    def append(self, feed: Feed, outputs: list[np.ndarray]) -> None:
        self._energy.append(energy_of(outputs))
        self._rows.append(max((a.shape[0] if a.ndim else 1 for a in feed.values()), default=1))
        size = sum(a.nbytes for a in feed.values()) + sum(np.asarray(o).nbytes for o in outputs)
        if self._bytes + size <= self.budget:
            self._held.append((feed, [np.asarray(o) for o in outputs]))
            self._bytes += size
            return
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="rdonnx-replay-")
            register(self._folder.name)  # removed on SIGTERM / Ctrl-C too (rdonnx.signals)
        path = Path(self._folder.name) / f"{len(self._held)}.npz"
        np.savez(path, **{f"in:{k}": v for k, v in feed.items()},
                 **{f"out:{i}": np.asarray(o) for i, o in enumerate(outputs)})
        self._held.append(path)

    def __iter__(self) -> Iterator[tuple[Feed, list[np.ndarray]]]:
        for item in self._held:
            if isinstance(item, Path):
                with np.load(item) as data:
                    feed = {k[3:]: data[k] for k in data.files if k.startswith("in:")}
                    outs = sorted((int(k[4:]), data[k]) for k in data.files if k.startswith("out:"))
                yield feed, [o for _, o in outs]
            else:
                yield item

    def __len__(self) -> int:
        return len(self._held)

    @property
    def samples(self) -> int:
        """Samples recorded (rows along axis 0 of the feeds; a scalar feed counts one)."""
        return sum(self._rows)

    def distortion(self, run: Predict, channel_axis: int = 1,
                   only: str | None = None, terms: str | None = None) -> Distortion:
        """Distortion of `run`'s outputs against the recorded ones (`only` one metric; `terms`:
        keep per-sample sums of that metric, for its confidence bound)."""
        meter = DistortionMeter(channel_axis, only, terms)
        for (feed, expected), energy in zip(self, self._energy):
            meter.add(expected, run(feed), energy)
        return meter.result()
