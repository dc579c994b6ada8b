"""Byte-identity check: compress the bundled digits models and print the sha256 of every
artifact and JSON report.

Run before and after a change that must not alter results; the two outputs must match line for
line. The report holds no timing or wall-clock field, so nothing is masked; it records the
model and output paths (a SuRP artifact the resolved source path), so each case runs in one
fixed folder ($TMPDIR/rdonnx-identity) holding copies of the bundled files and names them
relatively: the hashes do not depend on where the checkout lives. Each case
runs `python -m rdonnx.cli` in a fresh process (the rdonnx that `sys.executable` imports: set
PYTHONPATH to check another checkout with the same environment).

Run: .venv/bin/python bench/identity.py [--only SUBSTRING]    (a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("digits_mlp", "digits_cnn")
RATES = ("0.5", "0.1")
METHODS = {"rd": ["--method", "rd"], "sequential": ["--sequential"],
           "surp": ["--method", "surp"], "gao": ["--method", "gao"]}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_case(folder: Path, model: str, rate: str, method: str) -> tuple[str, str]:
    """(artifact sha256, report sha256) of one compress run."""
    stem = f"{model}-{method}-{rate}"
    artifact, report = folder / f"{stem}.rdonnx", folder / f"{stem}.json"
    command = [sys.executable, "-m", "rdonnx.cli", "compress", f"{model}.onnx", "--rate", rate,
               *METHODS[method], "--calib", "digits_calib.npz", "-o", artifact.name,
               "--report", report.name, "--quiet"]
    subprocess.run(command, check=True, cwd=folder, stderr=subprocess.DEVNULL)
    return sha256(artifact), sha256(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="Run only cases whose name contains this.")
    args = parser.parse_args()
    # a fixed folder: a SuRP artifact records the resolved path of its source model
    folder = Path(tempfile.gettempdir()) / "rdonnx-identity"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        for name in (*(f"{m}.onnx" for m in MODELS), "digits_calib.npz"):
            shutil.copyfile(ROOT / "models" / name, folder / name)
        for model in MODELS:
            for method in METHODS:
                for rate in RATES:
                    name = f"{model} {method} {rate}"
                    if args.only not in name:
                        continue
                    art, rep = run_case(folder, model, rate, method)
                    print(f"{model:<11} {method:<10} {rate:<4} artifact {art}  report {rep}",
                          flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
