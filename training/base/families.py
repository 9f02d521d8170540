"""Upstream model families the Conan builder reads: Qwen-VL backbones and audio encoders.

- `load_backbone`: a Qwen3-VL / Qwen2.5-VL / Qwen2-VL checkpoint through its own transformers `*Model` class.
- `load_audio_encoder`: a Whisper checkpoint (its encoder) or the audio tower of a Qwen3-Omni checkpoint, read out of
  the safetensors shards tensor by tensor (`thinker.audio_tower.*`), so the 30B model is never in memory.
- `write_tiny_backbone` / `write_tiny_audio`: tiny random checkpoints written with `save_pretrained` of the upstream
  `*ForConditionalGeneration` classes (sharded, real key prefixes), which the builder then reads like real ones.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperModel,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
    Qwen3OmniMoeAudioEncoderConfig,
    Qwen3OmniMoeConfig,
)
from transformers.utils import logging as transformers_logging

BACKBONE_FAMILIES = ("qwen3_vl", "qwen2_5_vl", "qwen2_vl")
AUDIO_FAMILIES = ("qwen3_omni", "whisper")
BACKBONE_CLASSES: dict[str, tuple[type, type, type]] = {
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLModel, Qwen3VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2_5_VLForConditionalGeneration),
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLModel, Qwen2VLForConditionalGeneration),
}
OMNI_AUDIO_PREFIX = "thinker.audio_tower."
QWEN_VL_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
TINY_SHARD_SIZE = "300KB"  # several shards even for tiny checkpoints, so the sharded reading path is what tests run


def _quiet_load(fn, *args, **kwargs):
    """Upstream checkpoints carry heads we do not use (lm_head, Whisper's decoder): their load report is expected."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return fn(*args, **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity)


def _read_config_dict(path: str) -> dict[str, Any]:
    return json.loads(Path(_resolve_file(path, "config.json")).read_text())


def _resolve_file(path: str, filename: str) -> str:
    """A file of a local folder, or of a Hub repo through huggingface_hub's cache (only that file is downloaded)."""
    if os.path.isdir(path):
        local = Path(path) / filename
        if not local.is_file():
            raise FileNotFoundError(f"{path} has no {filename}.")
        return str(local)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(path, filename)


def backbone_family_of(path: str) -> str:
    """`model_type` of a backbone checkpoint, checked against the supported families."""
    model_type = _read_config_dict(path).get("model_type")
    if model_type not in BACKBONE_CLASSES:
        raise ValueError(
            f"--backbone {path}: model_type {model_type!r} is not a supported backbone; expected one of "
            f"{BACKBONE_FAMILIES} (a Qwen3-VL, Qwen2.5-VL or Qwen2-VL checkpoint)."
        )
    return model_type


def audio_family_of(path: str) -> str:
    """`"qwen3_omni"` (a Qwen3-Omni checkpoint) or `"whisper"`, from the checkpoint's config.json."""
    model_type = _read_config_dict(path).get("model_type")
    if model_type == "qwen3_omni_moe":
        return "qwen3_omni"
    if model_type == "whisper":
        return "whisper"
    raise ValueError(
        f"--audio-encoder {path}: model_type {model_type!r} is not a supported audio encoder; expected a Qwen3-Omni "
        "(qwen3_omni_moe) or Whisper (whisper) checkpoint."
    )


def load_backbone(path: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The backbone through its family's own `*Model.from_pretrained` (the lm_head of the checkpoint is dropped)."""
    _, model_class, _ = BACKBONE_CLASSES[backbone_family_of(path)]
    return _quiet_load(model_class.from_pretrained, path, dtype=dtype)


def load_audio_encoder(path: str, dtype: torch.dtype = torch.float32) -> tuple[Any, dict[str, torch.Tensor]]:
    """`(audio_config, encoder_state_dict)` of a Whisper or Qwen3-Omni checkpoint.

    Whisper: the encoder of `WhisperModel.from_pretrained` (a small model). Qwen3-Omni: only the tensors under
    `thinker.audio_tower.` are read, one at a time, from the shards that hold them (`read_omni_audio_tower`).
    """
    if audio_family_of(path) == "whisper":
        whisper = _quiet_load(WhisperModel.from_pretrained, path, dtype=dtype)
        return whisper.config, whisper.encoder.state_dict()
    return read_omni_audio_tower(path, dtype)


def read_omni_audio_tower(path: str, dtype: torch.dtype = torch.float32) -> tuple[Any, dict[str, torch.Tensor]]:
    """The audio tower of a Qwen3-Omni checkpoint: its `Qwen3OmniMoeAudioEncoderConfig` and state dict.

    Peak memory is the audio tower itself: the index file names the shards holding `thinker.audio_tower.*`, and each
    tensor is read alone with `safetensors.safe_open(...).get_tensor` (memory-mapped), cast to `dtype`. For a Hub id,
    only the config, the index and those shards are downloaded. Raises ValueError when the checkpoint has no audio
    tower tensors.
    """
    from safetensors import safe_open

    config = _read_config_dict(path)
    audio_dict = dict(config.get("thinker_config", {}).get("audio_config") or {})
    audio_dict.pop("model_type", None)
    audio_config = Qwen3OmniMoeAudioEncoderConfig(**audio_dict)
    try:
        index = json.loads(Path(_resolve_file(path, "model.safetensors.index.json")).read_text())
        shard_of = index["weight_map"]
    except FileNotFoundError:
        shard_of = None
    if shard_of is None:  # a single-file checkpoint
        single = _resolve_file(path, "model.safetensors")
        with safe_open(single, "pt") as handle:
            shard_of = {key: "model.safetensors" for key in handle.keys()}
    by_shard: dict[str, list[str]] = defaultdict(list)
    for key, shard in shard_of.items():
        if key.startswith(OMNI_AUDIO_PREFIX):
            by_shard[shard].append(key)
    if not by_shard:
        raise ValueError(f"--audio-encoder {path}: no '{OMNI_AUDIO_PREFIX}*' tensors in the checkpoint.")
    state: dict[str, torch.Tensor] = {}
    for shard, keys in sorted(by_shard.items()):
        with safe_open(_resolve_file(path, shard), "pt") as handle:
            for key in keys:
                state[key[len(OMNI_AUDIO_PREFIX):]] = handle.get_tensor(key).to(dtype)
    return audio_config, state


def load_feature_extractor(path: str) -> WhisperFeatureExtractor:
    """The audio checkpoint's own feature extractor (Qwen3-Omni ships a 128-bin `WhisperFeatureExtractor`)."""
    return WhisperFeatureExtractor.from_pretrained(path)


# ----------------------------------------------------------------------------------------------- tiny checkpoints
def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2  # M-RoPE sections (t, h, w) must sum to head_dim / 2
    return [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]


def tiny_backbone_config(
    family: str,
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vision_width: int = 32,
    vision_depth: int = 1,
) -> Any:
    """A small random config of `family` with the tokenizer's special-token ids (same shapes across families)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_VL_SPECIAL_TOKENS}
    head_dim = hidden_size // num_heads
    text = dict(
        vocab_size=-(-(len(tokenizer) + 4) // 64) * 64, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim)},
        bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision_heads = max(1, vision_width // 16)
    if family == "qwen2_vl":
        vision = dict(depth=vision_depth, embed_dim=vision_width, hidden_size=hidden_size, num_heads=vision_heads,
                      mlp_ratio=2)
    elif family == "qwen2_5_vl":
        # window 56 px = 2x2 merged patches: tiny images have several windows, so window attention is exercised.
        vision = dict(depth=max(2, vision_depth), hidden_size=vision_width, intermediate_size=2 * vision_width,
                      num_heads=vision_heads, out_hidden_size=hidden_size, window_size=56,
                      fullatt_block_indexes=[max(2, vision_depth) - 1])
    elif family == "qwen3_vl":
        text["head_dim"] = head_dim
        depth = max(2, vision_depth)
        vision = dict(depth=depth, hidden_size=vision_width, intermediate_size=2 * vision_width,
                      num_heads=vision_heads, out_hidden_size=hidden_size, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])
    else:
        raise ValueError(f"backbone family {family!r}; expected one of {BACKBONE_FAMILIES}.")
    config_class = BACKBONE_CLASSES[family][0]
    return config_class(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def tiny_image_processor(family: str) -> Qwen2VLImageProcessorPil:
    """The family's image-processor settings at tiny pixel limits (Qwen3-VL: patch 16, mean/std 0.5)."""
    if family == "qwen3_vl":
        return Qwen2VLImageProcessorPil(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                        min_pixels=4 * 32 * 32, max_pixels=16 * 32 * 32)
    return Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)


def write_tiny_backbone(
    family: str,
    out_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    *sizes: int,
    seed: int = 0,
    max_shard_size: str | int = TINY_SHARD_SIZE,
    **size_kwargs: int,
) -> Path:
    """A random checkpoint in the upstream format: `<Family>ForConditionalGeneration.save_pretrained`, sharded.
    `sizes` / `size_kwargs` are `tiny_backbone_config`'s (hidden_size, num_layers, num_heads, vision_width, ...)."""
    torch.manual_seed(seed)
    config = tiny_backbone_config(family, tokenizer, *sizes, **size_kwargs)
    BACKBONE_CLASSES[family][2](config).save_pretrained(out_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    tiny_image_processor(family).save_pretrained(out_dir)
    return out_dir


def write_tiny_whisper(out_dir: Path, seed: int = 0) -> Path:
    """A tiny random `WhisperForConditionalGeneration` checkpoint (80 mel bins, d_model 32) and its extractor."""
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=64, num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, max_source_positions=1500,
        max_target_positions=32, pad_token_id=1, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=[], begin_suppress_tokens=[],
    )
    WhisperForConditionalGeneration(config).save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out_dir)
    return out_dir


