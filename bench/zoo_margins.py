"""How close the original's own decisions are to a tie, and which of them a compressed model
changes: the top-1 minus top-2 logit margin of each test sample (EfficientNet: the class; g2p:
the least margin along the word's greedy decoding path, up to its end token; the OCR model:
the least over the line's CTC frames).

    .venv/bin/python bench/zoo_margins.py efficientnet a.rdonnx [b.onnx ...]

For each artifact: the agreement, the logits' rms change on the samples whose decision held,
and the margins of the samples whose
decision changed, with their rank among all test samples' margins (0: the closest tie). An
agreement target of A on N samples allows (1 - A) N changed decisions; when more samples than
that have margins below the logit change a width causes, the target is out of that width's
reach on this data whatever the rounding. Needs the zoo (`python -m bench.zoo.fetch`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import rdonnx  # noqa: E402
from bench.zoo.common import Prepared, cache_dir, load_inputs, run_outputs  # noqa: E402
from bench.zoo.metrics import ctc_greedy  # noqa: E402
from bench.zoo.models.g2p import END  # noqa: E402


def margins_and_decisions(model: str, logits: np.ndarray) -> tuple[np.ndarray, list]:
    """Each sample's margin and its decision (a class, or the greedy phoneme sequence)."""
    top2 = np.sort(logits, axis=-1)[..., -2:]
    gap = top2[..., 1] - top2[..., 0]
    if model == "efficientnet":
        return gap, logits.argmax(-1).tolist()
    if model == "ocr":  # [frames, 1, classes] per line, lines stacked along axis 0
        return gap.min(axis=-1), [tuple(ctc_greedy(row.argmax(-1))) for row in logits]
    decisions = []
    for row in logits.argmax(-1).tolist():
        decisions.append(tuple(row[:row.index(END)] if END in row else row))
    return np.array([g[:len(d) + 1].min() for g, d in zip(gap, decisions)]), decisions


def shaped(out: np.ndarray, samples: int) -> np.ndarray:
    """One row per sample (the OCR model stacks each line's [frames, 1, classes])."""
    return out.reshape(samples, -1, out.shape[-1]) if len(out) != samples else out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=("efficientnet", "g2p", "ocr"))
    parser.add_argument("artifacts", nargs="+")
    args = parser.parse_args()
    prep = Prepared(cache_dir() / args.model)
    feeds = load_inputs(prep.inputs("test"))
    import onnxruntime as ort

    original = ort.InferenceSession(str(prep.onnx), providers=["CPUExecutionProvider"])
    lines = len(next(iter(feeds.values())))
    ref = shaped(run_outputs(original, feeds, 64)[0], lines)
    margin, decided = margins_and_decisions(args.model, ref)
    n = len(margin)
    print(f"{args.model}: {n} test samples; original margins: median {np.median(margin):.3f}, "
          + ", ".join(f"< {t:g}: {int((margin < t).sum())}" for t in (0.01, 0.05, 0.1, 0.3)))
    print("| artifact | bytes | agreement | changed | logit rms change (unchanged samples) | "
          "their margins (rank) |")
    print("|---|---|---|---|---|---|")
    for path in args.artifacts:
        session = rdonnx.open_session(path) if path.endswith(".rdonnx") else \
            ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        out = shaped(run_outputs(session, feeds, 64)[0], lines)
        _, got = margins_and_decisions(args.model, out)
        changed = np.array([a != b for a, b in zip(decided, got)])
        order = np.argsort(margin[changed])
        ranks = [int((margin < m).sum()) for m in margin[changed][order]]
        listed = ", ".join(f"{m:.3f} ({r})" for m, r in zip(margin[changed][order], ranks))
        # g2p: the steps of the word up to its end token (later steps decode padding)
        steps = [d[:len(decided[i]) + 1] if args.model == "g2p" else d
                 for i, d in enumerate(out - ref) if not changed[i]]
        rms = float(np.sqrt(np.mean(np.concatenate([np.ravel(d) for d in steps]) ** 2)))
        print(f"| {Path(path).name} | {Path(path).stat().st_size:,} | {1 - changed.mean():.2%} "
              f"| {int(changed.sum())} | {rms:.4f} | {listed} |")


if __name__ == "__main__":
    main()
