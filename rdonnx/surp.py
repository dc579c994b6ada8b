"""`--method surp`: SuRP successive refinement of one global pool of prunable weights.

The pool is the prunable weights in graph order, each divided by its L2 norm and flattened
into one vector; `rdonnx.codec.surp` codes it as an embedded stream. A prefix of the stream
decodes to a sparser, coarser model: compress stops at the target, `truncate` cuts further.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .codec import surp as codec
from .errors import UsageError

BOUND_RATES = (0.5, 0.8, 1.0)  # a distortion / agreement bound: encode up to these densities
# in turn (the stream is embedded, so a denser cap only extends it), bisecting the prefix
BOUND_SEARCH_STEPS = 24


@dataclass(frozen=True)
class PoolTensor:
    name: str
    shape: tuple[int, ...]
    data_type: int  # onnx TensorProto element type
    norm: float  # L2 norm of the original tensor (float64)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Pool:
    """The tensors of the SuRP pool, in pool order."""

    tensors: tuple[PoolTensor, ...]

    @property
    def n(self) -> int:
        return sum(t.size for t in self.tensors)

    @staticmethod
    def of(arrays: dict[str, np.ndarray], names: list[str]) -> tuple[Pool, np.ndarray,
                                                                    np.ndarray]:
        """The pool of `names` (in this order): tensors, magnitudes u, negative signs."""
        tensors, parts = [], []
        for name in names:
            a = np.asarray(arrays[name]).astype(np.float64).ravel()
            norm = float(np.sqrt(np.dot(a, a)))
            tensors.append(PoolTensor(name, tuple(np.shape(arrays[name])),
                                      onnx.helper.np_dtype_to_tensor_dtype(
                                          np.asarray(arrays[name]).dtype), norm))
            parts.append(a / norm if norm > 0 else a)
        w = np.concatenate(parts) if parts else np.zeros(0)
        return Pool(tuple(tensors)), np.abs(w), w < 0

    def values(self, uhat: np.ndarray, negative: np.ndarray) -> dict[str, np.ndarray]:
        """Each tensor as the decoder rebuilds it: sign * u-hat * norm, float64 -> float32 ->
        the tensor's type."""
        out, start = {}, 0
        for t in self.tensors:
            part = uhat[start:start + t.size] * t.norm
            part = np.where(negative[start:start + t.size], -part, part)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            out[t.name] = part.astype(np.float32).astype(dtype).reshape(t.shape)
            start += t.size
        return out


@dataclass
class Coded:
    """A SuRP pool and its stream (what the artifact stores)."""

    pool: Pool
    stream: codec.Stream
    source: dict[str, str] | None = None  # path and sha256 of the source model

    def nnz(self, uhat: np.ndarray) -> dict[str, int]:
        out, start = {}, 0
        for t in self.pool.tensors:
            out[t.name] = int(np.count_nonzero(uhat[start:start + t.size]))
            start += t.size
        return out

    def manifest(self) -> dict[str, Any]:
        """The manifest's `surp` object (the container adds the `stream` section)."""
        side = self.stream.side
        return {"n": side.n, "s": side.s, "alpha": side.alpha,
                "sum_u": side.sum_u, "seed": side.seed, "steps": self.stream.steps,
                "nnz": self.stream.nnz, "bits": self.stream.bits,
                "side_bits": side_bits(self.pool, self.stream),
                "tensors": [{"name": t.name, "norm": t.norm} for t in self.pool.tensors],
                "chunks": [[c.steps, c.length, c.nnz] for c in self.stream.table],
                "source": self.source}

    @staticmethod
    def from_manifest(meta: dict[str, Any], shapes: dict[str, tuple[tuple[int, ...], int]],
                      payload: bytes) -> Coded:
        """Parse the manifest's `surp` object (raises ValueError / KeyError / TypeError)."""
        tensors = tuple(PoolTensor(str(t["name"]), *shapes[str(t["name"])], float(t["norm"]))
                        for t in meta["tensors"])
        pool = Pool(tensors)
        side = codec.Side(int(meta["n"]), float(meta["s"]), float(meta["alpha"]),
                          float(meta["sum_u"]), int(meta["seed"]))
        if side.n != pool.n or side.n < 3 or not all(
                math.isfinite(v) and v >= 0 for v in (side.s, side.alpha, side.sum_u)) or \
                not all(math.isfinite(t.norm) and t.norm >= 0 for t in tensors):
            raise ValueError("SuRP side information is inconsistent")
        table = [codec.ChunkInfo(int(s), int(length), int(z)) for s, length, z in meta["chunks"]]
        if sum(c.length for c in table) != len(payload) or \
                any(c.steps <= 0 or c.length <= 0 or c.nnz > side.n for c in table):
            raise ValueError("SuRP chunk table does not match the stream")
        chunks, at = [], 0
        for c in table:
            chunks.append(payload[at:at + c.length])
            at += c.length
        return Coded(pool, codec.Stream(side, chunks, table), meta.get("source"))


