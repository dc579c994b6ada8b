"""Rendered text images for the OCR models: glyphs and words drawn with PIL and DejaVu fonts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts"))
GLYPHS = ("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
          "ΑΒΓΔΕΖΘΛΞΠΣΦΨΩαβγδλμπσφψωБГДЖЗИЛПФЦЧШЩЭЮЯбгджзилпфцчшщэюя")
ALNUM = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789"


def fonts() -> list[Path]:
    """DejaVu fonts found on this machine (sorted; raises if there are none)."""
    for d in FONT_DIRS:
        found = sorted(p for p in d.rglob("DejaVuS*.ttf"))
        if found:
            return found
    raise SystemExit("no DejaVu fonts: apt-get install fonts-dejavu-core")


def background(rng: np.random.Generator, h: int, w: int, channels: int = 3) -> np.ndarray:
    """A smooth two-colour gradient with noise and a few random lines."""
    from PIL import Image, ImageDraw

    a, b = rng.integers(120, 256, channels), rng.integers(120, 256, channels)
    t = np.linspace(0, 1, w)[None, :, None]
    img = (a * (1 - t) + b * t) * np.ones((h, 1, 1))
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    pil = Image.fromarray(img if channels == 3 else img[..., 0])
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(0, 4)):
        xy = [int(v) for v in (rng.integers(0, w), rng.integers(0, h), rng.integers(0, w),
                               rng.integers(0, h))]
        draw.line(xy, fill=tuple(int(c) for c in rng.integers(60, 200, channels)), width=1)
    return np.asarray(pil)


def glyph_scene(rng: np.random.Generator, font_files: list[Path], h: int, w: int) -> np.ndarray:
    """3-6 scattered, rotated glyphs (or one short word) on a background, RGB uint8 [h, w, 3]."""
    from PIL import Image, ImageFont

    canvas = Image.fromarray(background(rng, h, w))
    n = int(rng.integers(3, 7))
    for i in range(n):
        word = rng.random() < 0.25
        text = "".join(rng.choice(list(ALNUM), int(rng.integers(2, 5)))) if word else \
            str(rng.choice(list(GLYPHS)))
        size = int(rng.integers(26, 52))
        font = ImageFont.truetype(str(font_files[int(rng.integers(len(font_files)))]), size)
        box = font.getbbox(text)
        tile = Image.new("RGBA", (box[2] + 8, box[3] + 8), (0, 0, 0, 0))
        from PIL import ImageDraw

        ImageDraw.Draw(tile).text((4, 4), text, font=font,
                                  fill=tuple(int(c) for c in rng.integers(0, 110, 3)) + (255,))
        tile = tile.rotate(float(rng.uniform(-30, 30)), expand=True, resample=Image.BICUBIC)
        cols, rows = max(w // n, tile.width + 1), max(h - tile.height, 1)
        x = int(min(i * (w // n) + rng.integers(0, max(cols - tile.width, 1)), w - tile.width))
        y = int(rng.integers(0, rows))
        canvas.paste(tile, (max(x, 0), max(y, 0)), tile)
    return np.asarray(canvas.convert("RGB"))


def text_line(rng: np.random.Generator, font_files: list[Path], text: str, h: int, w: int
              ) -> np.ndarray:
    """``text`` on one line, fitted into a grey [h, w] uint8 image with jitter and noise."""
    from PIL import Image, ImageDraw, ImageFont

    size = int(rng.integers(int(0.5 * h), int(0.75 * h)))
    font = ImageFont.truetype(str(font_files[int(rng.integers(len(font_files)))]), size)
    box = font.getbbox(text)
    tw, th = box[2] - box[0], box[3] - box[1]
    tile = Image.new("L", (tw + 10, th + 10), 0)
    ImageDraw.Draw(tile).text((5 - box[0], 5 - box[1]), text, font=font, fill=255)
    scale = min((w - 8) / tile.width, (h - 4) / tile.height, 1.0)
    tile = tile.resize((max(int(tile.width * scale), 1), max(int(tile.height * scale), 1)))
    tile = tile.rotate(float(rng.uniform(-4, 4)), expand=False, resample=Image.BICUBIC)
    bg = Image.fromarray(background(rng, h, w, 1))
    ink = Image.new("L", bg.size, int(rng.integers(0, 90)))
    x = int(rng.integers(0, max(w - tile.width, 1)))
    y = int(rng.integers(0, max(h - tile.height, 1)))
    mask = Image.new("L", bg.size, 0)
    mask.paste(tile, (x, y))
    bg.paste(ink, (0, 0), mask)
    return np.asarray(bg)
