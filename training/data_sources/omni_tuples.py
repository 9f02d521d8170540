"""(text, video, audio) tuples for OmniRetriever's objectives: a caption, a motion clip over a real emoji, and its
name spoken by espeak-ng.

    python -m training.data_sources.omni_tuples --out DIR --preset smoke|small [--seed 0]

**Synthetic**: the motion (``motion_video.motion_frames``) and the speech (espeak-ng, ``speech_synth.synthesize``)
are made here; the picture is the real Noto Color Emoji glyph and the name its CLDR English name. The source name says
``synthetic``. Each tuple's three modalities agree on one emoji; a tuple's augmented copy (OmniRetriever's Obj1
positive) is the same emoji with another caption wording, another camera motion and another voice.

Row format (docs/omni_tuples.md): the project's pair format (``training.contrastive.data``), so the ordinary loader,
validation and samplers read it; ``query`` is the anchor tuple and ``positive`` its augmented copy, both dict items
with all three of text / video / audio:

    {"query": {"text": "the grinning face emoji", "video": "media/...zoom-in.mp4", "audio": "media/...en-us.wav"},
     "positive": {"text": "an emoji of grinning face", "video": "media/...pan-left.mp4", "audio": "media/...en-gb.wav"},
     "source": "emoji-spoken-name-synthetic-tuples", "instruction": "...", "meta": {"key": "emoji:grinning face", ...}}

Split: ``split_of("emoji:<name>")``, the emoji image builders' rule, so a test emoji is in no training file of any
builder. Layout: DIR/{train,dev,test}.jsonl, DIR/media/omni-emoji/..., DIR/manifest.json (written atomically).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from training.common.io_utils import write_json_atomic
from training.common.splits import split_of

from . import emoji_images, motion_video, speech_synth
from .common import SPLITS, BuildContext, SourceInfo, SourceMissing, make_pair
from .install import INSTALL

INFO = SourceInfo(
    name="emoji-spoken-name-synthetic-tuples",
    modality="text+video+audio",
    licence="Noto Color Emoji images Apache-2.0; CLDR names via PyPI emoji (BSD); speech by espeak-ng (GPL-3+, the "
            "generated audio is ours); motion is synthetic",
    obtained="caption of the CLDR name; 4 frames 56x56 of a PIL zoom/pan/rotation over the rendered emoji (MPEG-4, "
             "2 fps); the name spoken by espeak-ng (-s 160, 22.05 kHz WAV)",
    split_rule='training.common.splits.split_of("emoji:<name>") (same as the emoji image / video builders)',
    install=INSTALL["emoji"] + "; " + INSTALL["espeak"] + "; " + INSTALL["video"],
)
INSTRUCTION = "Represent this clip, its soundtrack and its caption for retrieval."
CAPTIONS = ("the {name} emoji", "an emoji of {name}")  # anchor, augmented copy
FRAMES = 4
SIZE = 56
PRESETS: dict[str, dict[str, int]] = {
    "smoke": {"train": 48, "dev": 8, "test": 24},
    "small": {"train": 400, "dev": 50, "test": 100},
}
ROW_FORMAT = "conan-omni-tuples/1"


def check(ctx: BuildContext) -> None:
    """Raise SourceMissing unless the emoji font and names, espeak-ng and PyAV are installed."""
    emoji_images.check(ctx)
    if shutil.which("espeak-ng") is None:
        raise SourceMissing(f"espeak-ng not found on PATH: {INSTALL['espeak']}")
    motion_video._check_av()


def build(split: str, cap: int, ctx: BuildContext) -> list[dict]:
    """Up to ``cap`` tuple rows of ``split`` (emoji the font can draw, in a seeded order); no negatives (the hard
    negative is built per training step from the batch, `omni_objectives.hard_negative_tuples`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = ctx.rng(INFO.name, split)
    chosen = emoji_images.usable(ctx, split, rng, cap)
    motions = list(motion_video.MOTIONS)
    voices = speech_synth.VOICES
    rows = []
    for ch, name in chosen:
        stem = emoji_images.file_stem(ch)
        m = rng.choice(len(motions), size=2, replace=False)
        v = rng.choice(len(voices), size=2, replace=False)
        items = []
        for caption, motion, voice in zip(CAPTIONS, (motions[m[0]], motions[m[1]]), (voices[v[0]], voices[v[1]])):
            video = ctx.media.write_video_once(
                f"omni-emoji/{stem}-{motion}.mp4",
                lambda ch=ch, motion=motion: motion_video.motion_frames(emoji_images.image(ctx, ch), motion, FRAMES,
                                                                        SIZE), motion_video.FPS)
            audio = ctx.media.write(f"omni-emoji/{stem}-{voice.replace('+', '_')}.wav",
                                    lambda tmp, voice=voice, name=name: speech_synth.synthesize(name, voice, tmp))
            items.append(({"text": caption.format(name=name), "video": video, "audio": audio}, motion, voice))
        (anchor, m0, v0), (augmented, m1, v1) = items
        key = emoji_images.key_of(name)
        if split_of(key) != split:  # emoji_images.items filters by the same rule; a guard against future edits
            raise AssertionError(f"{key} is in split {split_of(key)}, not {split}")
        rows.append(make_pair(anchor, augmented, [], INFO.name, INSTRUCTION, key=key, split=split, label=name,
                              emoji=ch, motions=[m0, m1], voices=[v0, v1], synthetic=True, format=ROW_FORMAT))
    return rows


def build_tuples(out_dir: str | Path, preset: str | dict[str, int] = "smoke", seed: int = 0,
                 overwrite: bool = False, shared: Path | None = None) -> dict:
    """Write DIR/{train,dev,test}.jsonl + media + manifest.json; returns the manifest.

    ``preset``: "smoke" / "small" or a {split: cap} mapping. Raises SourceMissing (with the install command) when a
    source is absent, FileExistsError when ``out_dir`` exists and not ``overwrite``.
    """
    caps = PRESETS.get(preset) if isinstance(preset, str) else dict(preset)
    if caps is None or set(caps) != set(SPLITS) or any(int(v) < 0 for v in caps.values()):
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or a non-negative cap for each of {SPLITS}, "
                         f"got {preset!r}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--force) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        ctx = BuildContext(root=tmp, seed=seed, **({"shared": shared} if shared is not None else {}))
        check(ctx)
        counts, keys = {}, {}
        for split in SPLITS:
            rows = build(split, int(caps[split]), ctx)
            with (tmp / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            counts[split] = len(rows)
            keys[split] = {r["meta"]["key"] for r in rows}
        overlap = {f"{a}&{b}": sorted(keys[a] & keys[b]) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1:]
                   if keys[a] & keys[b]}
        if overlap:
            raise AssertionError(f"splits share items: {overlap}")
        manifest = {"format": ROW_FORMAT, "source": INFO.__dict__, "seed": seed,
                    "preset": preset if isinstance(preset, str) else caps, "counts": counts, "synthetic": True}
        write_json_atomic(tmp / "manifest.json", manifest)
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="smoke", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        manifest = build_tuples(args.out, args.preset, args.seed, overwrite=args.force)
    except SourceMissing as error:
        print(f"cannot build tuples: {error}", file=sys.stderr)
        return 2
    print(json.dumps(manifest["counts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
