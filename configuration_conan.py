# Copyright 2026 The Conan-embedding-v3 authors. Licensed under the Apache License, Version 2.0.
"""Configuration of Conan-embedding-v3: a Qwen2-VL backbone plus a Whisper audio encoder and projector.

The config *is* a `Qwen2VLConfig` (text_config, vision_config, image/video token ids) extended with the audio
branch, so the backbone can be built with `Qwen2VLModel._from_config(config)` and every Qwen2-VL checkpoint's
config maps onto it unchanged.
"""

from __future__ import annotations

import math

from transformers import PreTrainedConfig, Qwen2VLConfig, WhisperConfig

WHISPER_WINDOW_FRAMES = 3000  # 30 s of 10 ms log-mel frames: the only length Whisper's encoder accepts
SAMPLING_RATE = 16000
SUPPORTED_BACKBONES = ("qwen2_vl",)
NOT_YET_SUPPORTED_BACKBONES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def check_backbone_model_type(model_type: str) -> None:
    """Fail early, and say so plainly, for Qwen-VL generations this package cannot build yet."""
    if model_type in SUPPORTED_BACKBONES:
        return
    if model_type in NOT_YET_SUPPORTED_BACKBONES:
        raise NotImplementedError(
            f"Backbone model_type {model_type!r} is not supported yet by Conan-embedding-v3: only "
            f"{SUPPORTED_BACKBONES} backbones can be built. Qwen2.5-VL needs second_per_grid_ts and window attention "
            "in the video path; Qwen3-VL rejects input_ids together with inputs_embeds (audio injection)."
        )
    raise ValueError(f"Unknown backbone model_type {model_type!r}; expected one of {SUPPORTED_BACKBONES}.")


# mm_token_type_ids, one table for processor and model. The Qwen2-VL backbone's M-RoPE knows text/image/video only;
# audio placeholders are text positions for it (ConanModel.forward maps "audio" to "text" before the backbone).
MM_TOKEN_TYPES = {"text": 0, "image": 1, "video": 2, "audio": 3}


def audio_tokens_for_frames(mel_frames: int, downsample: int) -> int:
    """Number of `<|audio_pad|>` tokens for one 30 s window holding `mel_frames` real log-mel frames.

    Whisper's stride-2 convolution gives (L-1)//2+1 frames; pooling by `downsample` (ceil mode) keeps a partial
    last group. The processor uses the same rule to insert placeholders (shared by processor and model).
    """
    encoder_frames = (max(int(mel_frames), 1) - 1) // 2 + 1
    return math.ceil(encoder_frames / downsample)


class ConanConfig(Qwen2VLConfig):
    r"""
    Args:
        audio_config (`dict` or `WhisperConfig`, *optional*):
            Config of the Whisper encoder that turns log-mel features into audio frames (50 frames per second).
        audio_token_id (`int`):
            Id of `<|audio_pad|>`: projected audio frames replace these placeholder embeddings.
        audio_downsample (`int`):
            Average-pooling stride over Whisper frames before the projector (2 -> 25 tokens per second).
        projector_calibration_hash (`str`, *optional*):
            Fingerprint (`modeling_conan.backbone_fingerprint`) of the backbone the audio projector was trained on.
            Loading the projector onto another backbone (e.g. after fusion) logs a Projector Drift warning.
        projector_hidden_act (`str`):
            Activation of the two-layer MLP audio projector.
        backbone_model_type (`str`):
            Which Qwen-VL generation the backbone is; only `"qwen2_vl"` is supported now.
        embedding_pooling (`str`):
            `"last_token"`: the embedding is the final-norm hidden state of the last real token.
    """

    model_type = "conan"
    sub_configs_defaults = {**Qwen2VLConfig.sub_configs_defaults, "audio_config": WhisperConfig}

    audio_config: dict | PreTrainedConfig | None = None
    audio_token_id: int = 151657
    audio_downsample: int = 2
    projector_calibration_hash: str | None = None
    projector_hidden_act: str = "gelu"
    backbone_model_type: str = "qwen2_vl"
    embedding_pooling: str = "last_token"

    def __post_init__(self, **kwargs):
        check_backbone_model_type(self.backbone_model_type)
        if self.embedding_pooling != "last_token":
            raise ValueError(f"embedding_pooling={self.embedding_pooling!r}: only 'last_token' is implemented.")
        if self.audio_downsample < 1:
            raise ValueError(f"audio_downsample must be >= 1, got {self.audio_downsample}.")
        super().__post_init__(**kwargs)


__all__ = ["MM_TOKEN_TYPES", "ConanConfig", "audio_tokens_for_frames", "check_backbone_model_type"]
