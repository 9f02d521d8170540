"""Loaders for the real offline data in ../shared: the proxy evaluation suite and the data builders both read it.

Each loader returns plain Python data or raises :class:`SourceMissing` with the install command, so the suite can
skip a task with a clear reason on a machine that lacks that source. Nothing here downloads anything.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.common.splits import cifar_split, split_of

FSDD_SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
DIGIT_NAMES = ("Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NOTO_EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
R_MANUALS = Path("/usr/share/doc/r-doc-pdf/manual")

INSTALL = {
    "fsdd": "place FSDD (Jakobovski/free-spoken-digit-dataset) under ../shared/data/fsdd/recordings",
    "cifar10": "place the CIFAR-10 test JPEGs under ../shared/data/cifar10-test/<class>/",
    "emoji": "apt-get install -y fonts-noto-color-emoji && pip install emoji==2.16.0",
    "pdf": "apt-get install -y r-doc-pdf  (pypdfium2 renders the pages)",
    "espeak": "apt-get install -y espeak-ng",
}


class SourceMissing(RuntimeError):
    """A data source is not installed; the message says how to install it."""


def default_shared_root() -> Path:
    """``../shared`` next to the repository root (where the project's read-only real data lives)."""
    return Path(__file__).resolve().parents[2].parent / "shared"


@dataclass(frozen=True)
class Clip:
    path: Path
    digit: int
    speaker: str
    take: int


def read_audio(path: str | Path) -> dict[str, Any]:
    """Read a WAV into the user audio format (native sampling rate; the model resamples)."""
    import soundfile as sf

    data, sr = sf.read(str(path), dtype="float32", always_2d=False)
    if data.ndim == 2:
        data = data.mean(axis=1)
    return {"array": np.ascontiguousarray(data, dtype=np.float32), "sampling_rate": int(sr)}


def fsdd_clips(shared: Path | None = None) -> list[Clip]:
    """All FSDD recordings, sorted by (take, digit, speaker) so any prefix is class-balanced."""
    rec = (shared or default_shared_root()) / "data" / "fsdd" / "recordings"
    if not rec.is_dir():
        raise SourceMissing(f"FSDD not found at {rec}: {INSTALL['fsdd']}")
    clips = []
    for p in rec.glob("*.wav"):
        m = re.fullmatch(r"(\d)_([a-z]+)_(\d+)", p.stem)
        if m:
            clips.append(Clip(p, int(m.group(1)), m.group(2), int(m.group(3))))
    if not clips:
        raise SourceMissing(f"no FSDD recordings matching '{{digit}}_{{speaker}}_{{take}}.wav' in {rec}")
    return sorted(clips, key=lambda c: (c.take, c.digit, c.speaker))


def fsdd_split(clips: list[Clip], split: str) -> list[Clip]:
    """FSDD's official split: takes 0-4 are test, the rest train."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return [c for c in clips if (c.take < 5) == (split == "test")]


def cifar10_images(
    shared: Path | None = None, per_class: int | None = None, split: str | None = None
) -> list[tuple[Path, int]]:
    """(path, class index) pairs, ``per_class`` first files of each class (of ``split`` if given), interleaved by
    class (one of each class in turn; a class with fewer files drops out of the rotation, none is cut short)."""
    root = (shared or default_shared_root()) / "data" / "cifar10-test"
    if not root.is_dir():
        raise SourceMissing(f"CIFAR-10 test images not found at {root}: {INSTALL['cifar10']}")
    per = []
    for ci, cls in enumerate(CIFAR10_CLASSES):
        files = sorted((root / cls).glob("*.jpg"))
        if split is not None:
            files = [p for p in files if cifar_split(int(p.stem)) == split]
        if not files:
            raise SourceMissing(f"no JPEGs in {root / cls}: {INSTALL['cifar10']}")
        per.append([(p, ci) for p in files[:per_class]])
    return [x for group in itertools.zip_longest(*per) for x in group if x is not None]


def emoji_names(n: int | None = None, split: str | None = None) -> list[tuple[str, str]]:
    """(emoji, English CLDR name) for single-codepoint fully-qualified emoji, evenly spread over the code space.

    Single codepoints only: Pillow without libraqm cannot shape ZWJ sequences into one glyph.
    """
    if not NOTO_EMOJI_FONT.exists():
        raise SourceMissing(f"{NOTO_EMOJI_FONT} missing: {INSTALL['emoji']}")
    try:
        import emoji
    except ImportError as e:
        raise SourceMissing(f"the PyPI package 'emoji' is not installed: {INSTALL['emoji']}") from e
    items = []
    for ch, data in emoji.EMOJI_DATA.items():
        base = ch.replace("\ufe0f", "")
        if len(base) != 1 or data.get("status") != emoji.STATUS["fully_qualified"]:
            continue
        name = data["en"].strip(":").replace("_", " ")
        items.append((ch, name))
    items.sort(key=lambda t: ord(t[0][0]))
    # names must be unique for a one-gold retrieval task
    seen, uniq = set(), []
    for ch, name in items:
        if name.lower() not in seen:
            seen.add(name.lower())
            uniq.append((ch, name))
    if split is not None:  # the same identity key the training-data builders split on
        uniq = [(ch, name) for ch, name in uniq if split_of(f"emoji:{name}") == split]
    if n is not None and n < len(uniq):
        idx = np.linspace(0, len(uniq) - 1, n).round().astype(int)
        uniq = [uniq[i] for i in idx]
    return uniq


def render_emoji(ch: str, size: int = 72) -> Any:
    """Render one emoji with Noto Color Emoji (a bitmap font drawn at 109 px) on white, resized to ``size``.

    Returns None when the font has no glyph for it (emoji newer than the installed font).
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(NOTO_EMOJI_FONT), 109)
    canvas = Image.new("RGB", (136, 128), "white")
    ImageDraw.Draw(canvas).text((0, 0), ch, font=font, embedded_color=True)
    bbox = Image.eval(canvas, lambda v: 255 - v).getbbox()
    if bbox is None or len(canvas.crop(bbox).getcolors(1 << 16) or [None] * 3) <= 2:
        return None  # blank or a monochrome "tofu" box
    return canvas.crop(bbox).resize((size, size))


