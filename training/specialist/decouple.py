"""Stage S (docs/ARCHITECTURE.md, data flow): train one modality specialist from the Conan base by contrastive learning.

    python -m training.specialist --config training/configs/specialist_tiny_audio.yaml
    accelerate launch --config_file training/accelerate/ddp.yaml -m training.specialist --config CONFIG.yaml

LoRA (peft) on the backbone LLM, the vision tower and audio encoder frozen, the audio projector trained in full for
the audio specialist; InfoNCE with in-batch + cross-device + hard negatives and GradCache (training/contrastive/trainer.py).
Output folder (written atomically):
    config.json, model.safetensors, processor/tokenizer files, remote code, sentence-transformers files
        -> the merged specialist: loads with AutoModel / SentenceTransformer (trust_remote_code) and training.fuse
    adapter/                  peft LoRA adapter (+ the trained projector) for adapter-based fusion
    task_vector.safetensors   dense delta (specialist - base) of every changed tensor, fp32
    specialist_manifest.json  base hash, full config, data mix, trainable counts, final metrics
Checkpoints (`accelerator.save_state`) go to `checkpoint_dir` every `save_every` steps; `--resume auto` continues
from the newest one exactly (model, optimizer, scheduler, RNG, sampler position).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.common import hub_code
from training.common.cli import run_training_stage
from training.common.config import ConfigError, build_dataclass, merged, require, resolve_path
from training.common.io_utils import atomic_output_dir, write_json_atomic
from training.common.modalities import MODALITIES
from training.common.repo import load_processor, save_conan_repo
from training.contrastive.data import load_sources
from training.contrastive.sampling import SourceMixtureSampler, is_batch_size
from training.contrastive.trainer import (
    LoopSettings, LoraSettings, TrainConfig, TrainState, apply_lora, build_optimizer, build_scheduler, collator_for,
    load_checkpoint, loss_settings_from, mixed_precision_for, resolve_resume, run_loop, trainable_parameters,
    lora_model_with_state, check_merged_weight_names, cast_for_save, install_feature_caches,
)

logger = logging.getLogger("training.specialist")


# ------------------------------------------------------------------------------------------------------ config
@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # JSONL files (relative paths resolve against the config file)
    weights: dict[str, float] = field(default_factory=dict)  # per source; missing sources weigh 1.0
    # per source: its own per-device batch size (batch_mode "global" only); missing: train.per_device_batch_size
    batch_sizes: dict[str, int] = field(default_factory=dict)
    batch_mode: str = "global"  # "global": one source per step; "device": one source per rank per step
    on_error: str = "fatal"  # bad rows: "skip" (logged with file:line) or "fatal"
    check_media: bool = True  # open every media file's header when loading
    num_workers: int = 0
    query_instruction: str | None = None  # default when a row has no "instruction"
    target_instruction: str | None = None


@dataclass
class SpecialistConfig:
    name: str
    modality: str
    base: str
    output: str
    data: DataConfig
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: dict[str, Any] = field(default_factory=dict)  # temperature, symmetric, num_negatives
    train_audio_projector: bool | None = None  # default: True for the audio specialist only
    checkpoint_dir: str | None = None  # default: <output>.checkpoints
    save_dtype: str = "float32"
    audio_cache_dir: str | None = None  # share cached frozen-Whisper frames across stages (training/common/audio_cache.py)
    # Encode each image / page / video once with the frozen vision tower (training/common/visual_cache.py); applies
    # only where lora.scopes leaves the tower frozen (no "vision") and the backbone family is supported. Opt-in: the
    # cache keeps every item's merged tokens on the device for the whole run (fine for the small preset's few
    # thousand items, not for a real-scale corpus on a GPU).
    visual_token_cache: bool = False
    seed: int = 0
    notes: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None,
                raw: dict[str, Any] | None = None) -> SpecialistConfig:
    """YAML at `path` (or the mapping `raw`) + `overrides` -> SpecialistConfig (training.common.config rules:
    ConfigError on bad keys, relative paths against the CWD first and then the repo root)."""
    raw, where = merged(path, overrides, raw)
    require(raw, ("name", "modality", "base", "output", "data"), where)
    cfg = build_dataclass(SpecialistConfig, {
        **raw,
        "data": build_dataclass(DataConfig, raw["data"], f"{where}: data"),
        "lora": build_dataclass(LoraSettings, raw.get("lora", {}), f"{where}: lora"),
        "train": build_dataclass(TrainConfig, raw.get("train", {}), f"{where}: train"),
    }, where)
    if cfg.modality not in MODALITIES:
        raise ConfigError(f"{where}: modality {cfg.modality!r}; expected one of {MODALITIES}")
    loss_settings_from(cfg.loss, cfg.seed, where)  # ConfigError on bad loss keys / objective / weights
    if not cfg.data.train:
        raise ConfigError(f"{where}: data.train lists no JSONL file")
    cfg.data.batch_sizes = checked_batch_sizes(cfg, where)
    if cfg.train_audio_projector is None:
        cfg.train_audio_projector = cfg.modality == "audio"
    cfg.base, cfg.output = resolve_path(cfg.base), resolve_path(cfg.output)
    cfg.data.train = [resolve_path(p) for p in cfg.data.train]
    cfg.checkpoint_dir = resolve_path(cfg.checkpoint_dir) if cfg.checkpoint_dir else cfg.output + ".checkpoints"
    cfg.audio_cache_dir = resolve_path(cfg.audio_cache_dir) if cfg.audio_cache_dir else None
    return cfg


# --------------------------------------------------------------------------------------------------- helpers
def checked_batch_sizes(cfg: SpecialistConfig, where: str = "config") -> dict[str, int]:
    """`cfg.data.batch_sizes` as {source name: int}; ConfigError naming the YAML keys for anything else (a
    mapping of source names to positive integers; sizes other than `train.per_device_batch_size` need
    `data.batch_mode: global`). Checked at load and again by `train`, before the model is built."""
    sizes = cfg.data.batch_sizes if cfg.data.batch_sizes is not None else {}
    if not isinstance(sizes, dict):
        raise ConfigError(f"{where}: data.batch_sizes is {sizes!r}; expected a mapping source name -> positive "
                          f"integer, e.g. {{pydoc-math: 16}}")
    bad = {k: v for k, v in sizes.items() if not isinstance(k, str) or not is_batch_size(v)}
    if bad:
        raise ConfigError(f"{where}: data.batch_sizes {bad}; expected source name -> positive integer")
    sizes = {k: int(v) for k, v in sizes.items()}
    other = {k: v for k, v in sizes.items() if v != cfg.train.per_device_batch_size}
    if other and cfg.data.batch_mode != "global":
        raise ConfigError(f"{where}: data.batch_sizes {other} differ from train.per_device_batch_size "
                          f"{cfg.train.per_device_batch_size}, which needs data.batch_mode: global (got "
                          f"{cfg.data.batch_mode!r}: each rank draws its own source and all-gather needs equal shapes)")
    return sizes


def base_hash(base_dir: str | Path) -> str:
    """sha256 over the base's config and weight files: fusion and recovery refuse mismatched bases with it."""
    base_dir = Path(base_dir)
    files = sorted(p for p in base_dir.iterdir() if p.name == "config.json" or p.suffix == ".safetensors")
    if not files:
        raise FileNotFoundError(f"{base_dir} holds no config.json / *.safetensors; is it a Conan base repo?")
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        with p.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def task_vector(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 delta of every tensor that changed; keys are the plain model names (`backbone.*`, `audio_projector.*`)."""
    missing = sorted(set(base) ^ set(merged))
    if missing:
        raise ValueError(f"merged and base weights differ in names: {missing[:5]}")
    return {
        k: (merged[k].float() - base[k].float()).contiguous()
        for k in merged if not torch.equal(merged[k].float(), base[k].float())
    }


# ---------------------------------------------------------------------------------------------------- training
def build_model(cfg: SpecialistConfig) -> tuple[torch.nn.Module, Any]:
    model = hub_code.ConanModel.from_pretrained(cfg.base, dtype=torch.float32)
    processor = load_processor(cfg.base)
    if cfg.train.gradient_checkpointing:
        # use_reentrant=False: with frozen embeddings reentrant checkpointing silently drops LoRA gradients.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets,
                       train_audio_projector=bool(cfg.train_audio_projector), scopes=cfg.lora.scopes)
    install_feature_caches(model, cfg.lora.scopes, cfg.audio_cache_dir,
                           visual=cfg.visual_token_cache and cfg.modality in ("image", "video", "document"))
    return model, processor


def train(cfg: SpecialistConfig, resume: str | None = "auto", stop_after: int | None = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Run stage S for `cfg`; returns the manifest (None-valued `output` when stopped early by `stop_after`)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    cfg.data.batch_sizes = checked_batch_sizes(cfg)  # a config built in code skips load_config's checks
    accelerator = Accelerator(mixed_precision=mixed_precision_for(cfg.train.mixed_precision))
    if Path(cfg.output).exists() and not overwrite:
        raise FileExistsError(f"output {cfg.output} exists; pass --force to replace it")
    largest_batch = max([cfg.train.per_device_batch_size, *cfg.data.batch_sizes.values()])
    gradcache = 0 < cfg.train.chunk_size < largest_batch
    if gradcache and accelerator.distributed_type == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        if stage >= 2:
            raise ValueError(
                f"GradCache needs no_sync, which DeepSpeed ZeRO-{stage} lacks (deepspeedai/DeepSpeed#6793, huggingface/accelerate#3481); set "
                "train.chunk_size: 0 (large per-device batch) or use the ddp / fsdp2 accelerate configs"
            )
    set_seed(cfg.seed)
    model, processor = build_model(cfg)
    dataset = load_sources(cfg.data.train, on_error=cfg.data.on_error, check_media=cfg.data.check_media)
    sampler = SourceMixtureSampler(
        dataset.by_source(), cfg.data.weights, cfg.train.per_device_batch_size, rank=accelerator.process_index,
        world_size=accelerator.num_processes, seed=cfg.seed, mode=cfg.data.batch_mode, max_steps=cfg.train.max_steps,
        source_batch_sizes=cfg.data.batch_sizes,
    )
    losses = loss_settings_from(cfg.loss, cfg.seed)
    collator = collator_for(
        losses, processor, num_negatives=int(cfg.loss.get("num_negatives", 0)),
        chunk_size=cfg.train.chunk_size if gradcache else 0, query_instruction=cfg.data.query_instruction,
        target_instruction=cfg.data.target_instruction, on_error=cfg.data.on_error,
    )
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.lr_projector)
    scheduler = build_scheduler(optimizer, cfg.train.schedule, cfg.train.warmup_steps, cfg.train.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState()
    checkpoint = resolve_resume(resume, cfg.checkpoint_dir)
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint, state, sampler)
        logger.info("resumed from %s at step %d", checkpoint, state.step)
    # A private generator keeps DataLoader start-up from drawing on the global RNG (exact resume under dropout).
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collator, num_workers=cfg.data.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    touch = []
    if accelerator.num_processes > 1 and accelerator.distributed_type in (DistributedType.MULTI_GPU,
                                                                          DistributedType.MULTI_CPU):
        touch = [p for n, p in model.named_parameters() if p.requires_grad and "audio_projector" in n]
    history = run_loop(
        accelerator, model, optimizer, scheduler, loader, state,
        losses,
        LoopSettings(max_steps=cfg.train.max_steps, gradcache=gradcache, max_grad_norm=cfg.train.max_grad_norm,
                     log_every=cfg.train.log_every, save_every=cfg.train.save_every,
                     keep_checkpoints=cfg.train.keep_checkpoints, checkpoint_dir=cfg.checkpoint_dir,
                     stop_after=stop_after),
        sampler=sampler, touch=touch,
    )
    manifest = {
        "format": "conan-specialist-manifest/1",
        "name": cfg.name,
        "modality": cfg.modality,
        "base": cfg.base,
        "base_hash": base_hash(cfg.base),
        "config": cfg.to_dict(),
        "data_mix": {"probabilities": sampler.mixture, "rows": {k: len(v) for k, v in dataset.by_source().items()}},
        "steps": state.step,
        "world_size": accelerator.num_processes,
        "effective_batch": cfg.train.per_device_batch_size * accelerator.num_processes,
        # sources with a batch size of their own (data.batch_sizes): their steps' global batch
        "effective_batch_by_source": {source: n * accelerator.num_processes
                                      for source, n in sorted(cfg.data.batch_sizes.items())},
        "gradcache": gradcache,
        "parameters": trainable_parameters(model),
        "history": history,
        "output": None,
    }
    if state.step < cfg.train.max_steps:
        return manifest  # interrupted on purpose (stop_after); resume continues from the checkpoint
    full_state = accelerator.get_state_dict(model)  # gathers FSDP / DeepSpeed shards onto the main process
    if accelerator.is_main_process:
        export_specialist(cfg, full_state, processor, manifest, overwrite=overwrite)
        manifest["output"] = cfg.output
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return manifest


# ------------------------------------------------------------------------------------------------------ export
def export_specialist(cfg: SpecialistConfig, peft_state: dict[str, torch.Tensor], processor: Any,
                      manifest: dict[str, Any], overwrite: bool = False) -> Path:
    """Rebuild the peft model on CPU from the full state, save adapter, merge LoRA, save model + task vector."""
    from safetensors.torch import save_file

    model = hub_code.ConanModel.from_pretrained(cfg.base, dtype=torch.float32)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    peft_model = lora_model_with_state(model, cfg.lora, peft_state, bool(cfg.train_audio_projector))
    with atomic_output_dir(cfg.output, overwrite=overwrite) as tmp:
        peft_model.save_pretrained(tmp / "adapter")
        merged = peft_model.merge_and_unload()
        merged_state = merged.state_dict()
        check_merged_weight_names(merged_state)
        delta = task_vector(merged_state, base_state)
        save_file(delta, str(tmp / "task_vector.safetensors"), metadata={"base_hash": manifest["base_hash"]})
        cast_for_save(merged, cfg.save_dtype)
        if cfg.train_audio_projector or "projector" in cfg.lora.scopes:  # calibrated on this specialist's backbone
            merged.config.projector_calibration_hash = hub_code.load("modeling_conan").backbone_fingerprint(merged)
        save_conan_repo(merged, processor, tmp)
        manifest = {**manifest, "task_vector": {"tensors": len(delta),
                                                "numel": int(sum(t.numel() for t in delta.values()))}}
        write_json_atomic(tmp / "specialist_manifest.json", manifest)
    return Path(cfg.output)


# ---------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    def summary(manifest: dict[str, Any]) -> dict[str, Any]:
        last = manifest["history"][-1] if manifest["history"] else {}
        return {"output": manifest["output"], "steps": manifest["steps"], **last}

    return run_training_stage(argv, "specialist", __doc__, "training/configs/specialist_*.yaml",
                              ("--model", "--base"), "base", load_config, train, summary)


if __name__ == "__main__":
    sys.exit(main())
