"""A deterministic, model-free reference embedder whose scores can be computed by hand.

Why: evaluator code (metrics, MMEB runner, mteb wrapper, proxy tasks) must be tested without a trained model. This
embedder maps inputs to fixed features of the raw data, in the spirit of mteb's own mock tasks:
dims 0-2: colour (mean RGB of an image/video, or the colour words named in a text);
dims 3-10: log energy in 8 frequency bands of an audio clip;
dims 11-26: hashed bag of words of a text that names no colour.
It is a test fixture, never a result: reports produced with it say ``reference-features``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np

from .embedder import l2_normalise
from .media import to_audio_item, to_video_frames

DIM = 27
COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "cyan": (0, 1, 1),
           "magenta": (1, 0, 1), "white": (1, 1, 1), "black": (0, 0, 0)}
_WORD = re.compile(r"[a-z]+")


def _text(t: str) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    words = _WORD.findall(t.lower())
    named = [w for w in words if w in COLOURS]
    if named:
        for w in named:
            v[0:3] += COLOURS[w]
        if np.any(v[0:3]):
            return v
    for w in words or [""]:
        v[11 + int(hashlib.blake2b(w.encode(), digest_size=2).hexdigest(), 16) % 16] += 1.0
    return v


def _image(img: Any) -> np.ndarray:
    from PIL import Image

    if isinstance(img, str):
        with Image.open(img) as im:
            arr = np.asarray(im.convert("RGB"), np.float32)
    else:
        arr = np.asarray(img.convert("RGB"), np.float32)
    v = np.zeros(DIM, np.float32)
    v[0:3] = arr.reshape(-1, 3).mean(0) / 255.0
    return v


def _audio(a: Any) -> np.ndarray:
    wave = to_audio_item(a)["array"]
    spec = np.abs(np.fft.rfft(wave, n=max(512, 1 << int(np.ceil(np.log2(max(wave.size, 2)))))))
    bands = np.array_split(spec, 8)
    v = np.zeros(DIM, np.float32)
    v[3:11] = np.log1p([float(np.sum(b ** 2)) for b in bands])
    return v


def _video(vid: Any) -> np.ndarray:
    frames = to_video_frames(vid)
    v = np.zeros(DIM, np.float32)
    v[0:3] = frames.reshape(-1, frames.shape[-1])[:, :3].mean(0) / 255.0
    return v


def features(x: Any) -> np.ndarray:
    """Raw feature vector of one user input (unnormalised)."""
    from PIL import Image

    if isinstance(x, str):
        return _text(x)
    if isinstance(x, Image.Image):
        return _image(x)
    if isinstance(x, dict):
        v = np.zeros(DIM, np.float32)
        known = {"text", "image", "document", "page", "video", "audio"}
        if not set(x) <= known or not set(x) - {"page"}:
            raise ValueError(f"input dict keys {sorted(x)} are not a subset of {sorted(known)}")
        if x.get("text"):
            v += _text(x["text"])
        for k in ("image", "document"):
            if x.get(k) is not None:
                v += _image(x[k])
        if x.get("audio") is not None:
            v += _audio(x["audio"])
        if x.get("video") is not None:
            v += _video(x["video"])
        return v
    raise TypeError(f"reference embedder: unsupported input type {type(x).__name__}")


class ReferenceEmbedder:
    """:class:`~training.evaluation.embedder.Embedder` over :func:`features`; ignores the prompt."""

    name = "reference-features"

    def __init__(self) -> None:
        self.calls: list[tuple[int, str | None]] = []  # (n inputs, prompt) per call, for tests

    def encode(self, inputs: list, *, prompt: str | None = None, batch_size: int = 8) -> np.ndarray:
        if len(inputs) == 0:
            raise ValueError("ReferenceEmbedder.encode: got an empty input list")
        self.calls.append((len(inputs), prompt))
        return l2_normalise(np.stack([features(x) for x in inputs]))
