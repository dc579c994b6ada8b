"""`--method surp` and `rdonnx truncate`: SuRP successive refinement of the prunable weights to a
target, and cutting an artifact's embedded stream to a shorter prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rdonnx.algo.quantize import quantize
from rdonnx.allocate.allocators import Allocation
from rdonnx.artifact.format import artifact_coded, read_artifact, surp_entries, write_artifact
from rdonnx.artifact.surp_stream import Prefixes, encode, file_digest, shortest_meeting
from rdonnx.codec import surp as codec
from rdonnx.errors import UsageError
from rdonnx.flow.calibration import calibrate_model
from rdonnx.flow.config import DEFAULTS, CompressConfig, Measurement, Target, VerifyOptions
from rdonnx.flow.result import CompressResult, finish_report
from rdonnx.flow.target import Check, Realized, meets
from rdonnx.graph.model import check_output
from rdonnx.report.records import RatePoint
from rdonnx.version import __version__

# a distortion / agreement bound: encode up to these densities in turn (the stream is embedded,
# so a denser cap only extends it), bisecting the prefix (`shortest_meeting`)
BOUND_RATES = (0.5, 0.8, 1.0)


def compress_surp(cal, config: CompressConfig, test_data, labels: str | None, quiet: bool):
    """The SuRP flow of `pipeline.compress`: encode to the target, measure the decoded model
    (exactly what the artifact holds), report. (The method's whole run: it takes the whole
    config.)"""
    names = [w.name for w in cal.weights]
    total = sum(w.size for w in cal.weights)
    seed = config.data.seed
    coding, metric = config.coding, config.measure.metric
    extras = {} if coding.lossless_unpruned or not coding.quantized else cal.extra
    quantized = {n: quantize(a, 8) for n, a in extras.items()}
    extra_values = {n: q.values(a.dtype) for (n, a), q in zip(extras.items(),
                                                               quantized.values())}
    source = None
    if cal.model.path is not None and Path(cal.model.path).is_file():
        path = Path(cal.model.path).resolve()
        source = {"path": str(path), "sha256": file_digest(path)}

    terms = metric if config.target.kind == "distortion" and config.verify.confidence > 0 \
        else None

    def measured(values: dict[str, np.ndarray]):
        return cal.distortion({**values, **extra_values}, config.measure.channel_axis,
                              terms=terms)

    points: list[RatePoint] = []
    target = config.target
    if target.kind == "rate":
        coded = encode(cal.originals, names, seed, nnz=max(1, round(target.value * total)))
    elif target.kind == "bits":
        coded = encode(cal.originals, names, seed, bits=target.value * total)
    else:  # encode to a cap, bisect the prefix; a denser cap only if the bound needs it
        for cap in BOUND_RATES:
            prefixes = Prefixes.of(encode(cal.originals, names, seed,
                                          nnz=max(1, round(cap * total))))

            def ok(steps: int, prefixes: Prefixes = prefixes):
                d = measured(prefixes.values(steps))
                r = Realized(prefixes.nnz(steps) / total, {}, {}, {}, {}, {}, d)
                passed = meets(target, Check(metric, config.verify.confidence), r, total)
                return passed, (d, prefixes.bits(steps), prefixes.nnz(steps), passed)

            try:
                steps, probes = shortest_meeting(prefixes, ok)
                break
            except UsageError:
                if cap == BOUND_RATES[-1]:
                    raise
        for _, (d, bits, nnz, passed) in sorted(probes, key=lambda p: p[0]):
            points.append(RatePoint(nnz / total, d.value(metric), d.top1_agreement,
                                    passed, bits / total))
        coded = prefixes.truncated(steps)
    coded.source = source
    decoded = codec.decode(coded.stream)  # measure exactly what a reader decodes
    values = coded.pool.values(decoded.uhat, decoded.negative)
    distortion = measured(values)
    keep = coded.nnz(decoded.uhat)
    chosen = Realized(decoded.nnz / total, keep, values, {**values, **extra_values}, quantized,
                      {n: 8 for n in quantized}, distortion, float(coded.stream.bits))
    allocation = Allocation({n: s.values for n, s in cal.scores.items()}, {})
    report = finish_report(cal, config, chosen, None, allocation, test_data, labels, quiet)
    report.search = points
    return CompressResult(cal.model, chosen.values, quantized, report, None, values,
                          surp=coded)


@dataclass(frozen=True)
class Truncation:
    """What `truncate_artifact` wrote."""

    path: str
    size: int
    steps: int
    rate: float
    bits_per_weight: float
    distortion: float | None
    top1_agreement: float | None


def _reference(artifact, reference: Path | None) -> Path:
    if reference is not None:
        if not Path(reference).is_file():
            raise UsageError(f"reference model not found: {reference}")
        return Path(reference)
    source = (artifact.manifest.get("surp") or {}).get("source") or {}
    path = Path(source["path"]) if source.get("path") else None
    if path is None or not path.is_file() or file_digest(path) != source.get("sha256"):
        raise UsageError("--max-distortion measures against the original model: pass "
                         "--reference ORIGINAL.onnx (the source recorded in the artifact is "
                         "missing or changed)")
    return path


def truncate_artifact(path: Path, output: Path, *, rate: float | None = None,
                      bits_per_weight: float | None = None,
                      max_distortion: float | None = None, calib=None,
                      reference: Path | None = None, data=None,
                      device: str = DEFAULTS.measure.device,
                      quiet: bool = True, force: bool = False) -> Truncation:
    """Cut the SuRP stream of `path` to a shorter prefix and write it to `output`."""
    targets = [t for t in (rate, bits_per_weight, max_distortion) if t is not None]
    if len(targets) != 1:
        raise UsageError("give exactly one target: --rate, --bits-per-weight or "
                         "--max-distortion")
    if rate is not None and not 0 < rate <= 1:
        raise UsageError(f"--rate must be in (0, 1], got {rate}")
    if bits_per_weight is not None and bits_per_weight <= 0:
        raise UsageError(f"--bits-per-weight must be > 0, got {bits_per_weight}")
    if max_distortion is not None and max_distortion < 0:
        raise UsageError(f"--max-distortion must be >= 0, got {max_distortion}")

    check_output(Path(output), Path(path), force)
    if Path(output).resolve() == Path(path).resolve():
        raise UsageError(f"output {output} is the input artifact; choose another -o")
    artifact = read_artifact(path)
    coded = artifact_coded(artifact)
    prefixes = Prefixes.of(coded)
    n = coded.pool.n
    settings = artifact.manifest.get("settings", {})
    stored = CompressConfig.from_dict(settings)  # version 1 (flat) or 2
    metric = stored.measure.metric
    distortion = None
    if rate is not None:
        steps = prefixes.steps_for_nnz(max(1, round(rate * n)))
    elif bits_per_weight is not None:
        steps = prefixes.steps_for_bits(bits_per_weight * n)
    else:
        steps, distortion = _by_distortion(artifact, prefixes, max_distortion, calib,
                                           _reference(artifact, reference), stored, data,
                                           device, quiet)
    cut = prefixes.truncated(steps)
    values = cut.pool.values(prefixes.uhat(steps), prefixes.decoded.negative)
    kept = []
    for entry in artifact.tensors:
        if entry.encoding == "surp":
            continue
        positions = artifact.section(entry.positions, f"{entry.name} positions")
        values_blob = artifact.section(entry.values, f"{entry.name} values")
        if getattr(entry, "codebook", None) is not None:
            entry.codebook_bytes = artifact.section(entry.codebook, f"{entry.name} codebook")
        kept.append((entry, positions, values_blob))
    kept.extend((e, b"", b"") for e in surp_entries(cut, values))
    nnz = prefixes.nnz(steps)
    metrics = {"rate": nnz / n, "metric": metric,
               "distortion": None if distortion is None else distortion.value(metric),
               "top1_agreement": None if distortion is None else distortion.top1_agreement,
               "value_bits": None}
    size = write_artifact(Path(output), artifact.graph, kept, settings, metrics, __version__,
                          (cut.stream.payload(), cut.manifest()))
    return Truncation(str(output), size, steps, nnz / n, cut.stream.bits / n,
                      metrics["distortion"], metrics["top1_agreement"])


def _by_distortion(artifact, prefixes: Prefixes, bound: float, calib, reference: Path,
                   stored: CompressConfig, data, device: str, quiet: bool):
    """The shortest prefix whose measured distortion against `reference` is within `bound`
    (the weights selected and measured as the artifact's `stored` settings say)."""
    config = CompressConfig(
        target=Target(rate=1.0), selection=stored.selection,
        verify=VerifyOptions(holdout=0.0),  # cutting a stream fits nothing: all of --calib
        measure=Measurement(metric=stored.measure.metric,
                            channel_axis=stored.measure.channel_axis, device=device),
        **({"data": data} if data is not None else {}))
    cal = calibrate_model(reference, config, calib, quiet)
    for t in prefixes.coded.pool.tensors:
        if t.name not in cal.originals or tuple(cal.originals[t.name].shape) != t.shape:
            raise UsageError(f"the reference model does not match the artifact (weight "
                             f"{t.name}); pass the model it was compressed from")
    extras = {e.name: artifact.decode(e) for e in artifact.tensors
              if e.encoding != "surp" and e.name in cal.extra}

    def ok(steps: int):
        d = cal.distortion({**prefixes.values(steps), **extras}, config.measure.channel_axis)
        return d.value(config.measure.metric) <= bound, d

    steps, probes = shortest_meeting(prefixes, ok)
    return steps, dict(probes)[steps]
