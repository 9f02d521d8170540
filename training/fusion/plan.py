"""Key policy and validation from headers only: decide, before any arithmetic, what happens to every tensor.

Every key of every input ends up in exactly one policy — fuse, copy_base, copy_owner, or drop (only when the config
asks) — or the plan fails with an error naming the key. Nothing is dropped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import FusionConfig
from .lora import LoraAdapter, LoraDelta, open_adapter
from .st_io import CheckpointError, CheckpointLayout, Reader, TensorInfo, open_checkpoint


class PlanError(ValueError):
    """The inputs cannot be fused as configured; the message names the tensor, the models and the reason."""


@dataclass
class Specialist:
    name: str
    weight: float
    layout: CheckpointLayout | None = None  # full checkpoint
    adapter: LoraAdapter | None = None  # LoRA adapter

    def source(self, key: str) -> TensorInfo | LoraDelta | None:
        if self.layout is not None:
            return self.layout.tensors.get(key)
        assert self.adapter is not None
        return self.adapter.full.get(key) or self.adapter.deltas.get(key)


@dataclass
class TensorPlan:
    key: str
    policy: str  # fuse | copy_base | copy_owner | drop
    group: str
    shard: str | None
    dtype: str
    shape: tuple[int, ...]
    lam: float = 1.0
    owners: list[str] = field(default_factory=list)  # copy_owner: the model copied from; fuse: contributors
    source: TensorInfo | None = None  # the bytes copied for copy_base / copy_owner
    needs_recovery: bool = False
    reason: str = ""


@dataclass
class FusionPlan:
    base: CheckpointLayout
    specialists: list[Specialist]
    tensors: dict[str, TensorPlan]
    shard_keys: dict[str, list[str]]  # output shard name -> keys in write order
    model_thresholds: dict[str, float] | None = None  # TIES trim over the whole model: |τ| threshold per specialist


def _matches(patterns: list[str], key: str) -> bool:
    return any(re.search(p, key) for p in patterns)


def load_specialists(cfg: FusionConfig) -> list[Specialist]:
    out = []
    for m in cfg.models:
        if m.kind == "lora":
            out.append(Specialist(m.name, m.weight, adapter=open_adapter(m.path)))
        else:
            out.append(Specialist(m.name, m.weight, layout=open_checkpoint(m.path)))
    return out


def _same_bytes(reader: Reader, a: TensorInfo, b: TensorInfo) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and reader.read_bytes(a) == reader.read_bytes(b)


def build_plan(cfg: FusionConfig, reader: Reader) -> FusionPlan:
    """Validate keys, shapes and dtypes of all inputs and assign a policy and an output shard to every key."""
    base = open_checkpoint(cfg.base)
    specs = load_specialists(cfg)
    out_dtype = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}.get(cfg.out_dtype or "")
    plans: dict[str, TensorPlan] = {}
    shard_of = {k: v.file.name for k, v in base.tensors.items()}
    last_shard = base.shards[-1]

    all_keys = list(base.tensors)
    seen = set(all_keys)
    for s in specs:
        keys = list(s.layout.tensors) if s.layout else list(s.adapter.full) + list(s.adapter.deltas)
        for k in keys:
            if k not in seen:
                seen.add(k)
                all_keys.append(k)

    for key in all_keys:
        b = base.tensors.get(key)
        holders = [(s, s.source(key)) for s in specs if s.source(key) is not None]
        group = cfg.group_of(key)
        ref = b if b is not None else holders[0][1]
        shape = ref.shape
        for s, src in holders:
            if tuple(src.shape) != tuple(shape):
                raise PlanError(
                    f"tensor {key!r}: shape {tuple(src.shape)} in model {s.name!r} does not match "
                    f"{tuple(shape)} in {'the base' if b is not None else holders[0][0].name!r}"
                )
        dtype = ref.dtype if isinstance(ref, TensorInfo) else "F32"
        tp = TensorPlan(key, "fuse", group, shard_of.get(key, last_shard), dtype, tuple(shape), cfg.lambda_for(key))

        if _matches(cfg.drop, key):
            tp.policy, tp.shard, tp.reason = "drop", None, "matched `drop` in the config"
        elif b is None:
            _plan_union(tp, holders, reader, cfg)
        elif not b.is_float:
            for s, src in holders:
                if not isinstance(src, TensorInfo) or not _same_bytes(reader, b, src):
                    raise PlanError(
                        f"non-float tensor {key!r} ({b.dtype}) differs between the base and model {s.name!r}; "
                        "integer/bool buffers cannot be merged (add it to `copy_base` or `drop`)"
                    )
            tp.policy, tp.source, tp.reason = "copy_base", b, "non-float buffer, identical in all inputs"
        elif _matches(cfg.copy_base, key):
            tp.policy, tp.source, tp.reason = "copy_base", b, "matched `copy_base` in the config"
        elif _matches(cfg.owner_copy, key):
            changers = [s for s, src in holders if isinstance(src, LoraDelta) or not _same_bytes(reader, b, src)]
            if not changers:
                tp.policy, tp.source, tp.reason = "copy_base", b, "owner-copy key unchanged by every specialist"
            elif len(changers) == 1 and isinstance(changers[0].source(key), TensorInfo):
                tp.policy, tp.owners, tp.source = "copy_owner", [changers[0].name], changers[0].source(key)
                tp.reason = "owner-copy key changed by exactly one specialist"
            else:
                raise PlanError(
                    f"tensor {key!r} matches `owner_copy` but is changed by {[s.name for s in changers]}; "
                    "exactly one owner is needed (remove it from `owner_copy` to fuse it instead)"
                )
        else:
            missing = [s.name for s in specs if s.layout is not None and key not in s.layout.tensors]
            if missing and cfg.missing_in_specialist == "error":
                raise PlanError(
                    f"tensor {key!r} is in the base but missing from model(s) {missing}; set "
                    "`missing_in_specialist: zero` to treat it as unchanged there, or list it in `copy_base`/`drop`"
                )
            for s, src in holders:
                if isinstance(src, TensorInfo) and not src.is_float:
                    raise PlanError(f"tensor {key!r} is float in the base but {src.dtype} in model {s.name!r}")
            tp.owners = [s.name for s, _ in holders]
            if not holders:
                tp.policy, tp.source, tp.reason = "copy_base", b, "no specialist provides it"
            if out_dtype and tp.policy == "fuse":
                tp.dtype = out_dtype
        if tp.policy != "fuse" and tp.source is not None:
            tp.dtype = tp.source.dtype
        tp.needs_recovery = tp.policy == "copy_owner" and _matches(cfg.needs_recovery, key)
        plans[key] = tp

    shard_keys: dict[str, list[str]] = {s: [] for s in base.shards}
    base_order = sorted(base.tensors, key=lambda k: (base.tensors[k].file.name, base.tensors[k].offset))
    for key in base_order + [k for k in all_keys if k not in base.tensors]:
        tp = plans[key]
        if tp.shard is not None:
            shard_keys[tp.shard].append(key)
    return FusionPlan(base, specs, plans, shard_keys)


def _plan_union(tp: TensorPlan, holders: list, reader: Reader, cfg: FusionConfig) -> None:
    """A key the base lacks: copy it from its single owner (or identical owners), else fail."""
    full = [(s, src) for s, src in holders if isinstance(src, TensorInfo)]
    if len(full) != len(holders):
        names = [s.name for s, src in holders if not isinstance(src, TensorInfo)]
        raise PlanError(f"tensor {tp.key!r}: LoRA delta in {names} targets a weight the base does not have")
    first = full[0][1]
    if any(not _same_bytes(reader, first, src) for _, src in full[1:]):
        raise PlanError(
            f"tensor {tp.key!r} is absent from the base and differs between models {[s.name for s, _ in full]}: "
            "there is no base to form task vectors (add the key to the base, or to `drop`)"
        )
    tp.policy, tp.source = "copy_owner", first
    tp.owners = [s.name for s, _ in full]
    tp.reason = "union key (absent from the base), copied from its owner"


def check_inputs_exist(cfg: FusionConfig) -> None:
    """Fail fast on missing folders before opening anything."""
    for p, what in [(cfg.base, "base")] + [(m.path, f"model {m.name!r}") for m in cfg.models]:
        if not Path(p).is_dir():
            raise CheckpointError(f"{what}: folder not found: {p}")
