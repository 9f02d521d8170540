"""Short videos made from real images by a camera motion (zoom, pan, rotation): caption -> MP4 clip.

**Synthetic motion** over real pictures (CIFAR-10 photos, Noto emoji): the source names say ``synthetic-motion``.
They exercise the video path and teach motion words; they are no evidence of real-video quality. Each clip uses
an image of the same split as the image builders (CIFAR index rule / emoji key), so a test image never appears in
a training video. One negative is the same image with a different motion (hard: only the motion differs).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from . import cifar, emoji_images
from .common import BuildContext, SourceInfo, SourceMissing, make_pair, pick_negatives, take_with_pool
from .install import INSTALL

FRAMES = 8
SIZE = 64
FPS = 2  # the processor samples video files at 2 fps by default: every frame is kept
MOTIONS = {
    "zoom-in": "zooming in on",
    "zoom-out": "zooming out from",
    "pan-left": "panning left across",
    "pan-right": "panning right across",
    "rotate-cw": "rotating clockwise around",
    "rotate-ccw": "rotating counterclockwise around",
}
INSTRUCTION = "Retrieve the video that matches the description."

CIFAR_INFO = SourceInfo(
    name="cifar10-synthetic-motion-video",
    modality="video",
    licence="frames from CIFAR-10 (see cifar10-photos); motion is synthetic",
    obtained=f"{FRAMES} frames {SIZE}x{SIZE} of a PIL zoom/pan/rotation over one CIFAR-10 photo, MPEG-4 MP4 at "
             f"{FPS} fps (PyAV)",
    split_rule="the photo's training.common.splits.cifar_split(index)",
    install=INSTALL["cifar10"] + "; " + INSTALL["video"],
)
EMOJI_INFO = SourceInfo(
    name="emoji-synthetic-motion-video",
    modality="video",
    licence="frames from Noto Color Emoji (Apache-2.0); motion is synthetic",
    obtained=f"{FRAMES} frames {SIZE}x{SIZE} of a PIL zoom/pan/rotation over one rendered emoji, MPEG-4 MP4 at "
             f"{FPS} fps (PyAV)",
    split_rule='the emoji\'s training.common.splits.split_of("emoji:<name>")',
    install=INSTALL["emoji"] + "; " + INSTALL["video"],
)


def motion_frames(img: Any, motion: str, frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """(T, size, size, 3) uint8 frames of ``motion`` over a PIL image (upsampled first so crops stay sharp)."""
    from PIL import Image

    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; expected one of {sorted(MOTIONS)}")
    big = img.convert("RGB").resize((2 * size, 2 * size), Image.BICUBIC)
    w = big.width
    out = []
    for t in np.linspace(0.0, 1.0, frames):
        if motion in ("zoom-in", "zoom-out"):
            z = t if motion == "zoom-in" else 1.0 - t
            half = w / 2 * (1.0 - 0.5 * z)          # full view -> central half
            box = (w / 2 - half, w / 2 - half, w / 2 + half, w / 2 + half)
            frame = big.resize((size, size), Image.BILINEAR, box=box)
        elif motion in ("pan-left", "pan-right"):
            side = 0.6 * w                           # a 60% window slides across the image
            x0 = (w - side) * (t if motion == "pan-right" else 1.0 - t)
            top = (w - side) / 2
            frame = big.resize((size, size), Image.BILINEAR, box=(x0, top, x0 + side, top + side))
        else:
            angle = 90.0 * t * (-1.0 if motion == "rotate-cw" else 1.0)   # PIL rotates counterclockwise
            frame = big.rotate(angle, Image.BILINEAR, fillcolor=(255, 255, 255)).resize((size, size), Image.BILINEAR)
        out.append(np.asarray(frame, dtype=np.uint8))
    return np.stack(out)


def _build(info: SourceInfo, split: str, cap: int, ctx: BuildContext,
           pool: list[tuple[str, str, Callable[[], Any], str]]) -> list[dict]:
    """Shared body: ``pool`` holds (key, phrase, image loader, file stem) of the split's images."""
    rng = ctx.rng(info.name, split)
    chosen, negpool = take_with_pool(pool, cap, max(ctx.n_negatives - 1, 0), rng)
    motions = list(MOTIONS)
    picked = [motions[i] for i in rng.integers(0, len(motions), len(negpool))]
    tag = info.name.split("-")[0]

    def clip(k: int, motion: str) -> str:
        key, _, load, stem = negpool[k]
        return ctx.media.write_video_once(f"{tag}-video/{stem}-{motion}.mp4",
                                          lambda: motion_frames(load(), motion), FPS)

    pairs = []
    for k, (key, phrase, _, _) in enumerate(chosen):
        motion = picked[k]
        other = motions[(motions.index(motion) + 1 + int(rng.integers(len(motions) - 1))) % len(motions)]
        negs = [clip(k, other)]
        neg_keys = [key]
        for j in pick_negatives(len(negpool), k, ctx.n_negatives - 1, rng):
            negs.append(clip(j, picked[j]))
            neg_keys.append(negpool[j][0])
        pairs.append(make_pair({"text": f"a video {MOTIONS[motion]} {phrase}"}, {"video": clip(k, motion)},
                               [{"video": v} for v in negs], info.name, INSTRUCTION, key=key,
                               negative_keys=neg_keys, motion=motion, negative_motions=[other], synthetic=True))
    return pairs


def _check_av() -> None:
    try:
        import av  # noqa: F401
    except ImportError as e:
        raise SourceMissing(f"PyAV is not installed: {INSTALL['video']}") from e


def check_cifar(ctx: BuildContext) -> None:
    """Raise SourceMissing unless PyAV and the CIFAR-10 JPEGs are there."""
    _check_av()
    cifar.check(ctx)


def check_emoji(ctx: BuildContext) -> None:
    """Raise SourceMissing unless PyAV and the emoji font/names are there."""
    _check_av()
    emoji_images.check(ctx)


def build_cifar(split: str, cap: int, ctx: BuildContext) -> list[dict]:
    """Motion clips over CIFAR-10 photos of ``split``: 'a video zooming in on a photo of a cat'."""
    from PIL import Image

    pool = [(cifar.key_of(p), cifar.caption(c), lambda p=p: Image.open(p), f"{p.parent.name}-{p.stem}")
            for p, c, _ in cifar.images(ctx, split)]
    return _build(CIFAR_INFO, split, cap, ctx, pool)


def build_emoji(split: str, cap: int, ctx: BuildContext) -> list[dict]:
    """Motion clips over emoji of ``split``: 'a video panning left across the grinning face emoji'."""
    usable = emoji_images.usable(ctx, split, ctx.rng(EMOJI_INFO.name, split, "pool"), cap + ctx.n_negatives)
    pool = [(emoji_images.key_of(name), f"the {name} emoji", lambda ch=ch: emoji_images.image(ctx, ch),
             emoji_images.file_stem(ch)) for ch, name in usable]
    return _build(EMOJI_INFO, split, cap, ctx, pool)
