"""Per-modality retrieval scores of one model folder on the pipeline's held-out test pairs.

For each modality's `test.jsonl`, every query ranks all distinct test positives of that modality (its own positive is
the gold candidate), the MMEB protocol: hit@1 and MRR, ties counted pessimistically. This is what the pipeline
prints after every stage (base, specialists, fused, recovered, rehearsed); it is an offline proxy on real local data,
not an MMEB/MAEB number.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from training.common.audio_cache import AudioFrameCache
from training.common.repo import load_conan
from training.contrastive.data import load_jsonl
from training.evaluation.embed import embed_items
from training.evaluation.metrics import gold_ranks, rank_metrics


def evaluate_model(
    model_dir: str | Path,
    data_dir: str | Path,
    modalities: list[str] | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    audio_cache_dir: str | Path | None = None,
) -> dict[str, dict[str, float]]:
    """{modality: {"hit@1", "mrr", "n_queries", "n_candidates"}} on `data_dir/<modality>/test.jsonl`."""
    data_dir = Path(data_dir)
    model, processor = load_conan(model_dir, dtype=torch.float32)
    model.audio_frames_hook = AudioFrameCache.for_model(model, audio_cache_dir)
    results = {}
    for modality in modalities or sorted(p.name for p in data_dir.iterdir() if (p / "test.jsonl").exists()):
        path = data_dir / modality / "test.jsonl"
        if not path.exists():
            continue
        # The training loader validates rows and resolves media paths; decoding errors surface in the processor.
        rows = load_jsonl(path, check_media=False)[:limit]
        queries = [r.query for r in rows]
        positives = [json.dumps(r.positive, sort_keys=True) for r in rows]
        unique = sorted(set(positives))
        candidates = [json.loads(p) for p in unique]
        gold = [unique.index(p) for p in positives]
        q = embed_items(model, processor, queries, [r.instruction for r in rows], batch_size, desc=f"eval {modality}")
        c = embed_items(model, processor, candidates, None, batch_size, desc=f"eval {modality} candidates")
        ranks = gold_ranks((q @ c.T).numpy(), gold)
        metrics = rank_metrics(ranks, ks=(1, 5))
        results[modality] = {
            "hit@1": metrics["hit@1"], "mrr": metrics["mrr"], "n_queries": len(rows), "n_candidates": len(unique),
        }
    return results
