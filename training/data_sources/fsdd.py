"""FSDD spoken digits (real speech): recording -> "the spoken digit seven", with speaker metadata for clustering.

Split: ``training.common.splits.fsdd_split(take)`` (official test = takes 0-4), the rule the proxy evaluation uses.
Reads the recordings with the shared raw-data loader (``training.common.shared_data.fsdd_clips``).
"""

from __future__ import annotations

import json
from pathlib import Path

from training.common.shared_data import DIGIT_NAMES, fsdd_clips
from training.common.splits import fsdd_split

from .common import BuildContext, SourceInfo, balanced_take, make_pair, pick_negatives
from .install import INSTALL

INFO = SourceInfo(
    name="fsdd-spoken-digits",
    modality="audio",
    licence="CC BY-SA 4.0 (Jakobovski/free-spoken-digit-dataset @26eb9aa); keep attribution",
    obtained="../shared/data/fsdd/recordings (8 kHz WAVs copied byte for byte)",
    split_rule="training.common.splits.fsdd_split(take): takes 0-4 test, 5-9 dev, 10-49 train",
    install=INSTALL["fsdd"],
)
INSTRUCTION = "Identify the digit spoken in the recording."


def caption(digit: int) -> str:
    """The label text of a digit, e.g. 7 -> 'the spoken digit seven'."""
    return f"the spoken digit {DIGIT_NAMES[digit].lower()}"


def _speakers(shared: Path) -> dict[str, dict]:
    path = shared / "data" / "fsdd" / "speakers.json"
    return json.loads(path.read_text()) if path.exists() else {}


def check(ctx: BuildContext) -> None:
    """Raise SourceMissing unless the FSDD recordings are in ../shared."""
    ctx.cached("fsdd:clips", lambda: fsdd_clips(ctx.shared))


def build(split: str, cap: int, ctx: BuildContext) -> list[dict]:
    """Up to ``cap`` pairs of ``split``, balanced over digits; negatives are other digits' label texts."""
    clips = ctx.cached("fsdd:clips", lambda: fsdd_clips(ctx.shared))
    speakers = ctx.cached("fsdd:speakers", lambda: _speakers(ctx.shared))
    rng = ctx.rng(INFO.name, split)
    chosen = balanced_take([c for c in clips if fsdd_split(c.take) == split], lambda c: c.digit, cap, rng)
    pairs = []
    for c in chosen:
        rel = ctx.media.copy(c.path, f"fsdd/{c.path.name}")
        neg = pick_negatives(10, c.digit, ctx.n_negatives, rng)
        pairs.append(make_pair(
            {"audio": rel}, {"text": caption(c.digit)}, [{"text": caption(d)} for d in neg], INFO.name, INSTRUCTION,
            key=f"fsdd:{c.path.stem}", label=c.digit, speaker=c.speaker, take=c.take, **speakers.get(c.speaker, {})))
    return pairs
