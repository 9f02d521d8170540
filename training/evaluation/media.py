"""Turn audio/video objects as mteb and datasets hand them over into the user input format.

Why here and not mteb's collators: ``AudioCollator`` resamples with torchaudio, which has no CPU wheel next to the
CPU torch. scipy's polyphase resampler works in both venvs. Accepted forms:
audio: torchcodec ``AudioDecoder`` (has ``get_all_samples``), ``{"array", "sampling_rate"}`` dicts (lists or
arrays, any channel layout), ``{"bytes"|"path"}`` dicts, file paths; video: torchcodec ``VideoDecoder``,
(T,C,H,W) torch tensors, (T,H,W,C) arrays, lists of PIL frames, ``{"bytes"|"path"}`` dicts, file paths.
"""

from __future__ import annotations

import io
from fractions import Fraction
from typing import Any

import numpy as np

TARGET_SR = 16_000
DEFAULT_FRAMES = 8


def resample(wave: np.ndarray, sr: int, target_sr: int = TARGET_SR) -> np.ndarray:
    """Polyphase resampling of a 1-D signal (no-op when the rates match)."""
    if sr <= 0:
        raise ValueError(f"resample: sampling rate must be positive, got {sr}")
    if sr == target_sr:
        return wave.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    frac = Fraction(target_sr, sr)
    return resample_poly(wave, frac.numerator, frac.denominator).astype(np.float32)


def _mono(arr: np.ndarray) -> np.ndarray:
    from training.common import hub_code  # integer PCM (scipy.io.wavfile) -> [-1, 1] by the package's own rule

    arr = hub_code.load("media_conan").pcm_to_float32(arr, "audio array")
    if arr.ndim == 1:
        return arr
    if arr.ndim == 2:  # (channels, samples) as torchcodec/mteb give it, or (samples, channels) from soundfile
        axis = 0 if arr.shape[0] <= arr.shape[1] else 1
        return arr.mean(axis=axis)
    raise ValueError(f"audio array must be 1-D or 2-D, got shape {arr.shape}")


def to_audio_item(a: Any, target_sr: int = TARGET_SR, allow_empty: bool = False) -> dict[str, Any] | None:
    """Decode one audio object to ``{"array": mono float32, "sampling_rate": target_sr}``; a clip of 0 samples
    raises a ValueError, or gives None with ``allow_empty``."""
    if hasattr(a, "get_all_samples"):  # torchcodec AudioDecoder (datasets >= 4 with torchcodec)
        s = a.get_all_samples()
        wave, sr = _mono(s.data.detach().cpu().numpy()), int(s.sample_rate)
    elif isinstance(a, dict) and a.get("array") is not None:
        if a.get("sampling_rate") is None:
            raise ValueError("audio dict has 'array' but no 'sampling_rate'")
        wave, sr = _mono(np.asarray(a["array"])), int(a["sampling_rate"])
    elif isinstance(a, dict) and (a.get("bytes") or a.get("path")):
        import soundfile as sf

        src = io.BytesIO(a["bytes"]) if a.get("bytes") else a["path"]
        data, sr = sf.read(src, dtype="float32", always_2d=False)
        wave = _mono(data)
    elif isinstance(a, str):
        import soundfile as sf

        data, sr = sf.read(a, dtype="float32", always_2d=False)
        wave = _mono(data)
    else:
        raise TypeError(f"cannot read audio from {type(a).__name__}; expected a torchcodec AudioDecoder, a dict with "
                        "'array'+'sampling_rate' or 'bytes'/'path', or a file path")
    if wave.size == 0:
        if allow_empty:
            return None
        raise ValueError("audio clip has no samples")
    return {"array": resample(wave, sr, target_sr), "sampling_rate": target_sr}


def _even(n: int, k: int) -> list[int]:
    if n <= 0:
        raise ValueError("video has no frames")
    if n <= k:
        return list(range(n))
    return [int(i) for i in np.linspace(0, n - 1, k).round()]


