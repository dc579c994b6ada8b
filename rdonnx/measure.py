"""Run a reference and candidate variants over the same batches, one batch in memory at a time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .data import Batches, Feed, split_labels
from .distortion import AccuracyMeter, Distortion, DistortionMeter
from .progress import progress_bar

Predict = Callable[[Feed], list[np.ndarray]]


@dataclass(frozen=True)
class Measurement:
    """Distortion of each candidate against the reference, and accuracies when labelled."""

    distortions: list[Distortion]
    reference_accuracy: float | None
    accuracies: list[float | None]


def measure(reference: Predict, candidates: Sequence[Predict], batches: Batches,
            labels: str | None = None, description: str = "measuring",
            quiet: bool = True) -> Measurement:
    """Stream `batches` once: the reference runs once per batch, every candidate after it."""
    meters = [DistortionMeter() for _ in candidates]
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
