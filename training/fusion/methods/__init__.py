"""Merge methods, one module per operator family, looked up by name (as mergekit's `merge_methods` registry).

| method | module | operator |
|---|---|---|
| linear | `linear.py` | weighted mean of the specialists |
| task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties | `gta.py` | θ₀ + λ · combine(sparsify(τ_t)) |
| tsv_m, iso_c | `svd.py` | spectral merge of 2-D task matrices |

`recipe.py` resolves a config into the flags `gta.py` reads; `select.py` finds magnitude thresholds. The engine
only calls `fuse_tensor`, `multi_pass` / `reuses_rows` / `memory_cost` (its memory planning) and, for the
model-wide TIES trim, `model_trim_thresholds` and `majority_sign`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import FusionConfig
from ..tensor_ctx import TensorContext
from . import gta, linear, svd
from .gta import majority_sign
from .recipe import Recipe, recipe
from .select import kth_largest_abs, model_trim_thresholds, radix_select


@dataclass(frozen=True)
class MergeMethod:
    """One registered method: `merge(ctx, cfg, recipe)` writes the fused tensor of `ctx`."""

    name: str
    merge: Callable[[TensorContext, FusionConfig, Recipe], None]
    whole_tensor: bool = False  # needs the whole tensor at once (SVD) instead of row chunks
    single_pass: bool = False  # reads every τ exactly once whatever the recipe


REGISTRY: dict[str, MergeMethod] = {
    "linear": MergeMethod("linear", linear.merge, single_pass=True),
    **{name: MergeMethod(name, gta.merge) for name in
       ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties")},
    "tsv_m": MergeMethod("tsv_m", svd.merge, whole_tensor=True, single_pass=True),
    "iso_c": MergeMethod("iso_c", svd.merge, whole_tensor=True, single_pass=True),
}


def fuse_tensor(ctx: TensorContext, cfg: FusionConfig, rc: Recipe) -> None:
    """Compute and write one fused tensor."""
    try:
        REGISTRY[cfg.method].merge(ctx, cfg, rc)
    finally:
        ctx.release()


def multi_pass(cfg: FusionConfig, rc: Recipe) -> bool:
    """Whether the method reads every τ more than once (thresholds or DARE's L1 factor before the merge pass)."""
    if REGISTRY[cfg.method].single_pass:
        return False
    per_tensor_threshold = rc.sparsify == "magnitude" and cfg.density < 1.0 and not rc.model_trim
    return per_tensor_threshold or (rc.sparsify == "band" and not rc.band_rowwise) \
        or (rc.sparsify == "random" and rc.dare_rescale == "l1")


def reuses_rows(numel: int, T: int, cfg: FusionConfig, rc: Recipe) -> bool:
    """Keep a tensor's loaded rows between passes when it fits in `reuse_limit_mb` (one read instead of three)."""
    item = 8 if cfg.reference else 4
    return multi_pass(cfg, rc) and numel * item * (T + 1) <= cfg.reuse_limit_mb * (1 << 20)


def memory_cost(ctx_numel: int, row_elems: int, T: int, cfg: FusionConfig, reuse: bool = False) -> int:
    """Rough peak bytes of one tensor job, for the thread pool's memory bound."""
    item = 8 if cfg.reference else 4
    if REGISTRY[cfg.method].whole_tensor:
        return ctx_numel * item * (T + 6)
    chunk = max(row_elems, min(ctx_numel, cfg.chunk_elems))
    return chunk * item * (2 * T + 6) + (ctx_numel * item * (T + 1) if reuse else 0)


__all__ = ["REGISTRY", "MergeMethod", "Recipe", "fuse_tensor", "kth_largest_abs", "majority_sign", "memory_cost",
           "model_trim_thresholds", "multi_pass", "radix_select", "recipe", "reuses_rows"]