def side_bits(pool: Pool, stream: codec.Stream) -> int:
    """Side information outside the chunks: one float64 norm per tensor, n, s, alpha, sum(u),
    seed (the chunk headers are inside `stream.bits`)."""
    return 64 * (len(pool.tensors) + 5)


def check_config(config) -> None:
    """Refuse settings that do not apply to SuRP (it codes its own values)."""
    if config.values != "auto" or config.value_bits is not None:
        raise UsageError("--method surp codes its own values: drop --values and --value-bits")
    if config.reconstructs:
        raise UsageError("--method surp does not reconstruct: drop --reconstruct, "
                         "--sequential and --criterion obs")
    if config.pattern is not None:
        raise UsageError("--method surp does not support --pattern")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------- choosing a prefix


@dataclass
class Prefixes:
    """Every prefix of one stream, decoded once: values and bits at any step count."""

    coded: Coded
    symbols: codec.Symbols
    decoded: codec.Decoded

    @staticmethod
    def of(coded: Coded) -> Prefixes:
        symbols = codec.decode_symbols(coded.stream)
        return Prefixes(coded, symbols, codec.replay(coded.stream.side, symbols))

    @property
    def steps(self) -> int:
        return self.decoded.steps

    def nnz(self, steps: int) -> int:
        return int(self.decoded.nnz_at[steps - 1]) if steps else 0

    def bits(self, steps: int) -> int:
        return codec.prefix_bits(self.coded.stream, steps, self.symbols, self.decoded)

    def uhat(self, steps: int) -> np.ndarray:
        uhat = np.zeros(self.coded.pool.n)
        np.add.at(uhat, self.decoded.picks[:steps], self.decoded.quanta[:steps])
        return uhat

    def values(self, steps: int) -> dict[str, np.ndarray]:
        return self.coded.pool.values(self.uhat(steps), self.decoded.negative)

    def steps_for_nnz(self, nnz: int) -> int:
        """The first step count with `nnz` nonzeros (UsageError when the stream is shorter)."""
        if nnz > self.nnz(self.steps):
            raise UsageError(f"the stream holds only {self.nnz(self.steps):,} nonzeros "
                             f"(rate {self.nnz(self.steps) / self.coded.pool.n:.4g}); "
                             f"{nnz:,} were asked for")
        return int(np.searchsorted(self.decoded.nnz_at, nnz, side="left")) + 1 if nnz else 0

    def steps_for_bits(self, budget: float) -> int:
        """The longest prefix whose coded bits are at most `budget` (bits grow with steps)."""
        lo, hi = 0, self.steps
        if self.bits(hi) <= budget:
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.bits(mid) <= budget else (lo, mid)
        return lo

    def truncated(self, steps: int) -> Coded:
        stream = codec.truncate(self.coded.stream, steps, self.symbols, self.decoded)
        return Coded(self.coded.pool, stream, self.coded.source)


def shortest_meeting(prefixes: Prefixes, ok) -> tuple[int, list[tuple[int, Any]]]:
    """The shortest prefix (steps) for which `ok(steps)` holds, by bisection (the quality
    grows with the prefix); returns it and the probes as (steps, result)."""
    probes: list[tuple[int, Any]] = []
    seen: dict[int, bool] = {}

    def probe(steps: int) -> bool:
        if steps not in seen:
            passed, result = ok(steps)
            seen[steps] = passed
            probes.append((steps, result))
        return seen[steps]

    hi = prefixes.steps
    if not probe(hi):
        raise UsageError("even the longest prefix (rate "
                         f"{prefixes.nnz(hi) / prefixes.coded.pool.n:.4g}) does not meet the "
                         "bound; loosen it")
    lo = 0
    for _ in range(BOUND_SEARCH_STEPS):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if probe(mid) else (mid, hi)
    return hi, probes


