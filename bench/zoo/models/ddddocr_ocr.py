"""ddddocr's recognizer (common.onnx: CNN + ONNX LSTM, CTC over 8,210 symbols): random strings
rendered with DejaVu fonts; exact string agreement and CER against the original."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..common import Adapter, save_splits, split_groups
from ..metrics import ctc_greedy, error_rate, sequence_agreement
from ..render import ALNUM, fonts, text_line

MEMBER = "ddddocr/common.onnx"
H, W = 64, 192  # ddddocr scales to height 64; one width so that every split is one array
COUNTS = {"calib": 32, "val": 32, "test": 200}


def prepare(src: dict[str, Path], out: Path, seed: int) -> None:
    import onnx

    from ..onnxutil import save

    # The wheel declares the output as [1, seqlen]; it is [seqlen, 1, 8210]. Only that
    # declaration is corrected (weights and nodes unchanged).
    model = onnx.load(str(src["ddddocr"] / MEMBER))
    dims = model.graph.output[0].type.tensor_type.shape.dim
    del dims[:]
    for d in ("seqlen", 1, 8210):
        dims.add().dim_param = d if isinstance(d, str) else ""
        if not isinstance(d, str):
            dims[-1].dim_value = d
    save(model, out / "model.onnx")
    rng = np.random.default_rng(seed)
    files = fonts()
    n = sum(COUNTS.values())
    texts = ["".join(rng.choice(list(ALNUM), int(rng.integers(4, 8)))) for _ in range(n)]
    images = np.stack([text_line(rng, files, t, H, W) for t in texts])
    x = (images.astype(np.float32) / 255.0)[:, None]
    save_splits(out, {"input1": x}, {"text": np.asarray(texts)},
                split_groups(range(n), COUNTS, seed))


def strings(out: np.ndarray, n: int) -> list[list[int]]:
    """CTC best paths of ``n`` samples whose outputs [T, 1, C] were stacked along axis 0."""
    logits = out.reshape(n, -1, out.shape[-1])
    return [ctc_greedy(row.argmax(-1)) for row in logits]


def score(ref: list[np.ndarray], cand: list[np.ndarray], truth: dict) -> dict[str, float]:
    n = len(truth["input1"])
    r, c = strings(ref[0], n), strings(cand[0], n)
    return {"string_agreement": sequence_agreement(r, c), "cer": error_rate(r, c)}


ADAPTER = Adapter(
    name="ocr", wheels=("ddddocr",), member=MEMBER, prepare=prepare, score=score,
    primary="string_agreement", transparent=lambda m: m["string_agreement"] >= 0.99,
    threshold="strings unchanged >= 99%",
    ladder=(("--max-distortion", "1e-2"), ("--max-distortion", "3e-3"),
            ("--max-distortion", "1e-3")),
    calib_samples=8, batch=1, extra_args=("--grid", "1,0.6,0.35,0.2,0.1"),
    subset="random 4-7 character strings rendered at 64x192; calib limited to 8 lines, "
           "a 5-point grid",
)
