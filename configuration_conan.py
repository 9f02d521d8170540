# Copyright 2026 The Conan-embedding-v3 authors. Licensed under the Apache License, Version 2.0.
"""Configuration of Conan-embedding-v3: a Qwen-VL backbone, an audio encoder and a two-layer MLP projector.

Composition, not inheritance: `ConanConfig.backbone_config` is the backbone's own config (`Qwen3VLConfig` — the
paper's —, `Qwen2_5_VLConfig` or `Qwen2VLConfig`) and `audio_config` the audio encoder's (`Qwen3OmniMoeAudioEncoderConfig`
— the paper's — or `WhisperConfig`). `modeling_conan.ConanModel` builds transformers' own classes from them.

Backward compatibility: repos written before the composition (config.json with `text_config`, `vision_config` and the
image/video token ids at the root, `backbone_model_type: "qwen2_vl"`) load unchanged: those keys are gathered into a
`Qwen2VLConfig` backbone. `text_config`, `vision_config` and the vision token ids stay readable on `ConanConfig` as
read-only views of `backbone_config`.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PreTrainedConfig, Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig, WhisperConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import AutoConfig
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeAudioEncoderConfig

WHISPER_WINDOW_FRAMES = 3000  # 30 s of 10 ms log-mel frames: the only length Whisper's encoder accepts
SAMPLING_RATE = 16000
BACKBONE_CONFIGS: dict[str, type[PreTrainedConfig]] = {
    "qwen3_vl": Qwen3VLConfig,
    "qwen2_5_vl": Qwen2_5_VLConfig,
    "qwen2_vl": Qwen2VLConfig,
}
AUDIO_CONFIGS: dict[str, type[PreTrainedConfig]] = {
    "qwen3_omni_moe_audio_encoder": Qwen3OmniMoeAudioEncoderConfig,
    "whisper": WhisperConfig,
}
SUPPORTED_BACKBONES = tuple(BACKBONE_CONFIGS)
EMBEDDING_POOLINGS = ("last_token", "compression_mean")  # ConanConfig.embedding_pooling
# Keys that sat at the root of config.json while ConanConfig subclassed Qwen2VLConfig (repos built up to d51a093).
LEGACY_BACKBONE_KEYS = ("text_config", "vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
                        "vision_end_token_id")
BACKBONE_VIEWS = LEGACY_BACKBONE_KEYS[1:]


def check_backbone_model_type(model_type: str) -> None:
    """Raise ValueError naming the supported Qwen-VL generations when `model_type` is not one of them."""
    if model_type not in BACKBONE_CONFIGS:
        raise ValueError(
            f"Unsupported backbone model_type {model_type!r}; expected one of {SUPPORTED_BACKBONES} "
            "(a Qwen3-VL, Qwen2.5-VL or Qwen2-VL checkpoint)."
        )


# mm_token_type_ids, one table for processor and model. The Qwen2-VL backbone's M-RoPE knows text/image/video only;
# audio placeholders are text positions for it (ConanModel.forward maps "audio" to "text" before the backbone).
MM_TOKEN_TYPES = {"text": 0, "image": 1, "video": 2, "audio": 3}


def audio_tokens_for_frames(mel_frames: int, downsample: int) -> int:
    """Number of audio placeholders for one 30 s Whisper window holding `mel_frames` real log-mel frames.

    Whisper's stride-2 convolution gives (L-1)//2+1 frames; pooling by `downsample` (ceil mode) keeps a partial
    last group. The processor uses the same rule to insert placeholders (shared by processor and model).
    """
    encoder_frames = (max(int(mel_frames), 1) - 1) // 2 + 1
    return math.ceil(encoder_frames / downsample)


def omni_audio_tokens_for_frames(mel_frames: int, n_window: int, downsample: int = 1) -> int:
    """Tokens the Qwen3-Omni audio encoder gives for one clip of `mel_frames` log-mel frames (no length limit).

    Same arithmetic as `transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe._get_feat_extract_output_lengths`
    (13 tokens per 100-frame chunk, three stride-2 convolutions on the tail chunk), then ceil-pooled by `downsample`.
    """
    frames = max(int(mel_frames), 1)
    chunk = n_window * 2
    tail = (frames % chunk - 1) // 2 + 1
    tokens = ((tail - 1) // 2 + 1 - 1) // 2 + 1 + (frames // chunk) * 13
    return math.ceil(tokens / downsample)


def audio_family(audio_config: PreTrainedConfig) -> str:
    """`"qwen3_omni"` or `"whisper"` for an audio config."""
    return "qwen3_omni" if audio_config.model_type == "qwen3_omni_moe_audio_encoder" else "whisper"


def _sub_config(value: Any, registry: dict[str, type[PreTrainedConfig]], default: str, what: str) -> PreTrainedConfig:
    if isinstance(value, PreTrainedConfig):
        config_type = value.model_type
        if config_type not in registry:
            raise ValueError(f"{what} has model_type {config_type!r}; expected one of {tuple(registry)}.")
        return value
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a dict or a config, got {type(value).__name__}.")
    config_type = value.get("model_type", default)
    if config_type not in registry:
        raise ValueError(f"{what} has model_type {config_type!r}; expected one of {tuple(registry)}.")
    return registry[config_type](**{k: v for k, v in value.items() if k != "model_type"})


class ConanConfig(PreTrainedConfig):
    r"""
    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the Qwen-VL backbone: model_type `qwen3_vl` (default; the paper's Qwen3-VL-8B), `qwen2_5_vl` or
            `qwen2_vl`. Its text_config/vision_config/token ids are used as they are.
        audio_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the audio encoder: model_type `qwen3_omni_moe_audio_encoder` (the paper's: the audio tower of
            Qwen3-Omni-30B-A3B, ~12.5 tokens per second, any length) or `whisper` (default for backward
            compatibility; 30 s windows, 50 frames per second).
        audio_token_id (`int`):
            Id of the audio placeholder token (`<|AUDIO|>` in repos built now, `<|audio_pad|>` in older ones):
            projected audio tokens replace these placeholder embeddings.
        audio_start_token_id / audio_end_token_id (`int`, *optional*):
            Ids of `<|audio_start|>` / `<|audio_end|>` around the placeholders (None in older repos).
        audio_downsample (`int`, *optional*):
            Average-pooling stride over encoder tokens before the projector. None picks the family default: Whisper 2
            (-> 25 tokens per second), Qwen3-Omni 1 (its encoder already gives ~12.5 tokens per second).
        projector_intermediate_size (`int`, *optional*):
            Width of the projector's hidden layer: `audio_dim -> projector_intermediate_size -> hidden_size`. None
            means `hidden_size` (the layout of repos built before this field existed). The paper states ~19M
            parameters for 2048 -> 4096, which gives ~3072 with biases (our arithmetic; the paper gives no width).
        projector_hidden_act (`str`):
            Activation of the two-layer MLP audio projector.
        projector_calibration_hash (`str`, *optional*):
            Fingerprint (`modeling_conan.backbone_fingerprint`) of the backbone the audio projector was trained on.
            Loading the projector onto another backbone (e.g. after fusion) logs a Projector Drift warning.
        embedding_pooling (`str`):
            How one row's final-norm hidden states become its embedding (then L2-normalised):
            `"last_token"` (default): the hidden state of the last real token.
            `"compression_mean"`: the mean over the row's compression tokens, which `ConanProcessor` appends after the
            rendered input (CoMa, "Compressing then Matching", arXiv 2511.08480; released code
            Trustworthy-Information-Access/CoMa, whose k learnable `<|ctoken_pad_i|>` tokens, 32 by default there,
            follow the input and are mean-pooled for the embedding). Needs `compression_token_ids`.
        num_compression_tokens (`int`):
            k, the number of compression tokens (0 unless `embedding_pooling="compression_mean"`). Filled from
            `len(compression_token_ids)` when left at 0.
        compression_token_ids (`list[int]`, *optional*):
            Token ids of `<|ctoken_pad_0|>` ... `<|ctoken_pad_{k-1}|>` in the order they are appended; distinct and
            below the backbone's `vocab_size`. Given exactly when `embedding_pooling="compression_mean"`. The tokens
            are added by `training.build_base --compression-tokens K`, so every model built on that base shares them.
    """

    model_type = "conan"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3_vl"),
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper"),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None
    audio_token_id: int = 151657
    audio_start_token_id: int | None = None
    audio_end_token_id: int | None = None
    audio_downsample: int | None = None
    projector_intermediate_size: int | None = None
    projector_hidden_act: str = "gelu"
    projector_calibration_hash: str | None = None
    embedding_pooling: str = "last_token"
    num_compression_tokens: int = 0
    compression_token_ids: list[int] | None = None

    def __post_init__(self, **kwargs):
        legacy = {key: kwargs.pop(key) for key in LEGACY_BACKBONE_KEYS if key in kwargs}
        legacy_type = kwargs.pop("backbone_model_type", None)
        if legacy:
            if self.backbone_config is not None:
                raise ValueError(
                    f"ConanConfig got both backbone_config and the legacy root keys {sorted(legacy)}; "
                    "put them inside backbone_config."
                )
            check_backbone_model_type(legacy_type or "qwen2_vl")
            self.backbone_config = {"model_type": legacy_type or "qwen2_vl", **legacy}
        self.backbone_config = _sub_config(self.backbone_config, BACKBONE_CONFIGS, "qwen3_vl", "backbone_config")
        self.audio_config = _sub_config(self.audio_config, AUDIO_CONFIGS, "whisper", "audio_config")
        if legacy_type is not None and legacy_type != self.backbone_config.model_type:
            raise ValueError(
                f"backbone_model_type={legacy_type!r} disagrees with backbone_config.model_type="
                f"{self.backbone_config.model_type!r}."
            )
        self._check_pooling()
        if self.audio_downsample is None:
            self.audio_downsample = 1 if self.audio_family == "qwen3_omni" else 2
        if self.audio_downsample < 1:
            raise ValueError(f"audio_downsample must be >= 1, got {self.audio_downsample}.")
        if self.projector_intermediate_size is not None and self.projector_intermediate_size < 1:
            raise ValueError(f"projector_intermediate_size must be >= 1 or None, got {self.projector_intermediate_size}.")
        super().__post_init__(**kwargs)

    def _check_pooling(self) -> None:
        """Validate `embedding_pooling` with `num_compression_tokens` / `compression_token_ids` (see the class doc)."""
        if self.embedding_pooling not in EMBEDDING_POOLINGS:
            raise ValueError(f"embedding_pooling={self.embedding_pooling!r}; expected one of {EMBEDDING_POOLINGS}.")
        ids, k = self.compression_token_ids, self.num_compression_tokens
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"num_compression_tokens must be an int >= 0, got {k!r}.")
        if self.embedding_pooling == "last_token":
            if ids or k:
                raise ValueError(
                    f"compression_token_ids={ids!r} / num_compression_tokens={k} are set but embedding_pooling="
                    "'last_token'; compression tokens are used only with embedding_pooling='compression_mean'."
                )
            self.compression_token_ids = None
            return
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError(
                "embedding_pooling='compression_mean' needs compression_token_ids, a non-empty list of the "
                f"<|ctoken_pad_i|> token ids (got {ids!r}); build the base with `training.build_base "
                "--compression-tokens K`."
            )
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise ValueError(f"compression_token_ids must be ints, got {ids!r}.")
        if len(set(ids)) != len(ids):
            raise ValueError(f"compression_token_ids must be distinct, got {ids!r}.")
        vocab_size = getattr(self.text_config, "vocab_size", None)
        bad = [i for i in ids if i < 0 or (vocab_size is not None and i >= vocab_size)]
        if bad:
            raise ValueError(f"compression_token_ids {bad} are outside the vocabulary [0, {vocab_size}).")
        placeholders = {self.audio_token_id, self.image_token_id, self.video_token_id} & set(ids)
        if placeholders:
            raise ValueError(f"compression_token_ids {sorted(placeholders)} are media placeholder ids "
                             "(audio/image/video).")
        if k and k != len(ids):
            raise ValueError(f"num_compression_tokens={k} but {len(ids)} compression_token_ids were given.")
        self.compression_token_ids = [int(i) for i in ids]
        self.num_compression_tokens = len(ids)

    # Read-only views kept for code (and users) written against the Qwen2VLConfig subclass.
    @property
    def backbone_model_type(self) -> str:
        return self.backbone_config.model_type

    @property
    def audio_family(self) -> str:
        return audio_family(self.audio_config)

    @property
    def text_config(self) -> PreTrainedConfig:
        return self.backbone_config.text_config

    @property
    def vision_config(self) -> PreTrainedConfig:
        return self.backbone_config.vision_config

    @property
    def image_token_id(self) -> int:
        return self.backbone_config.image_token_id

    @property
    def video_token_id(self) -> int:
        return self.backbone_config.video_token_id

    @property
    def vision_start_token_id(self) -> int:
        return self.backbone_config.vision_start_token_id

    @property
    def vision_end_token_id(self) -> int:
        return self.backbone_config.vision_end_token_id

    @property
    def audio_dim(self) -> int:
        """Width of the audio encoder's output tokens (Whisper d_model, Qwen3-Omni output_dim)."""
        audio = self.audio_config
        return audio.output_dim if self.audio_family == "qwen3_omni" else audio.d_model

    def audio_token_count(self, mel_frames: int) -> int:
        """Placeholders one audio row of `mel_frames` real log-mel frames becomes (Whisper: per 30 s window)."""
        if self.audio_family == "qwen3_omni":
            return omni_audio_tokens_for_frames(mel_frames, self.audio_config.n_window, self.audio_downsample)
        return audio_tokens_for_frames(mel_frames, self.audio_downsample)


__all__ = [
    "MM_TOKEN_TYPES", "ConanConfig", "audio_tokens_for_frames", "omni_audio_tokens_for_frames", "check_backbone_model_type",
    "audio_family", "EMBEDDING_POOLINGS",
]