def encode(arrays: dict[str, np.ndarray], names: list[str], seed: int, *,
           nnz: int | None = None, bits: float | None = None,
           alpha: float | None = None) -> Coded:
    """Run the encoder until `nnz` nonzeros, or until the stream passes `bits` (then cut to
    the longest prefix within `bits`)."""
    pool, u, negative = Pool.of(arrays, names)
    if pool.n < 3:
        raise UsageError("--method surp needs at least 3 prunable weights")
    encoder = codec.Encoder(u, negative, seed=seed, alpha=alpha)
    if nnz is not None:
        encoder.run(nnz=nnz)
        return Coded(pool, encoder.stream())
    step = codec.CHUNK_STEPS * 4
    while not encoder.exhausted and encoder.nnz < pool.n:
        encoder.run(steps=encoder.steps + step)
        stream = encoder.stream()
        if stream.bits > bits:
            break
        step = max(step, encoder.steps // 4)
    coded = Coded(pool, encoder.stream())
    prefixes = Prefixes.of(coded)
    return prefixes.truncated(prefixes.steps_for_bits(bits))


# ----------------------------------------------------------------------- compress


def compress_surp(cal, config, test_data, labels: str | None, quiet: bool):
    """The SuRP flow of `pipeline.compress`: encode to the target, measure the decoded model
    (exactly what the artifact holds), report."""
    from .allocate import Allocation
    from .pipeline import CompressResult, finish_report
    from .quantize import quantize
    from .report import RatePoint
    from .target import Realized, meets

    names = [w.name for w in cal.weights]
    total = sum(w.size for w in cal.weights)
    seed = config.data.seed
    extras = {} if config.lossless_unpruned or not config.quantized else cal.extra
    quantized = {n: quantize(a, 8) for n, a in extras.items()}
    extra_values = {n: q.values(a.dtype) for (n, a), q in zip(extras.items(),
                                                               quantized.values())}
    source = None
    if cal.model.path is not None and Path(cal.model.path).is_file():
        path = Path(cal.model.path).resolve()
        source = {"path": str(path), "sha256": file_digest(path)}

    def measured(values: dict[str, np.ndarray]):
        return cal.distortion({**values, **extra_values}, config)

    points: list[RatePoint] = []
    if config.rate is not None:
        coded = encode(cal.originals, names, seed, nnz=max(1, round(config.rate * total)))
    elif config.bits_per_weight is not None:
        coded = encode(cal.originals, names, seed, bits=config.bits_per_weight * total)
    else:  # encode to a cap, bisect the prefix; a denser cap only if the bound needs it
        for cap in BOUND_RATES:
            prefixes = Prefixes.of(encode(cal.originals, names, seed,
                                          nnz=max(1, round(cap * total))))

            def ok(steps: int, prefixes: Prefixes = prefixes):
                d = measured(prefixes.values(steps))
                r = Realized(prefixes.nnz(steps) / total, {}, {}, {}, {}, {}, d)
                passed = meets(config, r, total)
                return passed, (d, prefixes.bits(steps), prefixes.nnz(steps), passed)

            try:
                steps, probes = shortest_meeting(prefixes, ok)
                break
            except UsageError:
                if cap == BOUND_RATES[-1]:
                    raise
        for _, (d, bits, nnz, passed) in sorted(probes, key=lambda p: p[0]):
            points.append(RatePoint(nnz / total, d.value(config.metric), d.top1_agreement,
                                    passed, bits / total))
        coded = prefixes.truncated(steps)
    coded.source = source
    decoded = codec.decode(coded.stream)  # measure exactly what a reader decodes
    values = coded.pool.values(decoded.uhat, decoded.negative)
    distortion = measured(values)
    keep = coded.nnz(decoded.uhat)
    chosen = Realized(decoded.nnz / total, keep, values, {**values, **extra_values}, quantized,
                      {n: 8 for n in quantized}, distortion, float(coded.stream.bits))
    allocation = Allocation({n: s.values for n, s in cal.scores.items()}, {}, config.normalize)
    report = finish_report(cal, config, chosen, None, allocation, test_data, labels, quiet)
    report.search = points
    return CompressResult(cal.model, chosen.values, quantized, report, None, values,
                          surp=coded)


# ----------------------------------------------------------------------- the artifact


def artifact_coded(artifact) -> Coded:
    """The SuRP pool and stream of a parsed `.rdonnx` file (FormatError when damaged)."""
    from .container import FormatError, Section

    where = artifact._where()
    meta = artifact.manifest.get("surp")
    if meta is None:
        raise UsageError(f"{where} holds no SuRP stream (compress it with --method surp)")
    entries = {e.name: e for e in artifact.tensors if e.encoding == "surp"}
    try:
        section = Section(*(int(meta["stream"][k]) for k in ("offset", "length", "crc32")))
        payload = artifact.section(section, "SuRP stream")
        shapes = {n: (tuple(e.shape), onnx.TensorProto.DataType.Value(e.dtype))
                  for n, e in entries.items()}
        coded = Coded.from_manifest(meta, shapes, payload)
        if {t.name for t in coded.pool.tensors} != set(entries) or \
                len(coded.pool.tensors) != len(entries):
            raise ValueError("SuRP tensors differ from the manifest's tensor list")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"{where}: malformed SuRP stream ({exc})") from None
    return coded


