# Copyright 2026 The Conan-embedding-v3 authors. Licensed under the Apache License, Version 2.0.
"""Decoding of media files for ConanProcessor: audio, video and PDF pages.

Each decoder library is optional and imported on first use (a user who only embeds text and images needs none of
them), with an error that says what to install. No torchaudio/torchvision/torchcodec: none has a CPU build here.
"""

from __future__ import annotations

import contextlib
import importlib
import math
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


# Integer PCM -> float32 in [-1, 1]: divide by the format's full scale (unsigned 8-bit is offset by 128), the same
# convention as libsndfile/soundfile and FFmpeg's libswresample, so every decoder and array path agrees.
PCM_FULL_SCALE = {np.dtype(np.uint8): 128.0, np.dtype(np.int8): 128.0, np.dtype(np.int16): 32768.0,
                  np.dtype(np.int32): 2147483648.0}
AUDIO_DOWNMIX = "mono = arithmetic mean of all channels (every channel weighted 1/C, LFE included)"


def pcm_to_float32(samples: np.ndarray, where: str = "audio") -> np.ndarray:
    """Samples of any accepted dtype as float32 on the [-1, 1] scale, same shape.

    Floating point (float16/32/64) is taken as already on that scale; integer PCM (uint8, int8, int16, int32, what
    `scipy.io.wavfile.read` returns) is divided by its full scale, uint8 after removing its 128 offset. Other dtypes
    (int64, unsigned 16/32-bit, bool, complex) raise a ValueError naming `where`.
    """
    samples = np.asarray(samples)
    if samples.dtype.kind == "f":
        return samples.astype(np.float32, copy=False)
    scale = PCM_FULL_SCALE.get(samples.dtype)
    if scale is None:
        accepted = ", ".join(["float16", "float32", "float64"] + [str(d) for d in PCM_FULL_SCALE])
        raise ValueError(f"{where} has dtype {samples.dtype}; expected one of {accepted}.")
    offset = 128.0 if samples.dtype == np.uint8 else 0.0
    return ((samples.astype(np.float32) - offset) / np.float32(scale)).astype(np.float32)


def load_audio_file(path: str) -> tuple[np.ndarray, int]:
    """Read an audio file as mono float32 in [-1, 1] at its true duration, and its sampling rate.

    soundfile (libsndfile) first; formats it cannot read (AAC, ALAC, audio tracks of .mov/.mp4) go through PyAV
    (FFmpeg). Both return float samples on the [-1, 1] scale for every sample format (u8, s16, s32, flt, dbl,
    planar or packed); channels are downmixed by `AUDIO_DOWNMIX`.
    """
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
    """First audio stream of any FFmpeg-readable file, as mono float32 in [-1, 1].

    Every decoded frame is converted by libswresample to planar float at the stream's own layout and rate (so
    s16/s32/u8/s64, packed or planar, come out as (channels, samples) on one scale, with no resampling or channel
    remixing), then downmixed by `AUDIO_DOWNMIX` like the soundfile path.
    """
    av = _optional_import("av", "av", "Decoding this audio format")
    with av.open(path) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        rate = stream.rate
        converter = av.AudioResampler(format="fltp", layout=stream.layout, rate=rate)
        chunks = []
        for frame in container.decode(stream):
            chunks.extend(converted.to_ndarray().mean(axis=0) for converted in converter.resample(frame))
        chunks.extend(converted.to_ndarray().mean(axis=0) for converted in converter.resample(None))
    if not chunks:
        raise ValueError("no audio frames")
    return np.concatenate(chunks).astype(np.float32), int(rate)


