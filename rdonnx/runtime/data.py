"""Calibration and evaluation inputs: `.npz` files, folders of `.npz` feeds, or synthetic data.

Batches are re-iterable and read lazily, so a pass over the data holds one batch at a time.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx

from rdonnx.bounded import npz_problem
from rdonnx.choices import DEFAULT_SYNTHETIC_SAMPLES, DataOptions
from rdonnx.errors import UsageError
from rdonnx.graph.model import Model

Feed = dict[str, np.ndarray]
Dim = int | str | None  # a fixed size, a symbolic name, or unknown
AUTO_HOLDOUT = 0.25  # --holdout default: this share is held out ...
AUTO_HOLDOUT_MIN = 16  # ... when the data holds at least this many samples (files)
# ... or this many when reconstructing: updates fitted to a few samples (rank-deficient
# Hessians) raised the zoo LM's test nmse at rate 0.3 by 9.4% with nothing held out to check
# them (8 windows); with 2 of them held out, the check dropped them
AUTO_HOLDOUT_MIN_RECONSTRUCT = 4


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, element type and shape (symbolic dimensions as str / None)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]

    def describe(self) -> str:
        dims = "x".join(str(d) if d is not None else "?" for d in self.shape) or "scalar"
        return f"{self.name}[{self.dtype}, {dims}]"


def input_specs(model: Model) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers)."""
    initializers = {t.name for t in model.proto.graph.initializer}
    specs = []
    for value in model.proto.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise UsageError(f"input {value.name!r} is not a tensor; rdonnx feeds tensor inputs "
                             "only")
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in tensor.shape.dim)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def describe_inputs(specs: Sequence[InputSpec]) -> str:
    return ", ".join(s.describe() for s in specs)


class Batches(Protocol):
    """A re-iterable source of feeds; each iteration yields the same batches in order."""

    def __iter__(self) -> Iterator[Feed]: ...

    def __len__(self) -> int: ...


class _NpzMember:
    """One array of an `.npz` file, read row-range by row-range instead of whole."""

    def __init__(self, path: Path, member: str):
        self.path, self.member = path, member
        with zipfile.ZipFile(path) as zf, zf.open(member) as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran and len(shape) > 1:
            raise UsageError(f"{path}: array {member!r} is Fortran-ordered; save it with "
                             "np.ascontiguousarray")
        if dtype.hasobject:
            raise UsageError(f"{path}: array {member!r} holds Python objects; save numeric "
                             "arrays")
        self.shape, self.dtype = tuple(shape), dtype
        with zipfile.ZipFile(path) as zf:
            self.compressed = zf.getinfo(member).compress_type != zipfile.ZIP_STORED
            problem = npz_problem(shape, dtype.itemsize, zf.getinfo(member).file_size - self.offset)
        if problem is not None:  # a header declaring more rows than the member holds
            raise UsageError(f"{path}: array {member!r}: {problem}")
        self._whole: np.ndarray | None = None

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0] if self.shape else 1)
        if self.compressed:  # seeking a deflated member re-reads it from the start: read once
            if self._whole is None:
                self._whole = self._read_rows(0, self.shape[0] if self.shape else 1)
            return self._whole[start:stop].copy()
        return self._read_rows(start, stop)

    def _read_rows(self, start: int, stop: int) -> np.ndarray:
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
            f.seek(self.offset + start * row)
            data = f.read((stop - start) * row)
        if len(data) != (stop - start) * row:
            raise UsageError(f"{self.path}: array {self.member!r} ends before its declared shape "
                             f"{self.shape} (truncated file?)")
        shape = (stop - start, *self.shape[1:]) if self.shape else ()
        return np.frombuffer(data, self.dtype).reshape(shape).copy()

    def read(self) -> np.ndarray:
        return self._read_rows(0, 1) if not self.shape else self[:]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The rows at sorted indices `rows`, read run by run of consecutive indices."""
        if self.compressed:
            self[0:0]  # noqa: B018 - reads and keeps the whole member once
            return self._whole[rows].copy()
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        runs = np.split(rows, breaks)
        return np.concatenate([self._read_rows(int(r[0]), int(r[-1]) + 1) for r in runs])


def open_npz(path: Path) -> dict[str, _NpzMember]:
    """The arrays of an `.npz` file, keyed by name, without reading their data."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.namelist() if m.endswith(".npy")]
        return {m[:-4]: _NpzMember(path, m) for m in members}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise UsageError(f"{path} is not a readable .npz file ({exc}); save it with np.savez") \
            from None


