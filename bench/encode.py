"""Encoding throughput per modality and batch size, with baselines measured in the same run.

    python bench/encode.py [--configs tiny mid] [--batch-sizes 1 8] [--items 16] [--device cpu] [--dtype float32]

For each config (`tiny`: the tiny test repo; `mid`: Qwen2-VL-2B widths — hidden 1536, ViT 1280 — with 2 LLM layers,
2 ViT blocks and a Whisper-tiny-sized encoder, random weights) and modality it reports:
- `prep/s`: processor items/s (CPU preprocessing: resizing, patches, log-mel), measured separately;
- `model/s`: `ConanModel.forward` items/s on already-processed batches;
- `raw/s`: the baseline — the raw transformers `Qwen2VLModel` forward on the same batch (plus the Whisper encoder
  forward for audio), i.e. what our wrapper adds (`overhead` = raw time / model time inverted, target <= 5%);
- `loop/s`: one-item-at-a-time model items/s (what batching buys: `batch gain`).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.common import hub_code  # noqa: E402
from training.base.build_base import TINY_PROCESSOR_LIMITS, build_tiny_repo, build_tiny_tokenizer  # noqa: E402


def make_inputs(modality: str, n: int, rng: np.random.Generator) -> list:
    if modality == "text":
        words = "the quick brown fox jumps over a lazy dog while music plays in the park".split()
        return [" ".join(rng.choice(words, size=24)) for _ in range(n)]
    if modality in ("image", "document"):
        images = [Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)) for _ in range(n)]
        return images if modality == "image" else [{"document": im} for im in images]
    if modality == "video":
        return [{"video": rng.integers(0, 255, (8, 112, 112, 3), dtype=np.uint8)} for _ in range(n)]
    if modality == "audio":
        return [{"audio": {"array": (rng.standard_normal(16000 * 5) * 0.1).astype(np.float32), "sampling_rate": 16000}}
                for _ in range(n)]
    raise ValueError(modality)


def timed(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def raw_forward(model, batch: dict) -> None:
    """Baseline: the upstream modules alone on the same processed batch (no Conan wrapper)."""
    backbone = model.backbone
    types = batch["mm_token_type_ids"].masked_fill(batch["mm_token_type_ids"] == 3, 0)
    position_ids, _ = backbone.get_rope_index(
        batch["input_ids"], mm_token_type_ids=types, image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"), attention_mask=batch["attention_mask"],
    )
    if "input_features" in batch:
        model.audio_encoder(batch["input_features"].to(model.audio_encoder.conv1.weight.dtype))
    backbone(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=position_ids,
        pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
        pixel_values_videos=batch.get("pixel_values_videos"), video_grid_thw=batch.get("video_grid_thw"),
        mm_token_type_ids=types, use_cache=False,
    )


def mid_model(workdir: Path):
    """Qwen2-VL-2B widths with few layers, Whisper-tiny-sized audio encoder; random weights."""
    ConanConfig, ConanModel, ConanProcessor = hub_code.ConanConfig, hub_code.ConanModel, hub_code.ConanProcessor
    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from training.base.build_base import AUDIO_END, AUDIO_START, AUDIO_TOKEN, add_audio_token

    tokenizer = build_tiny_tokenizer()
    audio_id = add_audio_token(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    config = ConanConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=1536, intermediate_size=8960, num_hidden_layers=2,
                         num_attention_heads=12, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=2, embed_dim=1280, hidden_size=1536, num_heads=16),
        audio_config=dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536, num_mel_bins=80,
                          vocab_size=64, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
                          pad_token_id=1, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], audio_token_id=audio_id,
    )
    model = ConanModel(config)
    processor = ConanProcessor(
        image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer, feature_extractor=WhisperFeatureExtractor(),
        image_max_pixels=256 * 28 * 28, document_min_pixels=256 * 28 * 28,
        document_max_pixels=256 * 28 * 28, video_max_pixels=64 * 28 * 28,
        audio_token=AUDIO_TOKEN, audio_start_token=AUDIO_START, audio_end_token=AUDIO_END,
    )
    return model, processor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    parser.add_argument("--modalities", nargs="+", default=["text", "image", "document", "video", "audio"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--items", type=int, default=16, help="items per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)

    print("command: python " + " ".join(sys.argv))
    print(f"environment: python {platform.python_version()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, cpu {platform.processor() or platform.machine()}, device {args.device}, "
          f"dtype {args.dtype}")
    dtype = getattr(torch, args.dtype)
    rng = np.random.default_rng(0)
    header = f"| config | modality | batch | prep/s | model/s | raw/s | overhead | loop/s | batch gain |"
    print(header)
    print("|" + "---|" * 9)
    with tempfile.TemporaryDirectory() as workdir:
        for config_name in args.configs:
            if config_name == "tiny":
                repo = build_tiny_repo(Path(workdir) / "tiny")
                model = hub_code.ConanModel.from_pretrained(repo)
                processor = hub_code.ConanProcessor.from_pretrained(repo, trust_remote_code=True)
            else:
                model, processor = mid_model(Path(workdir))
            model = model.to(device=args.device, dtype=dtype).eval()
            for modality in args.modalities:
                inputs = make_inputs(modality, args.items, rng)
                for batch_size in args.batch_sizes:
                    chunks = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
                    prep_time = timed(lambda: [processor.prepare(c) for c in chunks], 1)
                    batches = [{k: v.to(args.device) for k, v in processor.prepare(c).items()} for c in chunks]
                    with torch.inference_mode():
                        model_time = timed(lambda: [model(**b) for b in batches], args.repeats)
                        raw_time = timed(lambda: [raw_forward(model, b) for b in batches], args.repeats)
                        singles = [{k: v.to(args.device) for k, v in processor.prepare([x]).items()} for x in inputs]
                        loop_time = timed(lambda: [model(**b) for b in singles], 1) if batch_size > 1 else model_time
                    n = len(inputs)
                    print(f"| {config_name} | {modality} | {batch_size} | {n / prep_time:.1f} | {n / model_time:.1f} | "
                          f"{n / raw_time:.1f} | {100 * (model_time / raw_time - 1):+.1f}% | {n / loop_time:.1f} | "
                          f"{loop_time / model_time:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
