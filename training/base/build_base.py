"""Assemble a Conan base repo from real parts: a Qwen-VL backbone + an audio encoder checkpoint.

    # the paper's parts: Qwen3-VL-8B + the audio tower of Qwen3-Omni-30B-A3B (read tensor by tensor)
    python -m training.build_base --backbone Qwen/Qwen3-VL-8B-Instruct \
        --audio-encoder Qwen/Qwen3-Omni-30B-A3B-Instruct --out DIR
    # any supported pair: Qwen3-VL | Qwen2.5-VL | Qwen2-VL  x  Qwen3-Omni | Whisper (Hub ids or local folders)
    python -m training.build_base --backbone Qwen/Qwen2-VL-2B-Instruct --audio-encoder openai/whisper-large-v3 --out DIR
    # tiny random upstream checkpoints first (save_pretrained of the upstream classes), then the same path
    python -m training.build_base --tiny --backbone-family qwen3_vl --audio-family qwen3_omni --out DIR
    # CoMa: K compression tokens <|ctoken_pad_0|>...<|ctoken_pad_{K-1}|> and embedding_pooling="compression_mean"
    python -m training.build_base --tiny --compression-tokens 32 --out DIR

The output folder loads with `AutoModel`/`AutoProcessor.from_pretrained(DIR, trust_remote_code=True)` and
`SentenceTransformer(DIR, trust_remote_code=True)`. The paper's four audio tokens are added to the tokenizer
(`<|audio_start|>`, `<|audio_end|>`, `<|audio_pad|>`, `<|AUDIO|>`; projected audio goes at `<|AUDIO|>` between
start/end), the projector is freshly initialised, everything else is copied from the upstream checkpoints.
With `--compression-tokens K` the base also gets CoMa's K compression tokens (`add_compression_tokens`): every
specialist trained from it shares them, so fusion sees one vocabulary.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedTokenizerBase

from training.base import families
from training.common import hub_code
from training.common.io_utils import atomic_output_dir, write_json_atomic
from training.common.repo import load_conan, save_conan_repo

AUDIO_TOKEN = "<|AUDIO|>"  # the placeholder projected audio replaces (the paper's)
AUDIO_START, AUDIO_END = "<|audio_start|>", "<|audio_end|>"
PAPER_AUDIO_TOKENS = (AUDIO_START, AUDIO_END, "<|audio_pad|>", AUDIO_TOKEN)  # all four the paper adds
COMPRESSION_TOKEN = "<|ctoken_pad_{}|>"  # CoMa's released code names its compression tokens so (32 there)
COMPRESSION_INIT_NOISE = 0.01  # noise std of a new compression-token row, in units of each dimension's std
# Processor limits for the tiny repo: small images and few frames keep CPU tests fast.
TINY_PROCESSOR_LIMITS = {
    "image_max_pixels": 16 * 28 * 28,
    "document_min_pixels": 16 * 28 * 28,
    "document_max_pixels": 64 * 28 * 28,
    "video_max_frames": 8,
    "video_max_pixels": 4 * 28 * 28,
}


def add_audio_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Register the paper's four audio tokens as special tokens (kept atomic; ones already present keep their ids)
    and expose `<|AUDIO|>` as `tokenizer.audio_token`. Returns its id."""
    missing = [t for t in PAPER_AUDIO_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    # Model-specific named tokens survive save/reload in tokenizer_config.json (transformers 5.x).
    tokenizer._set_model_specific_special_tokens(
        {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "audio_token": AUDIO_TOKEN}
    )
    return int(tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))


