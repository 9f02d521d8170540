"""Fusion configuration: every knob in one dataclass, loaded from YAML and/or CLI flags, validated up front.

Loading follows every stage's rules (`training.common.config`): one `ConfigError` ("<where>: <what>; expected ..."),
unknown keys listed with the allowed ones, relative paths against the working directory, then the repo root.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from training.common.config import ConfigError, build_dataclass, merged, require, resolve_path

METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "tsv_m",
    "iso_c",
)
SEMANTICS = ("paper", "mergekit")

# Module groups for per-group lambda; first matching regex wins (docs/ARCHITECTURE.md, "Weight names").
DEFAULT_GROUPS: dict[str, list[str]] = {
    "embeddings": [r"^backbone\.language_model\.embed_tokens\.", r"^lm_head\."],
    "llm": [r"^backbone\.language_model\.layers\.", r"^backbone\.language_model\.norm\."],
    "projector": [r"^backbone\.visual\.merger\.", r"^audio_projector\."],
    "vision": [r"^backbone\.visual\."],
    "audio_encoder": [r"^audio_encoder\."],
}


@dataclass
class ModelSpec:
    """One specialist: a full HF folder or a peft LoRA adapter folder."""

    path: Path
    name: str = ""
    weight: float = 1.0
    kind: str = "auto"  # auto | full | lora

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.name = self.name or self.path.name
        if self.kind not in ("auto", "full", "lora"):
            raise ConfigError(f"model {self.name!r}: kind must be auto|full|lora, got {self.kind!r}")
        if self.kind == "auto":
            self.kind = "lora" if (self.path / "adapter_config.json").is_file() else "full"


@dataclass
class FusionConfig:
    """What to fuse, how, and where to write it. Defaults: the original papers' arithmetic (`semantics: paper`,
