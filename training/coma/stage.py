"""CoMa stage 1, compressed pre-training: teach the base to pack each input into its K compression tokens.

    python -m training.coma --config training/configs/coma_small.yaml
    python -m training.specialist --config ... (base: this stage's output, stage 2: contrastive training that pools
        the compression tokens, `embedding_pooling="compression_mean"`)

Source: CoMa, "Compressing then Matching" (arXiv 2511.08480; code Trustworthy-Information-Access/CoMa, Apache-2.0).
Each row is [input | C | question | answer] (training/coma/data.py); the question and answer see the input only
through C (`compression_attention_mask`, a 4-D mask that ConanModel.forward takes as `attention_mask`, with the
2-D padding mask as `padding_mask`), and the LM loss is the cross-entropy of the answer tokens only, scored through
the backbone's own token embeddings (logits = h @ E^T, E the input embedding table: the Qwen-VL backbones tie their
LM head to it, and Conan keeps no LM head). Nothing of an LM head is published: the output is a normal Conan repo
(merged LoRA + the trained compression-token rows), the base for stage 2.

What trains: LoRA on the LLM's linear layers (CoMa's recipe: LoRA, merged after the stage; it also leaves the small
base's distilled text skill mostly in place on a few hundred rows) and the K compression-token rows of the embedding
table (they start as the builder's initialisation and are the only embedding rows that move: a gradient hook zeroes
every other row's gradient, and their optimizer group has no weight decay, so AdamW leaves the other rows bit-identical).
The vision tower, audio encoder and projector are frozen.

The base must carry compression tokens (`ConanConfig.compression_token_ids`, from the base builder's
`--compression-tokens K`); a base without them is refused with a ValueError that says how to build one.
Checkpoints and exact resume are the shared ones (accelerate `save_state` + sampler step, trainer.save_checkpoint);
the optimizer loop is `loop.run_steps`; the output folder is written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.common import hub_code
from training.common.cli import run_training_stage
from training.common.config import ConfigError, build_dataclass, merged, require, resolve_path
from training.common.io_utils import atomic_output_dir, write_json_atomic
from training.common.repo import load_processor, save_conan_repo
from training.contrastive.compression import IGNORE_INDEX, answer_labels, compression_attention_mask
from training.contrastive.data import ExampleDataset
from training.contrastive.sampling import SourceMixtureSampler
from training.contrastive.trainer import (
    LoopSettings, LoraSettings, TrainConfig, TrainState, apply_lora, build_scheduler, load_checkpoint,
    mixed_precision_for, resolve_resume, save_checkpoint, set_frozen_modules_eval, trainable_parameters,
    unwrap_conan, lora_model_with_state, check_merged_weight_names, cast_for_save, install_feature_caches,
)
from training.contrastive.loop import run_steps
from training.coma.data import CompressionCollator, load_qa_rows

logger = logging.getLogger("training.coma")

MANIFEST = "coma_manifest.json"


# ------------------------------------------------------------------------------------------------------ config
@dataclass
class ComaDataConfig:
    train: list[str] = field(default_factory=list)  # pair JSONL files (train splits only)
    weights: dict[str, float] = field(default_factory=dict)  # per source; missing sources weigh 1.0
    on_error: str = "skip"
    check_media: bool = True
    max_answer_tokens: int = 32


@dataclass
class ComaConfig:
    name: str
    base: str
    output: str
    data: ComaDataConfig
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    lr_compression_tokens: float | None = None  # default: train.lr
    train_compression_tokens: bool = True
    checkpoint_dir: str | None = None  # default: <output>.checkpoints
    audio_cache_dir: str | None = None  # share cached frozen-Whisper frames across stages (training/common/audio_cache.py)
    save_dtype: str = "float32"
    seed: int = 0
    notes: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None,
                raw: dict[str, Any] | None = None) -> ComaConfig:
    """YAML at `path` (or the mapping `raw`) + `overrides` -> ComaConfig (ConfigError on bad keys)."""
    raw, where = merged(path, overrides, raw)
    require(raw, ("name", "base", "output", "data"), where)
    cfg = build_dataclass(ComaConfig, {
        **raw,
        "data": build_dataclass(ComaDataConfig, raw["data"], f"{where}: data"),
        "lora": build_dataclass(LoraSettings, raw.get("lora", {}), f"{where}: lora"),
        "train": build_dataclass(TrainConfig, raw.get("train", {}), f"{where}: train"),
    }, where)
    if not cfg.data.train:
        raise ConfigError(f"{where}: data.train lists no pair JSONL file")
    if cfg.train.chunk_size:
        raise ConfigError(f"{where}: train.chunk_size is {cfg.train.chunk_size}; the LM loss has no GradCache "
                          "(rows are independent): lower train.per_device_batch_size instead")
    cfg.base, cfg.output = resolve_path(cfg.base), resolve_path(cfg.output)
    cfg.data.train = [resolve_path(p) for p in cfg.data.train]
    cfg.checkpoint_dir = resolve_path(cfg.checkpoint_dir) if cfg.checkpoint_dir else cfg.output + ".checkpoints"
    cfg.audio_cache_dir = resolve_path(cfg.audio_cache_dir) if cfg.audio_cache_dir else None
    return cfg


# ------------------------------------------------------------------------------------------------- the model
def compression_token_ids(config: Any, where: str = "base") -> list[int]:
    """The base's compression token ids (`ConanConfig.compression_token_ids`). Raises ValueError when it has none."""
    ids = list(getattr(config, "compression_token_ids", None) or [])
    if not ids:
        raise ValueError(
            f"{where} has no compression tokens (config.compression_token_ids is empty), so CoMa has nothing to "
            "compress into; build the base with compression tokens: python -m training.build_base ... "
            "--compression-tokens 32 (or the pipeline preset's compression_tokens)")
    return ids


