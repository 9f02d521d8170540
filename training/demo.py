"""Quick demo: build the tiny repo (random weights) and embed one input of every modality.

    python -m training.demo [--model DIR] [--out runs/tiny]

Prints the cosine-similarity matrix. With random weights the numbers only show that every modality flows through
one model into one space; `python -m training.pipeline` trains a real small model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def demo_inputs() -> dict[str, object]:
    """One deterministic input per modality (and two mixtures); nothing downloaded."""
    rate = 16000
    t = np.arange(rate * 2) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    picture = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(picture).ellipse((20, 8, 76, 56), fill="red")
    page = Image.new("RGB", (200, 260), "white")
    ImageDraw.Draw(page).text((10, 10), "Chapter 1\nEmbeddings for every modality.", fill="black")
    frames = np.stack([np.asarray(picture.rotate(angle)) for angle in range(0, 360, 45)])
    audio = {"array": tone, "sampling_rate": rate}
    return {
        "text": "a red ball on a white background",
        "image": picture,
        "document": {"document": page},
        "video": {"video": frames},
        "audio": {"audio": audio},
        "image+text": {"image": picture, "text": "what colour is the ball?"},
        "video+audio": {"video": frames, "audio": audio},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an existing Conan repo; default: build the tiny one")
    parser.add_argument("--output", "--out", dest="out", default="runs/tiny", help="where the tiny repo is built")
    args = parser.parse_args(argv)
    from sentence_transformers import SentenceTransformer

    model_dir = Path(args.model) if args.model else Path(args.out)
    if not args.model and not (model_dir / "config.json").exists():
        from training.base.build_base import build_tiny_repo

        build_tiny_repo(model_dir)
    model = SentenceTransformer(str(model_dir), trust_remote_code=True, device="cpu")
    inputs = demo_inputs()
    vectors = model.encode(list(inputs.values()))
    similarity = vectors @ vectors.T
    names = list(inputs)
    width = max(len(n) for n in names)
    print(f"model: {model_dir}  embedding dim: {vectors.shape[1]}")
    print(" " * width + "".join(f"{n[:11]:>12}" for n in names))
    for name, row in zip(names, similarity):
        print(f"{name:<{width}}" + "".join(f"{v:12.3f}" for v in row))


if __name__ == "__main__":
    main()