def decode_artifact(artifact) -> dict[str, np.ndarray]:
    """Every SuRP tensor of an artifact, decoded from the shared stream."""
    from .container import FormatError

    coded = artifact_coded(artifact)
    try:
        decoded = codec.decode(coded.stream)
    except codec.CodecError as exc:
        raise FormatError(f"{artifact._where()}: cannot decode the SuRP stream: {exc}") from None
    with np.errstate(over="ignore", invalid="ignore"):  # a crafted scale: refused below
        values = coded.pool.values(decoded.uhat, decoded.negative)
    if not all(np.isfinite(v).all() for v in values.values()):
        raise FormatError(f"{artifact._where()}: SuRP values overflow their type (damaged file)")
    entries = {e.name: e for e in artifact.tensors if e.encoding == "surp"}
    if any(int(np.count_nonzero(values[n])) > e.nnz for n, e in entries.items()):
        raise FormatError(f"{artifact._where()}: SuRP nonzero counts differ from the manifest")
    return values


def entries(coded: Coded, values: dict[str, np.ndarray]) -> list:
    """Manifest entries of the pool's tensors; the stream's bits are split by nonzeros
    (signs: 1 bit each; the rest, indices and refresh counts, in proportion)."""
    from .container import Section, TensorEntry

    nnz = {t.name: int(np.count_nonzero(values[t.name])) for t in coded.pool.tensors}
    total = max(sum(nnz.values()), 1)
    index_bits = coded.stream.bits - sum(nnz.values())
    out = []
    for t in coded.pool.tensors:
        share = nnz[t.name] / total
        out.append(TensorEntry(
            name=t.name, dtype=onnx.TensorProto.DataType.Name(t.data_type),
            shape=list(t.shape), encoding="surp", nnz=nnz[t.name],
            positions=Section(0, 0, 0), values=Section(0, 0, 0),
            bits={"positions": index_bits * share, "values": float(nnz[t.name]),
                  "side": side_bits(coded.pool, coded.stream) * t.size / coded.pool.n,
                  "iid_entropy": index_bits * share + nnz[t.name],
                  "positions_model": "surp"}))
    return out


# ----------------------------------------------------------------------- truncate


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
                      reference: Path | None = None, data=None, device: str = "auto",
                      quiet: bool = True, force: bool = False) -> Truncation:
    """Cut the SuRP stream of `path` to a shorter prefix and write it to `output`."""
    from . import __version__
    from .container import read_artifact, write_artifact

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
    from .model import check_output

    check_output(Path(output), Path(path), force)
    if Path(output).resolve() == Path(path).resolve():
        raise UsageError(f"output {output} is the input artifact; choose another -o")
    artifact = read_artifact(path)
    coded = artifact_coded(artifact)
    prefixes = Prefixes.of(coded)
    n = coded.pool.n
    settings = artifact.manifest.get("settings", {})
    metric = settings.get("metric", "nmse")
    distortion = None
    if rate is not None:
        steps = prefixes.steps_for_nnz(max(1, round(rate * n)))
    elif bits_per_weight is not None:
        steps = prefixes.steps_for_bits(bits_per_weight * n)
    else:
        steps, distortion = _by_distortion(artifact, prefixes, max_distortion, calib,
                                           _reference(artifact, reference), settings, data,
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
    kept.extend((e, b"", b"") for e in entries(cut, values))
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
                   settings: dict[str, Any], data, device: str, quiet: bool):
    """The shortest prefix whose measured distortion against `reference` is within `bound`."""
    from .calibration import calibrate_model
    from .config import CompressConfig

    config = CompressConfig(
        rate=1.0, metric=settings.get("metric", "nmse"),
        channel_axis=int(settings.get("channel_axis", 1)),
        min_params=int(settings.get("min_params", 1)),
        include=tuple(settings.get("include", ())), exclude=tuple(settings.get("exclude", ())),
        simplify=bool(settings.get("simplify", True)), device=device,
        **({"data": data} if data is not None else {}))
    cal = calibrate_model(reference, config, calib, quiet)
    for t in prefixes.coded.pool.tensors:
        if t.name not in cal.originals or tuple(cal.originals[t.name].shape) != t.shape:
            raise UsageError(f"the reference model does not match the artifact (weight "
                             f"{t.name}); pass the model it was compressed from")
    extras = {e.name: artifact.decode(e) for e in artifact.tensors
              if e.encoding != "surp" and e.name in cal.extra}

    def ok(steps: int):
        d = cal.distortion({**prefixes.values(steps), **extras}, config)
        return d.value(config.metric) <= bound, d

    steps, probes = shortest_meeting(prefixes, ok)
    return steps, dict(probes)[steps]
