"""Task metrics of the zoo: pure functions on arrays, tested in ``tests/test_zoo.py``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def topk_agreement(ref_logits: np.ndarray, cand_logits: np.ndarray, k: int = 1) -> float:
    """Share of samples whose original top-1 class is among the candidate's top-k classes
    (k=1: the two top-1 classes are equal)."""
    ref_top = ref_logits.argmax(axis=-1)
    cand_topk = np.argsort(-cand_logits, axis=-1)[:, :k]
    return float(np.mean(np.any(cand_topk == ref_top[:, None], axis=1)))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes (x1, y1, x2, y2): a [n, 4] against b [m, 4]."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def match_boxes(ref: np.ndarray, cand: np.ndarray, iou_min: float = 0.5
                ) -> tuple[int, int, int, list[float]]:
    """Greedy one-to-one matching by IoU (highest first): (true positives, false positives,
    false negatives, IoUs of the matched pairs)."""
    iou = box_iou(ref, cand)
    ious: list[float] = []
    used_r, used_c = set(), set()
    for flat in np.argsort(-iou, axis=None):
        r, c = np.unravel_index(flat, iou.shape)
        if iou[r, c] < iou_min:
            break
        if r in used_r or c in used_c:
            continue
        used_r.add(r)
        used_c.add(c)
        ious.append(float(iou[r, c]))
    tp = len(ious)
    return tp, len(cand) - tp, len(ref) - tp, ious


def detection_agreement(ref_boxes: Sequence[np.ndarray], cand_boxes: Sequence[np.ndarray]
                        ) -> dict[str, float]:
    """Box F1 of the candidate's detections against the original's (pooled over images) and
    the mean IoU of the matched pairs."""
    tp = fp = fn = 0
    ious: list[float] = []
    for r, c in zip(ref_boxes, cand_boxes, strict=True):
        t, p, n, i = match_boxes(r, c)
        tp, fp, fn = tp + t, fp + p, fn + n
        ious += i
    f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    return {"f1": f1, "matched_iou": float(np.mean(ious)) if ious else 0.0,
            "boxes": float(tp + fn)}


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def error_rate(refs: Sequence[Sequence], hyps: Sequence[Sequence]) -> float:
    """Summed edit distance over summed reference length (CER, PER)."""
    errors = sum(edit_distance(r, h) for r, h in zip(refs, hyps, strict=True))
    return errors / max(sum(len(r) for r in refs), 1)


def ctc_greedy(indices: np.ndarray, blank: int = 0) -> list[int]:
    """CTC best path: collapse repeats, drop blanks."""
    out: list[int] = []
    last = None
    for i in indices.tolist():
        if i != last and i != blank:
            out.append(i)
        last = i
    return out


def sequence_agreement(refs: Sequence[Sequence], hyps: Sequence[Sequence]) -> float:
    """Share of sequences that are exactly equal."""
    return float(np.mean([list(r) == list(h) for r, h in zip(refs, hyps, strict=True)]))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(den, 1e-12)


def retrieval_agreement(ref: np.ndarray, cand: np.ndarray) -> float:
    """Share of queries whose nearest other item (cosine) is the same under both embeddings."""
    def nearest(e: np.ndarray) -> np.ndarray:
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(axis=1)
    return float(np.mean(nearest(ref) == nearest(cand)))


def paraphrase_recall(queries: np.ndarray, keys: np.ndarray) -> float:
    """Share of queries (paraphrases) whose nearest key (cosine) is their own source row."""
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    k = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
    return float(np.mean((q @ k.T).argmax(axis=1) == np.arange(len(q))))


CREPE_CENTS_OFFSET = 1997.3794084376191  # cents of pitch bin 0 (torchcrepe.convert)


def crepe_cents(probs: np.ndarray) -> np.ndarray:
    """Pitch in cents (re 10 Hz) from CREPE's 360 bin activations: the activation-weighted mean
    of the bins within 4 of the argmax (the decoding of the CREPE paper)."""
    center = probs.argmax(axis=1)
    bins = np.arange(probs.shape[1])
    cents = 20.0 * bins + CREPE_CENTS_OFFSET
    window = np.abs(bins[None, :] - center[:, None]) <= 4
    w = probs * window
    return (w * cents[None, :]).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-12)


def hz_to_cents(hz: np.ndarray) -> np.ndarray:
    return 1200.0 * np.log2(np.asarray(hz, dtype=np.float64) / 10.0)


def raw_pitch_accuracy(cents: np.ndarray, true_cents: np.ndarray, tolerance: float = 50.0
                       ) -> float:
    """Share of frames whose pitch is within ``tolerance`` cents of the truth."""
    return float(np.mean(np.abs(cents - true_cents) <= tolerance))


def token_nll(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Next-token negative log-likelihoods [n, t - 1]: logits [n, t, v] predict tokens [n, t]
    shifted by one."""
    lg = logits[:, :-1].astype(np.float64)
    lg = lg - lg.max(axis=-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def perplexity(logits: np.ndarray, tokens: np.ndarray) -> float:
    """exp of the mean next-token negative log-likelihood (`token_nll`)."""
    return float(np.exp(token_nll(logits, tokens).mean()))


def perplexity_ratio(ref_nll: np.ndarray, cand_nll: np.ndarray, confidence: float = 0.95,
                     draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """perplexity(cand) / perplexity(ref) from their `token_nll` [n, t - 1], and its paired
    bootstrap interval over the n sequences: each draw resamples whole sequences with
    replacement (tokens of one sequence are not independent) and takes the ratio on them."""
    diff = (cand_nll - ref_nll).mean(axis=1)  # every sequence has the same number of tokens
    pick = np.random.default_rng(seed).integers(0, len(diff), (draws, len(diff)))
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(np.exp(diff[pick].mean(axis=1)), [tail, 1.0 - tail])
    return float(np.exp(diff.mean())), float(low), float(high)
