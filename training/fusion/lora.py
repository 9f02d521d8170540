"""peft LoRA adapter folders as task vectors: the exact dense ΔW = scale · B · A, row range by row range.

peft's own `add_weighted_adapter` merges the A and B factors separately (an approximation, peft `tuners/lora/model.py`); fusion
needs the dense ΔW of each specialist, so it is materialised here, in fp32 (fp64 in reference mode).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .st_io import CheckpointError, Reader, TensorInfo, open_checkpoint

_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraDelta:
    """ΔW for one weight: scale · B @ A, or its transpose (fan_in_fan_out / embeddings)."""

    a: TensorInfo  # (r, in)  [embedding: (r, num_embeddings)]
    b: TensorInfo  # (out, r) [embedding: (dim, r)]
    scale: float
    transposed: bool

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a.shape[1], self.b.shape[0]) if self.transposed else (self.b.shape[0], self.a.shape[1])

    def rows(self, reader: Reader, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [r0, r1) of ΔW, flattened."""
        a = reader.read(self.a).to(dtype).view(self.a.shape)
        b = reader.read(self.b).to(dtype).view(self.b.shape)
        if self.transposed:
            return (b @ a[:, r0:r1]).T.mul_(self.scale).reshape(-1)
        return (b[r0:r1] @ a).mul_(self.scale).reshape(-1)


@dataclass
class LoraAdapter:
    """Dense deltas (`deltas`) and full replacement tensors (`modules_to_save` → `full`) keyed by model weight name."""

    folder: Path
    deltas: dict[str, LoraDelta]
    full: dict[str, TensorInfo]


def _pattern_value(patterns: dict, module: str, default):
    """peft-style pattern lookup: a pattern matches a module name or any dotted suffix of it."""
    for pat, val in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pat})", module):
            return val
    return default


def _strip(key: str) -> str:
    key = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    return key.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")


def open_adapter(folder: Path) -> LoraAdapter:
    """Index a peft adapter folder from headers and adapter_config.json; reject what cannot be made exact."""
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: not a peft adapter folder (adapter_config.json missing)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (need LORA)")
    if cfg.get("use_dora"):
        raise CheckpointError(f"{cfg_path}: DoRA adapters are not supported (ΔW depends on the base weight norm)")
    layout = open_checkpoint(folder, stem="adapter_model")
    r_default, alpha_default = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rslora, fifo = bool(cfg.get("use_rslora", False)), bool(cfg.get("fan_in_fan_out", False))

    parts: dict[str, dict[str, TensorInfo]] = {}
    full: dict[str, TensorInfo] = {}
    rx = re.compile(r"^(?P<mod>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.default)?(\.weight)?$")
    for key, info in layout.tensors.items():
        m = rx.match(key)
        if m:
            parts.setdefault(_strip(m["mod"]), {})[m["kind"]] = info
        elif ".lora_" in key:
            raise CheckpointError(f"{folder}: unrecognised LoRA tensor {key!r}")
        elif ".base_layer." in key:
            raise CheckpointError(
                f"{folder}: adapter stores the frozen base weight {key!r} (peft save_embedding_layers); fusion "
                "needs the task vector only: re-save with save_embedding_layers=False"
            )
        else:
            full[_strip(key)] = info

    deltas: dict[str, LoraDelta] = {}
    for module, p in parts.items():
        emb = "lora_embedding_A" in p
        a, b = (p.get("lora_embedding_A"), p.get("lora_embedding_B")) if emb else (p.get("lora_A"), p.get("lora_B"))
        if a is None or b is None:
            raise CheckpointError(f"{folder}: module {module!r} has only one of the LoRA A/B factors")
        r = int(_pattern_value(rank_pat, module, r_default))
        alpha = float(_pattern_value(alpha_pat, module, alpha_default))
        if a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(
                f"{folder}: module {module!r} has A {a.shape} / B {b.shape} but adapter_config says r={r}"
            )
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        deltas[f"{module}.weight"] = LoraDelta(a, b, scale, transposed=emb or fifo)
    return LoraAdapter(folder, deltas, full)