def answer_lm_loss(hidden_states: torch.Tensor, embedding_weight: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the labelled (answer) tokens, scored through the tied embeddings.

    hidden_states (B, L, H) after the final norm; embedding_weight (V, H); labels (B, L) unshifted, `IGNORE_INDEX`
    where no loss (training/contrastive/compression.answer_labels). Position t predicts labels[t+1]; logits
    are computed only at those positions (float32). Returns (loss, number of scored tokens). Raises ValueError when
    no token is labelled.
    """
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    count = int(scored.sum())
    if count == 0:
        raise ValueError("answer_lm_loss: no answer token in the batch (every label is IGNORE_INDEX)")
    logits = hidden_states[:, :-1][scored].float() @ embedding_weight.float().T
    return F.cross_entropy(logits, targets[scored]), count


def compressed_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """One forward of a CompressionCollator batch under the CoMa mask -> (answer LM loss, scored tokens).

    ConanModel takes the 4-D mask (B, 1, L, L) as `attention_mask` and the batch's 2-D padding mask as
    `padding_mask`, from which it builds the M-RoPE positions (so they are the plain forward's)."""
    inputs = {k: v for k, v in batch.items() if k not in ("segment_ids", "attention_mask")}
    mask = compression_attention_mask(batch["segment_ids"], batch["attention_mask"])  # bool; the model adapts it
    hidden = model(**inputs, attention_mask=mask, padding_mask=batch["attention_mask"]).last_hidden_state
    labels = answer_labels(batch["input_ids"], batch["segment_ids"], batch["attention_mask"])
    return answer_lm_loss(hidden, unwrap_conan(model).get_input_embeddings().weight, labels)


def train_compression_rows(model: nn.Module, token_ids: Sequence[int]) -> nn.Parameter:
    """Make the embedding table trainable for the `token_ids` rows only (a gradient hook zeroes the rest);
    returns the table's parameter."""
    weight = unwrap_conan(model).get_input_embeddings().weight
    keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    keep[list(token_ids)] = 1
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * keep.to(grad.device, grad.dtype))
    return weight


def build_model(cfg: ComaConfig) -> tuple[nn.Module, Any, list[int]]:
    """(LoRA-wrapped ConanModel with trainable compression rows, processor, compression token ids)."""
    model = hub_code.ConanModel.from_pretrained(cfg.base, dtype=torch.float32)
    ids = compression_token_ids(model.config, f"base {cfg.base}")
    processor = load_processor(cfg.base)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets, scopes=cfg.lora.scopes)
    # The audio encoder is frozen here: its frames are the same every epoch.
    install_feature_caches(model, cfg.lora.scopes, cfg.audio_cache_dir, visual=False)
    if cfg.train_compression_tokens:
        train_compression_rows(model, ids)
    return model, processor, ids


def build_optimizer(model: nn.Module, cfg: ComaConfig) -> torch.optim.AdamW:
    """AdamW: the LoRA weights (train.weight_decay) and the embedding table (no weight decay, so the rows whose
    gradient the hook zeroes never move)."""
    embedding = unwrap_conan(model).get_input_embeddings().weight
    lora = [p for p in model.parameters() if p.requires_grad and p is not embedding]
    groups = [{"params": lora, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay, "name": "lora"}]
    if embedding.requires_grad:
        groups.append({"params": [embedding], "lr": cfg.lr_compression_tokens or cfg.train.lr, "weight_decay": 0.0,
                       "name": "compression_tokens"})
    return torch.optim.AdamW(groups, lr=cfg.train.lr)


