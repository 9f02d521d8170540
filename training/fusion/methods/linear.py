"""`linear`: the weighted mean of the specialists (a model soup; the base only defines the layout)."""

from __future__ import annotations

import torch

from ..config import FusionConfig
from ..tensor_ctx import TensorContext
from .recipe import Recipe


def merge(ctx: TensorContext, cfg: FusionConfig | None = None, rc: Recipe | None = None) -> None:
    """θ = Σ w_t θ_t / Σ w_t (model soup of the specialists; base only defines the layout)."""
    wsum = sum(c.weight for c in ctx.contributors)
    for r0, r1 in ctx.chunks():
        raw, base, taus = ctx.load(r0, r1)
        if all(t is None for t in taus):
            ctx.emit_base(r0, r1, raw, base)
            continue
        acc = torch.zeros_like(base)
        for c, tau in zip(ctx.contributors, taus):
            acc.add_(base if tau is None else base + tau, alpha=c.weight)
        ctx.emit(r0, r1, acc.div_(wsum))