def compression_token_names(k: int) -> list[str]:
    """`["<|ctoken_pad_0|>", ..., "<|ctoken_pad_{k-1}|>"]` (CoMa's names). Raises ValueError for k < 1."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"compression token count must be an int >= 1, got {k!r}.")
    return [COMPRESSION_TOKEN.format(i) for i in range(k)]


def add_compression_tokens(tokenizer: PreTrainedTokenizerBase, k: int) -> list[int]:
    """Register CoMa's k compression tokens as special tokens (atomic; ones already present keep their ids) and
    return their ids in order. Source: CoMa (arXiv 2511.08480), released code Trustworthy-Information-Access/CoMa."""
    names = compression_token_names(k)
    missing = [t for t in names if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return [int(tokenizer.convert_tokens_to_ids(t)) for t in names]


@torch.no_grad()
def init_token_rows(model: torch.nn.Module, token_ids: list[int], vocab_size: int, seed: int = 0) -> None:
    """Set the embedding rows of `token_ids` to the mean of the other rows below `vocab_size` (the tokenizer's real
    tokens) plus seeded Gaussian noise of `COMPRESSION_INIT_NOISE` x each dimension's std, so new tokens start in
    the distribution of trained ones and differ from each other (transformers' `mean_resizing` samples around the
    same mean but covers only rows past the old table, and real Qwen tables have unused rows below their size).
    Untied output embeddings, when the model has them, get the same treatment; tied ones follow the input table."""
    generator = torch.Generator().manual_seed(seed)
    tables = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and output.weight is not tables[0]:
        tables.append(output.weight)
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[torch.as_tensor(token_ids)] = False
    for table in tables:
        existing = table[:vocab_size][keep.to(table.device)].float()
        mean, std = existing.mean(dim=0), existing.std(dim=0)
        noise = torch.randn(len(token_ids), table.shape[1], generator=generator) * COMPRESSION_INIT_NOISE
        rows = mean.cpu() + noise * std.cpu()
        table[torch.as_tensor(token_ids, device=table.device)] = rows.to(table.device, table.dtype)


PIXEL_LIMIT_TOKENS = {  # ConanProcessor's pixel limits, in merged visual tokens (x (patch * merge)^2 pixels)
    "image_min_pixels": 4, "image_max_pixels": 1280, "document_min_pixels": 256, "document_max_pixels": 1280,
    "video_min_pixels": 4, "video_max_pixels": 128,
}


def family_processor_limits(image_processor: Any, tokens: dict[str, int] | None = None) -> dict[str, int]:
    """Pixel limits in the backbone's own units: one merged token is (patch x merge)^2 pixels (Qwen2/2.5-VL 28^2,
    Qwen3-VL 32^2), so a family gets the same token budgets (`PIXEL_LIMIT_TOKENS`, ConanProcessor's defaults)."""
    unit = (image_processor.patch_size * image_processor.merge_size) ** 2
    return {key: n * unit for key, n in (tokens or PIXEL_LIMIT_TOKENS).items()}


def assemble_base(
    backbone: str,
    audio_encoder: str,
    out: str | Path,
    processor_limits: dict[str, Any] | None = None,
    audio_downsample: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    overwrite: bool = False,
    seed: int = 0,
    projector_intermediate_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    compression_tokens: int = 0,
) -> Path:
    """Build the Conan base repo at `out` from a backbone and an audio checkpoint (local folders or Hub ids).

    `backbone`: a Qwen3-VL, Qwen2.5-VL or Qwen2-VL checkpoint (`*ForConditionalGeneration` layout). `audio_encoder`:
    a Qwen3-Omni checkpoint (only its `thinker.audio_tower.*` tensors are read) or a Whisper checkpoint.
    `projector_intermediate_size` defaults to 3/4 of the backbone width (the paper's ~19M-parameter projector for
    2048 -> 4096 is 3072 wide with biases; our arithmetic). `dtype` is the dtype of the loaded parts and of the written
    weights (peak memory: about twice the backbone plus the audio tower, in that dtype). `compression_tokens` K > 0
    adds CoMa's `<|ctoken_pad_0|>`..`<|ctoken_pad_{K-1}|>` to the tokenizer (rows initialised by `init_token_rows`),
    sets `embedding_pooling="compression_mean"` with their ids in the config and gives them to the processor, which
    appends them to every input. Raises ValueError for unsupported checkpoints before anything is written.
    """
    if isinstance(compression_tokens, bool) or not isinstance(compression_tokens, int) or compression_tokens < 0:
        raise ValueError(f"compression_tokens must be an int >= 0, got {compression_tokens!r}.")
    backbone_family = families.backbone_family_of(backbone)
    audio_family = families.audio_family_of(audio_encoder)
    ConanConfig, ConanModel, ConanProcessor = hub_code.ConanConfig, hub_code.ConanModel, hub_code.ConanProcessor

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(backbone)
    audio_token_id = add_audio_token(tokenizer)
    compression_ids = add_compression_tokens(tokenizer, compression_tokens) if compression_tokens else []
    vlm = families.load_backbone(backbone, dtype)
    audio_config, audio_state = families.load_audio_encoder(audio_encoder, dtype)
    hidden = vlm.config.text_config.hidden_size
    vocab_size = vlm.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab_size:
        vlm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        vocab_size = len(tokenizer)
    backbone_config = vlm.config.to_dict()
    backbone_config["text_config"]["vocab_size"] = vocab_size
    pooling = {"embedding_pooling": "compression_mean", "compression_token_ids": compression_ids} if compression_ids \
        else {}
    config = ConanConfig(
        backbone_config=backbone_config,
        audio_config=audio_config.to_dict(),
        audio_token_id=audio_token_id,
        audio_start_token_id=int(tokenizer.convert_tokens_to_ids(AUDIO_START)),
        audio_end_token_id=int(tokenizer.convert_tokens_to_ids(AUDIO_END)),
        audio_downsample=audio_downsample,
        projector_intermediate_size=projector_intermediate_size or 3 * hidden // 4,
        **pooling,
    )
    torch.manual_seed(seed)
    model = ConanModel._from_config(config, dtype=dtype)
    _load_strict(model.backbone, vlm.state_dict(), "backbone")
    del vlm
    if compression_ids:
        init_token_rows(model, compression_ids, len(tokenizer), seed)
    _load_strict(model.audio_encoder, audio_state, "audio_encoder")
    del audio_state

    image_processor = AutoImageProcessor.from_pretrained(backbone)
    feature_extractor = families.load_feature_extractor(audio_encoder)
    if feature_extractor.feature_size != config.audio_config.num_mel_bins:
        raise ValueError(
            f"The audio feature extractor gives {feature_extractor.feature_size} mel bins but the encoder expects "
            f"{config.audio_config.num_mel_bins}."
        )
    limits = {**family_processor_limits(image_processor), **(processor_limits or {})}
    processor = ConanProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        feature_extractor=feature_extractor,
        audio_downsample=config.audio_downsample,
        backbone_family=backbone_family,
        audio_family=audio_family,
        audio_token=AUDIO_TOKEN,
        audio_start_token=AUDIO_START,
        audio_end_token=AUDIO_END,
        audio_n_window=getattr(config.audio_config, "n_window", 50),
        compression_tokens=compression_token_names(compression_tokens) if compression_tokens else None,
        **limits,
    )
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        save_conan_repo(model, processor, tmp)
        write_json_atomic(tmp / "build_info.json", {"backbone": str(backbone), "audio_encoder": str(audio_encoder)})
    return Path(out)


