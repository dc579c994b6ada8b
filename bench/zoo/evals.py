"""Task metrics of the zoo as `rdonnx compress --eval` callables.

    rdonnx compress ~/.cache/rdonnx-zoo/g2p/model.onnx --calib .../calib.npz \\
        --eval bench.zoo.evals:g2p_word_agreement --min-score 0.99

Each is called as f(session, data): `session` an onnxruntime.InferenceSession of the candidate,
`data` the held-out feeds (a list of dicts of arrays). Agreements are returned as (share,
samples), so rdonnx checks them on their lower confidence bound. The original model's answers
on the same feeds are computed once (the model is found in the zoo cache,
`bench.zoo.common.cache_dir`) and kept by the feeds' digest, so every probe of a search costs
one run of the candidate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from bench.zoo.common import cache_dir
from bench.zoo.metrics import cosine_rows, sequence_agreement, topk_agreement

_REFERENCE: dict[tuple[str, str], list[np.ndarray]] = {}


def _run(session, data: Sequence[dict]) -> list[np.ndarray]:
    """The first output of every batch, concatenated along axis 0."""
    names = [i.name for i in session.get_inputs()]
    outs = [session.run(None, {n: feed[n] for n in names})[0] for feed in data]
    return [np.concatenate(outs)]


def _reference(model: str, data: Sequence[dict]) -> list[np.ndarray]:
    """The original zoo model's outputs on `data` (computed once per model and data)."""
    h = hashlib.sha256()
    for feed in data:
        for key in sorted(feed):
            h.update(key.encode() + np.ascontiguousarray(feed[key]).tobytes())
    key = (model, h.hexdigest())
    if key not in _REFERENCE:
        import onnxruntime as ort

        path = cache_dir() / model / "model.onnx"
        original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        _REFERENCE[key] = _run(original, data)
    return _REFERENCE[key]


def _against_original(model: str, score: Callable[[list[np.ndarray], list[np.ndarray]], float],
                      share: bool) -> Callable:
    def evaluate(session, data) -> float | tuple[float, int]:
        ref = _reference(model, data)
        value = score(ref, _run(session, data))
        return (value, len(ref[0])) if share else value

    evaluate.__doc__ = f"{model}: {score.__doc__}"
    return evaluate


def _words(ref: list[np.ndarray], cand: list[np.ndarray]) -> float:
    """word agreement of the greedy phoneme strings with the original's."""
    from bench.zoo.models.g2p import decode

    return sequence_agreement(decode(ref[0]), decode(cand[0]))


def _top1(ref: list[np.ndarray], cand: list[np.ndarray]) -> float:
    """top-1 agreement with the original's classes."""
    return topk_agreement(ref[0], cand[0], 1)


def _cosine(ref: list[np.ndarray], cand: list[np.ndarray]) -> float:
    """mean cosine of the embeddings with the original's."""
    return float(cosine_rows(ref[0], cand[0]).mean())


g2p_word_agreement = _against_original("g2p", _words, share=True)
efficientnet_top1 = _against_original("efficientnet", _top1, share=True)
minilm_cosine = _against_original("minilm", _cosine, share=False)
