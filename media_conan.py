# Copyright 2026 The Conan-embedding-v3 authors. Licensed under the Apache License, Version 2.0.
"""Decoding of media files for ConanProcessor: audio, video and PDF pages.

Each decoder library is optional and imported on first use (a user who only embeds text and images needs none of
them), with an error that says what to install. No torchaudio/torchvision/torchcodec: none has a CPU build here.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import numpy as np

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aiff", ".aif")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
PDF_EXTENSIONS = (".pdf",)


def _optional_import(module: str, pip_name: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{purpose} needs the `{pip_name}` package: pip install {pip_name}") from error


def media_kind_of_path(path: str) -> str | None:
    """'image' | 'audio' | 'video' | 'pdf' for a path with a known extension, else None."""
    ext = os.path.splitext(path)[1].lower()
    for kind, extensions in (
        ("image", IMAGE_EXTENSIONS),
        ("audio", AUDIO_EXTENSIONS),
        ("video", VIDEO_EXTENSIONS),
        ("pdf", PDF_EXTENSIONS),
    ):
        if ext in extensions:
            return kind
    return None


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"{what} file {path!r} does not exist or is not a file.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} file {path!r} is empty (0 bytes).")


def resample_audio(samples: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling (scipy), exact for rational rate ratios such as 8 kHz or 44.1 kHz -> 16 kHz."""
    if orig_rate == target_rate:
        return samples
    signal = _optional_import("scipy.signal", "scipy", "Resampling audio")
    ratio = Fraction(target_rate, orig_rate)
    return signal.resample_poly(samples, ratio.numerator, ratio.denominator).astype(np.float32)


def load_audio_file(path: str) -> tuple[np.ndarray, int]:
    """Read an audio file as mono float32 in [-1, 1] and its sampling rate (soundfile first, PyAV as fallback)."""
    _require_file(path, "Audio")
    soundfile = _optional_import("soundfile", "soundfile", "Reading audio files")
    try:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
        return samples.mean(axis=1), int(rate)
    except Exception as soundfile_error:  # libsndfile lacks some codecs (e.g. AAC): try FFmpeg through PyAV
        try:
            return _load_audio_with_av(path)
        except ImportError:
            raise ValueError(f"Audio file {path!r} could not be decoded: {soundfile_error}") from soundfile_error
        except Exception as av_error:
            raise ValueError(f"Audio file {path!r} could not be decoded: {soundfile_error}; {av_error}") from av_error


def _load_audio_with_av(path: str) -> tuple[np.ndarray, int]:
    av = _optional_import("av", "av", "Decoding this audio format")
    with av.open(path) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        rate = stream.rate
        chunks = [frame.to_ndarray().astype(np.float32).reshape(frame.layout.nb_channels if frame.format.is_planar else 1, -1)
                  for frame in container.decode(stream)]
    if not chunks:
        raise ValueError("no audio frames")
    samples = np.concatenate([chunk.mean(axis=0) for chunk in chunks])
    return samples, int(rate)


def load_video_file(path: str, fps: float, max_frames: int) -> list[np.ndarray]:
    """Decode a video file with PyAV, sampling at `fps` frames per second, at most `max_frames` (spread uniformly)."""
    _require_file(path, "Video")
    av = _optional_import("av", "av", "Decoding video files")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError("it has no video stream")
            stream = container.streams.video[0]
            decoded = [(float(frame.time or 0.0), frame.to_ndarray(format="rgb24")) for frame in container.decode(stream)]
    except ValueError as error:
        raise ValueError(f"Video file {path!r} could not be decoded: {error}") from error
    except Exception as error:  # av raises its own error classes for corrupt containers
        raise ValueError(f"Video file {path!r} could not be decoded: {error}") from error
    if not decoded:
        raise ValueError(f"Video file {path!r} has 0 frames.")
    times = np.array([t for t, _ in decoded])
    duration = times[-1] - times[0]
    wanted = np.arange(times[0], times[0] + duration + 1e-9, 1.0 / fps) if duration > 0 else np.array([times[0]])
    picks = sorted({int(np.argmin(np.abs(times - t))) for t in wanted})
    if len(picks) > max_frames:
        picks = [picks[i] for i in np.linspace(0, len(picks) - 1, max_frames).round().astype(int)]
    return [decoded[i][1] for i in picks]


@contextlib.contextmanager
def open_pdf(path: str) -> Iterator[Any]:
    """A pypdfium2 document, closed afterwards; a file that is not a readable PDF gives a ValueError."""
    _require_file(path, "PDF")
    pdfium = _optional_import("pypdfium2", "pypdfium2", "Reading PDF pages")
    try:
        document = pdfium.PdfDocument(path)
    except Exception as error:
        raise ValueError(f"PDF file {path!r} could not be opened: {error}") from error
    try:
        yield document
    finally:
        document.close()


def render_pdf_page(path: str, page: int, scale: float) -> Any:
    """Rasterise one page (0-based) of a PDF with pypdfium2 and return a PIL image."""
    with open_pdf(path) as document:
        n_pages = len(document)
        if not 0 <= page < n_pages:
            raise ValueError(f"PDF file {path!r} has {n_pages} pages; page={page} is out of range (0-based).")
        return document[page].render(scale=scale).to_pil().convert("RGB")


def count_pdf_pages(path: str) -> int:
    """Number of pages of a PDF (for expanding a PDF into one input per page)."""
    with open_pdf(path) as document:
        return len(document)