def write_tiny_qwen3_omni(out_dir: Path, seed: int = 0, max_shard_size: str | int = TINY_SHARD_SIZE) -> Path:
    """A tiny random Qwen3-Omni thinker checkpoint (`Qwen3OmniMoeForConditionalGeneration`, no talker), sharded,
    with its real `thinker.audio_tower.*` keys, and a 128-bin `WhisperFeatureExtractor` like the real repo's."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    torch.manual_seed(seed)
    thinker = dict(
        audio_config=dict(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                          d_model=32, output_dim=48, downsample_hidden_size=16, max_source_positions=1500),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=32, num_experts=2,
                         num_experts_per_tok=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                 "mrope_section": [2, 3, 3]}),
    )
    config = Qwen3OmniMoeConfig(thinker_config=thinker, enable_audio_output=False)
    Qwen3OmniMoeForConditionalGeneration(config).save_pretrained(out_dir, max_shard_size=max_shard_size)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(out_dir)
    return out_dir


def write_tiny_audio(family: str, out_dir: Path, seed: int = 0) -> Path:
    """`write_tiny_qwen3_omni` or `write_tiny_whisper`."""
    if family == "qwen3_omni":
        return write_tiny_qwen3_omni(out_dir, seed)
    if family == "whisper":
        return write_tiny_whisper(out_dir, seed)
    raise ValueError(f"audio family {family!r}; expected one of {AUDIO_FAMILIES}.")
