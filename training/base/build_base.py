"""Assemble a Conan base repo from real parts: a Qwen2-VL checkpoint + a Whisper checkpoint.

    python -m training.build_base --backbone Qwen/Qwen2-VL-2B-Instruct --audio-encoder openai/whisper-large-v3 --out DIR
    python -m training.build_base --tiny --out DIR     # tiny random upstream checkpoints first, then the same path

The output folder loads with `AutoModel`/`AutoProcessor.from_pretrained(DIR, trust_remote_code=True)` and
`SentenceTransformer(DIR, trust_remote_code=True)`. The audio token is added to the tokenizer, the projector is
freshly initialised, everything else is copied from the upstream checkpoints.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Qwen2VLModel,
    WhisperFeatureExtractor,
    WhisperModel,
)
from transformers.utils import logging as transformers_logging

from training.common import hub_code
from training.common.io_utils import atomic_output_dir, write_json_atomic
from training.common.repo import save_conan_repo

AUDIO_TOKEN = "<|audio_pad|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'audio' %}<|audio_pad|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<|endoftext|>{% endif %}"
)
# Processor limits for the tiny repo: small images and few frames keep CPU tests fast.
TINY_PROCESSOR_LIMITS = {
    "image_max_pixels": 16 * 28 * 28,
    "document_min_pixels": 16 * 28 * 28,
    "document_max_pixels": 64 * 28 * 28,
    "video_max_frames": 8,
    "video_max_pixels": 4 * 28 * 28,
}


def add_audio_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Register `<|audio_pad|>` as a special token (kept atomic) and expose it as `tokenizer.audio_token`."""
    if AUDIO_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [AUDIO_TOKEN]}, replace_extra_special_tokens=False)
    # Model-specific named tokens survive save/reload in tokenizer_config.json (transformers 5.x).
    tokenizer._set_model_specific_special_tokens(
        {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "audio_token": AUDIO_TOKEN}
    )
    return int(tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))


def assemble_base(
    backbone: str,
    audio_encoder: str,
    out: str | Path,
    processor_limits: dict[str, Any] | None = None,
    audio_downsample: int = 2,
    tokenizer: PreTrainedTokenizerBase | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> Path:
    """Build the Conan base repo at `out` from a Qwen2-VL and a Whisper checkpoint (local paths or Hub ids)."""
    hub_code.load("configuration_conan").check_backbone_model_type(AutoConfig.from_pretrained(backbone).model_type)
    ConanConfig, ConanModel, ConanProcessor = hub_code.ConanConfig, hub_code.ConanModel, hub_code.ConanProcessor

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(backbone)
    audio_token_id = add_audio_token(tokenizer)
    # Upstream checkpoints carry heads we do not use (lm_head, the Whisper decoder is kept but unused): the
    # load report would list them as unexpected, which is expected here, so it is silenced for these two loads.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        vlm = Qwen2VLModel.from_pretrained(backbone, dtype=torch.float32)
        whisper = WhisperModel.from_pretrained(audio_encoder, dtype=torch.float32)
    finally:
        transformers_logging.set_verbosity(verbosity)
    vlm_config = vlm.config
    config = ConanConfig(
        text_config=vlm_config.text_config.to_dict(),
        vision_config=vlm_config.vision_config.to_dict(),
        image_token_id=vlm_config.image_token_id,
        video_token_id=vlm_config.video_token_id,
        vision_start_token_id=vlm_config.vision_start_token_id,
        vision_end_token_id=vlm_config.vision_end_token_id,
        audio_config=whisper.config.to_dict(),
        audio_token_id=audio_token_id,
        audio_downsample=audio_downsample,
    )
    torch.manual_seed(seed)
    model = ConanModel(config)
    if len(tokenizer) > vlm.get_input_embeddings().num_embeddings:
        vlm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        config.text_config.vocab_size = len(tokenizer)
        model = ConanModel(config)
    _load_strict(model.backbone, vlm.state_dict(), "backbone")
    _load_strict(model.audio_encoder, whisper.encoder.state_dict(), "audio_encoder")

    image_processor = AutoImageProcessor.from_pretrained(backbone)
    feature_extractor = WhisperFeatureExtractor.from_pretrained(audio_encoder)
    if feature_extractor.feature_size != config.audio_config.num_mel_bins:
        raise ValueError(
            f"Whisper feature extractor gives {feature_extractor.feature_size} mel bins but the encoder expects "
            f"{config.audio_config.num_mel_bins}."
        )
    processor = ConanProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        feature_extractor=feature_extractor,
        chat_template=CHAT_TEMPLATE,
        audio_downsample=audio_downsample,
        **(processor_limits or {}),
    )
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        save_conan_repo(model, processor, tmp)
        write_json_atomic(tmp / "build_info.json", {"backbone": str(backbone), "audio_encoder": str(audio_encoder)})
    return Path(out)


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{name}: checkpoint does not match the architecture; missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}."
        )