@dataclass
class SampleBatches:
    """Batches cut along axis 0 (the sample axis) of same-length arrays (of the rows at
    sorted indices `rows` only, when given: one side of a holdout split)."""

    arrays: Mapping[str, np.ndarray | _NpzMember]
    batch_size: int
    samples: int
    rows: np.ndarray | None = None
    fixed: bool = False  # the model takes batches of exactly batch_size samples

    def __iter__(self) -> Iterator[Feed]:
        for start in range(0, self.samples, self.batch_size):
            stop = min(start + self.batch_size, self.samples)
            if self.rows is None:
                yield {k: a[start:stop] for k, a in self.arrays.items()}
                continue
            rows = self.rows[start:stop]
            if rows[-1] - rows[0] == len(rows) - 1:  # consecutive: a plain slice
                yield {k: a[int(rows[0]):int(rows[-1]) + 1] for k, a in self.arrays.items()}
            else:
                yield {k: a[rows] if isinstance(a, np.ndarray) else a.take(rows)
                       for k, a in self.arrays.items()}

    def __len__(self) -> int:
        return math.ceil(self.samples / self.batch_size)


@dataclass
class FeedBatches:
    """One complete feed per `.npz` file of a folder (inputs may differ in shape per file)."""

    files: list[Path]

    @property
    def samples(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Feed]:
        for path in self.files:
            yield {k: m.read() for k, m in open_npz(path).items()}

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class SyntheticBatches:
    """Random feeds from the input specs: standard normal floats, uniform values in a range."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]
    ranges: dict[str, tuple[float, float]]
    count: int
    seed: int
    indices: tuple[int, ...] | None = None  # the batches kept (one side of a holdout split)

    @property
    def samples(self) -> int:
        per_batch = max((s[0] for s in self.shapes.values() if s), default=1)
        return len(self) * per_batch

    def __iter__(self) -> Iterator[Feed]:
        for index in self.indices if self.indices is not None else range(self.count):
            rng = np.random.default_rng([self.seed, index])
            feed = {}
            for name, shape in self.shapes.items():
                dtype = self.dtypes[name]
                if name in self.ranges:
                    lo, hi = self.ranges[name]
                    if dtype.kind in "iub":
                        value = rng.integers(int(lo), int(hi), size=shape, endpoint=True)
                    else:
                        value = rng.uniform(lo, hi, size=shape)
                else:
                    value = rng.standard_normal(shape)
                feed[name] = value.astype(dtype)
            yield feed

    def __len__(self) -> int:
        return self.count if self.indices is None else len(self.indices)


def make_batches(source: str | Path | Mapping[str, np.ndarray] | None, specs: Sequence[InputSpec],
                 options: DataOptions, extra_keys: Sequence[str] = ()) -> Batches:
    """Batches from an `.npz` path, a folder of `.npz` feeds, arrays in memory, or synthetic.

    Keys listed in `extra_keys` (labels) may appear beside the model's inputs. Every batch is
    validated against `specs`: the first problem raises a `UsageError` naming what the model
    expects.
    """
    if options.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.samples is not None and options.samples < 1:
        raise UsageError(f"--calib-samples must be at least 1, got {options.samples}")
    unknown = set(options.shapes) | set(options.ranges)
    unknown -= {s.name for s in specs}
    if unknown:
        raise UsageError(f"--input-shape/--input-range name unknown input(s) {sorted(unknown)}; "
                         f"the model expects: {describe_inputs(specs)}")
    if source is None:
        batches: Batches = _synthetic(specs, options)
    elif isinstance(source, Mapping):
        batches = _sample_batches(dict(source), specs, options, "the calibration arrays",
                                  extra_keys)
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.npz"))
            if not files:
                raise UsageError(f"calibration folder {path} holds no .npz files")
            batches = FeedBatches(files[: options.samples])
        elif path.is_file():
            batches = _sample_batches(open_npz(path), specs, options, str(path), extra_keys)
        else:
            raise UsageError(f"calibration data not found: {path}")
    where = "synthetic data" if source is None else "the calibration arrays" \
        if isinstance(source, Mapping) else str(source)
    checked = CheckedBatches(batches, list(specs), tuple(extra_keys), where)
    next(iter(checked))  # fail now, not halfway through a long run
    return checked


@dataclass
class CheckedBatches:
    """Batches validated (and cast within a dtype kind) against the model's inputs as read."""

    source: Batches
    specs: list[InputSpec]
    extra_keys: tuple[str, ...]
    where: str = "data"

    def __iter__(self) -> Iterator[Feed]:
        for index, feed in enumerate(self.source):
            check_feed(feed, self.specs, f"{self.where}, batch {index + 1}", self.extra_keys)
            yield feed

    def __len__(self) -> int:
        return len(self.source)

    @property
    def samples(self) -> int:
        """Samples (files, for a folder of feeds)."""
        return self.source.samples

    @property
    def synthetic(self) -> bool:
        return isinstance(self.source, SyntheticBatches)


