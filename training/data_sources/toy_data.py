"""Write small real training sets in the JSONL pair format from ../shared data (train split only).

    python -m training.data_sources.toy_data --modality audio --out runs/data/audio
    python -m training.data_sources.toy_data --modality all --out runs/data

audio:    FSDD recording -> "the digit seven" (hard negative: another digit), FSDD index 10-49 (training/common/splits.py)
image:    CIFAR-10 photo -> "a photo of a cat" and the reverse text -> photo (two sources), JPEGs 0-699 per class
video:    a CIFAR-10 photo panned over 4 frames (generated MP4) <- "a video of a cat"
document: a rendered page (title + photo) <- "a page about cats"
text:     the first docstring line of a Python standard-library function -> its signature (split_of("pydoc:..."))
Media paths in the JSONL are relative to the file, as the format requires; shared files are referenced, not copied.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from training.common.modalities import MODALITIES
from training.common.splits import cifar_split, fsdd_split, split_of

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _rel(path: Path, out_dir: Path) -> str:
    return os.path.relpath(path, out_dir)


def _write(rows: list[dict], out_file: Path) -> Path:
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out_file)
    return out_file


def _need(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is absent (real data lives in ../shared next to the repo)")
    return path


def fsdd_rows(out_dir: Path, split: str = "train", limit: int | None = None, seed: int = 0) -> list[dict]:
    """Audio -> digit text pairs; the hard negative is the text of a random other digit."""
    rng = np.random.default_rng(seed)
    rows = []
    for wav in sorted(_need(SHARED / "fsdd" / "recordings").glob("*.wav")):
        digit, _speaker, index = wav.stem.split("_")
        if fsdd_split(int(index)) != split:
            continue
        other = (int(digit) + int(rng.integers(1, 10))) % 10
        rows.append({"query": {"audio": _rel(wav, out_dir)}, "positive": {"text": f"the digit {DIGITS[int(digit)]}"},
                     "negatives": [{"text": f"the digit {DIGITS[other]}"}], "source": "fsdd",
                     "instruction": "Represent the spoken digit for retrieving its name."})
    rng.shuffle(rows)
    return rows[:limit] if limit else rows


def write_fsdd_pairs(recordings: str | os.PathLike, out: str | os.PathLike, split: str,
                     takes: Iterable[int] | None = None, speakers: Iterable[str] | None = None) -> int:
    """JSONL audio->text pairs from the Free Spoken Digit Dataset for Projector Recovery's tests and bench.

    Each line: {"query": {"audio": ABS_PATH}, "positive": {"text": "the spoken digit seven"}, "source": "fsdd"},
    split by `training.common.splits.fsdd_split`. `takes` restricts the take index (e.g. range(10, 14)), `speakers`
    the speaker names; returns the number of lines written (atomically). Raises FileNotFoundError when
    `recordings` is not a folder.
    """
    recordings = Path(recordings)
    if not recordings.is_dir():
        raise FileNotFoundError(f"{recordings} is not a folder of FSDD recordings ({{digit}}_{{speaker}}_{{index}}.wav).")
    wanted_takes = None if takes is None else set(takes)
    wanted_speakers = None if speakers is None else set(speakers)
    rows = []
    for wav in sorted(recordings.glob("*.wav")):
        digit, speaker, take = wav.stem.split("_")
        if fsdd_split(int(take)) != split:
            continue
        if (wanted_takes is not None and int(take) not in wanted_takes) or (
                wanted_speakers is not None and speaker not in wanted_speakers):
            continue
        rows.append({"query": {"audio": str(wav.resolve())},
                     "positive": {"text": f"the spoken digit {DIGITS[int(digit)]}"}, "source": "fsdd"})
    _write(rows, Path(out))
    return len(rows)


def _cifar(split: str, per_class: int) -> list[tuple[str, Path]]:
    items = []
    for class_dir in sorted(_need(SHARED / "cifar10-test").iterdir()):
        files = sorted(class_dir.glob("*.jpg"))
        chosen = [f for f in files if cifar_split(int(f.stem)) == split][:per_class]
        items.extend((class_dir.name, f) for f in chosen)
    return items


def image_rows(out_dir: Path, split: str = "train", per_class: int = 20) -> list[dict]:
    rows = []
    for label, path in _cifar(split, per_class):
        rows.append({"query": {"image": _rel(path, out_dir)}, "positive": f"a photo of a {label}",
                     "source": "cifar10-classify", "instruction": "Represent the image for finding its class."})
        rows.append({"query": f"a photo of a {label}", "positive": {"image": _rel(path, out_dir)},
                     "source": "cifar10-retrieve", "instruction": "Find a photo matching the caption."})
    return rows


def video_rows(out_dir: Path, split: str = "train", per_class: int = 8, frames: int = 4) -> list[dict]:
    """Each CIFAR photo becomes a short MP4 panning across it (real pixels, synthetic motion)."""
    import av
    from PIL import Image

    media = out_dir / "videos"
    media.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, path in _cifar(split, per_class):
        target = media / f"{label}_{path.stem}.mp4"
        if not target.exists():
            big = np.asarray(Image.open(path).convert("RGB").resize((80, 64)))
            with av.open(str(target), "w") as container:
                stream = container.add_stream("mpeg4", rate=2)
                stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
                for t in range(frames):
                    frame = np.ascontiguousarray(big[4 * t // 2 : 4 * t // 2 + 48, 4 * t : 4 * t + 64])
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
                container.mux(stream.encode())
        rows.append({"query": f"a video of a {label}", "positive": {"video": _rel(target, out_dir)},
                     "source": "cifar10-video", "instruction": "Find a video matching the caption."})
    return rows


def document_rows(out_dir: Path, split: str = "train", per_class: int = 8) -> list[dict]:
    """A page image: the class name as a heading over the photo."""
    from PIL import Image, ImageDraw

    media = out_dir / "pages"
    media.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, path in _cifar(split, per_class):
        target = media / f"{label}_{path.stem}.png"
        if not target.exists():
            page = Image.new("RGB", (112, 140), "white")
            ImageDraw.Draw(page).text((8, 6), f"All about the {label}", fill="black")
            page.paste(Image.open(path).convert("RGB").resize((64, 64)), (24, 40))
            page.save(target)
        rows.append({"query": f"a page about the {label}", "positive": {"document": _rel(target, out_dir)},
                     "source": "cifar10-pages", "instruction": "Find the document page about the topic."})
    return rows


def text_rows(split: str = "train") -> list[dict]:
    """Docstring summary -> signature of standard-library callables (real text shipped with Python)."""
    import math, os.path as osp, statistics, string, textwrap  # noqa: E401

    rows = []
    for module in (math, osp, statistics, string, textwrap):
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not callable(obj) or not (obj.__doc__ or "").strip():
                continue
            summary = obj.__doc__.strip().splitlines()[0].strip()
            try:
                signature = f"{module.__name__}.{name}{inspect.signature(obj)}"
            except (TypeError, ValueError):
                signature = f"{module.__name__}.{name}(...)"
            if len(summary) < 8 or split_of(f"pydoc:{module.__name__}.{name}") != split:
                continue
            rows.append({"query": summary, "positive": signature, "source": f"pydoc-{module.__name__}",
                         "instruction": "Find the function that does this."})
    return rows


def build(modality: str, out_dir: str | Path, split: str = "train") -> Path:
    """Write `<out_dir>/<modality>.jsonl`; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    makers = {
        "audio": lambda: fsdd_rows(out_dir, split), "image": lambda: image_rows(out_dir, split),
        "video": lambda: video_rows(out_dir, split), "document": lambda: document_rows(out_dir, split),
        "text": lambda: text_rows(split),
    }
    if modality not in makers:
        raise ValueError(f"modality {modality!r}; expected one of {MODALITIES}")
    return _write(makers[modality](), out_dir / f"{modality}.jsonl")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modality", required=True, choices=(*MODALITIES, "all"))
    parser.add_argument("--output", "--out", dest="out", required=True)
    parser.add_argument("--split", default="train", choices=("train", "dev", "test"))
    args = parser.parse_args(argv)
    for modality in MODALITIES if args.modality == "all" else (args.modality,):
        path = build(modality, args.out, args.split)
        print(f"{path}: {sum(1 for _ in path.open())} rows")


if __name__ == "__main__":
    main()