def load_video_file(path: str, fps: float, max_frames: int) -> list[np.ndarray]:
    """Decode a video file with PyAV, sampling at `fps` frames per second, at most `max_frames` (spread uniformly).

    Memory is bounded by the frames kept, not by the video: a first pass reads only packet timestamps (no decoding),
    the frames to keep are chosen from them (for each `1/fps` step the nearest frame), and a second pass decodes and
    converts to RGB only those frames. Returns (H, W, 3) uint8 frames in time order.
    """
    _require_file(path, "Video")
    av = _optional_import("av", "av", "Decoding video files")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError("it has no video stream")
            stream = container.streams.video[0]
            stamps = sorted(packet.pts for packet in container.demux(stream) if packet.pts is not None)
            if not stamps:  # no packet timestamps (rare raw streams): count frames by decoding instead
                container.seek(0)
                stamps = [frame.pts if frame.pts is not None else i for i, frame in enumerate(container.decode(stream))]
            if not stamps:
                raise ValueError("it has 0 frames")
            keep = set(_pick_timestamps(stamps, float(stream.time_base or 1), fps, max_frames))
            container.seek(0)
            frames = []
            for i, frame in enumerate(container.decode(stream)):
                if (frame.pts if frame.pts is not None else i) in keep:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    keep.discard(frame.pts if frame.pts is not None else i)
                    if not keep:
                        break
    except Exception as error:  # av raises its own error classes for corrupt containers
        raise ValueError(f"Video file {path!r} could not be decoded: {error}") from error
    if not frames:
        raise ValueError(f"Video file {path!r} has 0 decodable frames.")
    return frames


def _pick_timestamps(stamps: list[int], time_base: float, fps: float, max_frames: int) -> list[int]:
    """Timestamps (in `time_base` units) of the frames to keep: nearest frame to each `1/fps` step from the first
    frame to the last, at most `max_frames` of them spread uniformly."""
    times = np.array(stamps, dtype=np.float64) * time_base
    duration = times[-1] - times[0]
    wanted = np.arange(times[0], times[0] + duration + 1e-9, 1.0 / fps) if duration > 0 else np.array([times[0]])
    picks = sorted({int(np.argmin(np.abs(times - t))) for t in wanted})
    if len(picks) > max_frames:
        picks = [picks[i] for i in np.linspace(0, len(picks) - 1, max_frames).round().astype(int)]
    return [stamps[i] for i in picks]


# ------------------------------------------------------------------------------------------------ images and frames
# PIL modes whose pixels have a defined range, and how they become 8-bit RGB. 16-bit grayscale (16-bit PNG/TIFF open
# as "I;16") is scaled by 255/65535; PIL's own convert("RGB") would clip it at 255. Transparent modes are composited
# over white. 32-bit "I" and float "F" images have no defined range and are refused.
IMAGE_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA", "RGBA", "RGBa",
               "I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("LA", "PA", "RGBA", "RGBa")
FRAME_DTYPES = ("uint8 (0..255)", "uint16 (0..65535)", "float16/float32/float64 (0..1)")


MAX_ASPECT_RATIO = 200  # Qwen2-VL's smart_resize refuses longer/shorter side ratios above this


def check_image_size(width: int, height: int, where: str = "image") -> None:
    """Raise a ValueError naming `where` for an empty image or one past `MAX_ASPECT_RATIO` (long side / short side),
    before the image processor fails on it with no input named."""
    if width == 0 or height == 0:
        raise ValueError(f"{where} is an image of {width}x{height} pixels; expected a non-empty image.")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"{where} is an image of {width}x{height} pixels, aspect ratio {ratio:.1f}; the vision encoder accepts at "
            f"most {MAX_ASPECT_RATIO}:1 (long side / short side). Crop it, pad it, or split it into tiles."
        )