def _decode_with_av(src: Any, num_frames: int) -> np.ndarray:
    import av

    with av.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    if not frames:
        raise ValueError("video file has no decodable frames")
    return np.stack([frames[i] for i in _even(len(frames), num_frames)])


def to_video_frames(v: Any, num_frames: int = DEFAULT_FRAMES) -> np.ndarray:
    """Decode one video object to at most ``num_frames`` evenly spaced (T,H,W,C) uint8 frames."""
    if hasattr(v, "get_frames_at") and hasattr(v, "metadata"):  # torchcodec VideoDecoder
        n = int(v.metadata.num_frames or len(v))
        data = v.get_frames_at(_even(n, num_frames)).data  # (T,C,H,W)
        return data.permute(0, 2, 3, 1).contiguous().cpu().numpy().astype(np.uint8)
    if hasattr(v, "permute") and hasattr(v, "numpy"):  # torch tensor from mteb's FramesCollator: (T,C,H,W)
        arr = v.detach().cpu()
        if arr.ndim != 4:
            raise ValueError(f"video tensor must be 4-D, got shape {tuple(arr.shape)}")
        arr = arr.permute(0, 2, 3, 1).numpy() if arr.shape[1] in (1, 3) else arr.numpy()
        return arr[_even(arr.shape[0], num_frames)].astype(np.uint8)
    if isinstance(v, np.ndarray):
        if v.ndim != 4:
            raise ValueError(f"video array must be (T,H,W,C), got shape {v.shape}")
        return v[_even(v.shape[0], num_frames)].astype(np.uint8)
    if isinstance(v, list) and v and hasattr(v[0], "convert"):
        return np.stack([np.asarray(v[i].convert("RGB")) for i in _even(len(v), num_frames)])
    if isinstance(v, dict) and (v.get("bytes") or v.get("path")):
        return _decode_with_av(v.get("bytes") or v["path"], num_frames)
    if isinstance(v, str):
        return _decode_with_av(v, num_frames)
    raise TypeError(f"cannot read video from {type(v).__name__}; expected a torchcodec VideoDecoder, a (T,C,H,W) "
                    "tensor, a (T,H,W,C) array, PIL frames, a dict with 'bytes'/'path', or a file path")


def batch_to_inputs(batch: dict[str, Any], *, num_frames: int = DEFAULT_FRAMES,
                    target_sr: int = TARGET_SR) -> list[Any | None]:
    """Split one mteb batch into user inputs (str, PIL image, or dict mixing text/image/audio/video).

    Blank text and 0-sample audio are no content; a row left with no content at all is ``None`` (the row count is
    kept: the encoder gives such rows its defined empty-row embedding)."""
    cols = {k: batch[k] for k in ("text", "image", "audio", "video") if k in batch and batch[k] is not None}
    if not cols:
        raise ValueError(f"mteb batch carries none of text/image/audio/video (keys: {sorted(batch)})")
    lens = {k: len(v) for k, v in cols.items()}
    if len(set(lens.values())) != 1:
        raise ValueError(f"mteb batch columns differ in length: {lens}")
    out: list[Any] = []
    for i in range(next(iter(lens.values()))):
        item: dict[str, Any] = {}
        text = cols["text"][i] if "text" in cols else None
        if text is not None and str(text).strip():
            item["text"] = str(text)
        if "image" in cols and cols["image"][i] is not None:
            img = cols["image"][i]
            item["image"] = img.convert("RGB") if hasattr(img, "convert") and img.mode != "RGB" else img
        if "audio" in cols and cols["audio"][i] is not None:
            audio = to_audio_item(cols["audio"][i], target_sr, allow_empty=True)
            if audio is not None:
                item["audio"] = audio
        if "video" in cols and cols["video"][i] is not None:
            item["video"] = to_video_frames(cols["video"][i], num_frames)
        if not item:
            out.append(None)  # mteb sends blank titles/texts and 0-sample clips; the row count is kept
            continue
        out.append(item["text"] if list(item) == ["text"] else (item["image"] if list(item) == ["image"] else item))
    return out
