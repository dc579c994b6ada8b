"""rdonnx.progress: a bar at a terminal, timed lines in a log, stage timings."""

from __future__ import annotations

import io
import json
import re
import sys
import time
from pathlib import Path

from rdonnx import progress
from rdonnx.cli import main
from rdonnx.progress import LogProgress, Stages, heartbeat, progress_bar

MODELS = Path(__file__).resolve().parents[1] / "models"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_log_progress_prints_a_line_every_interval_with_time_left():
    stream, clock = io.StringIO(), Clock()
    with LogProgress(100, "R-D curves", stream, every=10.0, clock=clock) as bar:
        for _ in range(100):
            clock.now += 0.5  # 50 s in all: a line at 10, 20, 30, 40 and 50 s
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 6  # five timed lines and the closing one
    assert lines[0] == "rdonnx: R-D curves 20/100 (20%), elapsed 0:10, about 0:40 left"
    assert all(re.match(r"rdonnx: R-D curves \d+/100 \(\d+%\), elapsed \d:\d\d", line)
               for line in lines)
    assert lines[-1].startswith("rdonnx: R-D curves 100/100 (100%), elapsed 0:50")


def test_a_short_stage_prints_nothing():
    stream, clock = io.StringIO(), Clock()
    with LogProgress(3, "reference", stream, clock=clock) as bar:
        clock.now += 2
        bar.update(3)
    assert stream.getvalue() == ""


def test_progress_bar_logs_lines_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # no isatty(): a CI log
    assert isinstance(progress_bar(5, "x"), LogProgress)
    assert not isinstance(progress_bar(5, "x", quiet=True), LogProgress)


def test_stages_add_up_the_seconds_of_each_stage():
    stages = Stages()
    for _ in range(2):
        with stages.stage("curves"):
            pass
    with stages.stage("report"):
        pass
    assert list(stages.seconds) == ["curves", "report"]
    assert all(v >= 0 for v in stages.seconds.values())


def test_heartbeat_speaks_during_a_stage_without_a_counter():
    stream = io.StringIO()
    stages = Stages()
    with heartbeat(every=0.05, stream=stream), stages.stage("allocate and measure"):
        time.sleep(0.4)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 2
    assert all(re.fullmatch(r"rdonnx: allocate and measure, elapsed 0:00", x) for x in lines)


def test_a_ci_log_gets_progress_lines_and_the_report_its_stage_times(capsys, tmp_path,
                                                                     monkeypatch):
    """`rdonnx compress ... 2>log`: captured stderr is no terminal; the interval is shortened
    so that a run of a few seconds shows the lines a long run prints every 10 s."""
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.01)
    report = tmp_path / "report.json"
    code = main(["compress", str(MODELS / "digits_mlp.onnx"), "--calib",
                 str(MODELS / "digits_calib.npz"), "--rate", "0.3", "--format", "dense",
                 "-o", str(tmp_path / "m.onnx"), "--report", str(report)])
    err = capsys.readouterr().err
    assert code == 0
    assert re.search(r"^rdonnx: R-D curves \d+/\d+ \(\d+%\), elapsed \d:\d\d", err, re.M)
    assert "\r" not in err  # no bar redrawn in place
    timings = json.loads(report.read_text())["timings"]
    assert {"reference", "curves", "allocate and measure", "report", "save"} <= set(timings)
