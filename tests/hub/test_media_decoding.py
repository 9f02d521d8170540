"""Table-driven decoding checks: every accepted sample/pixel format against a float reference (issue 13).

Each grid row is one format; adding a format is adding a row. Fixtures are written at test time with soundfile,
PyAV and PIL (no ffmpeg CLI), a fraction of a second each.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from training.common import hub_code

media = hub_code.load("media_conan")
RATE = 16000
N = 4000  # 0.25 s


def reference_channels(n_channels: int, n: int = N, rate: int = RATE) -> np.ndarray:
    """(channels, samples) float64 tones, a different frequency and sign per channel, peak 0.5."""
    t = np.arange(n) / rate
    return np.stack([0.5 * (-1) ** c * np.sin(2 * np.pi * (220 + 110 * c) * t) for c in range(n_channels)])


def downmix(channels: np.ndarray) -> np.ndarray:
    return channels.mean(axis=0)  # the documented downmix: every channel weighted 1/C


# ------------------------------------------------------------------------------------------------ audio: soundfile
# (extension, soundfile subtype, channels, tolerance = the format's quantisation step)
SOUNDFILE_GRID = [
    ("wav", "PCM_U8", 1, 1 / 64), ("wav", "PCM_16", 2, 1e-4), ("wav", "PCM_24", 1, 1e-4),
    ("wav", "PCM_32", 6, 1e-4), ("wav", "FLOAT", 2, 1e-6), ("wav", "DOUBLE", 6, 1e-6),
    ("flac", "PCM_16", 6, 1e-4), ("flac", "PCM_24", 2, 1e-4),
]


@pytest.mark.parametrize("ext, subtype, channels, tol", SOUNDFILE_GRID)
def test_soundfile_formats_match_float_reference(tmp_path, ext, subtype, channels, tol):
    import soundfile

    ref = reference_channels(channels)
    path = tmp_path / f"tone.{ext}"
    soundfile.write(path, ref.T, RATE, subtype=subtype)
    samples, rate = media.load_audio_file(str(path))
    assert rate == RATE and samples.dtype == np.float32 and samples.shape == (N,)
    np.testing.assert_allclose(samples, downmix(ref), atol=tol)


# ------------------------------------------------------------------------------------------------ audio: PyAV
# (container format, extension, codec, encoder sample format, layout, tolerance). soundfile cannot read any of these,
# so each goes through the PyAV fallback.
PYAV_GRID = [
    ("mov", "mov", "pcm_u8", "u8", "mono", 1 / 64),
    ("mov", "mov", "pcm_s16le", "s16", "stereo", 1e-4),
    ("mov", "mov", "pcm_s16le", "s16", "5.1", 1e-4),
    ("mov", "mov", "pcm_s32le", "s32", "stereo", 1e-6),
    ("mov", "mov", "pcm_f32le", "flt", "5.1", 1e-6),
    ("mov", "mov", "pcm_f64le", "dbl", "mono", 1e-6),
    ("ipod", "m4a", "alac", "s16p", "mono", 1e-4),
    ("ipod", "m4a", "alac", "s16p", "stereo", 1e-4),
    ("ipod", "m4a", "alac", "s32p", "5.1", 1e-6),
]


def write_with_av(path, container_format: str, codec: str, sample_format: str, layout: str,
                  channels: np.ndarray, rate: int = RATE, video: bool = False) -> None:
    """Encode (channels, samples) floats with PyAV; `video` adds a short video stream first (a camera .mov)."""
    import av

    with av.open(str(path), "w", format=container_format) as container:
        if video:
            vstream = container.add_stream("mpeg4", rate=4)
            vstream.width, vstream.height, vstream.pix_fmt = 32, 32, "yuv420p"
        stream = container.add_stream(codec, rate=rate, layout=layout)
        stream.format = sample_format
        if video:
            for i in range(2):
                frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 60 * i, np.uint8), format="rgb24")
                for packet in vstream.encode(frame):
                    container.mux(packet)
            for packet in vstream.encode():
                container.mux(packet)
        frame = av.AudioFrame.from_ndarray(channels.astype(np.float32), format="fltp", layout=layout)
        frame.rate = rate
        converter = av.AudioResampler(format=sample_format, layout=layout, rate=rate)
        for converted in converter.resample(frame) + converter.resample(None):
            for packet in stream.encode(converted):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize("fmt, ext, codec, sample_format, layout, tol", PYAV_GRID)
def test_pyav_formats_match_float_reference(tmp_path, fmt, ext, codec, sample_format, layout, tol):
    pytest.importorskip("av")
    import av

    ref = reference_channels(av.AudioLayout(layout).nb_channels)
    path = tmp_path / f"tone.{ext}"
    write_with_av(path, fmt, codec, sample_format, layout, ref)
    samples, rate = media.load_audio_file(str(path))
    assert rate == RATE and samples.dtype == np.float32
    assert samples.shape == (N,), f"{sample_format}/{layout}: {samples.shape[0]} samples for {N} (true duration)"
    np.testing.assert_allclose(samples, downmix(ref), atol=tol)


def test_camera_mov_soundtrack_is_read_at_scale_and_duration(tmp_path, tiny_model_and_processor):
    """A .mov with a video stream and 48 kHz stereo pcm_s16le audio: one file gives both the video and the audio."""
    pytest.importorskip("av")
    _, processor = tiny_model_and_processor
    ref = reference_channels(2, n=48000 // 2, rate=48000)
    path = tmp_path / "clip.mov"
    write_with_av(path, "mov", "pcm_s16le", "s16", "stereo", ref, rate=48000, video=True)
    samples, rate = media.load_audio_file(str(path))
    assert rate == 48000 and samples.shape == (24000,)
    assert 0.2 < np.abs(samples).max() <= 1.0
    batch = processor.prepare([{"video": str(path), "audio": str(path)}], return_tensors="np")
    assert batch["video_grid_thw"].shape[0] == 1 and batch["audio_feature_lengths"].tolist() == [50]  # 0.5 s


# ------------------------------------------------------------------------------------------------ audio: arrays
# (dtype, how the float reference is stored in it): what scipy.io.wavfile.read, soundfile and torch hand over.
ARRAY_GRID = [
    ("float32", lambda x: x.astype(np.float32), 1e-7),
    ("float64", lambda x: x, 1e-7),
    ("float16", lambda x: x.astype(np.float16), 1e-3),
    ("int16", lambda x: np.round(x * 32767).astype(np.int16), 1e-4),
    ("int32", lambda x: np.round(x * 2147483647).astype(np.int32), 1e-7),
    ("int8", lambda x: np.round(x * 127).astype(np.int8), 1 / 64),
    ("uint8", lambda x: np.round(x * 127 + 128).astype(np.uint8), 1 / 64),
]


@pytest.mark.parametrize("dtype, store, tol", ARRAY_GRID, ids=[row[0] for row in ARRAY_GRID])
def test_audio_arrays_are_scaled_by_dtype(dtype, store, tol):
    ref = downmix(reference_channels(1))
    np.testing.assert_allclose(media.pcm_to_float32(store(ref)), ref, atol=tol)


def test_int16_array_gives_the_float_features(tiny_model_and_processor):
    """The scipy.io.wavfile case: an int16 array must give the log-mel features of its float twin."""
    _, processor = tiny_model_and_processor
    ref = downmix(reference_channels(1)).astype(np.float32)
    pcm = np.round(ref * 32767).astype(np.int16)
    features = [processor.prepare([{"audio": {"array": x, "sampling_rate": RATE}}], return_tensors="np")
                ["input_features"] for x in (ref, pcm)]
    assert np.abs(features[0] - features[1]).max() < 0.01


@pytest.mark.parametrize("bad", [np.zeros(8, np.int64), np.zeros(8, np.uint16), np.zeros(8, bool)])
def test_unaccepted_audio_dtypes_fail_clearly(tiny_model_and_processor, bad):
    _, processor = tiny_model_and_processor
    with pytest.raises(ValueError, match=rf"inputs\[1\]\['audio'\]\['array'\] has dtype {bad.dtype}; expected"):
        processor.prepare(["fine", {"audio": {"array": bad, "sampling_rate": RATE}}])


# ------------------------------------------------------------------------------------------------ images: PIL modes
def reference_rgb(height: int = 12, width: int = 16) -> np.ndarray:
    """(H, W, 3) float64 RGB in [0, 1]: smooth ramps, so each mode's quantisation stays small."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x / (width - 1), y / (height - 1), 0.5 * np.ones_like(x, dtype=float)], axis=-1)


