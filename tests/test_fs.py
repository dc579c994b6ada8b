"""rdonnx.fs: atomic writes with the mode of a normal file, nothing left behind on failure."""

from __future__ import annotations

import os
import stat

import pytest

from rdonnx.fs import atomic_output, write_bytes, write_text


def _normal_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def test_write_gives_a_normal_file_mode_and_content(tmp_path):
    path = tmp_path / "out.json"
    assert write_text(path, "{}\n") == 3
    assert path.read_text() == "{}\n"
    assert stat.S_IMODE(path.stat().st_mode) == _normal_mode()  # not mkstemp's 0o600
    assert write_bytes(path, b"replaced") == 8
    assert path.read_bytes() == b"replaced"
    assert os.listdir(tmp_path) == ["out.json"]


def test_the_mode_follows_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_bytes(tmp_path / "private", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_a_failed_rename_leaves_no_temporary(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_bytes(tmp_path / "out.bin", b"data")
    assert os.listdir(tmp_path) == []
