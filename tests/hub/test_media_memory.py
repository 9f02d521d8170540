"""Memory bounded by the output, not the input (issue 13, kind 3).

Each check runs in a fresh subprocess and reads its own VmHWM (peak RSS, bench/procfs.py) before and after one
`prepare` call: pytest's own high-water mark is already raised by earlier tests. The bounds are generous correctness
bounds (several times what is kept, far below what decoding the whole input costs), not performance targets; timings
live in bench/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
PROBE = r"""
import json, sys
sys.path.insert(0, {repo!r})
from bench.procfs import status_kb
from transformers import AutoProcessor
processor = AutoProcessor.from_pretrained({tiny!r}, trust_remote_code=True)
processor.prepare([{warmup!r}], return_tensors="np")  # codecs, pdfium and the image processor loaded and warm
before = status_kb("VmHWM")
batch = processor.prepare([{item!r}], return_tensors="np")
after = status_kb("VmHWM")
print(json.dumps({{"growth_mb": (after - before) / 1024, "shapes": {{k: list(v.shape) for k, v in batch.items()}}}}))
"""


def _peak_growth(tiny_repo: Path, warmup: dict, item: dict) -> dict:
    if not Path("/proc/self/status").exists():
        pytest.skip("VmHWM needs Linux /proc")
    code = PROBE.format(repo=str(REPO), tiny=str(tiny_repo), warmup=warmup, item=item)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_video(path: Path, seconds: float, fps: int, width: int, height: int) -> None:
    """A moving gradient (compresses well, so the file is small while every decoded frame is full size)."""
    av = pytest.importorskip("av")
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) * 127 // (width + height))], -1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = np.roll(base, 4 * i, axis=1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_long_video_keeps_only_the_sampled_frames(tiny_repo, tmp_path):
    """30 s of 480p at 15 fps: 450 decoded frames would be ~550 MB; the processor keeps video_max_frames (8)."""
    clip, small = tmp_path / "long.mp4", tmp_path / "small.mp4"
    write_video(clip, seconds=30, fps=15, width=854, height=480)
    write_video(small, seconds=1, fps=4, width=64, height=48)
    report = _peak_growth(tiny_repo, {"video": str(small)}, {"video": str(clip)})
    assert report["shapes"]["video_grid_thw"] == [1, 3]
    assert report["growth_mb"] < 150, report


def test_huge_pdf_page_is_rendered_near_the_pixel_cap(tiny_repo, tmp_path):
    """A 100x100 inch page at 144 dpi would be 14400x14400 px (~0.8 GB as RGBA); it is rendered near the cap."""
    pytest.importorskip("pypdfium2")
    poster, letter = tmp_path / "poster.pdf", tmp_path / "letter.pdf"
    Image.new("RGB", (100, 100), (200, 30, 30)).save(poster, resolution=1.0)  # 100 px at 1 dpi = 100 inches
    Image.new("RGB", (85, 110), (30, 200, 30)).save(letter, resolution=10.0)
    report = _peak_growth(tiny_repo, {"document": str(letter)}, {"document": str(poster)})
    assert report["shapes"]["image_grid_thw"][0] == 1
    assert report["growth_mb"] < 150, report


def test_render_scale_follows_the_page_size(tmp_path):
    pytest.importorskip("pypdfium2")
    from training.common import hub_code

    media = hub_code.load("media_conan")
    poster, letter = tmp_path / "poster.pdf", tmp_path / "letter.pdf"
    Image.new("RGB", (100, 100), (200, 30, 30)).save(poster, resolution=1.0)
    Image.new("RGB", (85, 110), (30, 200, 30)).save(letter, resolution=10.0)  # 8.5 x 11 in
    big = media.render_pdf_page(str(poster), 0, 2.0, max_pixels=1_000_000)
    assert 0.9e6 < big.width * big.height <= 1_000_000
    assert np.abs(np.asarray(big.getpixel((10, 10))) - (200, 30, 30)).max() <= 4  # the page's (JPEG) colour
    normal = media.render_pdf_page(str(letter), 0, 2.0, max_pixels=4_000_000)
    assert normal.size == (1224, 1584)  # 612x792 pt at scale 2: untouched below the cap
