"""ddddocr's YOLOX-style text-glyph detector (common_det.onnx, opset 11): scattered glyphs and
words rendered with PIL and DejaVu fonts; box F1 and matched IoU against the original."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..common import Adapter, save_splits, split_groups
from ..metrics import detection_agreement
from ..render import fonts, glyph_scene

MEMBER = "ddddocr/common_det.onnx"
SIZE = 416
COUNTS = {"calib": 16, "val": 8, "test": 64}
SCORE_MIN, NMS_IOU = 0.1, 0.45  # ddddocr's own post-processing thresholds


def letterbox(img: np.ndarray) -> np.ndarray:
    """ddddocr's preprocessing: scale into 416x416 (top-left), pad with 114, CHW float 0..255."""
    from PIL import Image

    h, w = img.shape[:2]
    r = min(SIZE / h, SIZE / w)
    resized = np.asarray(Image.fromarray(img).resize((int(w * r), int(h * r)), Image.BILINEAR))
    out = np.full((SIZE, SIZE, 3), 114, np.uint8)
    out[:resized.shape[0], :resized.shape[1]] = resized[..., ::-1]  # RGB -> BGR like cv2
    return out.transpose(2, 0, 1).astype(np.float32)


def prepare(src: dict[str, Path], out: Path, seed: int) -> None:
    shutil.copy(src["ddddocr"] / MEMBER, out / "model.onnx")
    rng = np.random.default_rng(seed)
    files = fonts()
    n = sum(COUNTS.values())
    images = []
    for _ in range(n):
        h, w = int(rng.integers(160, 400)), int(rng.integers(300, 560))
        images.append(letterbox(glyph_scene(rng, files, h, w)))
    save_splits(out, {"images": np.stack(images)}, {}, split_groups(range(n), COUNTS, seed))


def nms(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    order = scores.argsort()[::-1]
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(boxes[i, 0], boxes[order[1:], 0])
        yy1 = np.maximum(boxes[i, 1], boxes[order[1:], 1])
        xx2 = np.minimum(boxes[i, 2], boxes[order[1:], 2])
        yy2 = np.minimum(boxes[i, 3], boxes[order[1:], 3])
        inter = np.maximum(0, xx2 - xx1 + 1) * np.maximum(0, yy2 - yy1 + 1)
        area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
        iou = inter / (area[i] + area[order[1:]] - inter)
        order = order[1:][iou <= NMS_IOU]
    return np.asarray(keep, dtype=np.int64)


def detections(raw: np.ndarray) -> np.ndarray:
    """ddddocr's decoding of one [3549, 6] output: grid offsets and strides 8/16/32, score =
    objectness x class, threshold 0.1, NMS 0.45; boxes (x1, y1, x2, y2) in input pixels."""
    grids, strides = [], []
    for s in (8, 16, 32):
        n = SIZE // s
        yv, xv = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((n * n, 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    p = raw.astype(np.float64).copy()
    p[:, :2] = (p[:, :2] + grid) * stride
    p[:, 2:4] = np.exp(p[:, 2:4]) * stride
    scores = p[:, 4] * p[:, 5]
    xyxy = np.stack([p[:, 0] - p[:, 2] / 2, p[:, 1] - p[:, 3] / 2,
                     p[:, 0] + p[:, 2] / 2, p[:, 1] + p[:, 3] / 2], 1)
    m = scores > SCORE_MIN
    boxes, scores = xyxy[m], scores[m]
    return boxes[nms(boxes, scores)] if len(boxes) else np.zeros((0, 4))


def score(ref: list[np.ndarray], cand: list[np.ndarray], truth: dict) -> dict[str, float]:
    return detection_agreement([detections(r) for r in ref[0]],
                               [detections(c) for c in cand[0]])


ADAPTER = Adapter(
    name="detector", wheels=("ddddocr",), member=MEMBER, prepare=prepare, score=score,
    primary="f1", transparent=lambda m: m["f1"] >= 0.95, threshold="box F1 >= 0.95",
    ladder=(("--max-distortion", "1e-2"), ("--max-distortion", "3e-3"),
            ("--max-distortion", "1e-3")),
    calib_samples=2, batch=1, extra_args=("--grid", "1,0.5,0.25,0.1"),
    subset="rendered 416x416 glyph scenes; calib limited to 2 images, a 4-point grid",
)
