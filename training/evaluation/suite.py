"""Run the offline proxy suite for one saved model (`python -m training.evaluate proxy`). The pipeline scores its
stages with `stage_eval.evaluate_model` instead (held-out pairs of its own data)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .cache import CachedEmbedder, EmbeddingCache, model_hash
from .embedder import Embedder, SentenceTransformerEmbedder
from training.common.shared_data import SourceMissing
from .proxy_tasks import TASKS, Context
from .report import LABEL

DEFAULT_CACHE = Path.home() / ".cache" / "conan-eval"


def _select(tasks: list[str] | None) -> list[str]:
    if not tasks:
        return list(TASKS)
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown proxy task(s) {bad}; choose from {sorted(TASKS)}")
    return list(tasks)


def run_with_embedder(embedder: Embedder, *, model_name: str, model_id: str, tasks: list[str] | None = None,
                      limit: int | None = None, cache_dir: str | Path | None = DEFAULT_CACHE,
                      shared: Path | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Run the chosen proxy tasks with any embedder; embeddings are cached under ``cache_dir/model_id``."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    root = Path(cache_dir) if cache_dir is not None else None
    cache = EmbeddingCache(root / "embeddings", model_id) if root is not None else None
    cached = CachedEmbedder(embedder, cache)
    ctx = Context(embedder=cached, limit=limit, shared=shared,
                  data_cache=(root or Path.home() / ".cache" / "conan-eval") / "data", batch_size=batch_size)
    out: dict[str, Any] = {"label": LABEL, "model": model_name, "model_hash": model_id, "limit": limit,
                           "tasks": {}}
    for name in tqdm(_select(tasks), desc="proxy tasks"):
        t = TASKS[name]
        entry: dict[str, Any] = {"modality": t.modality, "mirrors": t.mirrors, "main_score_name": t.main_score_name,
                                 "protocol": t.protocol, "synthetic": t.synthetic}
        start, enc0 = time.perf_counter(), cached.n_encoded
        try:
            entry.update(t.fn(ctx))
            entry["status"] = "ok"
        except SourceMissing as e:
            entry.update(status="skipped", reason=str(e))
        entry["seconds"] = round(time.perf_counter() - start, 2)
        entry["newly_encoded"] = cached.n_encoded - enc0
        out["tasks"][name] = entry
    return out


def run_proxy_suite(model_dir: str | Path, tasks: list[str] | None = None, limit: int | None = None,
                    cache_dir: str | Path | None = DEFAULT_CACHE, *, device: str | None = None,
                    batch_size: int = 8, shared: Path | None = None) -> dict[str, Any]:
    """Load ``SentenceTransformer(model_dir, trust_remote_code=True)`` and run the proxy suite on it."""
    model_dir = Path(model_dir)
    mid = model_hash(model_dir)
    emb = SentenceTransformerEmbedder(model_dir, device=device)
    return run_with_embedder(emb, model_name=str(model_dir), model_id=mid, tasks=tasks, limit=limit,
                             cache_dir=cache_dir, shared=shared, batch_size=batch_size)
