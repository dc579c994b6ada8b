"""Do the bounds rdonnx meets on calibration data hold on the zoo's separate test split?

Runs `rdonnx compress` (a subprocess, with the code found on PYTHONPATH, so the same jobs run
before and after a change) on a zoo model's calibration split with a bound or a rate, with
`--test test.npz`, and prints one JSON line per job: the bound, the figure the report gives on
the calibration data (fit and held-out parts when there is a holdout), and the same figure
measured on the test split.

    PYTHONPATH=. python bench/zoo_bounds.py --model g2p --jobs bounds --tag after
    PYTHONPATH=. python bench/zoo_bounds.py --model g2p --jobs recon --tag after
    PYTHONPATH=. python bench/zoo_bounds.py --model ocr --jobs recon --modes reconstruct

`--jobs bounds`: the bound ladder; `recon`: --method uniform at rates 0.5 and 0.3, plain mask
vs --reconstruct vs --sequential (the same mask: uniform densities, magnitude scores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.zoo.common import cache_dir  # noqa: E402

# per model: common arguments, bound ladder, recon arguments
SETUPS: dict[str, dict] = {
    "g2p": {"common": ["--values", "exact", "--format", "dense", "--no-layer-distortion"],
            "bounds": [["--max-distortion", "1e-2"], ["--max-distortion", "3e-3"],
                       ["--max-distortion", "1e-3"]],
            "calibrate": [],
            "recon": ["--calib-samples", "256"]},
    "efficientnet": {"common": ["--values", "exact", "--format", "dense", "--method", "uniform",
                                "--no-layer-distortion", "--calib-samples", "128"],
                     "bounds": [["--min-agreement", "0.9"], ["--min-agreement", "0.95"],
                                ["--min-agreement", "0.99"], ["--max-distortion", "1e-2"]],
                     "calibrate": None,
                     # held-out crops of other photos (the calibration split's crops share
                     # photos, so its own held-out part cannot see overfitting to them)
                     "recon": ["--calib-samples", "32", "--verify", "{zoo}/val.npz"]},
    "minilm": {"common": ["--values", "exact", "--format", "dense", "--method", "uniform",
                          "--no-layer-distortion", "--metric", "cosine", "--calib-samples", "128"],
               "bounds": [["--max-distortion", "1e-2"], ["--max-distortion", "3e-3"]],
               "calibrate": None,
               "recon": ["--calib-samples", "64", "--metric", "cosine"]},
    # recon only (their bound ladders run in bench/zoo.py): the whole calibration split
    # (CREPE: its first 48 frames, as the zoo ladder), the test split capped to the same count
    "detector": {"recon": ["--calib-samples", "16"]},
    "ocr": {"recon": ["--calib-samples", "32"]},
    "crepe": {"recon": ["--calib-samples", "48"]},
    # the LM: its 8 calibration windows of 128 tokens (6 fit, 2 held out); no onnxsim pass;
    # bounds with uniform densities (its rd curves take an hour: bench/speed.py)
    "smollm2": {"common": ["--values", "exact", "--format", "dense", "--method", "uniform",
                           "--no-layer-distortion", "--calib-samples", "8", "--no-simplify"],
                "bounds": [["--max-distortion", "0.3"], ["--max-distortion", "0.1"]],
                "calibrate": None,
                "recon": ["--calib-samples", "8", "--no-simplify"]},
}


def run(args: list[str], env: dict) -> tuple[int, str, float]:
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "rdonnx.cli", *args], env=env,
                          capture_output=True, text=True)
    return proc.returncode, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "", \
        time.time() - start


def figures(report: dict) -> dict:
    out = {"rate": report["rate"], "bytes": report.get("output_bytes")}
    for key in ("calibration", "holdout", "test"):
        ev = report.get(key)
        if ev:
            out[key] = {"samples": ev["samples"], "metric": ev["metric"],
                        "distortion": ev["distortion"], "top1": ev["top1_agreement"]}
    check = report.get("check")
    if check:
        out["check"] = {k: check.get(k) for k in ("measured", "bound", "limit", "samples")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=sorted(SETUPS))
    parser.add_argument("--jobs", choices=("bounds", "recon"), default="bounds")
    parser.add_argument("--tag", default="run")
    parser.add_argument("--extra", default="", help="more compress arguments (space-separated)")
    parser.add_argument("--rates", default="0.5,0.3")
    parser.add_argument("--modes", default="plain,reconstruct,sequential",
                        help="recon: which of plain,reconstruct,sequential to run")
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args()
    zoo = cache_dir() / args.model
    setup = SETUPS[args.model]
    if args.jobs == "bounds" and "bounds" not in setup:
        parser.error(f"{args.model} has no bound ladder here (bench/zoo.py runs it)")
    env = dict(os.environ)
    extra = args.extra.split()
    with tempfile.TemporaryDirectory() as tmp:
        jobs: list[tuple[str, list[str]]] = []
        if args.jobs == "bounds":
            common = [*setup["common"], *extra]
            if setup["calibrate"] is not None:  # curves once, reused by every bound
                curves = Path(tmp) / "curves.json"
                code, line, secs = run(["calibrate", str(zoo / "model.onnx"), "--calib",
                                        str(zoo / "calib.npz"), "-o", str(curves), "-q",
                                        *setup["calibrate"], *extra], env)
                print(json.dumps({"tag": args.tag, "model": args.model, "job": "calibrate",
                                  "exit": code, "seconds": round(secs, 1), "error": line}),
                      flush=True)
                if code == 0:
                    common += ["--curves", str(curves)]
            jobs = [(" ".join(b), [*b, *common]) for b in setup["bounds"]]
        else:
            base = ["--values", "exact", "--format", "dense", "--method", "uniform",
                    "--no-layer-distortion", *(a.format(zoo=zoo) for a in setup["recon"]),
                    *extra]
            for rate in args.rates.split(","):
                for mode in ([f"--{m}"] if m != "plain" else []
                             for m in args.modes.split(",")):
                    jobs.append((f"--rate {rate} {' '.join(mode)}".strip(),
                                 ["--rate", rate, *mode, *base]))
        for name, job in jobs:
            report = Path(tmp) / "report.json"
            out = Path(tmp) / "out.onnx"
            code, line, secs = run(["compress", str(zoo / "model.onnx"), "--calib",
                                    str(zoo / "calib.npz"), "--test", str(zoo / "test.npz"),
                                    "-o", str(out), "--report", str(report), "--force", "-q",
                                    *job], env)
            row = {"tag": args.tag, "model": args.model, "job": name, "exit": code,
                   "seconds": round(secs, 1)}
            if code == 0:
                row.update(figures(json.loads(report.read_text())))
            else:
                row["error"] = line
            text = json.dumps(row)
            print(text, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(text + "\n")


if __name__ == "__main__":
    main()
