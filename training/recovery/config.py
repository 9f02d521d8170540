"""Projector Recovery's configuration: every knob in one dataclass, loaded by the one config loader."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from training.common.config import ConfigError, build_dataclass, merged, resolve_path


class RecoverError(ConfigError):
    """Bad recovery input; the message names the input and what was expected."""


@dataclass
class RecoverConfig:
    """Every knob of Projector Recovery (defaults: ours; the paper gives none)."""

    model: str = ""  # the fused model folder
    output: str = ""  # recovered model folder (written atomically)
    train_data: str = ""  # JSONL pairs (docs/ARCHITECTURE.md format); pairs with audio on exactly one side are used
    dev_data: str | None = None  # JSONL pairs for early stopping (audio->partner R@1)
    specialist: str | None = None  # audio specialist folder: teacher for relational distillation
    trainable_prefix: str | None = None  # override the manifest (default: manifest, else "audio_projector.")
    query_instruction: str | None = None  # when a pair has no "instruction"; None = processor default
    document_instruction: str | None = None  # instruction of the positive side; None = processor default
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_steps: int = 500
    batch_size: int = 64  # audio clips per optimizer step (global)
    queue_size: int = 4096  # cached partner negatives per step (the whole cache when smaller)
    temperature: float = 0.02
    symmetric: bool = True  # add the partner->audio direction over the batch
    kd_weight: float = 0.0  # relational distillation weight (needs `specialist`)
    kd_temperature: float = 0.05
    eval_every: int = 50
    patience: int = 5  # evaluations without dev improvement before stopping
    checkpoint_every: int = 50
    checkpoint_dir: str | None = None  # default: "<output>.recover-ckpt"
    resume: bool = True
    keep_checkpoint: bool = False
    dtype: str = "auto"  # backbone dtype on load (auto = as saved); the projector always trains in fp32
    mixed_precision: str = "no"  # accelerate: no | bf16 | fp16
    cpu: bool = False
    gradient_checkpointing: bool = False
    cache_batch_size: int = 16
    feature_cache_dir: str | None = None  # keep cached Whisper frames on disk here (reused across runs/resumes)
    max_train_pairs: int | None = None
    max_dev_pairs: int | None = None
    seed: int = 0
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if not self.model:
            raise RecoverError("config: `model` (the fused model folder) is required.")
        if not self.output:
            raise RecoverError("config: `output` (the recovered model folder) is required.")
        if not self.train_data:
            raise RecoverError("config: `train_data` (a JSONL file of audio<->text pairs) is required.")
        for name in ("max_steps", "batch_size", "queue_size", "eval_every", "checkpoint_every", "cache_batch_size"):
            if int(getattr(self, name)) < 1:
                raise RecoverError(f"config: {name} must be >= 1, got {getattr(self, name)!r}.")
        if not 0 < self.temperature <= 1 or not 0 < self.kd_temperature <= 1:
            raise RecoverError("config: temperature and kd_temperature must be in (0, 1].")
        if self.kd_weight > 0 and not self.specialist:
            raise RecoverError("config: kd_weight > 0 needs `specialist` (the audio specialist folder).")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise RecoverError(f"config: mixed_precision must be no|bf16|fp16, got {self.mixed_precision!r}.")


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None,
                raw: dict[str, Any] | None = None) -> RecoverConfig:
    """YAML at `path` (or the mapping `raw`; every key a RecoverConfig field) + `overrides` that are not None
    (training.common.config rules: ConfigError on bad keys, relative paths against the CWD, then the repo root)."""
    raw, where = merged(path, overrides, raw)
    cfg = build_dataclass(RecoverConfig, raw, where)
    cfg.validate()
    for name in ("model", "output", "train_data", "dev_data", "specialist", "checkpoint_dir", "feature_cache_dir"):
        if getattr(cfg, name):
            setattr(cfg, name, resolve_path(getattr(cfg, name)))
    return cfg