def _gray(ref: np.ndarray) -> np.ndarray:
    return np.repeat((ref @ np.array([0.299, 0.587, 0.114]))[..., None], 3, axis=-1)


def _rgb8(ref: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(ref * 255).astype(np.uint8), "RGB")


def _with_alpha(mode: str):
    def make(ref):
        rgba = np.concatenate([np.round(ref * 255), np.full(ref.shape[:2] + (1,), 255.0)], axis=-1)
        rgba[0, 0, 3] = 0  # one transparent pixel: composited over white
        return Image.fromarray(rgba.astype(np.uint8), "RGBA").convert(mode)
    return make


def _expect_white_corner(expected: np.ndarray) -> np.ndarray:
    out = expected.copy()
    out[0, 0] = 1.0
    return out


# (mode, make the image from the float reference, the expected float RGB, tolerance in 0..1)
IMAGE_GRID = [
    ("RGB", _rgb8, lambda r: r, 1 / 255),
    ("L", lambda r: _rgb8(r).convert("L"), _gray, 2 / 255),
    ("P", lambda r: _rgb8(r).convert("P", palette=Image.Palette.ADAPTIVE, colors=256), lambda r: r, 12 / 255),
    ("1", lambda r: _rgb8(r).convert("L").point(lambda v: 255 if v > 127 else 0).convert("1"),
     lambda r: (_gray(r) > 127.5 / 255).astype(float), 0.0),
    ("CMYK", lambda r: _rgb8(r).convert("CMYK"), lambda r: r, 1 / 255),
    ("YCbCr", lambda r: _rgb8(r).convert("YCbCr"), lambda r: r, 4 / 255),
    ("RGBA", _with_alpha("RGBA"), lambda r: _expect_white_corner(r), 1 / 255),
    ("LA", _with_alpha("LA"), lambda r: _expect_white_corner(_gray(r)), 2 / 255),
    ("I;16", lambda r: Image.fromarray(np.round(_gray(r)[..., 0] * 65535).astype(np.uint16)), _gray,
     1 / 255),
]


