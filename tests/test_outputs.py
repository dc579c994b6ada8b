"""Outputs (issue 16): never replace what is not a regular file, refuse `-o -`, fail on an
unwritable output or report before any work, leave no temporary file on a full disk, write
files with the mode of a normal file, and print nothing with --quiet on success."""

from __future__ import annotations

import os
import resource
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from rdonnx.cli import main
from rdonnx.outputs import check_target, kind_of, probe_writable, user_error

MODELS = Path(__file__).resolve().parents[1] / "models"
MLP = MODELS / "digits_mlp.onnx"
CALIB = MODELS / "digits_calib.npz"
FAST = ["--rate", "0.2", "--calib", str(CALIB), "--method", "uniform",
        "--no-layer-distortion", "--calib-samples", "32"]


def rdonnx(*args, cwd: Path | None = None, preexec=None, timeout: float = 120
           ) -> subprocess.CompletedProcess:
    """The CLI in a subprocess (for runs that do the work, or need a umask or limits)."""
    return subprocess.run([sys.executable, "-m", "rdonnx.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec)


@pytest.fixture
def cli(capsys, monkeypatch):
    """The CLI in-process (`rdonnx.cli.main`), for refusals that happen before any work."""
    def run(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return run


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rdonnx: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def specials(tmp_path) -> dict[str, Path]:
    """A char device like /dev/full (1, 7), a FIFO, a socket and a folder, all in tmp_path."""
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    device = tmp_path / "fulldev"
    os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 7))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    folder = tmp_path / "folder"
    folder.mkdir()
    yield {"a character device": device, "a FIFO": fifo, "a socket": sock_path,
           "a folder": folder}
    sock.close()


def _unchanged(path: Path, kind: str) -> bool:
    mode = os.lstat(path).st_mode
    return {"a character device": stat.S_ISCHR, "a FIFO": stat.S_ISFIFO,
            "a socket": stat.S_ISSOCK, "a folder": stat.S_ISDIR}[kind](mode)


@pytest.mark.parametrize("force", [True, False])
def test_compress_never_replaces_a_special_file(cli, specials, tmp_path, force):
    for kind, path in specials.items():
        proc = cli("compress", MLP, *FAST, "-o", path, *(["--force"] if force else []))
        assert_one_line_error(proc, str(path), kind)
        assert _unchanged(path, kind)
    assert not list(tmp_path.glob(".*")), "a temporary file was left behind"


def test_a_link_to_a_device_is_refused_too(cli, specials, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(specials["a character device"])
    assert_one_line_error(cli("compress", MLP, *FAST, "-o", link, "--force"),
                          "a character device")
    assert link.is_symlink()


def test_report_plot_and_other_commands_refuse_special_files(cli, specials, tmp_path):
    fifo, device = specials["a FIFO"], specials["a character device"]
    out = tmp_path / "out.rdonnx"
    assert_one_line_error(cli("compress", MLP, *FAST, "-o", out, "--report", fifo,
                                 "--force"), "FIFO")
    assert_one_line_error(cli("compress", MLP, *FAST, "-o", out, "--plot", device,
                                 "--force"), "character device")
    assert not out.exists()
    assert_one_line_error(cli("calibrate", MLP, "--calib", CALIB, "-o", fifo, "--force"),
                          "FIFO")
    artifact = tmp_path / "in.rdonnx"
    artifact.write_bytes(b"RDONNX\r\n")  # never read: the output is refused first
    assert_one_line_error(cli("decompress", artifact, "-o", device, "--force"),
                          "character device")
    assert_one_line_error(cli("truncate", artifact, "--rate", "0.1", "-o", fifo,
                                 "--force"), "FIFO")
    assert _unchanged(fifo, "a FIFO") and _unchanged(device, "a character device")


@pytest.mark.parametrize("option", ["-o", "--report"])
def test_dash_is_refused_not_written_as_a_file(cli, tmp_path, option):
    extra = ["-o", tmp_path / "a.rdonnx"] if option == "--report" else []
    proc = cli("compress", MLP, *FAST, *extra, option, "-", cwd=tmp_path)
    assert_one_line_error(proc, "'-'", "stdout")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")
def test_unwritable_output_and_report_fail_before_any_work(cli, tmp_path):
    proc = cli("compress", MLP, *FAST, "-o", "/proc/x.onnx")
    assert_one_line_error(proc, "/proc", "x.onnx")
    out = tmp_path / "a.rdonnx"
    proc = cli("compress", MLP, *FAST, "-o", out, "--report", "/proc/r.json")
    assert_one_line_error(proc, "/proc", "r.json")
    assert not out.exists(), "the artifact was written before the report path was checked"
    assert_one_line_error(cli("calibrate", MLP, "--calib", CALIB, "-o", "/proc/c.json"),
                          "/proc")


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory):
    """One real compress with --quiet, a report, a plot and umask 027."""
    folder = tmp_path_factory.mktemp("quiet")
    proc = rdonnx("compress", MLP, *FAST, "-o", folder / "a.rdonnx", "--report",
                  folder / "r.json", "--plot", folder / "p.png", "--quiet",
                  preexec=lambda: os.umask(0o027))
    return proc, folder


def test_quiet_prints_nothing_on_success(quiet_run):
    proc, _ = quiet_run
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""


def test_outputs_get_the_mode_of_a_new_file(quiet_run):
    _, folder = quiet_run
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {"a.rdonnx": 0o640, "r.json": 0o640, "p.png": 0o640}


def _small_disk(limit: int):
    """A file-size limit stands in for a full disk (EFBIG where a full disk gives ENOSPC)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error, not the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("command", ["calibrate", "compress"])
def test_full_disk_leaves_no_temporary_file(tmp_path, command):
    """calibrate writes one JSON file (the report writer); compress an artifact. Either
    write fails with one line, exit 2, and nothing is left: no `.tmp`, no partial file."""
    options = (["--calib", CALIB, "--calib-samples", "16", "--grid", "1,0.5,0.1",
                "-o", tmp_path / "c.json"] if command == "calibrate"
               else [*FAST, "-o", tmp_path / "a.rdonnx", "--report", tmp_path / "r.json"])
    proc = rdonnx(command, MLP, *options, "--quiet", preexec=_small_disk(300))
    assert_one_line_error(proc, "File too large")
    assert os.listdir(tmp_path) == []


def test_check_target_and_probe(tmp_path, specials):
    for kind, path in specials.items():
        assert kind_of(path).startswith(kind)
    regular = tmp_path / "f"
    regular.write_text("x")
    assert kind_of(regular) is None and kind_of(tmp_path / "missing") is None
    check_target(regular)
    check_target(tmp_path / "missing")
    before = sorted(os.listdir(tmp_path))
    probe_writable(tmp_path / "new.onnx")
    assert sorted(os.listdir(tmp_path)) == before, "the probe left a file behind"


def test_user_error_names_only_environment_failures():
    import errno

    assert "No space left" in user_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                                                 "/x/out.onnx"))
    assert "/x/out.onnx" in user_error(OSError(errno.EROFS, "Read-only file system",
                                               "/x/out.onnx"))
    assert user_error(OSError(errno.EBADF, "Bad file descriptor")) is None
