"""`tsv_m` and `iso_c`: spectral merges of 2-D task matrices (paper semantics only)."""

from __future__ import annotations

import re
from typing import Callable

import torch

from ..config import FusionConfig
from ..tensor_ctx import TensorContext
from .recipe import Recipe


def merge(ctx: TensorContext, cfg: FusionConfig, rc: Recipe | None = None) -> None:
    """TSV-M / Iso-C on 2-D weights, except keys matching `cfg.svd_exclude`."""
    _svd_method(ctx, cfg, lambda k: any(re.search(p, k) for p in cfg.svd_exclude))


def _svd_method(ctx: TensorContext, cfg: FusionConfig, exclude: Callable[[str], bool]) -> None:
    """TSV-M / Iso-C on 2-D weights; other tensors (and excluded keys) get the weighted mean of τ_t."""
    (r0, r1), = list(ctx.chunks(whole=True))
    raw, base, taus = ctx.load(r0, r1)
    present = [(c.weight, tau) for c, tau in zip(ctx.contributors, taus) if tau is not None]
    if not present:
        ctx.emit_base(r0, r1, raw, base)
        return
    if len(ctx.shape) != 2 or exclude(ctx.key):
        wsum = sum(c.weight for c in ctx.contributors)
        delta = sum(w * tau for w, tau in present) / wsum
    else:
        m, n = ctx.shape
        mats = [(w * tau).view(m, n) for w, tau in present]
        delta = _iso_c(mats) if cfg.method == "iso_c" else _tsv_m(mats)
    ctx.emit(r0, r1, base.add_(delta.reshape(-1).mul(ctx.lam)))


def _iso_c(mats: list[torch.Tensor]) -> torch.Tensor:
    """Iso-C (Marczak 2025): flatten the spectrum of Σ τ_t to its mean singular value."""
    total = torch.stack(mats).sum(0) if len(mats) > 1 else mats[0]
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return (u @ vh) * s.mean()


def _tsv_m(mats: list[torch.Tensor]) -> torch.Tensor:
    """TSV-M (Gargiulo 2025): top ⌊r/T⌋ singular triplets per task, whitened by Procrustes, recombined."""
    T = len(mats)
    r = min(mats[0].shape)
    k = max(1, r // T)
    us, ss, vs = [], [], []
    for mat in mats:
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k].T)
    U, S, V = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    pu, _, qu = torch.linalg.svd(U, full_matrices=False)
    pv, _, qv = torch.linalg.svd(V, full_matrices=False)
    return (pu @ qu) @ torch.diag(S) @ (pv @ qv).T
