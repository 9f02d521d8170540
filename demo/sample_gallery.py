"""A small mixed-media sample gallery: three coloured images, a tone, a short video, a two-page PDF and a text note.

    python -m demo.sample_gallery --out runs/gallery

The README's index and demo commands use it; the tests build it in a temporary folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}


def colour_image(name: str, size: tuple[int, int] = (96, 72)) -> Image.Image:
    image = Image.new("RGB", size, COLOURS[name])
    draw = ImageDraw.Draw(image)
    draw.text((8, 8), name.upper(), fill="white")
    draw.rectangle([size[0] // 2, size[1] // 2, size[0] - 8, size[1] - 8], outline="white", width=3)
    return image


def make_gallery(folder: Path, video: bool = True, decoys: bool = False) -> Path:
    """Write the gallery into `folder` (created); returns it. Files: 3 PNGs (one in a subfolder), tone.wav,
    clip.mp4 (if `video`; needs PyAV), pages.pdf (2 pages), note.txt; with `decoys` also a README.json and a hidden
    .hidden.png that an index must skip."""
    import soundfile

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    colour_image("red").save(folder / "red.png")
    colour_image("green").save(folder / "green.png")
    colour_image("blue").save(folder / "sub" / "blue.png")
    t = np.arange(8000) / 8000
    soundfile.write(folder / "tone.wav", (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 8000)
    page = colour_image("blue", (120, 160))
    page.save(folder / "pages.pdf", save_all=True, append_images=[colour_image("green", (120, 160))])
    (folder / "note.txt").write_text("A short note about red squares and green circles.\n")
    if decoys:
        (folder / "README.json").write_text("{}")  # not an embeddable type: skipped
        (folder / ".hidden.png").write_bytes(b"")  # hidden: skipped
    if video:
        import av

        with av.open(str(folder / "clip.mp4"), "w") as container:
            stream = container.add_stream("mpeg4", rate=4)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            for i in range(6):
                frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, dtype=np.uint8), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
    return folder


EXPECTED_IDS = ["clip.mp4", "green.png", "note.txt", "pages.pdf#page=0", "pages.pdf#page=1", "red.png",
                "sub/blue.png", "tone.wav"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo.sample_gallery", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the gallery into (created)")
    out = make_gallery(Path(parser.parse_args(argv).out))
    print(f"wrote {len(EXPECTED_IDS) - 1} files ({len(EXPECTED_IDS)} index records) to {out}")


if __name__ == "__main__":
    main()