_SENT = re.compile(r"[^.!?]*[A-Za-z][^.!?]*[.!?]")


def pdf_pages(
    pdf: Path | None = None, n: int | None = None, dpi: int = 50, split: str | None = None
) -> list[tuple[Any, str, int]]:
    """(page image, query sentence, page index) for pages of a real manual with a usable text layer.

    The query is the longest sentence of 6-40 words on the page that appears on no other page, so exactly one page
    is relevant (ViDoRe-style). Pages without such a sentence are skipped.
    """
    pdf = pdf or (R_MANUALS / "R-intro.pdf")
    if not pdf.exists():
        raise SourceMissing(f"{pdf} missing: {INSTALL['pdf']}")
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument(str(pdf))
    texts = []
    for i in range(len(doc)):
        tp = doc[i].get_textpage()
        texts.append(" ".join(tp.get_text_range().split()))
    counts: dict[str, int] = {}
    cands: list[list[str]] = []
    for t in texts:
        sents = [s.strip() for s in _SENT.findall(t) if 6 <= len(s.split()) <= 40]
        cands.append(sents)
        for s in set(sents):
            counts[s] = counts.get(s, 0) + 1
    chosen = []
    for i, sents in enumerate(cands):
        uniq = [s for s in sents if counts[s] == 1 and all(s not in texts[j] for j in range(len(texts)) if j != i)]
        if uniq and (split is None or split_of(f"pdf:{pdf.name}:{i}") == split):
            chosen.append((i, max(uniq, key=len)))
    if n is not None and n < len(chosen):
        idx = np.linspace(0, len(chosen) - 1, n).round().astype(int)
        chosen = [chosen[k] for k in idx]
    out = []
    for i, q in chosen:
        img = doc[i].render(scale=dpi / 72).to_pil().convert("RGB")
        out.append((img, q, i))
    doc.close()
    return out


def espeak_clips(texts: list[str], cache_dir: Path, voice: str = "en-us") -> list[dict[str, Any]]:
    """Synthesise each text with espeak-ng (cached as WAV); returns user-format audio dicts. **Synthetic speech.**"""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SourceMissing(f"espeak-ng not found: {INSTALL['espeak']}")
    import hashlib

    cache_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for t in texts:
        f = cache_dir / f"{voice}-{hashlib.blake2b(t.encode(), digest_size=8).hexdigest()}.wav"
        if not f.exists():
            tmp = f.with_suffix(".tmp.wav")
            subprocess.run([exe, "-v", voice, "-s", "160", "-w", str(tmp), t], check=True, capture_output=True)
            tmp.replace(f)
        out.append(read_audio(f))
    return out
