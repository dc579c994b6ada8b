"""Clean aborts (issue 16): SIGTERM ends a run like Ctrl-C, with one line and no traceback,
and leaves no replay folder or temporary file behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rdonnx.signals import (
    EXIT_TERMINATED,
    Terminated,
    clean_aborts,
    register,
    remove_registered,
    removing,
    was_terminated,
)

MODELS = Path(__file__).resolve().parents[1] / "models"
MLP = MODELS / "digits_mlp.onnx"
CALIB = MODELS / "digits_calib.npz"


def start(tmp_path: Path, *args) -> tuple[subprocess.Popen, Path]:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "rdonnx.cli", *map(str, args)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, tmp


def wait_for(condition, proc: subprocess.Popen, timeout: float = 60) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_sigterm_removes_the_replay_folder(tmp_path):
    """A compress whose replay spills (--replay-mb 0) is terminated while the spill folder
    exists: exit 143, one line, no traceback, and no rdonnx-replay-* folder is left."""
    out = tmp_path / "a.rdonnx"
    proc, tmp = start(tmp_path, "compress", MLP, "--rate", "0.2", "--calib", CALIB,
                      "--replay-mb", "0", "-o", out, "--report", tmp_path / "r.json")
    try:
        spilled = wait_for(lambda: any(p.name.startswith("rdonnx-replay-") and any(p.iterdir())
                                       for p in tmp.iterdir()), proc)
        assert spilled, "the run never spilled to a replay folder"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_TERMINATED, err
    assert err.strip().splitlines() == ["rdonnx: terminated"], err
    left = {p.name for p in tmp.iterdir()} - {".ses"}  # .ses: onnxsim's own session note
    assert left == set(), f"temporary files were left in TMPDIR: {left}"
    assert not out.exists() and not (tmp_path / "r.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_removing_and_registry(tmp_path):
    path = tmp_path / "x.tmp"
    with pytest.raises(RuntimeError):
        with removing(path):
            path.write_text("partial")
            raise RuntimeError
    assert not path.exists()
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "f").write_text("x")
    register(folder)
    remove_registered()
    assert not folder.exists()


def test_clean_aborts_turns_sigterm_into_terminated_and_restores(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    leftover = tmp_path / "leftover"
    with pytest.raises(Terminated) as caught:
        with clean_aborts():
            leftover.write_text("x")
            register(leftover)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert was_terminated(caught.value) and isinstance(caught.value, KeyboardInterrupt)
    assert not leftover.exists()
    assert signal.getsignal(signal.SIGTERM) == before


def test_clean_aborts_keeps_what_was_registered_before_it(tmp_path):
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    theirs.mkdir()
    register(theirs)
    with clean_aborts():
        mine.mkdir()
        register(mine)
    assert theirs.exists() and not mine.exists()
    remove_registered()
    assert not theirs.exists()


def test_the_atomic_write_uses_the_same_registry(tmp_path):
    """rdonnx.fs's one atomic write registers its temporary file here: SIGTERM in the middle
    of a write leaves neither the output nor the temporary file."""
    from rdonnx import signals
    from rdonnx.fs import atomic_output

    out = tmp_path / "report.json"
    with pytest.raises(Terminated), clean_aborts(), atomic_output(out) as tmp:
        tmp.write_text("half")
        assert str(tmp) in signals.registered()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert list(tmp_path.iterdir()) == []
    assert str(tmp) not in signals.registered()