@pytest.mark.parametrize("mode, make, expected, tol", IMAGE_GRID, ids=[row[0] for row in IMAGE_GRID])
def test_pil_modes_match_float_reference(mode, make, expected, tol):
    ref = reference_rgb()
    image = make(ref)
    assert image.mode == mode
    rgb = media.image_to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    np.testing.assert_allclose(np.asarray(rgb) / 255.0, expected(ref), atol=tol + 1e-9)


def test_sixteen_bit_png_file_keeps_its_range(tmp_path):
    ref = reference_rgb()
    path = tmp_path / "gray16.png"
    Image.fromarray(np.round(_gray(ref)[..., 0] * 65535).astype(np.uint16)).save(path)
    rgb = media.open_image_file(str(path))
    np.testing.assert_allclose(np.asarray(rgb) / 255.0, _gray(ref), atol=1 / 255 + 1e-9)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_unaccepted_pil_modes_fail_clearly(tiny_model_and_processor, mode):
    _, processor = tiny_model_and_processor
    image = Image.new("L", (8, 8), 100).convert(mode)
    with pytest.raises(ValueError, match=rf"inputs\[1\]\['image'\] is a PIL image of mode '{mode}'; accepted modes"):
        processor.prepare(["fine", {"image": image}])


# ------------------------------------------------------------------------------------------------ images: orientation
@pytest.mark.parametrize("orientation, transpose", [
    (1, None), (3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90),
])
def test_exif_orientation_is_applied_to_opened_files(tmp_path, tiny_model_and_processor, orientation, transpose):
    """A phone JPEG stores the sensor's pixels plus an Orientation tag; the package must see the upright picture."""
    _, processor = tiny_model_and_processor
    upright = _rgb8(reference_rgb(24, 40))
    stored = upright if transpose is None else upright.transpose(
        {Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270,
         Image.Transpose.ROTATE_180: Image.Transpose.ROTATE_180}[transpose])
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"phone_{orientation}.png"
    stored.save(path, exif=exif)
    loaded = media.open_image_file(str(path))
    assert loaded.size == upright.size
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(upright))
    with_file = processor.prepare([str(path)], return_tensors="np")
    with_upright = processor.prepare([upright], return_tensors="np")
    np.testing.assert_array_equal(with_file["image_grid_thw"], with_upright["image_grid_thw"])
    np.testing.assert_allclose(with_file["pixel_values"], with_upright["pixel_values"], atol=1e-6)