def extend_repo_with_compression_tokens(src: str | Path, out: str | Path, k: int, seed: int = 0) -> Path:
    """A copy of the Conan repo `src` with CoMa's k compression tokens, as `training.build_base --compression-tokens k`
    would have built it: the tokens in the tokenizer (`build_base.add_compression_tokens`), the embedding table
    grown if needed, their rows initialised around the mean of the others (`build_base.init_token_rows`),
    `embedding_pooling="compression_mean"` and the processor appending them. For bases that were already trained
    (the pipeline's distilled small base; used by bench/coma.py --add-compression-tokens). Written atomically; an
    existing `out` is reused."""
    src, out = Path(src), Path(out)
    if (out / "config.json").is_file():
        return out
    model, _ = load_conan(src, dtype="float32")
    processor = hub_code.ConanProcessor.from_pretrained(src)  # its own tokenizer: tokens are added to it below
    tokenizer = processor.tokenizer
    ids = add_compression_tokens(tokenizer, k)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        model.backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model.config.backbone_config.text_config.vocab_size = len(tokenizer)
        model.config.text_config.vocab_size = len(tokenizer)
    init_token_rows(model, ids, len(tokenizer), seed)
    model.config.compression_token_ids = ids
    model.config.num_compression_tokens = k
    model.config.embedding_pooling = "compression_mean"
    processor.compression_tokens = compression_token_names(k)
    processor.compression_token_ids = ids
    with atomic_output_dir(out, overwrite=True) as tmp:
        save_conan_repo(model, processor, tmp)
    return out


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{name}: checkpoint does not match the architecture; missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}."
        )


# --------------------------------------------------------------------------------------------------- tiny repo
QWEN2_VL_SPECIAL_TOKENS = families.QWEN_VL_SPECIAL_TOKENS


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


def write_random_qwen2_vl(out_dir: Path, tokenizer: PreTrainedTokenizerBase, *sizes: int, seed: int = 0) -> Path:
    """A random Qwen2-VL checkpoint in the upstream format (`families.write_tiny_backbone("qwen2_vl", ...)`)."""
    return families.write_tiny_backbone("qwen2_vl", out_dir, tokenizer, *sizes, seed=seed)


