"""Merge operators, one tensor at a time, in row chunks where the method allows it (TIES with `trim_scope: model`
gets its thresholds from a model-wide pre-pass, `model_trim_thresholds`).

Semantics (fusion.md §2.2) are explicit: `paper` follows the original repositories, `mergekit` follows mergekit 0.1.5.

| aspect                  | paper                                   | mergekit                                  |
|-------------------------|-----------------------------------------|-------------------------------------------|
| TIES trim scope         | whole model: one top-k per specialist   | per tensor, flattened                     |
|                         | over all fused tensors (`trim_scope`)   |                                           |
| sign election           | sign(Σ τ̂_t); 0 → majority sign of the  | sign(Σ w_t τ̂_t); Σ ≥ 0 → +               |
|                         | trim scope (model or tensor)            |                                           |
| disjoint-mean divisor   | count of agreeing non-zero entries      | Σ w_t over agreeing entries (ties only)   |
| DARE rescale            | 1 / density                             | match the L1 norm of τ_t per tensor       |
| Breadcrumbs scope       | per row along the last dim              | per tensor, flattened                     |

Tie rule for magnitude thresholds: with k = int(fraction · n), the threshold is the k-th largest |τ|. `paper` (like
the TIES/FusionBench kthvalue code) selects every entry with |τ| ≥ threshold, so boundary ties are all kept;
`mergekit` TIES keeps exactly k = max(1, int(density · n)) like its argsort, taking boundary ties in flat-index order.
Breadcrumbs uses the inclusive rule in both semantics. Exact zeros never count as kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .config import ConfigError, FusionConfig
from .tensor_ctx import TensorContext

CONSENSUS = {"ties", "dare_ties", "breadcrumbs_ties"}
SPARSIFY = {
    "task_arithmetic": None,
    "ties": "magnitude",
    "dare_linear": "random",
    "dare_ties": "random",
    "breadcrumbs": "band",
    "breadcrumbs_ties": "band",
}


@dataclass(frozen=True)
class Recipe:
    """The resolved arithmetic of one (method, semantics) pair."""

    sparsify: str | None  # magnitude | random | band | None
    consensus: bool
    weighted_election: bool
    divisor: str | None  # count | weight | None
    dare_rescale: str  # inverse | l1
    band_rowwise: bool
    exact_k: bool  # top-k keeps exactly k (mergekit) instead of every entry >= the k-th largest (paper repos)
    model_trim: bool = False  # TIES thresholds (and the zero-sum majority sign) over the whole model, not per tensor


def recipe(cfg: FusionConfig) -> Recipe:
    """Resolve method + semantics + normalize override into concrete arithmetic."""
    m, paper = cfg.method, cfg.semantics == "paper"
    if m in ("tsv_m", "iso_c") and not paper:
        raise ConfigError(f"method {m!r} has no mergekit equivalent; use semantics: paper")
    consensus = m in CONSENSUS
    if consensus:
        if paper:
            divisor = "count" if cfg.normalize in (None, True) else None
        else:
            norm = (m == "ties") if cfg.normalize is None else cfg.normalize
            divisor = "weight" if norm else None
    else:
        divisor = "weight" if cfg.normalize else None
    model_trim = m == "ties" and paper and cfg.density < 1.0 and cfg.trim_scope in (None, "model")
    return Recipe(SPARSIFY.get(m), consensus, not paper, divisor, "inverse" if paper else "l1", paper, not paper,
                  model_trim)


# ----------------------------------------------------------------------------------------------------------- select
Query = tuple[int, int]  # (contributor index t, k)


def _histograms(ctx: TensorContext, state: dict[Query, list[int]], shift: int, done_bits: int,
                int_dtype: torch.dtype) -> dict[Query, torch.Tensor]:
    """One radix pass over one tensor: counts of the 16-bit digit at `shift` among entries matching each prefix."""
    hists = {q: torch.zeros(1 << 16, dtype=torch.int64) for q in state}
    for r0, r1 in ctx.chunks():
        _, _, taus = ctx.load(r0, r1)
        for q, (prefix, _) in state.items():
            tau = taus[q[0]]
            if tau is None:
                if prefix == 0:
                    hists[q][0] += (r1 - r0) * max(1, ctx.base.row_elems)
                continue
            bits = tau.abs().view(int_dtype)
            if done_bits:
                bits = bits[(bits >> (shift + 16)) == prefix]
            hists[q] += torch.bincount(((bits >> shift) & 0xFFFF).to(torch.int64), minlength=1 << 16)
    return hists


def radix_select(ctxs: list[TensorContext], queries: list[Query], map_fn: Callable = map,
                 on_pass: Callable[[], None] | None = None) -> dict[Query, tuple[float, int]]:
    """Exact k-th largest |τ_t| over the entries of all `ctxs` for each (t, k), by a radix select on the float bit
    pattern, streaming in chunks; also how many entries equal to it belong to an exactly-k selection.

    O(n) per pass and bounded memory (no full sort, no int64 index as with argsort); 2 passes in fp32, 4 in fp64.
    `map_fn` runs the per-tensor passes (e.g. a thread pool's map); k <= 0 gives (0.0, 0).
    """
    compute = ctxs[0].compute
    int_dtype = torch.int32 if compute == torch.float32 else torch.int64
    nbits = 32 if compute == torch.float32 else 64
    state = {q: [0, q[1]] for q in queries if q[1] > 0}  # prefix, k remaining
    done_bits = 0
    for shift in range(nbits - 16, -1, -16):
        hists = {q: torch.zeros(1 << 16, dtype=torch.int64) for q in state}
        for part in map_fn(lambda c: _histograms(c, state, shift, done_bits, int_dtype), ctxs):
            for q, h in part.items():
                hists[q] += h
        for q, st in state.items():
            csum = torch.flip(hists[q], [0]).cumsum(0)  # counts from the largest bin down
            idx = int(torch.searchsorted(csum, torch.tensor(st[1])).item())
            b = (1 << 16) - 1 - idx
            above = int(csum[idx - 1].item()) if idx > 0 else 0
            st[0], st[1] = (st[0] << 16) | b, st[1] - above
        done_bits += 16
        if on_pass is not None:
            on_pass()
    out = {q: (0.0, 0) for q in queries}
    for q, (prefix, remaining) in state.items():
        out[q] = (torch.tensor([prefix], dtype=int_dtype).view(compute).item(), remaining)
    return out


def kth_largest_abs(ctx: TensorContext, queries: list[Query]) -> dict[Query, float]:
    """Per-tensor thresholds; `ctx.tie_take[(t, k)]` gets the ties at the threshold inside an exactly-k top-k."""
    found = radix_select([ctx], queries)
    ctx.tie_take.update({q: ties for q, (_, ties) in found.items() if q[1] > 0})
    return {q: value for q, (value, _) in found.items()}


def model_trim_thresholds(ctxs: list[TensorContext], cfg: FusionConfig, map_fn: Callable = map,
                          on_pass: Callable[[], None] | None = None) -> list[float]:
    """Original TIES trim: per specialist, the k-th largest |τ_t| over all fused tensors, k = ⌊density · N⌋
    (entries a specialist leaves equal to the base count as zeros, as in a flattened state dict)."""
    T = len(ctxs[0].contributors)
    k = int(cfg.density * sum(c.numel for c in ctxs))
    if k <= 0:
        return [math.inf] * T
    found = radix_select(ctxs, [(t, k) for t in range(T)], map_fn, on_pass)
    return [found[(t, k)][0] for t in range(T)]


# --------------------------------------------------------------------------------------------- element-wise / GTA
def _linear(ctx: TensorContext) -> None:
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


def _gta(ctx: TensorContext, rc: Recipe, cfg: FusionConfig) -> None:
    """Generalised task arithmetic: sparsify each τ_t, optionally elect signs, combine, θ₀ + λ · merged."""
    T, w = len(ctx.contributors), [c.weight for c in ctx.contributors]
    thr: dict[tuple[int, int], float] = {}
    n = ctx.numel
    k_top = max(1, int(cfg.density * n)) if rc.exact_k else int(cfg.density * n)
    magnitude_thr: list[float] = []
    if rc.sparsify == "magnitude" and cfg.density < 1.0:
        if rc.model_trim:  # thresholds over the whole model, found by the engine before any tensor is written
            magnitude_thr = list(ctx.model_thresholds)
        elif k_top > 0:
            found = kth_largest_abs(ctx, [(t, k_top) for t in range(T)])
            magnitude_thr = [found[(t, k_top)] for t in range(T)]
        else:
            magnitude_thr = [math.inf] * T
    elif rc.sparsify == "band" and not rc.band_rowwise:
        n_out, n_keep = int(cfg.gamma * n), int(cfg.density * n)
        thr = kth_largest_abs(ctx, [(t, k) for t in range(T) for k in (n_out, n_out + n_keep)])
    ties_taken = [0] * T
    l1_factor = [1.0] * T
    if rc.sparsify == "random" and rc.dare_rescale == "l1":
        l1_factor = _dare_l1_factors(ctx, cfg)

    def sparsified(t: int, tau: torch.Tensor, r0: int) -> torch.Tensor:
        if rc.sparsify == "magnitude":
            if cfg.density >= 1.0:
                return tau
            a, v = tau.abs(), magnitude_thr[t]
            if not rc.exact_k:
                return tau * (a >= v)
            # mergekit keeps exactly k (argsort order); ties at the threshold: lowest flat index first
            eq = a == v
            n_eq, quota = int(eq.sum()), ctx.tie_take[(t, k_top)] - ties_taken[t]
            ties_taken[t] += n_eq
            if n_eq <= quota:  # every tie of this chunk fits (the usual case: no cumsum needed)
                return tau * (a >= v)
            if quota <= 0:
                return tau * (a > v)
            rank = torch.cumsum(eq, 0, dtype=torch.int32)
            return tau * ((a > v) | (eq & (rank <= quota)))
        if rc.sparsify == "random":
            dropped = tau * ctx.keep_mask(t, r0, tau.numel(), cfg.density)  # bool mask: faster than torch.where
            return dropped / cfg.density if rc.dare_rescale == "inverse" else dropped * l1_factor[t]
        if rc.sparsify == "band":
            return tau * _band_mask(ctx, rc, cfg, thr, t, tau)
        return tau

    majority_fix: list[tuple[int, int]] = []
    elected_sum = 0.0
    for r0, r1 in ctx.chunks():
        raw, base, taus = ctx.load(r0, r1)
        if all(t is None for t in taus):
            ctx.emit_base(r0, r1, raw, base)
            continue
        sp = [None if tau is None else sparsified(t, tau, r0) for t, tau in enumerate(taus)]
        merged, cancel, esum = _combine(sp, w, rc, base, provisional_sign=1.0)
        elected_sum += esum
        if cancel:
            majority_fix.append((r0, r1))
        ctx.emit(r0, r1, base + merged.mul_(ctx.lam))
    if not rc.consensus or rc.weighted_election:
        return

    # paper TIES: Σ τ̂ = 0 with non-zero contributors resolves to the majority elected sign of the trim scope (this
    # tensor, or the whole model: then the engine sums every tensor's `elected_sum` and calls `majority_redo`)
    def redo(sign: float) -> None:
        for r0, r1 in majority_fix:
            raw, base, taus = ctx.load(r0, r1)
            sp = [None if tau is None else sparsified(t, tau, r0) for t, tau in enumerate(taus)]
            merged, _, _ = _combine(sp, w, rc, base, provisional_sign=sign)
            ctx.emit(r0, r1, base + merged.mul_(ctx.lam))

    if rc.model_trim:
        ctx.elected_sum, ctx.majority_redo = elected_sum, (redo if majority_fix else None)
    elif majority_fix and elected_sum <= 0:
        redo(majority_sign(elected_sum))


def majority_sign(elected_sum: float) -> float:
    """The sign that exact cancellations take once the provisional + is known to be wrong (Σ elected ≤ 0)."""
    return -1.0 if elected_sum < 0 else 0.0


def _combine(sp: list[torch.Tensor | None], w: list[float], rc: Recipe, base: torch.Tensor,
             provisional_sign: float) -> tuple[torch.Tensor, bool, float]:
    """Merge sparsified deltas of one chunk. Returns (merged Δ, any exact sign cancellations, Σ elected signs)."""
    present = [(t, s) for t, s in enumerate(sp) if s is not None]
    if not rc.consensus:
        acc = torch.zeros_like(base)
        for t, s in present:
            acc.add_(s, alpha=w[t]) if w[t] != 1.0 else acc.add_(s)
        if rc.divisor == "weight":
            acc.div_(sum(w))
        return acc, False, 0.0
    total = torch.zeros_like(base)
    for t, s in present:
        total.add_(s, alpha=w[t] if rc.weighted_election else 1.0)
    if rc.weighted_election:  # mergekit: Σ ≥ 0 → +
        sign = (total >= 0).to(base.dtype).mul_(2.0).sub_(1.0)  # ±1 (torch.where is ~2.5x slower on CPU)
        cancel, esum = False, 0.0
    else:
        sign = torch.sign(total)
        nz = torch.zeros_like(base, dtype=torch.bool)
        for _, s in present:
            nz |= s != 0
        zero_sum = (sign == 0) & nz
        cancel = bool(zero_sum.any())
        esum = float(sign.sum())
        if cancel:
            sign = torch.where(zero_sum, torch.tensor(provisional_sign, dtype=base.dtype), sign)
    acc = torch.zeros_like(base)
    div = torch.zeros_like(base) if rc.divisor else None
    for t, s in present:
        ws = s * w[t] if w[t] != 1.0 else s
        agree = torch.sign(ws if rc.weighted_election else s) == sign
        if not rc.weighted_election:
            agree &= s != 0
        acc.add_(ws * agree)
        if rc.divisor == "count":
            div.add_(agree.to(base.dtype))
        elif rc.divisor == "weight":
            div.add_(agree.to(base.dtype), alpha=w[t])
    if rc.divisor == "count":
        acc.div_(div.clamp_(min=1.0))
    elif rc.divisor == "weight":
        acc.div_(div.masked_fill_(div.abs() < 1e-8, 1.0))
    return acc, cancel, esum


def _dare_l1_factors(ctx: TensorContext, cfg: FusionConfig) -> list[float]:
    """mergekit's DARE rescale: ‖τ_t‖₁ / ‖m_t ⊙ τ_t‖₁ over the whole tensor (1 when nothing survives)."""
    T = len(ctx.contributors)
    full, kept = [0.0] * T, [0.0] * T
    for r0, r1 in ctx.chunks():
        _, _, taus = ctx.load(r0, r1)
        for t, tau in enumerate(taus):
            if tau is not None:
                a = tau.abs()
                full[t] += float(a.sum(dtype=torch.float64))
                keep = ctx.keep_mask(t, r0, a.numel(), cfg.density)
                kept[t] += float((a * keep).sum(dtype=torch.float64))
    return [f / k if k > 1e-7 else 1.0 for f, k in zip(full, kept)]


def _band_mask(ctx: TensorContext, rc: Recipe, cfg: FusionConfig, thr: dict, t: int, tau: torch.Tensor) -> torch.Tensor:
    """Breadcrumbs: drop the top-γ outliers by |τ|, keep the next `density` fraction, zero the rest."""
    a = tau.abs()
    if not rc.band_rowwise:
        n = ctx.numel
        n_out, n_keep = int(cfg.gamma * n), int(cfg.density * n)
        lo = thr[(t, n_out + n_keep)] if n_out + n_keep > 0 else float("inf")
        keep = (a >= lo) & (a != 0)
        if n_out > 0:
            keep &= a < thr[(t, n_out)]
        return keep
    L = ctx.shape[-1] if ctx.shape else 1
    rows = a.view(-1, L)
    n_out, n_keep = int(cfg.gamma * L), int(cfg.density * L)
    keep = rows != 0
    if n_out + n_keep == 0:
        return torch.zeros_like(a, dtype=torch.bool)
    lo = torch.kthvalue(rows, L - (n_out + n_keep) + 1, dim=1, keepdim=True).values
    keep &= rows >= lo
    if n_out > 0:
        hi = torch.kthvalue(rows, L - n_out + 1, dim=1, keepdim=True).values
        keep &= rows < hi
    return keep.view(-1)


# ------------------------------------------------------------------------------------------------------------- SVD
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


# -------------------------------------------------------------------------------------------------------- dispatch
def fuse_tensor(ctx: TensorContext, cfg: FusionConfig, rc: Recipe) -> None:
    """Compute and write one fused tensor."""
    try:
        if cfg.method == "linear":
            _linear(ctx)
        elif cfg.method in ("tsv_m", "iso_c"):
            import re

            _svd_method(ctx, cfg, lambda k: any(re.search(p, k) for p in cfg.svd_exclude))
        else:
            _gta(ctx, rc, cfg)
    finally:
        ctx.release()


def multi_pass(cfg: FusionConfig, rc: Recipe) -> bool:
    """Whether the method reads every τ more than once (thresholds or DARE's L1 factor before the merge pass)."""
    if cfg.method in ("linear", "tsv_m", "iso_c"):
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
    if cfg.method in ("tsv_m", "iso_c"):
        return ctx_numel * item * (T + 6)
    chunk = max(row_elems, min(ctx_numel, cfg.chunk_elems))
    return chunk * item * (2 * T + 6) + (ctx_numel * item * (T + 1) if reuse else 0)