# --------------------------------------------------------------------------------------------------- tiny repo
QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]


def _tiny_corpus() -> list[str]:
    """Real English text that ships with Python: docstrings of standard-library modules."""
    import collections, json as json_module, os as os_module, pathlib, re, string, textwrap  # noqa: E401

    docs = [m.__doc__ or "" for m in (collections, json_module, os_module, pathlib, re, string, textwrap, argparse)]
    return [line for doc in docs for line in doc.splitlines() if line.strip()]


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerBase:
    """A small byte-level BPE with the Qwen2-VL special tokens (the real vocabulary is 151k: too big for tiny)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN2_VL_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def write_random_qwen2_vl(
    out_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vision_width: int = 32,
    vision_depth: int = 1,
    seed: int = 0,
) -> Path:
    """A random Qwen2-VL checkpoint in the upstream format (`Qwen2VLForConditionalGeneration.save_pretrained`)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    half_head = hidden_size // num_heads // 2  # M-RoPE sections (t, h, w) must sum to head_dim / 2
    mrope_section = [half_head - 2 * (half_head * 3 // 8), half_head * 3 // 8, half_head * 3 // 8]
    qwen_config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=-(-(len(tokenizer) + 1) // 64) * 64, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                            "mrope_section": mrope_section},
            bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=vision_depth, embed_dim=vision_width, hidden_size=hidden_size,
                           num_heads=max(1, vision_width // 16), mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    Qwen2VLForConditionalGeneration(qwen_config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28).save_pretrained(out_dir)
    return out_dir


def write_tiny_upstream_checkpoints(root: Path, hidden_size: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Tiny random Qwen2-VL and Whisper checkpoints in their upstream formats (`save_pretrained`)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    backbone_dir = write_random_qwen2_vl(root / "tiny-qwen2-vl", build_tiny_tokenizer(), hidden_size, seed=seed)
    audio_dir = root / "tiny-whisper"
    whisper_config = WhisperConfig(
        vocab_size=64, num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, max_source_positions=1500,
        max_target_positions=32, pad_token_id=1, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=[], begin_suppress_tokens=[],
    )
    WhisperForConditionalGeneration(whisper_config).save_pretrained(audio_dir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(audio_dir)
    return backbone_dir, audio_dir


def build_tiny_repo(out: str | Path, overwrite: bool = False, seed: int = 0) -> Path:
    """The tiny test/demo repo: tiny upstream checkpoints written to disk, then assembled like real ones."""
    with tempfile.TemporaryDirectory(prefix="conan-tiny-upstream-") as scratch:
        backbone_dir, audio_dir = write_tiny_upstream_checkpoints(Path(scratch), seed=seed)
        return assemble_base(
            str(backbone_dir), str(audio_dir), out, processor_limits=TINY_PROCESSOR_LIMITS, overwrite=overwrite, seed=seed
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", "--out", dest="out", required=True, help="output folder (the Conan base repo)")
    parser.add_argument("--tiny", action="store_true", help="build from tiny random upstream checkpoints")
    parser.add_argument("--backbone", help="Qwen2-VL checkpoint: local folder or Hub id")
    parser.add_argument("--audio-encoder", help="Whisper checkpoint: local folder or Hub id")
    parser.add_argument("--audio-downsample", type=int, default=2, help="pool Whisper frames by this stride")
    parser.add_argument("--processor-limits", type=json.loads, default=None,
                        help='JSON dict of ConanProcessor limits, e.g. \'{"video_max_frames": 32}\'')
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tiny:
        out = build_tiny_repo(args.out, overwrite=args.force, seed=args.seed)
    else:
        if not args.backbone or not args.audio_encoder:
            parser.error("--backbone and --audio-encoder are required unless --tiny is given")
        out = assemble_base(
            args.backbone, args.audio_encoder, args.out, processor_limits=args.processor_limits,
            audio_downsample=args.audio_downsample, overwrite=args.force, seed=args.seed,
        )
    size_mb = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()) / 2**20
    print(f"Conan base repo written to {out} ({size_mb:.1f} MB)")


if __name__ == "__main__":
    main()