def write_tiny_upstream_checkpoints(
    root: Path, hidden_size: int = 64, seed: int = 0, backbone_family: str = "qwen2_vl", audio_family: str = "whisper"
) -> tuple[Path, Path]:
    """Tiny random backbone and audio checkpoints in their upstream formats (`save_pretrained`, sharded)."""
    backbone_dir = families.write_tiny_backbone(
        backbone_family, root / f"tiny-{backbone_family}", build_tiny_tokenizer(), hidden_size, seed=seed
    )
    audio_dir = families.write_tiny_audio(audio_family, root / f"tiny-{audio_family}", seed=seed)
    return backbone_dir, audio_dir


def tiny_processor_limits(backbone_family: str) -> dict[str, Any]:
    """`TINY_PROCESSOR_LIMITS` in the family's pixel units (Qwen3-VL: 32^2 px per merged token instead of 28^2)."""
    unit = (32 if backbone_family == "qwen3_vl" else 28) ** 2
    return {k: v * unit // 28**2 if k.endswith("_pixels") else v for k, v in TINY_PROCESSOR_LIMITS.items()}


def build_tiny_repo(
    out: str | Path,
    overwrite: bool = False,
    seed: int = 0,
    backbone_family: str = "qwen2_vl",
    audio_family: str = "whisper",
    compression_tokens: int = 0,
) -> Path:
    """The tiny test/demo repo: tiny upstream checkpoints written to disk, then assembled like real ones
    (`compression_tokens` as in `assemble_base`)."""
    with tempfile.TemporaryDirectory(prefix="conan-tiny-upstream-") as scratch:
        backbone_dir, audio_dir = write_tiny_upstream_checkpoints(
            Path(scratch), seed=seed, backbone_family=backbone_family, audio_family=audio_family
        )
        return assemble_base(
            str(backbone_dir), str(audio_dir), out, processor_limits=tiny_processor_limits(backbone_family),
            overwrite=overwrite, seed=seed, compression_tokens=compression_tokens,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.build_base", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", "--out", dest="out", required=True, help="output folder (the Conan base repo)")
    parser.add_argument("--tiny", action="store_true", help="build from tiny random upstream checkpoints")
    parser.add_argument("--backbone", help="Qwen3-VL / Qwen2.5-VL / Qwen2-VL checkpoint: local folder or Hub id")
    parser.add_argument("--audio-encoder", help="Qwen3-Omni or Whisper checkpoint: local folder or Hub id")
    parser.add_argument("--backbone-family", choices=families.BACKBONE_FAMILIES, default="qwen2_vl",
                        help="with --tiny: the family of the tiny random backbone")
    parser.add_argument("--audio-family", choices=families.AUDIO_FAMILIES, default="whisper",
                        help="with --tiny: the family of the tiny random audio encoder")
    parser.add_argument("--audio-downsample", type=int, default=None,
                        help="pool audio-encoder tokens by this stride (default: Whisper 2, Qwen3-Omni 1)")
    parser.add_argument("--projector-intermediate-size", type=int, default=None,
                        help="projector hidden width (default: 3/4 of the backbone width; 3072 for 4096)")
    parser.add_argument("--processor-limits", type=json.loads, default=None,
                        help='JSON dict of ConanProcessor limits, e.g. \'{"video_max_frames": 32}\'')
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the loaded parts and the written weights (bfloat16 halves memory and size)")
    parser.add_argument("--compression-tokens", type=int, default=0, metavar="K",
                        help="add CoMa's K compression tokens <|ctoken_pad_i|> and pool their mean "
                             "(embedding_pooling=compression_mean; CoMa uses 32); default 0: last-token pooling")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tiny:
        out = build_tiny_repo(
            args.out, overwrite=args.force, seed=args.seed, backbone_family=args.backbone_family,
            audio_family=args.audio_family, compression_tokens=args.compression_tokens,
        )
    else:
        if not args.backbone or not args.audio_encoder:
            parser.error("--backbone and --audio-encoder are required unless --tiny is given")
        out = assemble_base(
            args.backbone, args.audio_encoder, args.out, processor_limits=args.processor_limits,
            audio_downsample=args.audio_downsample, overwrite=args.force, seed=args.seed,
            projector_intermediate_size=args.projector_intermediate_size, dtype=getattr(torch, args.dtype),
            compression_tokens=args.compression_tokens,
        )
    size_mb = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()) / 2**20
    print(f"Conan base repo written to {out} ({size_mb:.1f} MB)")


if __name__ == "__main__":
    main()
