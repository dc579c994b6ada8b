"""Byte-identity check: compress the bundled digits models and print the sha256 of every
artifact and JSON report.

Run before and after a change that must not alter results; the two outputs must match line for
line. The report holds no timing or wall-clock field, so nothing is masked; it records the
model and output paths (a SuRP artifact the resolved source path), so each case runs in one
fixed folder ($TMPDIR/rdonnx-identity) holding copies of the bundled files and names them
relatively: the hashes do not depend on where the checkout lives. Each case
runs `python -m rdonnx.cli` in a fresh process (the rdonnx that `sys.executable` imports: set
PYTHONPATH to check another checkout with the same environment).

Each line also gives two hashes that a change of the settings' schema (`CompressConfig`
version 1 -> 2) leaves alone: `payload`, of the artifact's data sections and its manifest
without `settings`, and of the report without `settings`, its `schema_version` and the
figures that follow from the file's size (the manifest holds the settings: `output_bytes`,
`coding.artifact_*`, `coding.smaller_than_*`); `settings`, of the settings read back by this
checkout's `CompressConfig.from_dict` (versions 1 and 2 alike) and written as version 2. Two
checkouts whose outputs differ only by the settings' layout print the same `payload` and
`settings`.

Run: .venv/bin/python bench/identity.py [--only SUBSTRING]    (a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("digits_mlp", "digits_cnn")
RATES = ("0.5", "0.1")
METHODS = {"rd": ["--method", "rd"], "sequential": ["--sequential"],
           "surp": ["--method", "surp"], "gao": ["--method", "gao"]}


HEADER = struct.Struct("<8sHHII")  # rdonnx.artifact.format.HEADER, read without rdonnx
SIZE_FIGURES = ("artifact_bytes", "artifact_bits_per_weight", "smaller_than_dense_zstd19",
                "smaller_than_original", "smaller_than_sparse")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def normalized(artifact: Path, report: Path) -> tuple[str, str]:
    """(payload sha256, settings sha256): see the module's docstring. The folder's path (in
    a SuRP artifact's source) is replaced by a placeholder, so `--folder` keeps them too."""
    import zstandard

    blob = artifact.read_bytes()
    _, _, _, length, _ = HEADER.unpack_from(blob)
    folder = json.dumps(str(artifact.parent.resolve()))[1:-1]
    manifest = json.loads(zstandard.ZstdDecompressor().decompress(
        blob[HEADER.size:HEADER.size + length]).decode().replace(folder, "<folder>"))
    settings = manifest.pop("settings")
    data = json.loads(report.read_text().replace(folder, "<folder>"))
    if json.dumps(data.pop("settings"), sort_keys=True) != json.dumps(settings, sort_keys=True):
        raise SystemExit(f"{report}: the report's settings differ from the artifact's")
    data.pop("output_bytes")
    data.pop("schema_version")
    for key in SIZE_FIGURES:
        data["coding"].pop(key, None)
    h = hashlib.sha256(blob[HEADER.size + length:])
    h.update(digest(manifest).encode())
    h.update(digest(data).encode())
    sys.path.insert(0, str(ROOT))  # this checkout's reader, whichever rdonnx made the files
    from rdonnx.flow.config import CompressConfig

    return h.hexdigest(), digest(CompressConfig.from_dict(settings).as_dict())


def run_case(folder: Path, model: str, rate: str, method: str) -> tuple[str, ...]:
    """(artifact sha256, report sha256, payload sha256, settings sha256) of one compress
    run."""
    stem = f"{model}-{method}-{rate}"
    artifact, report = folder / f"{stem}.rdonnx", folder / f"{stem}.json"
    command = [sys.executable, "-m", "rdonnx.cli", "compress", f"{model}.onnx", "--rate", rate,
               *METHODS[method], "--calib", "digits_calib.npz", "-o", artifact.name,
               "--report", report.name, "--quiet"]
    subprocess.run(command, check=True, cwd=folder, stderr=subprocess.DEVNULL)
    return (sha256(artifact), sha256(report), *normalized(artifact, report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="Run only cases whose name contains this.")
    parser.add_argument("--folder", type=Path, default=None,
                        help="Work here instead (the SuRP artifacts' hashes then differ; "
                        "`payload` and `settings` do not).")
    parser.add_argument("--keep", action="store_true", help="Keep the folder and its files.")
    args = parser.parse_args()
    # a fixed folder: a SuRP artifact records the resolved path of its source model
    folder = args.folder or Path(tempfile.gettempdir()) / "rdonnx-identity"
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
                    art, rep, payload, settings = run_case(folder, model, rate, method)
                    print(f"{model:<11} {method:<10} {rate:<4} artifact {art}  report {rep}  "
                          f"payload {payload}  settings {settings}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
