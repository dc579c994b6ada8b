"""Rate-distortion plots (matplotlib is an optional extra: pip install 'rdonnx[plot]')."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import UsageError
from .outputs import normal_mode
from .report import Report


def require_matplotlib():
    """The pyplot module with a file-only backend, or a one-line install hint."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'rdonnx[plot]'") from None
    return plt


def _save(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.fchmod(fd, normal_mode())  # mkstemp's 0600 -> the mode of any new file
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def plot_report(report: Report, path: str | os.PathLike) -> None:
    """Per-weight curves with the chosen densities, and the measured model operating point."""
    plt = require_matplotlib()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    metric = report.calibration.metric
    floor = 1e-6
    for w in report.weights:
        if w.curve is None or report.grid is None:
            continue
        line, = left.plot(report.grid[1:], [max(v, floor) for v in w.curve[1:]], marker=".",
                          lw=1, label=w.name[:28])
        if w.distortion is not None:
            left.plot([w.density], [max(w.distortion, floor)], "o", color=line.get_color(),
                      mfc="none", ms=9)
    left.set(xscale="log", yscale="log", xlabel="density of the weight",
             ylabel=f"{metric}, this weight pruned alone", title="per-weight R-D curves "
             "(circles: chosen)")
    if report.grid is None:
        left.text(0.5, 0.5, f"no curves measured (method {report.method})",
                  ha="center", va="center", transform=left.transAxes)
    elif len(report.weights) <= 12:
        left.legend(fontsize=7)
    if report.frontier:
        pts = sorted((p.rate, max(p.distortion, floor)) for p in report.frontier)
        right.plot(*zip(*pts), "-", marker=".", label=f"{report.method}: measured at each rate")
    if report.search:
        right.plot([s.rate for s in report.search], [s.distortion for s in report.search], "s",
                   label="search probes (measured)")
    right.plot([report.rate], [max(report.calibration.distortion, floor)], "o", ms=9,
               label=f"{report.method}: chosen, measured")
    if report.predicted_distortion is not None:
        right.plot([report.rate], [report.predicted_distortion], "x", ms=9,
                   label="sum of curves (predicted)")
    right.set(xscale="log", yscale="log", xlabel="rate (fraction of weights kept)",
              ylabel=metric, title="model output distortion")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)


def plot_methods(series: Mapping[str, Sequence[tuple[float, float]]], path: str | os.PathLike,
                 ylabel: str, title: str,
                 xlabel: str = "rate (fraction of weights kept)") -> None:
    """Measured distortion (or any metric) against rate, one line per method."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)