# ------------------------------------------------------------------------------------------------ video frames
# (dtype, store the float reference in it, tolerance in 0..1)
FRAME_GRID = [
    ("uint8", lambda r: np.round(r * 255).astype(np.uint8), 0.0),
    ("uint16", lambda r: np.round(r * 65535).astype(np.uint16), 1 / 255),
    ("float32", lambda r: r.astype(np.float32), 1 / 255),
    ("float64", lambda r: r, 1 / 255),
    ("float16", lambda r: r.astype(np.float16), 1 / 255),
]


@pytest.mark.parametrize("dtype, store, tol", FRAME_GRID, ids=[row[0] for row in FRAME_GRID])
def test_video_frame_dtypes_match_float_reference(tiny_model_and_processor, dtype, store, tol):
    _, processor = tiny_model_and_processor
    ref = np.stack([reference_rgb(), 1 - reference_rgb()])
    frames = processor.parse_input({"video": store(ref)}, 0)[0].video
    assert all(f.dtype == np.uint8 for f in frames)
    np.testing.assert_allclose(np.stack(frames) / 255.0, ref, atol=tol + 1 / 510)


@pytest.mark.parametrize("bad, match", [
    (np.full((2, 8, 8, 3), 200.0, np.float32), r"float32 with values in \[200, 200\]; float frames must lie in"),
    (np.zeros((2, 8, 8, 3), np.int64), "dtype int64; accepted frame dtypes"),
])
def test_unaccepted_frames_fail_clearly(tiny_model_and_processor, bad, match):
    _, processor = tiny_model_and_processor
    with pytest.raises(ValueError, match=rf"inputs\[1\]\['video'\] frame 0 .*{match}"):
        processor.prepare(["fine", {"video": bad}])


# (container, codec, pixel format): decoded by PyAV's swscale to rgb24, so bit depth and chroma layout do not matter.
VIDEO_FILE_GRID = [("mp4", "mpeg4", "yuv420p", 12 / 255), ("mkv", "ffv1", "yuv444p10le", 3 / 255),
                   ("mov", "png", "rgb48be", 1 / 255), ("mov", "png", "rgb24", 0.0)]


@pytest.mark.parametrize("ext, codec, pix_fmt, tol", VIDEO_FILE_GRID, ids=[f"{r[1]}-{r[2]}" for r in VIDEO_FILE_GRID])
def test_video_file_pixel_formats_match_reference(tmp_path, ext, codec, pix_fmt, tol):
    av = pytest.importorskip("av")
    ref = np.round(reference_rgb(32, 48) * 255).astype(np.uint8)
    path = tmp_path / f"clip.{ext}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=2)
        stream.width, stream.height, stream.pix_fmt = 48, 32, pix_fmt
        for _ in range(2):
            frame = av.VideoFrame.from_ndarray(ref, format="rgb24").reformat(format=pix_fmt)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frames = media.load_video_file(str(path), fps=2.0, max_frames=4)
    assert len(frames) == 2 and frames[0].dtype == np.uint8 and frames[0].shape == ref.shape
    assert np.abs(frames[0].astype(int) - ref).mean() <= tol * 255 / 2 + 1e-9


def test_hf_call_scales_video_frames_like_prepare(tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    ref = np.stack([reference_rgb(), 1 - reference_rgb()])
    text = ["<|vision_start|><|video_pad|><|vision_end|>a clip"]
    as_uint8 = processor(text=text, videos=[np.round(ref * 255).astype(np.uint8)], return_tensors="np")
    as_float = processor(text=text, videos=[ref.astype(np.float32)], return_tensors="np")
    np.testing.assert_allclose(as_float["pixel_values_videos"], as_uint8["pixel_values_videos"], atol=1e-6)
    with pytest.raises(ValueError, match=r"videos\[0\] frame 0 has dtype int64"):
        processor(text=text, videos=[np.zeros((2, 8, 8, 3), np.int64)])
