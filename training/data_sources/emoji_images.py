"""Emoji artwork (Noto Color Emoji) with CLDR English names: name -> rendered emoji image.

Uses the shared raw-data loaders (``shared_data.emoji_names`` for the unique single-codepoint names,
``shared_data.render_emoji`` for the PIL rendering). Split: ``split_of("emoji:<name>")``.
"""

from __future__ import annotations

from training.common.shared_data import emoji_names, render_emoji
from training.common.splits import split_of

from .common import BuildContext, SourceInfo, make_pair, pick_negatives, take_with_pool
from .install import INSTALL

INFO = SourceInfo(
    name="noto-emoji-cldr-names",
    modality="image",
    licence="Noto Color Emoji images Apache-2.0 (font OFL-1.1); CLDR names via PyPI emoji (BSD)",
    obtained="Debian fonts-noto-color-emoji rendered with PIL at 109 px, resized; names from emoji.EMOJI_DATA",
    split_rule='training.common.splits.split_of("emoji:<name>")',
    install=INSTALL["emoji"],
)
INSTRUCTION = "Retrieve the emoji that this name describes."
IMAGE_SIZE = 72


def key_of(name: str) -> str:
    """Item identity, e.g. 'emoji:grinning face'."""
    return f"emoji:{name}"


def file_stem(ch: str) -> str:
    """File name from the code points, e.g. '1f600'."""
    return "-".join(f"{ord(c):x}" for c in ch if c != "\ufe0f")


def items(ctx: BuildContext, split: str) -> list[tuple[str, str]]:
    """(emoji, name) of every usable emoji in ``split``, in code-point order (shared with the video builder)."""
    names = ctx.cached("emoji:names", emoji_names)
    return [(ch, name) for ch, name in names if split_of(key_of(name)) == split]


def image(ctx: BuildContext, ch: str):
    """The rendered emoji (cached per build); None when the installed font has no glyph for it."""
    return ctx.cached(f"emoji:img:{ch}", lambda: render_emoji(ch, IMAGE_SIZE))


def usable(ctx: BuildContext, split: str, rng, need: int) -> list[tuple[str, str]]:
    """Up to ``need`` (emoji, name) of ``split`` in a seeded order, keeping only emoji the font can draw.

    Lazy on purpose: rendering all ~1,400 candidates to filter them would cost ~6 s per split.
    """
    pool = items(ctx, split)
    out: list[tuple[str, str]] = []
    for i in rng.permutation(len(pool)):
        if len(out) >= need:
            break
        if image(ctx, pool[i][0]) is not None:
            out.append(pool[i])
    return out


def check(ctx: BuildContext) -> None:
    """Raise SourceMissing unless the emoji font and names are installed."""
    ctx.cached("emoji:names", emoji_names)


def build(split: str, cap: int, ctx: BuildContext) -> list[dict]:
    """Up to ``cap`` name->image pairs; negatives are other emoji images of the same split."""
    rng = ctx.rng(INFO.name, split)
    chosen, negpool = take_with_pool(usable(ctx, split, rng, max(cap, ctx.n_negatives + 1)), cap, ctx.n_negatives, rng)
    rels = [ctx.media.image(image(ctx, ch), f"emoji/{file_stem(ch)}.png") for ch, _ in negpool]
    pairs = []
    for i, (ch, name) in enumerate(chosen):
        neg = pick_negatives(len(negpool), i, ctx.n_negatives, rng)
        pairs.append(make_pair({"text": name}, {"image": rels[i]}, [{"image": rels[j]} for j in neg], INFO.name,
                               INSTRUCTION, key=key_of(name), negative_keys=[key_of(negpool[j][1]) for j in neg],
                               label=name, emoji=ch))
    return pairs
