"""Synthetic speech (espeak-ng) of WordNet definitions: definition text -> the same definition spoken.

**Synthetic**: the source name says so. Voices rotate over English accents and voice variants (seeded), so the
audio specialist cannot key on a single voice. Split: the WordNet key (``split_of("wordnet:n<offset>")``), the same
as the text anchor, so a definition never crosses splits between modalities.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .common import BuildContext, SourceInfo, SourceMissing, make_pair, pick_negatives, take_with_pool
from .install import INSTALL
from .wordnet import load_synsets, synsets

INFO = SourceInfo(
    name="espeak-ng-wordnet-synthetic-speech",
    modality="audio",
    licence="espeak-ng GPL-3+ (the generated audio is ours); text: WordNet 3.0 licence",
    obtained="Debian espeak-ng 1.51 (-s 160, 22.05 kHz WAV) speaking WordNet 3.0 noun definitions",
    split_rule='training.common.splits.split_of("wordnet:n<synset offset>") (same as wordnet-definitions)',
    install=INSTALL["espeak"],
)
INSTRUCTION = "Retrieve the recording in which this sentence is spoken."
VOICES = ("en-us", "en-gb", "en-us+f2", "en-gb+m3", "en-us+m7", "en-gb-scotland+f4")


def synthesize(text: str, voice: str, out: Path, speed: int = 160) -> None:
    """Speak ``text`` with espeak-ng into a WAV at ``out`` (raises SourceMissing if espeak-ng is absent)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SourceMissing(f"espeak-ng not found on PATH: {INSTALL['espeak']}")
    res = subprocess.run([exe, "-v", voice, "-s", str(speed), "-w", str(out), text], capture_output=True)
    if res.returncode != 0 or not out.exists() or out.stat().st_size <= 44:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r} on {text!r}: {res.stderr.decode(errors='replace')}")


def check(ctx: BuildContext) -> None:
    """Raise SourceMissing unless espeak-ng and WordNet (the sentences) are installed."""
    if shutil.which("espeak-ng") is None:
        raise SourceMissing(f"espeak-ng not found on PATH: {INSTALL['espeak']}")
    ctx.cached("wordnet:synsets", load_synsets)


def build(split: str, cap: int, ctx: BuildContext) -> list[dict]:
    """Up to ``cap`` text->speech pairs; negatives are other spoken definitions of the same split."""
    if shutil.which("espeak-ng") is None:
        raise SourceMissing(f"espeak-ng not found on PATH: {INSTALL['espeak']}")
    rng = ctx.rng(INFO.name, split)
    pool = [s for s in synsets(ctx, split) if len(s.gloss.split()) <= 16]
    chosen, negpool = take_with_pool(pool[: max(cap, min(len(pool), 3000))], cap, ctx.n_negatives, rng)
    voices = [VOICES[i] for i in rng.integers(0, len(VOICES), len(negpool))]
    rels = []
    for s, voice in zip(negpool, voices):
        stem = s.key.split(":")[1]
        rels.append(ctx.media.write(f"espeak/{stem}.wav", lambda tmp, s=s, v=voice: synthesize(s.gloss, v, tmp)))
    pairs = []
    for i, (s, voice) in enumerate(zip(chosen, voices)):
        neg = pick_negatives(len(negpool), i, ctx.n_negatives, rng)
        pairs.append(make_pair({"text": s.gloss}, {"audio": rels[i]}, [{"audio": rels[j]} for j in neg], INFO.name,
                               INSTRUCTION, key=s.key, negative_keys=[negpool[j].key for j in neg], label=s.lemma,
                               voice=voice, synthetic=True))
    return pairs