def image_to_rgb(image: Any, where: str = "image") -> Any:
    """A PIL image of any mode in `IMAGE_MODES` as 8-bit RGB; other modes raise a ValueError naming `where`."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        wide = np.asarray(image, dtype=np.float32)  # PIL reads every I;16 byte order to native uint16 values
        return Image.fromarray(np.round(wide * (255.0 / 65535.0)).astype(np.uint8)).convert("RGB")
    if image.mode not in IMAGE_MODES:
        raise ValueError(
            f"{where} is a PIL image of mode {image.mode!r}; accepted modes are {IMAGE_MODES} (mode 'I' and 'F' pixels "
            "have no defined range: convert to 'L', 'I;16' or 'RGB' first)."
        )
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_image_file(path: str, where: str = "image") -> Any:
    """Open an image file as upright 8-bit RGB: EXIF Orientation applied (`ImageOps.exif_transpose`, as camera apps
    and browsers display it), then `image_to_rgb`. Raises ValueError naming `where` for unreadable files."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            opened.load()
            upright = ImageOps.exif_transpose(opened)
    except Exception as error:
        raise ValueError(f"{where}: image file {path!r} could not be read: {error}") from error
    return image_to_rgb(upright, where)


def frame_to_uint8(frame: np.ndarray, where: str = "frame") -> np.ndarray:
    """One (H, W, 3) video frame as uint8 RGB: uint8 as is, uint16 scaled by 255/65535, floats read as 0..1.

    Float frames outside [0, 1] (e.g. 0..255 floats) and other dtypes raise a ValueError naming `where`; a silent
    clip would turn 0..1 floats black and 0..255 floats white.
    """
    if frame.dtype == np.uint8:
        return frame
    if frame.dtype == np.uint16:
        return np.round(frame.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    if frame.dtype.kind == "f":
        lo, hi = (float(frame.min()), float(frame.max())) if frame.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
            raise ValueError(
                f"{where} is {frame.dtype} with values in [{lo:g}, {hi:g}]; float frames must lie in [0, 1] "
                "(pass 0..255 pixels as uint8)."
            )
        return np.round(frame.astype(np.float32) * 255.0).astype(np.uint8)
    raise ValueError(f"{where} has dtype {frame.dtype}; accepted frame dtypes are {FRAME_DTYPES}.")


@contextlib.contextmanager
def open_pdf(path: str) -> Iterator[Any]:
    """A pypdfium2 document, closed afterwards; a file that is not a readable PDF gives a ValueError."""
    _require_file(path, "PDF")
    pdfium = _optional_import("pypdfium2", "pypdfium2", "Reading PDF pages")
    try:
        document = pdfium.PdfDocument(path)
    except Exception as error:
        # PDFium's error code is process-global and only set on some failures: a 0-page file is refused with the
        # code of whatever failed before (or "Success"), so it is reported as a hint, not as the cause.
        raise ValueError(
            f"PDF file {path!r} could not be opened: it is damaged, password-protected or has no pages "
            f"(PDFium's last error: {error}; it can be left over from an earlier file)"
        ) from error
    try:
        yield document
    finally:
        document.close()


def render_pdf_page(path: str, page: int, scale: float, max_pixels: int | None = None) -> Any:
    """Rasterise one page (0-based) of a PDF with pypdfium2 and return an RGB PIL image.

    `scale` is pixels per PDF point (2.0 = 144 dpi); with `max_pixels`, the scale is lowered from the page size so the
    bitmap holds at most about that many pixels (a 100x100 inch poster page is not rendered at 14400x14400 px only to
    be shrunk afterwards).
    """
    with open_pdf(path) as document:
        n_pages = len(document)
        if not 0 <= page < n_pages:
            raise ValueError(f"PDF file {path!r} has {n_pages} pages; page={page} is out of range (0-based).")
        pdf_page = document[page]
        width, height = pdf_page.get_size()
        if max_pixels is not None and width * height * scale * scale > max_pixels:
            scale = math.sqrt(max_pixels / (width * height))
        return pdf_page.render(scale=scale).to_pil().convert("RGB")


def count_pdf_pages(path: str) -> int:
    """Number of pages of a PDF (for expanding a PDF into one input per page)."""
    with open_pdf(path) as document:
        return len(document)
