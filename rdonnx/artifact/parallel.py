"""Decode an artifact's tensors in forked worker processes.

constriction's ANS decoder holds the GIL, so threads do not help. The parent forks workers
and decodes a share itself. Whole tensors are spread by estimated decoding time (longest
first, each to the process where it finishes first); then, while that evens out the loads, a
tensor's positions or values move to the least loaded process (the parent places the values
of such a split tensor once both halves are decoded). Workers write into one shared anonymous
memory map, which the parent wraps as numpy arrays without copying (they can back ONNX
Runtime OrtValues directly).

Results are byte-identical to serial decoding. A worker only runs numpy and constriction,
reports each finished job through a pipe and leaves with `os._exit`. Any tensor whose jobs did
not all succeed (a damaged section, a crash, a kill) is decoded again by the parent, in file
order, so a damaged file raises exactly the error serial decoding raises. No worker outlives
the call.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import signal
import struct
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from rdonnx.artifact.format import Artifact, TensorEntry, entry_dtype
from rdonnx.codec import entropy
from rdonnx.errors import UsageError

MIN_PARALLEL_BYTES = 16 * 2**20  # automatic: artifacts with fewer bytes of weights decode serially
MAX_AUTO_WORKERS = 8  # automatic: at most this many processes
_ALIGN = 64  # byte alignment of each array in the shared map
_REPORT = struct.Struct("<IB")  # a worker's report: job index in its plan, 0 done / 1 failed
# estimated decoding time in ns on one core: per ANS symbol (Bernoulli, Categorical; numpy's
# share included), per dense output entry written into private (huge) pages or into the
# shared map, per byte of a split tensor's half in the map, per kept entry placed
_NS_BERNOULLI, _NS_CATEGORICAL = 8.0, 27.0
_NS_OUT_PRIVATE, _NS_OUT_SHARED, _NS_SHARED_BYTE, _NS_PLACE = 0.5, 1.8, 0.45, 2.0
_SPLITTABLE = ("quantized", "codebook", "exact")  # values decode without the positions

WHOLE, KEPT, VALUES = 0, 1, 2  # what a job decodes of its tensor
_GAPS, _N_M = (entropy.POSITION_MODELS.index(m) for m in ("gaps", "n:m"))  # model bytes


@dataclass(frozen=True)
class _Job:
    tensor: int
    part: int


@dataclass(frozen=True)
class _Cost:
    """Estimated decoding time (ns) of one tensor, whole or by halves, in the parent or in a
    worker (whose outputs go to the shared map)."""

    tensor: int
    kept: float  # decoding the positions
    values: float  # decoding the values
    size: int
    nnz: int
    halves: tuple[int, int]  # bytes of the kept selector and of the values in the map
    splittable: bool

    def whole(self, worker: bool) -> float:
        return self.kept + self.values + self.size * (
            _NS_OUT_SHARED if worker else _NS_OUT_PRIVATE)

    def half(self, part: int, worker: bool) -> float:
        work = self.kept if part == KEPT else self.values
        return work + worker * self.halves[part - KEPT] * _NS_SHARED_BYTE

    def place(self) -> float:
        """The parent's work to place a split tensor."""
        return self.nnz * _NS_PLACE + self.size * _NS_OUT_PRIVATE


