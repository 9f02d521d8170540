"""Shared plumbing for the real-data builders: build context, media writing, seeded sampling, negatives.

Why one place: every source must write media the same way (paths relative to the JSONL file, atomic writes, each
file once), sample the same way (seeded, class-balanced where a source has classes) and draw negatives only from
its own split, so that a training file can never point at an evaluation item.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from training.common.shared_data import SourceMissing, default_shared_root
from training.common.splits import Split

__all__ = ["SourceMissing", "SourceInfo", "BuildContext", "MediaWriter", "stable_int", "balanced_take",
           "pick_negatives", "make_pair", "SPLITS"]

SPLITS: tuple[Split, ...] = ("train", "dev", "test")


@dataclass(frozen=True)
class SourceInfo:
    """What a source is, for the manifest: ``name`` is the ``source`` field of its pairs."""

    name: str
    modality: str
    licence: str
    obtained: str
    split_rule: str
    install: str


def stable_int(*parts: Any) -> int:
    """A process-independent 32-bit integer from any parts (Python's ``hash`` is salted per process)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:4], "big")


class MediaWriter:
    """Writes media files under ``root/media/<source>/`` and returns their paths relative to ``root``.

    Each relative name is written once per build (later calls reuse it); writes go to a temporary name first and
    are renamed into place, so an interrupted build never leaves a half-written file behind.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._written: set[str] = set()

    def _target(self, rel: str) -> tuple[str, Path]:
        rel = Path("media", rel).as_posix()
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return rel, path

    def write(self, rel: str, write: Callable[[Path], None]) -> str:
        """Write one file with ``write(tmp_path)``, then rename it into place; returns its relative path."""
        rel, path = self._target(rel)
        if rel in self._written:
            return rel
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        try:
            write(tmp)
            tmp.replace(path)
        finally:
            if tmp.exists():
                tmp.unlink()
        self._written.add(rel)
        return rel

    def copy(self, src: Path, rel: str) -> str:
        """Copy an existing file byte for byte (keeps the original encoding of real data)."""
        return self.write(rel, lambda tmp: shutil.copyfile(src, tmp))

    def image(self, img: Any, rel: str) -> str:
        """Save a PIL image as PNG (deterministic bytes: no metadata, fixed compression)."""
        return self.write(rel, lambda tmp: img.save(tmp, format="PNG", optimize=False, compress_level=6))

    def audio(self, wave: np.ndarray, sampling_rate: int, rel: str) -> str:
        """Save a mono float waveform as 16-bit PCM WAV."""
        import soundfile as sf

        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1 or wave.size == 0:
            raise ValueError(f"audio for {rel!r} must be a non-empty 1-D array, got shape {wave.shape}")
        return self.write(rel, lambda tmp: sf.write(str(tmp), np.clip(wave, -1.0, 1.0), int(sampling_rate),
                                                     subtype="PCM_16", format="WAV"))

    def video(self, frames: np.ndarray, rel: str, fps: int = 2) -> str:
        """Save (T,H,W,3) uint8 frames as an MPEG-4 Part 2 MP4 with PyAV (fixed quantiser 2, ~39 dB PSNR).

        Why not H.264: libx264 through PyAV gave different bytes for the same frames from run to run (measured);
        FFmpeg's own single-threaded mpeg4 encoder is reproducible, so builds stay byte-identical.
        """
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"video for {rel!r} must be (T,H,W,3) uint8, got {frames.shape} {frames.dtype}")
        if frames.shape[1] % 2 or frames.shape[2] % 2:
            raise ValueError(f"video for {rel!r}: MPEG-4 needs even height/width, got {frames.shape[1:3]}")

        def write(tmp: Path) -> None:
            from fractions import Fraction

            import av

            with av.open(str(tmp), mode="w", format="mp4") as container:
                stream = container.add_stream("mpeg4", rate=fps)
                stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
                stream.pix_fmt = "yuv420p"
                stream.options = {"threads": "1", "flags": "+qscale", "global_quality": str(2 * 118)}
                for i, arr in enumerate(frames):
                    frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
                    frame.pts, frame.time_base = i, Fraction(1, fps)
                    for packet in stream.encode(frame):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)

        return self.write(rel, write)

    def write_video_once(self, rel: str, make_frames: Callable[[], np.ndarray], fps: int = 2) -> str:
        """Like :meth:`video`, but frames are only made when ``rel`` was not written yet in this build."""
        if Path("media", rel).as_posix() in self._written:
            return Path("media", rel).as_posix()
        return self.video(make_frames(), rel, fps)


@dataclass
class BuildContext:
    """Everything a source needs for one build: where to write, the seed, and the preset's knobs."""

    root: Path
    seed: int
    n_negatives: int = 3
    shared: Path = field(default_factory=default_shared_root)
    pdf_max_pages: int = 40
    cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.media = MediaWriter(self.root)

    def rng(self, source: str, split: str, purpose: str = "") -> np.random.Generator:
        """A generator that depends only on (seed, source, split, purpose): builds are reproducible."""
        return np.random.default_rng([self.seed, stable_int(source, split, purpose)])

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """Compute once per build (e.g. a parsed WordNet or a PDF's text layer) and reuse across splits."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


def balanced_take(items: Sequence[Any], label_of: Callable[[Any], Hashable], cap: int,
                  rng: np.random.Generator) -> list[Any]:
    """Up to ``cap`` items, shuffled within each label then taken round-robin over labels (any prefix is balanced)."""
    if cap <= 0:
        return []
    groups: dict[Hashable, list[Any]] = {}
    for it in items:
        groups.setdefault(label_of(it), []).append(it)
    labels = sorted(groups, key=str)
    order = [labels[i] for i in rng.permutation(len(labels))]
    for lab in order:
        g = groups[lab]
        groups[lab] = [g[i] for i in rng.permutation(len(g))]
    out: list[Any] = []
    depth = 0
    while len(out) < cap and any(depth < len(groups[lab]) for lab in order):
        for lab in order:
            if depth < len(groups[lab]) and len(out) < cap:
                out.append(groups[lab][depth])
        depth += 1
    return out


def take_with_pool(pool: Sequence[Any], cap: int, n_negatives: int, rng: np.random.Generator) -> tuple[list, list]:
    """(chosen, negative pool): a seeded sample of ``cap`` items, and a pool that starts with them and has at least
    ``n_negatives + 1`` items where the split has them (so even a one-pair split gets real negatives)."""
    perm = rng.permutation(len(pool))
    chosen = [pool[i] for i in perm[:cap]]
    negpool = [pool[i] for i in perm[:max(len(chosen), min(len(pool), n_negatives + 1) if chosen else 0)]]
    return chosen, negpool


def pick_negatives(n: int, index: int, k: int, rng: np.random.Generator,
                   ok: Callable[[int], bool] | None = None, prefer: Callable[[int], bool] | None = None) -> list[int]:
    """Indices of up to ``k`` negatives among ``n`` candidates, never ``index``; ``prefer`` ones (hard) come first."""
    cands = [j for j in rng.permutation(n).tolist() if j != index and (ok is None or ok(j))]
    if prefer is not None:
        cands = [j for j in cands if prefer(j)] + [j for j in cands if not prefer(j)]
    return cands[:k]


def make_pair(query: dict, positive: dict, negatives: list[dict], source: str, instruction: str | None,
              key: str, negative_keys: Sequence[str] = (), **meta: Any) -> dict:
    """One JSONL record in the project's training format (ARCHITECTURE.md), with provenance under ``meta``.

    ``meta.key`` is the item identity the split rule was applied to; ``meta.negative_keys`` the identities of item
    negatives (label-text negatives have none), so anyone can audit that no split leaks into another.
    """
    for name, item in (("query", query), ("positive", positive), *(("negative", n) for n in negatives)):
        if not isinstance(item, dict) or not item:
            raise ValueError(f"{source}: {name} must be a non-empty item dict, got {item!r}")
    rec: dict[str, Any] = {"query": query, "positive": positive, "negatives": list(negatives), "source": source}
    if instruction:
        rec["instruction"] = instruction
    rec["meta"] = {"key": key, "negative_keys": list(negative_keys), **meta}
    return rec
