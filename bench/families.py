"""Backbone family cost at the main job's small size: should the small default stay Qwen2-VL-shaped?

For each family, a random backbone of the `small` preset's shape (training/small_base.py SIZES) with a Whisper
tiny.en-shaped encoder (random; only the shape matters for cost) is built through the real builder, then a fixed mixed
batch (images, a document page, videos, texts) is encoded on CPU: parameters, sequence tokens per input kind,
forward and forward+backward wall time (median of `--repeats`), each family measured in turn. Audio is left out of
the timed batch (its path is the same for every backbone family) but its token count is reported.

    OMP_NUM_THREADS=1 python -m bench.families --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _build(family: str, root: Path) -> Path:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from training.base import families
    from training.base.build_base import assemble_base, build_tiny_tokenizer
    from training.base.small_base import PROCESSOR_LIMITS, SIZES

    spec = SIZES["small"]
    backbone = families.write_tiny_backbone(
        family, root / family, build_tiny_tokenizer(), spec.hidden_size, spec.num_layers, spec.num_heads,
        spec.vision_width, spec.vision_depth,
    )
    whisper = root / "whisper-tiny-shape"
    if not whisper.exists():  # Whisper tiny.en's shape (d_model 384, 4 layers, 6 heads, 80 mel bins)
        WhisperForConditionalGeneration(WhisperConfig(
            vocab_size=64, num_mel_bins=80, d_model=384, encoder_layers=4, encoder_attention_heads=6,
            encoder_ffn_dim=1536, decoder_layers=1, decoder_attention_heads=6, decoder_ffn_dim=64,
            max_target_positions=32, pad_token_id=1, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
            suppress_tokens=[], begin_suppress_tokens=[],
        )).save_pretrained(whisper)
        WhisperFeatureExtractor(feature_size=80).save_pretrained(whisper)
    unit = (32 if family == "qwen3_vl" else 28) ** 2  # same token budgets, in the family's pixel units
    limits = {k: v * unit // 28**2 if k.endswith("_pixels") else v for k, v in PROCESSOR_LIMITS.items()}
    return assemble_base(str(backbone), str(whisper), root / f"repo-{family}", processor_limits=limits)


def _inputs() -> dict[str, list]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    video = rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    audio = {"array": (rng.standard_normal(16000 * 3) * 0.1).astype(np.float32), "sampling_rate": 16000}
    return {
        "image": [image] * 4, "document": [{"document": image}], "video": [{"video": video}] * 2,
        "text": ["a short caption of a photo"] * 4, "audio": [{"audio": audio}] * 2,
    }


def measure(family: str, root: Path, repeats: int) -> dict:
    from training.common import hub_code

    repo = _build(family, root)
    model = hub_code.ConanModel.from_pretrained(repo, dtype=torch.float32).eval()
    processor = hub_code.ConanProcessor.from_pretrained(repo)
    groups = _inputs()
    batch = processor.prepare([x for kind, items in groups.items() if kind != "audio" for x in items])
    tokens = {kind: int(processor.prepare(items[:1])["attention_mask"].sum()) for kind, items in groups.items()}
    forward, backward = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            model(**batch)
        forward.append(time.perf_counter() - start)
        start = time.perf_counter()
        model(**batch).embeddings.sum().backward()
        backward.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    count = lambda prefix: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))  # noqa: E731
    return {
        "family": family, "params_llm": count("backbone.language_model."), "params_vision": count("backbone.visual."),
        "tokens_per_input": tokens, "batch_shape": list(batch["input_ids"].shape),
        "forward_ms": 1000 * statistics.median(forward), "forward_backward_ms": 1000 * statistics.median(backward),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-families-") as scratch:
        for family in args.families:
            print(json.dumps(measure(family, Path(scratch), args.repeats)))


if __name__ == "__main__":
    main()