def worker_count(workers: int | None) -> int:
    """Processes to decode with: `workers`, or for None the usable cores (at most 8); 1 where
    fork-based decoding is unavailable."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise UsageError(f"workers must be a positive integer or None, not {workers!r}")
    if not can_fork():
        return 1
    if workers is not None:
        return workers
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_AUTO_WORKERS))


def can_fork() -> bool:
    """Fork-based decoding runs on Linux only (elsewhere fork is missing or unsafe)."""
    return hasattr(os, "fork") and sys.platform.startswith("linux")


def decode_all(artifact: Artifact, workers: int | None = None) -> dict[str, np.ndarray]:
    """Every coded tensor of `artifact` by name, decoded by `workers` processes (None:
    automatic, serial below `MIN_PARALLEL_BYTES` of decoded weights)."""
    procs = worker_count(workers)
    total = sum(e.size * entry_dtype(e).itemsize for e in artifact.tensors
                if e.encoding != "surp")
    if procs > 1 and total and (workers is not None or total >= MIN_PARALLEL_BYTES):
        plans = _plans(_costs(artifact), procs)
        if len(plans) > 1:
            try:
                decoder = _Decoder(artifact, plans)
            except (OSError, ValueError, OverflowError):  # no room for the declared sizes
                pass
            else:
                return decoder.run()
    return {e.name: artifact.decode(e) for e in artifact.tensors}


def _costs(artifact: Artifact) -> list[_Cost]:
    costs = []
    for i, entry in enumerate(artifact.tensors):
        if entry.encoding == "surp":  # decoded by the parent, from its shared stream
            continue
        at = entry.positions.offset + 1  # the positions model byte, unchecked: only a hint
        model = artifact.data[at] if 0 <= at < len(artifact.data) else 0
        if model == _GAPS:  # one symbol per kept entry
            kept = entry.nnz * _NS_CATEGORICAL
        else:  # one symbol per entry (per group of at least 4 for n:m)
            kept = entry.size * _NS_BERNOULLI / (4 if model == _N_M else 1)
        costs.append(_Cost(i, kept, entry.nnz * _NS_CATEGORICAL, entry.size, entry.nnz,
                           (_nbytes(entry, KEPT), _nbytes(entry, VALUES)),
                           entry.encoding in _SPLITTABLE))
    return costs


def _layout(entry: TensorEntry, part: int) -> tuple[np.dtype, int]:
    """(dtype, element count) of a job's output: the dense tensor, its kept values, or its
    kept selector (int64 indices or a bool mask, as `entropy.decode_kept` gives it)."""
    if part == WHOLE:
        return entry_dtype(entry), entry.size
    if part == VALUES:
        return entry_dtype(entry), entry.nnz
    if entropy.kept_as_indices(entry.size, entry.nnz):
        return np.dtype(np.int64), entry.nnz
    return np.dtype(np.bool_), entry.size


def _nbytes(entry: TensorEntry, part: int) -> int:
    dtype, count = _layout(entry, part)
    return dtype.itemsize * count


def _plans(costs: list[_Cost], procs: int) -> list[list[_Job]]:
    """Each process's jobs (process 0 is the parent). Whole tensors go longest first to the
    process where they finish first; then, while it lowers the largest load, the positions or
    the values of a whole tensor on the most loaded process move to the least loaded one (the
    parent places such a split tensor). Deterministic: ties go to the lower process/tensor."""
    loads = [0.0] * procs
    owner: dict[int, list[int]] = {}  # tensor -> [process of its positions, of its values]
    for c in sorted(costs, key=lambda c: (-c.whole(False), c.tensor)):
        p = min(range(procs), key=lambda q: (loads[q] + c.whole(q > 0), q))
        owner[c.tensor] = [p, p]
        loads[p] += c.whole(p > 0)
    while True:
        hi = max(range(procs), key=lambda q: (loads[q], -q))
        lo = min(range(procs), key=lambda q: (loads[q], q))
        best = None
        for c in costs:
            if not c.splittable or owner[c.tensor] != [hi, hi]:
                continue
            for part in (KEPT, VALUES):
                after = loads.copy()
                after[hi] += c.half(KEPT + VALUES - part, hi > 0) - c.whole(hi > 0)
                after[lo] += c.half(part, lo > 0)
                after[0] += c.place()
                span = max(after[hi], after[lo], after[0])
                if span < loads[hi] and (best is None or span < best[0]):
                    best = (span, c.tensor, part, after)
        if best is None:
            break
        _, tensor, part, loads = best
        owner[tensor][part - KEPT] = lo
    plans: list[list[_Job]] = [[] for _ in range(procs)]
    for t, (pk, pv) in sorted(owner.items()):  # split halves first: placing can start early
        if pk != pv:
            plans[pk].append(_Job(t, KEPT))
            plans[pv].append(_Job(t, VALUES))
    for c in sorted(costs, key=lambda c: (-c.whole(False), c.tensor)):
        pk, pv = owner[c.tensor]
        if pk == pv:
            plans[pk].append(_Job(c.tensor, WHOLE))
    return [plan for plan in plans if plan]


class _Decoder:
    """One parallel decode: the plans, the shared map of the workers' outputs, the results."""

    def __init__(self, artifact: Artifact, plans: list[list[_Job]]) -> None:
        self.artifact = artifact
        self.plans = plans
        self.offsets: dict[_Job, int] = {}  # where each worker job's output lies in the map
        size = 0
        for plan in plans[1:]:
            for job in plan:
                self.offsets[job] = size
                size += -(-_nbytes(artifact.tensors[job.tensor], job.part) // _ALIGN) * _ALIGN
        self.map = mmap.mmap(-1, max(size, _ALIGN), flags=mmap.MAP_SHARED)
        self.parts: dict[_Job, np.ndarray] = {}  # finished jobs' outputs
        self.results: dict[int, np.ndarray] = {}  # finished tensors (flat)

    def run(self) -> dict[str, np.ndarray]:
        with self._workers(self.plans[1:]) as pipes:
            for job in self.plans[0]:
                self._finish(job, self._run(job, None))
                if pipes:
                    self._collect(pipes, block=False)
            while pipes:
                self._collect(pipes, block=True)
        return self._results()

    def _view(self, job: _Job) -> np.ndarray:
        """A worker job's output in the map."""
        dtype, count = _layout(self.artifact.tensors[job.tensor], job.part)
        return np.frombuffer(self.map, dtype, count, self.offsets[job])

    def _run(self, job: _Job, out: np.ndarray | None) -> np.ndarray | None:
        """Decode one job (into `out` when given); None if it failed."""
        entry = self.artifact.tensors[job.tensor]
        try:
            if job.part == WHOLE:  # the map starts zero-filled, as `decode` needs
                return self.artifact.decode(entry, out=out).reshape(-1)
            if job.part == KEPT:
                blob = self.artifact.section(entry.positions, f"{entry.name} positions")
                result = self.artifact.decode_kept(entry, blob)
            else:
                blob = self.artifact.section(entry.values, f"{entry.name} values")
                result = self.artifact.decode_survivors(entry, blob, None)
        except Exception:  # noqa: BLE001 - the parent decodes the tensor again, and raises
            return None
        if out is None:
            return result
        out[:] = result
        return out

    def _finish(self, job: _Job, result: np.ndarray | None) -> None:
        """Record a finished job; place a split tensor once both halves are there."""
        if result is None:
            return
        if job.part == WHOLE:
            self.results[job.tensor] = result
            return
        self.parts[job] = result
        kept, values = _Job(job.tensor, KEPT), _Job(job.tensor, VALUES)
        if kept in self.parts and values in self.parts:
            entry = self.artifact.tensors[job.tensor]
            out = np.zeros(entry.size, dtype=entry_dtype(entry))
            out[self.parts.pop(kept)] = self.parts.pop(values)
            self.results[job.tensor] = out

    def _results(self) -> dict[str, np.ndarray]:
        """The tensors in file order; those not finished are decoded here, raising what
        serial decoding raises."""
        results = {}
        for i, entry in enumerate(self.artifact.tensors):
            flat = self.results.get(i)
            results[entry.name] = self.artifact.decode(entry) if flat is None else \
                flat.reshape(entry.shape)
        return results

    # ------------------------------------------------------------------ workers

    @contextlib.contextmanager
    def _workers(self, plans: list[list[_Job]]
                 ) -> Iterator[dict[int, tuple[int, list[_Job], bytes]]]:
        """Fork one worker per plan; yields {read fd: (pid, plan, unread report bytes)}. On
        exit every worker is reaped, killed first if it is still running."""
        pipes: dict[int, tuple[int, list[_Job], bytes]] = {}
        pids: list[int] = []
        try:
            for plan in plans:
                read, write = os.pipe()
                try:
                    with warnings.catch_warnings():  # Python 3.12+ warns on fork with threads
                        warnings.simplefilter("ignore", DeprecationWarning)
                        pid = os.fork()
                except OSError:  # no more processes: the parent decodes what is left
                    os.close(read)
                    os.close(write)
                    break
                if pid == 0:
                    self._work(plan, write)  # never returns
                os.close(write)
                pids.append(pid)
                pipes[read] = (pid, plan, b"")
            yield pipes
        finally:
            for fd in pipes:
                os.close(fd)
            for pid in pids:
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG) == (0, 0):
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)

    def _work(self, plan: list[_Job], write: int) -> None:
        """A worker's life: run its jobs into the map, report each, exit without running any
        cleanup of the parent's state."""
        code = 1
        try:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signal.SIGINT, signal.SIG_DFL)
            for k, job in enumerate(plan):
                ok = self._run(job, self._view(job)) is not None
                os.write(write, _REPORT.pack(k, 0 if ok else 1))
            code = 0
        finally:
            os._exit(code)

    def _collect(self, pipes: dict[int, tuple[int, list[_Job], bytes]], block: bool) -> None:
        """Read the workers' reports (waiting for one if `block`); a pipe at EOF is closed and
        its worker reaped."""
        poll = select.poll()
        for fd in pipes:
            poll.register(fd, select.POLLIN)
        for fd, _ in poll.poll(None if block else 0):
            pid, plan, pending = pipes[fd]
            chunk = os.read(fd, 4096)
            if not chunk:
                os.close(fd)
                del pipes[fd]
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                continue
            pending += chunk
            whole = len(pending) - len(pending) % _REPORT.size
            for k, status in _REPORT.iter_unpack(pending[:whole]):
                self._finish(plan[k], self._view(plan[k]) if status == 0 else None)
            pipes[fd] = (pid, plan, pending[whole:])