methods/recipe.py), fp32 compute."""

    base: Path
    models: list[ModelSpec]
    output: Path
    method: str = "task_arithmetic"
    semantics: str = "paper"
    lambda_: float = 1.0  # global scale (YAML key: lambda)
    lambda_groups: dict[str, float] = field(default_factory=dict)
    density: float = 1.0  # fraction of entries kept (TIES, DARE, Breadcrumbs)
    trim_scope: str | None = None  # TIES top-k per `tensor` or over the `model`; None: paper model, mergekit tensor
    gamma: float = 0.01  # Breadcrumbs: fraction of top-|tau| outliers removed
    normalize: bool | None = None  # divide by sum of weights; None = the semantics' default for the method
    seed: int = 0
    svd_exclude: list[str] = field(default_factory=lambda: [r"embed_tokens", r"lm_head"])
    groups: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_GROUPS.items()})
    owner_copy: list[str] = field(default_factory=lambda: [r"^audio_projector\."])
    needs_recovery: list[str] = field(default_factory=lambda: [r"^audio_projector\."])
    copy_base: list[str] = field(default_factory=list)  # regexes forced to the base's bytes
    drop: list[str] = field(default_factory=list)  # regexes explicitly left out of the output (listed in manifest)
    missing_in_specialist: str = "error"  # error | zero (treat a key a full specialist lacks as tau = 0)
    files_from: str = "base"  # base | <model name>: where tokenizer/config/remote-code files come from
    out_dtype: str | None = None  # e.g. bfloat16; None = keep each tensor's base dtype
    reference: bool = False  # fp64 compute (slow, for checking)
    workers: int = 0  # 0 = cpu count
    memory_limit_gb: float = 4.0
    chunk_elems: int = 1 << 18  # 1 MiB of fp32 per operand: the passes of a chunk stay in L2 (2x faster than 4M)
    reuse_limit_mb: float = 256.0  # multi-pass methods keep a tensor's fp32 rows in memory up to this size
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.base, self.output = Path(self.base), Path(self.output)
        self.models = [m if isinstance(m, ModelSpec) else ModelSpec(**m) for m in self.models]
        self.validate()

    def validate(self) -> None:
        self._check_finite_numbers()
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.semantics not in SEMANTICS:
            raise ConfigError(f"semantics must be one of {SEMANTICS}, got {self.semantics!r}")
        if not self.models:
            raise ConfigError("models: at least one specialist is required")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"models: names must be unique, got {names}")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")
        if not 0.0 <= self.gamma < 1.0 or (self.method.startswith("breadcrumbs") and self.gamma + self.density > 1.0):
            raise ConfigError(f"gamma must be in [0, 1) with gamma + density <= 1, got gamma={self.gamma}")
        unknown = set(self.lambda_groups) - set(self.groups) - {"other"}
        if unknown:
            raise ConfigError(f"lambda_groups names unknown groups {sorted(unknown)}; known: {sorted(self.groups)}")
        if self.trim_scope not in (None, "tensor", "model"):
            raise ConfigError(f"trim_scope must be tensor|model or null, got {self.trim_scope!r}")
        if self.trim_scope == "model" and (self.method != "ties" or self.semantics != "paper"):
            raise ConfigError(
                f"trim_scope: model is the original TIES trim (one top-k per specialist over all fused tensors); it "
                f"needs method: ties and semantics: paper, got method {self.method!r}, semantics {self.semantics!r} "
                "(mergekit keeps exactly k per tensor)"
            )
        if self.missing_in_specialist not in ("error", "zero"):
            raise ConfigError(f"missing_in_specialist must be error|zero, got {self.missing_in_specialist!r}")
        if self.files_from != "base" and self.files_from not in names:
            raise ConfigError(f"files_from must be 'base' or a model name {names}, got {self.files_from!r}")
        if self.out_dtype not in (None, "float32", "bfloat16", "float16", "float64"):
            raise ConfigError(f"out_dtype must be float32|bfloat16|float16|float64 or null, got {self.out_dtype!r}")
        if self.method == "linear" and sum(m.weight for m in self.models) == 0:
            raise ConfigError("linear: the model weights sum to zero")
        for pats in [self.svd_exclude, self.owner_copy, self.needs_recovery, self.copy_base, self.drop,
                     *self.groups.values()]:
            for p in pats:
                try:
                    re.compile(p)
                except re.error as e:
                    raise ConfigError(f"invalid regex {p!r}: {e}") from e

    def _check_finite_numbers(self) -> None:
        """Weights and scales must be finite numbers: one NaN or inf weight makes every fused value NaN/inf."""
        numbers = {f"models[{m.name!r}].weight": m.weight for m in self.models}
        numbers.update({"lambda": self.lambda_, "density": self.density, "gamma": self.gamma,
                        "memory_limit_gb": self.memory_limit_gb, "reuse_limit_mb": self.reuse_limit_mb})
        numbers.update({f"lambda_groups[{g!r}]": v for g, v in self.lambda_groups.items()})
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")

    def group_of(self, key: str) -> str:
        for name, pats in self.groups.items():
            if any(re.search(p, key) for p in pats):
                return name
        return "other"

    def lambda_for(self, key: str) -> float:
        return float(self.lambda_groups.get(self.group_of(key), self.lambda_))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["lambda"] = d.pop("lambda_")
        d["base"], d["output"] = str(self.base), str(self.output)
        d["models"] = [{"name": m.name, "path": str(m.path), "weight": m.weight, "kind": m.kind} for m in self.models]
        return d


def load_config(path: Path | None = None, **overrides: Any) -> FusionConfig:
    """Read a YAML config (keys as in FusionConfig; `lambda` for the global scale) and apply non-None overrides.
    Raises ConfigError (training.common.config) for a missing file, unknown or missing keys and invalid values."""
    raw, where = merged(path, overrides)
    if "lambda" in raw:
        raw["lambda_"] = raw.pop("lambda")
    require(raw, ("base", "models", "output"), where)
    if not isinstance(raw["models"], list):
        raise ConfigError(f"{where}: models must be a list of {{name, path, weight}} mappings, got "
                          f"{type(raw['models']).__name__}")
    raw["base"], raw["output"] = resolve_path(raw["base"]), resolve_path(raw["output"])
    models = []
    for i, model in enumerate(raw["models"]):
        spec = build_dataclass(ModelSpec, model, f"{where}: models[{i}]") if not isinstance(model, ModelSpec) else model
        spec.path = Path(resolve_path(spec.path))
        models.append(spec)
    raw["models"] = models
    return build_dataclass(FusionConfig, raw, where)