def split_holdout(batches: CheckedBatches, fraction: float | None, seed: int,
                  least: int = AUTO_HOLDOUT_MIN
                  ) -> tuple[CheckedBatches, CheckedBatches | None]:
    """(fit, held-out): a seeded random `fraction` of the samples (files of a folder; whole
    batches when the model's batch axis is fixed) held out. None: `AUTO_HOLDOUT` when there
    are at least `least` samples, else nothing; 0: nothing held out."""
    source = batches.source
    fixed = isinstance(source, SampleBatches) and source.fixed
    units = len(source) if fixed or isinstance(source, SyntheticBatches) else source.samples
    auto = fraction is None
    if auto:  # synthetic inputs say nothing about real data: nothing to hold out for
        fraction = AUTO_HOLDOUT if batches.samples >= least and \
            not batches.synthetic else 0.0
    if fraction <= 0:
        return batches, None
    held = int(round(units * fraction))
    if auto and (held < 1 or held >= units):  # whole fixed-size batches: too few to split
        return batches, None
    if held < 1 or held >= units:
        raise UsageError(f"--holdout {fraction:g} of {batches.samples} sample(s) leaves one part "
                         "empty; give more data, --holdout 0 or --verify DATA")
    order = np.random.default_rng([seed, 13]).permutation(units)
    parts = (np.sort(order[held:]), np.sort(order[:held]))

    def part(kept: np.ndarray) -> CheckedBatches:
        if isinstance(source, SampleBatches):
            base = source.rows if source.rows is not None else np.arange(source.samples)
            size = source.batch_size
            rows = base[(kept[:, None] * size + np.arange(size)).ravel()] if fixed else \
                base[kept]
            new: Batches = SampleBatches(source.arrays, size, len(rows), rows, fixed)
        elif isinstance(source, FeedBatches):
            new = FeedBatches([source.files[i] for i in kept])
        else:
            indices = source.indices or tuple(range(source.count))
            new = SyntheticBatches(source.shapes, source.dtypes, source.ranges, source.count,
                                   source.seed, tuple(indices[i] for i in kept))
        return CheckedBatches(new, batches.specs, batches.extra_keys, batches.where)

    return part(parts[0]), part(parts[1])


def _sample_batches(arrays: Mapping[str, np.ndarray | _NpzMember], specs: Sequence[InputSpec],
                    options: DataOptions, where: str, extra_keys: Sequence[str]) -> SampleBatches:
    _check_names(set(arrays), specs, where, extra_keys)
    lengths = set()
    for spec in specs:
        array = arrays[spec.name]
        if len(array.shape) == 0 or len(spec.shape) == 0:
            raise UsageError(f"{where}: input {spec.name!r} has no sample axis; give a folder of "
                             ".npz files, one complete feed each")
        lengths.add(array.shape[0])
    for key in extra_keys:
        if key in arrays:
            lengths.add(arrays[key].shape[0])
    if len(lengths) != 1:
        raise UsageError(f"{where}: arrays differ in length along axis 0 (samples): "
                         f"{ {k: a.shape[0] for k, a in arrays.items()} }")
    samples = lengths.pop()
    if samples == 0:
        raise UsageError(f"{where} holds no samples")
    fixed = {s.shape[0] for s in specs if isinstance(s.shape[0], int) and s.shape[0] > 0}
    batch = next(iter(fixed)) if len(fixed) == 1 else options.batch_size
    if options.samples is not None:
        samples = min(samples, options.samples)
    if len(fixed) == 1:  # a fixed batch axis takes whole batches only
        if samples < batch:
            raise UsageError(f"{where}: the model takes batches of exactly {batch} samples but "
                             f"only {samples} are given")
        samples -= samples % batch
    return SampleBatches(arrays, batch, samples, fixed=len(fixed) == 1)