# ---------------------------------------------------------------------------------------------------- training
def train(cfg: ComaConfig, resume: str | None = "auto", stop_after: int | None = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Run CoMa stage 1 for `cfg`; returns the manifest (`output` None when stopped early by `stop_after`)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if Path(cfg.output).exists() and not overwrite:
        raise FileExistsError(f"output {cfg.output} exists; pass --force to replace it")
    accelerator = Accelerator(mixed_precision=mixed_precision_for(cfg.train.mixed_precision))
    set_seed(cfg.seed)
    model, processor, ids = build_model(cfg)
    dataset = ExampleDataset(load_qa_rows(  # rows by index, grouped by `source`
        cfg.data.train, on_error=cfg.data.on_error, check_media=cfg.data.check_media))
    sampler = SourceMixtureSampler(
        dataset.by_source(), cfg.data.weights, cfg.train.per_device_batch_size, rank=accelerator.process_index,
        world_size=accelerator.num_processes, seed=cfg.seed, max_steps=cfg.train.max_steps,
    )
    collator = CompressionCollator(processor, ids, cfg.data.max_answer_tokens, on_error=cfg.data.on_error)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg.train.schedule, cfg.train.warmup_steps, cfg.train.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState()
    checkpoint = resolve_resume(resume, cfg.checkpoint_dir)
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint, state, sampler)
        logger.info("resumed from %s at step %d", checkpoint, state.step)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    iterator = iter(loader)
    history: list[dict[str, float]] = []
    window: list[float] = []
    metrics_path = Path(cfg.checkpoint_dir) / "metrics.jsonl"
    started = time.perf_counter()

    def forward_backward(step: int) -> dict[str, Any]:
        batch = {k: v.to(accelerator.device) for k, v in next(iterator).items()}
        loss, tokens = compressed_lm_loss(model, batch)
        accelerator.backward(loss)
        window.append(float(loss.detach()))
        return {"loss": loss.detach(), "tokens": tokens}

    def after_step(step: int, logs: dict[str, Any]) -> bool:
        sampler.step = step
        if step % max(cfg.train.log_every, 1) == 0 or step == cfg.train.max_steps:
            record = {"step": step, "loss": sum(window) / len(window), "lr": logs["lr"],
                      "seconds": time.perf_counter() - started}
            if "grad_norm" in logs:
                record["grad_norm"] = logs["grad_norm"]
            history.append(record)
            window.clear()
            if accelerator.is_main_process:
                metrics_path.parent.mkdir(parents=True, exist_ok=True)
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
        return False

    def save(step: int) -> None:
        save_checkpoint(accelerator, cfg.checkpoint_dir, step, cfg.train.keep_checkpoints,
                        {"train_state": state.state_dict(), "sampler": sampler.state_dict()})

    model.train()
    set_frozen_modules_eval(model)
    run_steps(accelerator, state,
              LoopSettings(max_steps=cfg.train.max_steps, gradcache=False, max_grad_norm=cfg.train.max_grad_norm,
                           log_every=cfg.train.log_every, save_every=cfg.train.save_every,
                           keep_checkpoints=cfg.train.keep_checkpoints, checkpoint_dir=cfg.checkpoint_dir,
                           stop_after=stop_after),
              optimizer, scheduler, [p for p in model.parameters() if p.requires_grad], forward_backward,
              after_step, save, desc="coma")
    manifest = {
        "format": "conan-coma-manifest/1", "name": cfg.name, "base": cfg.base, "config": cfg.to_dict(),
        "compression_token_ids": ids, "rows": {k: len(v) for k, v in dataset.by_source().items()},
        "steps": state.step, "parameters": trainable_parameters(model), "history": history,
        "seconds": time.perf_counter() - started, "output": None,
    }
    if state.step < cfg.train.max_steps:
        return manifest
    full_state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        export(cfg, full_state, processor, manifest, overwrite=overwrite)
        manifest["output"] = cfg.output
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return manifest


def export(cfg: ComaConfig, peft_state: dict[str, torch.Tensor], processor: Any, manifest: dict[str, Any],
           overwrite: bool = False) -> Path:
    """Rebuild the LoRA model on CPU, load the trained state, merge the LoRA and write a plain Conan repo (no LM
    head, no adapter) atomically to `cfg.output`, with `coma_manifest.json`."""

    model = hub_code.ConanModel.from_pretrained(cfg.base, dtype=torch.float32)
    merged_model = lora_model_with_state(model, cfg.lora, peft_state).merge_and_unload()
    check_merged_weight_names(merged_model.state_dict())
    cast_for_save(merged_model, cfg.save_dtype)
    with atomic_output_dir(cfg.output, overwrite=overwrite) as tmp:
        save_conan_repo(merged_model, processor, tmp)
        write_json_atomic(tmp / MANIFEST, manifest)
    return Path(cfg.output)


# ---------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    def summary(manifest: dict[str, Any]) -> dict[str, Any]:
        last = manifest["history"][-1] if manifest["history"] else {}
        return {"output": manifest["output"], "steps": manifest["steps"], **last}

    return run_training_stage(argv, "coma", __doc__, "training/configs/coma_*.yaml", ("--model", "--base"), "base",
                              load_config, train, summary)


if __name__ == "__main__":
    sys.exit(main())
