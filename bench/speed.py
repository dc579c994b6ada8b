"""Calibration speed on the zoo's real models (issue 14): the probe cost against a forward pass,
the number of probes, and the wall time of whole compress runs.

Per model (prepared by ``python -m bench.zoo.fetch``; ``<cache>/<name>/model.onnx`` with
``calib.npz``), in one process:

- forward: one pass of the whole model over the calibration samples with every weight fed as
  an input and ORT optimisations off (what every probe cost before downstream probes);
- probe: the mean over all prunable weights of one downstream-only probe (the weight pruned to
  half, its slice run over the same samples, its other weights constant and ORT optimisations
  on, nmse probes stopping at the input of a linear tail), and its ratio to the forward pass,
  both timed in the same run; also the ratio of the slice as first built (weights fed,
  optimisations off), and the largest relative difference between the two slices' figures;
- probes: the probes `compress --rate 0.5` measured (adaptive grid) next to the full grid's;
- the wall time of `compress --rate 0.5`, of a `--max-distortion` bound and of
  `--rate 0.5 --sequential`, each written to a temporary `.rdonnx` (stage times from the
  report);
- with ``--jobs-compare``: `rdonnx calibrate` (whole 20-point grid) with --jobs 1 and 2.

The machine is shared: the 1-minute load average is printed next to every timing.

    python bench/speed.py --models detector,ocr --samples 8
    python bench/speed.py --models g2p --jobs-compare --runs probe,rate
    python bench/speed.py --models smollm2 --samples 4 --runs probe --every 15
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rdonnx  # noqa: E402
from rdonnx.algo.prune import prune  # noqa: E402
from rdonnx.flow.calibration import calibrate_model  # noqa: E402
from rdonnx.flow.config import CompressConfig  # noqa: E402
from rdonnx.flow.pipeline import make_realizer, measure_all_curves  # noqa: E402
from rdonnx.runtime.data import DataOptions  # noqa: E402
from rdonnx.runtime.probe import Prober  # noqa: E402

MODELS = ("detector", "ocr", "efficientnet", "g2p", "minilm", "crepe", "smollm2")
# per model: the distortion metric and the --max-distortion bound timed (the zoo's loosest)
SETTINGS = {"minilm": ("cosine", 2e-2)}
DEFAULT_SETTING = ("nmse", 1e-2)
UNSIMPLIFIED = {"smollm2"}  # run as exported (onnxsim on its 650 MB of external data: minutes)
RUNS = ("probe", "rate", "bound", "sequential")


def load() -> float:
    return os.getloadavg()[0]


def cache_dir(override: str | None) -> Path:
    path = override or os.environ.get("RDONNX_ZOO_CACHE") or Path.home() / ".cache/rdonnx-zoo"
    return Path(path).expanduser()


def probe_costs(model: Path, calib: Path, config: CompressConfig, every: int = 1) -> dict:
    """Every weight probed three times back to back, so load changes hit all alike: on the
    whole graph (a forward pass with every weight fed and ORT optimisations off: what every
    probe cost before), on its downstream slice as first built (weights fed, optimisations
    off), and as compress probes now (the slice's other weights constant, optimisations on);
    a ratio is the sum of a kind's times over the sum of the whole-graph times. The slices are
    built (and run once) before the timing; their build seconds are given apart. One probe
    thread (--jobs 1), so that every kind runs its operators on all cores. `every`: time every
    so many weights only (the first, then evenly spaced: the LM's 211 take hours)."""
    start = time.monotonic()
    cal = calibrate_model(model, config.updated(jobs=1), calib)
    reference = time.monotonic() - start
    whole = Prober(cal.runner, cal.replay)
    plain = Prober(cal.runner, cal.replay, cal.prober.cuts)
    metric = config.measure.metric
    half = {w.name: prune(cal.originals[w.name], w.size // 2) for w in cal.weights[::every]}
    loads = [load()]
    times: dict[str, list[float]] = {"forward": [], "plain": [], "probe": [], "build": []}
    drift = 0.0  # largest relative difference of a probe's figure from the slice as built
    timed = cal.weights[::every]
    for w in timed:
        arrays = {w.name: half[w.name]}
        start = time.monotonic()
        cal.prober.probe(arrays, metric)  # builds the slice
        times["build"].append(time.monotonic() - start)
        plain.probe(arrays, metric)
        figures = {}
        for kind, prober in (("forward", whole), ("plain", plain), ("probe", cal.prober)):
            start = time.monotonic()
            figures[kind] = prober.probe(arrays, metric).value(metric)
            times[kind].append(time.monotonic() - start)
        drift = max(drift, abs(figures["probe"] - figures["plain"]) /
                    max(abs(figures["plain"]), 1e-30))
    loads.append(load())
    forward = sum(times["forward"])
    return {"weights": len(cal.weights), "timed": len(timed),
            "params": sum(w.size for w in cal.weights),
            "reference_s": reference, "forward_s": float(np.mean(times["forward"])),
            "plain_mean_s": float(np.mean(times["plain"])),
            "plain_ratio": sum(times["plain"]) / forward,
            "probe_mean_s": float(np.mean(times["probe"])),
            "probe_ratio": sum(times["probe"]) / forward,
            "first_probe_s": sum(times["build"]),
            "whole_graph": len(cal.prober.full), "tails": len(cal.prober.tails),
            "probe_drift": drift, "load": loads}


def timed_compress(model: Path, calib: Path, config: CompressConfig) -> dict:
    """One compress run written to a temporary .rdonnx: seconds, stage seconds, probes."""
    before = load()
    start, cpu = time.monotonic(), time.process_time()
    result = rdonnx.compress(model, calib=calib, config=config)
    with tempfile.TemporaryDirectory() as tmp:
        size = result.save(Path(tmp) / "m.rdonnx")
    seconds, cpu = time.monotonic() - start, time.process_time() - cpu
    curves = result.curves
    probes = 0
    if curves is not None:
        measured = curves.measured or {n: range(len(curves.grid)) for n in curves.distortion}
        probes = sum(1 for n, idx in measured.items() for i in idx if curves.grid[i] < 1)
    full = len(result.report.weights) * sum(1 for d in config.measure.grid if d < 1)
    return {"seconds": seconds, "cpu_s": cpu, "stages": result.report.timings, "probes": probes,
            "full_grid_probes": full, "bytes": size, "rate": result.report.rate,
            "distortion": result.report.calibration.distortion,
            "load": [before, load()]}


def adaptive_accuracy(model: Path, calib: Path, config: CompressConfig) -> dict:
    """The allocation's measured distortion at --rate 0.5: adaptive grid against full grid
    (the same calibration, so the two differ only by the curves)."""
    cal = calibrate_model(model, config, calib)
    from rdonnx.allocate.allocators import Allocation, rd

    scores = {n: s.values for n, s in cal.scores.items()}
    out = {}
    rate, metric = config.target.rate, config.measure.metric
    for adaptive in (True, False):
        run = config.updated(adaptive=adaptive)
        realizer = make_realizer(cal, run)

        def focus(curves, rate=rate):
            return [rd(Allocation(scores, {n: curves.curve(n) for n in curves.distortion}), rate)]

        start = time.monotonic()
        curves = measure_all_curves(realizer, run.measure, run.curve_settings(), True, focus)
        keep = rd(Allocation(scores, {n: curves.curve(n) for n in curves.distortion}), rate)
        pruned, _ = realizer.compress_all(keep)
        d = cal.distortion(pruned, run.measure.channel_axis, metric).value(metric)
        out["adaptive" if adaptive else "full"] = {"distortion": d,
                                                   "seconds": time.monotonic() - start}
    out["relative_difference"] = out["adaptive"]["distortion"] / out["full"]["distortion"] - 1
    return out


def calibrate_jobs(model: Path, calib: Path, config: CompressConfig) -> dict:
    """`rdonnx calibrate` (whole grid) with --jobs 1 and 2, alternating, twice each."""
    out: dict[str, list] = {"1": [], "2": [], "load": []}
    for _ in range(2):
        for jobs in (1, 2):
            out["load"].append(load())
            start = time.monotonic()
            rdonnx.calibrate(model, calib=calib, config=config.updated(jobs=jobs))
            out[str(jobs)].append(time.monotonic() - start)
            out["load"].append(load())
    out["speedup"] = min(out["1"]) / min(out["2"])
    return out


def fmt_table(results: dict) -> str:
    lines = ["| model | weights (timed) | samples | forward s | slice as built / forward | "
             "probe mean s | probe / forward | probe drift | probes at rate 0.5 (full grid) | "
             "rate 0.5 s (CPU s) | bound s (CPU s) | sequential s (CPU s) | adaptive vs full | "
             "load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def num(part: dict, key: str, spec: str = ".1f") -> str:
        return format(part[key], spec) if key in part else "-"

    for name, r in results.items():
        p, rate, bound, seq, acc = (r.get(k, {}) for k in
                                    ("probe", "rate", "bound_run", "sequential", "accuracy"))
        loads = [v for part in (p, rate, bound, seq) for v in part.get("load", [])]
        cells = [name, f"{p['weights']} ({p['timed']})" if p else "-", str(r["samples"]),
                 num(p, "forward_s", ".2f"), num(p, "plain_ratio", ".2f"),
                 num(p, "probe_mean_s", ".2f"), num(p, "probe_ratio", ".2f"),
                 num(p, "probe_drift", ".1e"),
                 f"{rate['probes']} ({rate['full_grid_probes']})" if rate else "-",
                 *(f"{num(part, 'seconds')} ({num(part, 'cpu_s')})" if part else "-"
                   for part in (rate, bound, seq)),
                 f"{100 * acc['relative_difference']:+.1f}%" if acc else "-",
                 f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS[:-1]))
    parser.add_argument("--samples", type=int, default=None,
                        help="calibration samples (default: the whole calib split)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--runs", default=",".join(RUNS),
                        help=f"which of {','.join(RUNS)},accuracy to run")
    parser.add_argument("--jobs", type=int, default=1, help="--jobs of the compress runs")
    parser.add_argument("--jobs-compare", action="store_true",
                        help="also time rdonnx calibrate with --jobs 1 and 2")
    parser.add_argument("--every", type=int, default=1,
                        help="probe costs of every so many weights only (the LM: 15)")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args(argv)
    cache = cache_dir(args.cache)
    runs = set(args.runs.split(","))
    results: dict[str, dict] = {}
    for name in args.models.split(","):
        folder = cache / name
        model, calib = folder / "model.onnx", folder / "calib.npz"
        if not model.is_file() or not calib.is_file():
            print(f"{name}: not in {cache} (run python -m bench.zoo.fetch)", file=sys.stderr)
            continue
        metric, bound = SETTINGS.get(name, DEFAULT_SETTING)
        data = DataOptions(samples=args.samples)
        if args.batch_size:
            data = replace(data, batch_size=args.batch_size)
        base = CompressConfig.of(rate=0.5, metric=metric, data=data, jobs=args.jobs,
                                 layer_distortion=False, simplify=name not in UNSIMPLIFIED)
        with np.load(calib) as arrays:
            total = len(arrays[arrays.files[0]])
        r: dict = {"samples": min(total, args.samples or total), "metric": metric,
                   "max_distortion": bound}
        results[name] = r
        if "probe" in runs:
            r["probe"] = probe_costs(model, calib, base, args.every)
        if "rate" in runs:
            r["rate"] = timed_compress(model, calib, base)
        if "bound" in runs:
            r["bound_run"] = timed_compress(model, calib, base.updated(rate=None,
                                                                    max_distortion=bound))
        if "sequential" in runs:
            r["sequential"] = timed_compress(model, calib, base.updated(sequential=True))
        if "accuracy" in runs:
            r["accuracy"] = adaptive_accuracy(model, calib, base)
        if args.jobs_compare:
            r["jobs"] = calibrate_jobs(model, calib, base.updated(jobs=1))
        print(f"{name}: {json.dumps(r, default=float)}", file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    print(fmt_table(results))
    for name, r in results.items():
        if "jobs" in r:
            j = r["jobs"]
            print(f"{name}: rdonnx calibrate --jobs 1 {min(j['1']):.1f} s, --jobs 2 "
                  f"{min(j['2']):.1f} s: {j['speedup']:.2f}x (load {min(j['load']):.1f}-"
                  f"{max(j['load']):.1f})")


if __name__ == "__main__":
    main()
