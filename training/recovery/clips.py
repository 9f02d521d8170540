"""Audio pairs and the frozen-encoder clip cache shared by Projector Recovery, drift diagnosis and re-alignment.

`audio_pairs` keeps JSONL pairs with audio on exactly one side; `cache_audio` runs the frozen Whisper encoder once
per clip and keeps only the pooled frames the projector turns into tokens; `embed_clips` runs projector + backbone
on cached clips (the only part that changes while the projector trains).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training.common import hub_code
from training.common.audio_cache import AudioFrameCache
from training.contrastive.data import DataError, load_jsonl
from training.evaluation.embed import model_device
from training.recovery.config import RecoverError


def read_pairs(path: str | os.PathLike, limit: int | None = None, on_error: str = "fatal") -> list[dict[str, Any]]:
    """JSONL pairs (training.contrastive.data format, media paths resolved and probed) as plain dicts for the caches."""
    try:
        examples = load_jsonl(path, on_error=on_error)
    except (DataError, FileNotFoundError) as error:
        raise RecoverError(str(error)) from error
    rows = [{"query": e.query, "positive": e.positive, "source": e.source, "instruction": e.instruction}
            for e in examples]
    return rows[:limit] if limit is not None else rows


def has_audio(item: Any) -> bool:
    return isinstance(item, dict) and item.get("audio") is not None


@dataclass
class AudioPairs:
    """Pairs with audio on exactly one side, as (audio input, partner input) keyed for caching."""

    audio_keys: list[str]  # per pair
    partner_keys: list[str]  # per pair
    audio_inputs: dict[str, tuple[Any, str | None]]  # key -> (input, instruction)
    partner_inputs: dict[str, tuple[Any, str | None]]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.audio_keys)


def _key(item: Any, instruction: str | None) -> str:
    return json.dumps([instruction, item], sort_keys=True, default=str)


def audio_pairs(
    pairs: list[dict[str, Any]], query_instruction: str | None = None, document_instruction: str | None = None
) -> AudioPairs:
    """Keep pairs whose audio sits on exactly one side; the other side (text/image/...) is the constant partner."""
    out = AudioPairs([], [], {}, {})
    for row in pairs:
        q_inst = row.get("instruction") or query_instruction
        sides = [(row["query"], q_inst), (row["positive"], document_instruction)]
        flags = [has_audio(item) for item, _ in sides]
        if flags.count(True) != 1:
            out.skipped += 1
            continue
        (audio_item, audio_inst), (partner_item, partner_inst) = sides if flags[0] else sides[::-1]
        a_key, p_key = _key(audio_item, audio_inst), _key(partner_item, partner_inst)
        out.audio_inputs.setdefault(a_key, (audio_item, audio_inst))
        out.partner_inputs.setdefault(p_key, (partner_item, partner_inst))
        out.audio_keys.append(a_key)
        out.partner_keys.append(p_key)
    return out


@dataclass
class ClipCache:
    """Per clip: prompt ids with audio placeholders, the frozen encoder's pooled frames (real tokens only)."""

    input_ids: list[torch.Tensor]
    frames: list[torch.Tensor]  # (windows, tokens_max_of_clip, d_audio)
    lengths: list[torch.Tensor]  # (windows,) mel frames per window
    index: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)


@torch.no_grad()
def cache_audio(
    model: torch.nn.Module, processor: Any, inputs: dict[str, tuple[Any, str | None]], batch_size: int = 16,
    progress: bool = True, cache_dir: str | os.PathLike | None = None,
) -> ClipCache:
    """Run the frozen Whisper encoder once per clip and keep only the frames the projector turns into tokens.

    With `cache_dir` the encoder's frames go through the shared per-window cache (training/common/audio_cache.py, keyed by
    the encoder's fingerprint and the window's features), so every stage and every run encodes each clip once.
    """

    cache = ClipCache([], [], [])
    keys = list(inputs)
    device = model_device(model)
    previous = model.audio_frames_hook
    if cache_dir is not None:
        model.audio_frames_hook = AudioFrameCache.for_model(model, cache_dir)
    try:
        for start in tqdm(range(0, len(keys), batch_size), desc="cache audio", disable=not progress, leave=False):
            chunk = keys[start : start + batch_size]
            prepared = [processor.prepare([inputs[key][0]], instruction=inputs[key][1]) for key in chunk]
            width = max(p["input_features"].shape[-1] for p in prepared)  # Qwen3-Omni rows have per-clip lengths
            features = torch.cat([F.pad(p["input_features"], (0, width - p["input_features"].shape[-1]))
                                  for p in prepared]).to(device)
            lengths_all = torch.cat([p["audio_feature_lengths"] for p in prepared])
            frames = model.encode_audio_frames(features, lengths_all).float().cpu()
            row = 0
            for key, p in zip(chunk, prepared):
                lengths = p["audio_feature_lengths"].cpu()
                windows = lengths.shape[0]
                keep = max(model.config.audio_token_count(int(n)) for n in lengths.tolist())
                cache.index[key] = len(cache.input_ids)
                cache.input_ids.append(p["input_ids"][0].cpu())
                cache.frames.append(frames[row : row + windows, :keep].clone())
                cache.lengths.append(lengths)
                row += windows
    finally:
        model.audio_frames_hook = previous
    return cache


def collate_clips(cache: ClipCache, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Model inputs (right padded) for cached clips: forward(input_ids, attention_mask, audio_frames, lengths)."""
    ids = [cache.input_ids[i] for i in rows]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, x in enumerate(ids):
        input_ids[r, : len(x)] = x
        attention_mask[r, : len(x)] = 1
    frames = [cache.frames[i] for i in rows]
    t_max = max(f.shape[1] for f in frames)
    frames = torch.cat([F.pad(f, (0, 0, 0, t_max - f.shape[1])) for f in frames])
    lengths = torch.cat([cache.lengths[i] for i in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "audio_frames": frames,
            "audio_feature_lengths": lengths}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def embed_clips(model: torch.nn.Module, cache: ClipCache, rows: list[int], pad_id: int, batch_size: int = 32,
                grad: bool = False) -> torch.Tensor:
    """Embeddings of cached clips (through projector + backbone); with grad only where the projector trains."""
    device = model_device(model)
    outs = []
    for start in range(0, len(rows), batch_size):
        batch = to_device(collate_clips(cache, rows[start : start + batch_size], pad_id), device)
        with torch.set_grad_enabled(grad):
            outs.append(model(**batch).embeddings.float())
    return torch.cat(outs)
