"""A cache of the frozen Whisper encoder's pooled frames, shared by every stage and evaluation.

The audio encoder never changes across stages, so each 30 s window is encoded once: set
`model.audio_frames_hook = AudioFrameCache.for_model(model, cache_dir)` (`ConanModel.encode_audio_frames` calls the
hook instead of the encoder). Keys are a hash of the window's log-mel features plus a fingerprint of the encoder
weights (a different encoder never reads stale frames). Only each window's real frames are stored; frames past them
come back as zeros, which `ConanModel.forward` never reads (it keeps the first `config.audio_token_count(length)`
tokens of each window).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from training.common import hub_code
from training.common.io_utils import torch_save_atomic


def module_fingerprint(module: torch.nn.Module) -> str:
    """Hash of a module's parameters and buffers (names, shapes, dtypes and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class AudioFrameCache:
    """In-memory cache of pooled Whisper frames, optionally persisted as one file per window in `cache_dir`."""

    def __init__(self, encoder_fingerprint: str, cache_dir: str | os.PathLike | None = None):
        self.encoder_fingerprint = encoder_fingerprint
        self.cache_dir = Path(cache_dir) / encoder_fingerprint if cache_dir else None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, cache_dir: str | os.PathLike | None = None) -> "AudioFrameCache":
        fingerprint = module_fingerprint(model.audio_encoder) + f"-k{model.config.audio_downsample}"
        return cls(fingerprint, cache_dir)

    def _key(self, features: torch.Tensor) -> str:
        data = features.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return hashlib.blake2b(data, digest_size=20).hexdigest()

    def get(self, features: torch.Tensor) -> torch.Tensor | None:
        key = self._key(features)
        frames = self._memory.get(key)
        if frames is None and self.cache_dir and (self.cache_dir / f"{key}.pt").exists():
            frames = torch.load(self.cache_dir / f"{key}.pt", weights_only=True)
            self._memory[key] = frames
        if frames is None:
            self.misses += 1
        else:
            self.hits += 1
        return frames

    def put(self, features: torch.Tensor, frames: torch.Tensor) -> None:
        key = self._key(features)
        frames = frames.detach().to("cpu").clone()
        self._memory[key] = frames
        if self.cache_dir:
            torch_save_atomic(self.cache_dir / f"{key}.pt", frames)

    def __call__(self, model: torch.nn.Module, input_features: torch.Tensor,
                 audio_feature_lengths: torch.Tensor) -> torch.Tensor:
        """`ConanModel.audio_frames_hook`: pooled tokens `(rows, tokens, audio_dim)`, encoding only misses.

        Whisper rows are 30 s windows of `ceil(1500/k)` tokens; Qwen3-Omni rows are whole clips, as wide as the
        longest clip's `config.audio_token_count(length)`. Tokens past a row's real count are zeros.
        """
        counts = [model.config.audio_token_count(int(n)) for n in audio_feature_lengths.tolist()]
        if model.config.audio_family == "qwen3_omni":
            width = max(counts)
        else:
            width = -(-(hub_code.load("configuration_conan").WHISPER_WINDOW_FRAMES // 2) // model.config.audio_downsample)
        out = torch.zeros(input_features.shape[0], width, model.config.audio_dim,
                          dtype=model.audio_encoder_dtype(), device=input_features.device)
        cached = [self.get(row) for row in input_features]
        todo = [i for i, frames in enumerate(cached) if frames is None]
        if todo:
            fresh = model.run_audio_encoder(input_features[todo], audio_feature_lengths[todo])
            for j, i in enumerate(todo):
                cached[i] = fresh[j, : counts[i]]
                self.put(input_features[i], cached[i])
        for i, frames in enumerate(cached):
            out[i, : frames.shape[0]] = frames.to(out.device, out.dtype)
        return out
