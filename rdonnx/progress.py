"""Progress on stderr: a bar with time left at a terminal, one plain line every ~10 s in a log
(CI), nothing with `quiet`; and the wall time of each stage of a run, for the report."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

LOG_EVERY_S = 10.0  # seconds between two progress lines when stderr is not a terminal


def _clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else \
        f"{rest // 60}:{rest % 60:02d}"


class LogProgress:
    """A progress counter that prints `rdonnx: STAGE done/total (P%), elapsed M:SS, about
    M:SS left` at most every `every` seconds (and once at the end), for logs without a
    terminal. Thread-safe: probe workers update one counter. While a `heartbeat` runs, it
    repeats the line of the open counter when updates are slower than `every`."""

    def __init__(self, total: int, description: str, stream: TextIO,
                 every: float | None = None, clock=time.monotonic):
        self.total, self.description, self.stream = max(int(total), 0), description, stream
        self.every, self.clock = every if every is not None else LOG_EVERY_S, clock
        self.n = 0
        self.start = self.last = clock()
        self._lock = threading.Lock()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.n += n
            now = self.clock()
            if now - self.last >= self.every:
                self._line(now)

    def _line(self, now: float) -> None:
        self.last = now
        elapsed = now - self.start
        share = self.n / self.total if self.total else 1.0
        left = f", about {_clock(elapsed * (1 - share) / share)} left" if 0 < share < 1 else ""
        _LOG.say(f"rdonnx: {self.description} {self.n}/{self.total} ({share:.0%}), elapsed "
                 f"{_clock(elapsed)}{left}", self.stream)

    def beat(self) -> None:
        """Print the line now if none was printed for `every` seconds (the heartbeat)."""
        with self._lock:
            now = self.clock()
            if now - self.last >= self.every:
                self._line(now)

    def close(self) -> None:
        with self._lock:
            if self in _LOG.bars:
                _LOG.bars.remove(self)
            if self.clock() - self.start >= self.every:  # a long stage says that it ended
                self._line(self.clock())

    def __enter__(self) -> LogProgress:
        _LOG.bars.append(self)  # the heartbeat repeats the line of the innermost open one
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Log:
    """The process's progress log: the open counters, the current stage and the time of the
    last line (so a heartbeat speaks only when nothing else did)."""

    def __init__(self) -> None:
        self.bars: list[LogProgress] = []
        self.stage: tuple[str, float] | None = None  # name, start
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def say(self, line: str, stream: TextIO) -> None:
        with self.lock:
            self.last = time.monotonic()
            print(line, file=stream, flush=True)


_LOG = _Log()


@contextmanager
def heartbeat(every: float | None = None, stream: TextIO | None = None) -> Iterator[None]:
    """While the block runs, a line at least every `every` seconds: the open counter's, else
    the current stage and its elapsed time (stages without a counter: the search, saving).
    For logs without a terminal; the CLI starts it unless --quiet or stderr is a terminal."""
    stop = threading.Event()
    out = stream or sys.stderr
    every = every if every is not None else LOG_EVERY_S

    def run() -> None:
        while not stop.wait(min(1.0, every / 4)):
            bars = list(_LOG.bars)
            if bars:
                bars[-1].beat()
            elif _LOG.stage is not None:
                name, start = _LOG.stage
                now = time.monotonic()
                if now - max(_LOG.last, start) >= every:  # the stage ran `every` in silence
                    _LOG.say(f"rdonnx: {name}, elapsed {_clock(now - start)}", out)

    thread = threading.Thread(target=run, name="rdonnx-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class _Locked:
    """A tqdm bar whose updates may come from several threads."""

    def __init__(self, bar: object):
        self.bar, self._lock = bar, threading.Lock()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.bar.update(n)

    def __enter__(self) -> _Locked:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def progress_bar(total: int, description: str, quiet: bool = False) -> _Locked | LogProgress:
    """A bar at a terminal, timed lines in a log (`LOG_EVERY_S`), silent with `quiet`."""
    if not quiet and not sys.stderr.isatty():
        return LogProgress(total, description, sys.stderr)
    from tqdm import tqdm  # not at import: `rdonnx --help` stays light

    return _Locked(tqdm(total=total, desc=description, unit="run", leave=False,
                        file=sys.stderr, disable=quiet, dynamic_ncols=True))


@dataclass
class Stages:
    """Wall-clock seconds of each stage of a run, in the order they ran (a stage entered
    twice adds up)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        outer, _LOG.stage = _LOG.stage, (name, start)
        try:
            yield
        finally:
            _LOG.stage = outer
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - start
