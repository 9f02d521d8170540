"""The resolved arithmetic of a (method, semantics) pair: what `config.yaml` asks for, as flags the operators read."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, FusionConfig

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
