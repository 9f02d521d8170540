"""Exact k-th largest |τ| by a streaming radix select (TIES / Breadcrumbs thresholds, per tensor or model-wide)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..config import FusionConfig
from ..tensor_ctx import TensorContext

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