def _synthetic(specs: Sequence[InputSpec], options: DataOptions) -> SyntheticBatches:
    shapes = {}
    for spec in specs:
        if spec.name in options.shapes:
            shape = tuple(options.shapes[spec.name])
            if len(shape) != len(spec.shape):
                raise UsageError(f"--input-shape {spec.name}: rank {len(shape)} but the model "
                                 f"expects {spec.describe()}")
        else:
            shape = tuple(d if isinstance(d, int) and d > 0 else
                          (options.batch_size if i == 0 else None)
                          for i, d in enumerate(spec.shape))
            if None in shape:
                raise UsageError(f"input {spec.describe()} has dynamic dimensions; give "
                                 f"--input-shape {spec.name}=AxBx... or --calib DATA")
        if spec.dtype.kind not in "fc" and spec.name not in options.ranges:
            raise UsageError(f"input {spec.describe()} is not float, so random values would be "
                             f"meaningless; give --calib DATA or --input-range {spec.name}=LO:HI")
        shapes[spec.name] = shape
    size = sum(math.prod(shapes[s.name]) * s.dtype.itemsize for s in specs)
    if size > _memory_bytes() // 2:
        given = ", ".join(f"{s.name}=" + "x".join(map(str, shapes[s.name])) for s in specs)
        raise UsageError(f"synthetic inputs {given} would take {size / 2**30:.1f} GiB per "
                         "batch, more than half of this machine's memory; give a smaller "
                         "--input-shape or --batch-size")
    per_batch = max((s[0] for s in shapes.values() if s), default=1)
    samples = options.samples or DEFAULT_SYNTHETIC_SAMPLES
    return SyntheticBatches(shapes, {s.name: s.dtype for s in specs}, dict(options.ranges),
                            math.ceil(samples / per_batch), options.seed)


def _memory_bytes() -> int:
    """Physical memory of this machine (1 TiB when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def _check_names(keys: set[str], specs: Sequence[InputSpec], where: str,
                 extra_keys: Sequence[str]) -> None:
    names = {s.name for s in specs}
    missing, unknown = names - keys, keys - names - set(extra_keys)
    if missing or unknown:
        problem = ", ".join(filter(None, [
            f"missing {sorted(missing)}" if missing else "",
            f"unknown {sorted(unknown)}" if unknown else ""]))
        raise UsageError(f"{where}: {problem}; the model expects: {describe_inputs(specs)}")


def check_feed(feed: Feed, specs: Sequence[InputSpec], where: str,
               extra_keys: Sequence[str] = ()) -> None:
    """Check names, ranks, fixed dimensions and dtypes of one feed; cast within a dtype kind."""
    _check_names(set(feed), specs, where, extra_keys)
    for spec in specs:
        value = feed[spec.name]
        expected = f"the model expects: {describe_inputs(specs)}"
        if value.ndim != len(spec.shape):
            raise UsageError(f"{where}: input {spec.name!r} has rank {value.ndim} (shape "
                             f"{value.shape}); {expected}")
        for got, want in zip(value.shape, spec.shape):
            if isinstance(want, int) and want > 0 and got != want:
                raise UsageError(f"{where}: input {spec.name!r} has shape {value.shape}; "
                                 f"{expected}")
        if value.dtype != spec.dtype:
            same_kind = (value.dtype.kind in "iu" and spec.dtype.kind in "iu") or \
                        (value.dtype.kind == spec.dtype.kind == "f")
            if not same_kind:
                raise UsageError(f"{where}: input {spec.name!r} is {value.dtype}; {expected}")
            feed[spec.name] = value.astype(spec.dtype)
    for key, value in feed.items():
        if np.asarray(value).dtype.kind in "fc" and not np.isfinite(value).all():
            raise UsageError(f"{where}: {'input' if key in {s.name for s in specs} else 'array'}"
                             f" {key!r} holds NaN or inf values; rdonnx measures finite data "
                             "only (clean or drop those samples)")


def split_labels(feed: Feed, key: str | None) -> tuple[Feed, np.ndarray | None]:
    """Separate the label array (if any) from the model inputs of one feed."""
    if key is None:
        return feed, None
    inputs = dict(feed)
    return inputs, inputs.pop(key, None)
