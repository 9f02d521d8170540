"""Per-modality and per-source retrieval scores of one model folder on the pipeline's held-out pairs.

For each modality's `<split>.jsonl` (`test` for the reported scores; `dev` for model selection such as the fusion
weight sweep), every query ranks all distinct positives of that modality *of its own positive's input kind* (its own
positive is the gold candidate), the MMEB protocol: hit@1 and MRR, ties counted pessimistically. The kind restriction
matters where a modality mixes directions: the image modality holds CIFAR-10 image -> class-name queries and emoji
name -> glyph queries, and a pool of both kinds would let a CIFAR photo rank emoji glyphs (image-image similarity
beats image-text across the modality gap) and an emoji name rank CIFAR class names, which measured 0.013 hit@1 for
an image specialist that scored 0.225 and 0.050 per source. A task's candidates are always of the kind it retrieves,
as in MMEB where each task has its own candidate list. Each modality result also breaks the score down by
SOURCE (the `source` field of each row): a source's queries rank only the distinct positives of that source, so
CIFAR-10 photos are zero-shot classified over its 10 class names, spoken digits over the 10 digit names, emoji
glyphs over the emoji names of the split, manual page text over the page images. Every score carries its chance
level (1 / number of candidates: the hit@1 of a random ranking). With `pool_size`, a split larger than one pool is
scored in candidate pools: its rows are cut, in file order, into equal folds of at most `pool_size` rows and each
query ranks only its fold's positives (the COCO "1K test" protocol of 5 folds of 1,000 images, e.g. Karpathy &
Fei-Fei 2015); scores are the mean over all queries, so a test of 3 x 80 pairs is as hard as one of 80 pairs while
its 95% interval is ~sqrt(3) narrower. This is what the pipeline prints after every stage
(base, specialists, fused, recovered, rehearsed); it is an offline proxy on real local data, not an MMEB/MAEB number.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.common import hub_code
from training.common.audio_cache import AudioFrameCache
from training.common.repo import load_conan
from training.common.visual_cache import SUPPORTED_FAMILIES, VisualTokenCache, vision_tower
from training.contrastive.data import load_jsonl
from training.evaluation.embed import embed_items
from training.evaluation.metrics import gold_ranks, rank_metrics

SPLITS = ("train", "dev", "test")
INPUT_KINDS = ("text", "image", "video", "document", "audio")
# Files of a model folder that never shape its processor (weights, per-stage reports): left out of the fingerprint.
_NOT_PROCESSOR = (".safetensors", ".safetensors.index.json", "manifest.json", "report.json", "log.json", ".md")
_PROCESSORS: OrderedDict[str, Any] = OrderedDict()
_PROCESSORS_KEPT = 2


def processor_fingerprint(model_dir: str | Path) -> str:
    """sha1 over the names and bytes of a model folder's top-level files other than weights and reports: equal for
    folders whose processor loads the same (fused trials, a recovered model and its fused input)."""
    digest = hashlib.sha1()
    for path in sorted(Path(model_dir).iterdir()):
        if path.is_file() and not path.name.endswith(_NOT_PROCESSOR):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def load_for_eval(model_dir: str | Path) -> tuple[torch.nn.Module, Any]:
    """(fp32 ConanModel in eval mode, ConanProcessor) of `model_dir`, the processor reused from an earlier folder with
    the same :func:`processor_fingerprint`. Why: building the Qwen2 tokenizer from its 11 MB tokenizer.json is ~75% of
    a small model's stage evaluation, and a pipeline evaluates ~16 folders that share one tokenizer."""
    key = processor_fingerprint(model_dir)
    if key not in _PROCESSORS:
        model, processor = load_conan(model_dir, dtype=torch.float32)
        _PROCESSORS[key] = processor
        while len(_PROCESSORS) > _PROCESSORS_KEPT:
            _PROCESSORS.popitem(last=False)
        return model, processor
    _PROCESSORS.move_to_end(key)
    return hub_code.ConanModel.from_pretrained(model_dir, dtype=torch.float32).eval(), _PROCESSORS[key]


def input_kind(item: dict[str, Any]) -> str:
    """"image", "text", "image+text", ... : the input kinds an item of the pair format holds (for task labels)."""
    return "+".join(k for k in INPUT_KINDS if item.get(k) is not None) or "?"


def score_similarity(similarity: np.ndarray, gold: Sequence[int]) -> dict[str, float]:
    """hit@1, MRR, sizes and chance (1 / candidates) of queries ranking all columns of `similarity` (Q, C)."""
    s = np.asarray(similarity, dtype=np.float64)
    metrics = rank_metrics(gold_ranks(s, gold), ks=(1,))
    return {"hit@1": metrics["hit@1"], "mrr": metrics["mrr"], "n_queries": int(s.shape[0]),
            "n_candidates": int(s.shape[1]), "chance": 1.0 / s.shape[1]}


def kind_pool_scores(similarity: np.ndarray, gold: Sequence[int], candidate_kinds: Sequence[str]) -> dict[str, Any]:
    """hit@1, MRR, sizes and chance where each query ranks only the columns of its gold column's input kind.

    `similarity` is (Q, C), `gold[i]` the column of query i's positive, `candidate_kinds[c]` the input kind of column
    c ("text", "image", ... from :func:`input_kind`). Query i's pool is {c : candidate_kinds[c] ==
    candidate_kinds[gold[i]]}; "chance" is the mean over queries of 1 / pool size (the hit@1 of a random ranking),
    "n_candidates" the number of all columns. Raises ValueError when the lengths disagree.
    """
    s = np.asarray(similarity, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.int64)
    if s.ndim != 2 or len(gold) != s.shape[0] or len(candidate_kinds) != s.shape[1]:
        raise ValueError(f"kind_pool_scores: expected similarity [Q, C], Q gold indices and C candidate kinds; got "
                         f"{s.shape}, {len(gold)}, {len(candidate_kinds)}")
    kinds = np.asarray(candidate_kinds)
    ranks = np.empty(len(gold), dtype=np.float64)
    pool_sizes = np.empty(len(gold), dtype=np.float64)
    for kind in sorted(set(kinds[gold].tolist())):
        rows = np.flatnonzero(kinds[gold] == kind)
        columns = np.flatnonzero(kinds == kind)
        column_of = {int(c): j for j, c in enumerate(columns)}
        ranks[rows] = gold_ranks(s[np.ix_(rows, columns)], [column_of[int(gold[i])] for i in rows])
        pool_sizes[rows] = len(columns)
    metrics = rank_metrics(ranks, ks=(1,))
    return {"hit@1": metrics["hit@1"], "mrr": metrics["mrr"], "n_queries": int(s.shape[0]),
            "n_candidates": int(s.shape[1]), "chance": float(np.mean(1.0 / pool_sizes))}


def source_scores(similarity: np.ndarray, gold: Sequence[int], sources: Sequence[str],
                  tasks: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """{source: score_similarity(...)} where each source's queries rank only the candidates that are gold for some
    query of that source (its own label set: CIFAR-10's 10 class names, the emoji names of the split, ...).

    `similarity` is (Q, C) over the whole modality, `gold[i]` the column of query i's positive, `sources[i]` its
    source and `tasks[i]` (optional) a label such as "image -> text" kept in the result as "task". Raises
    ValueError when the lengths disagree.
    """
    s = np.asarray(similarity, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.int64)
    if s.ndim != 2 or len(gold) != s.shape[0] or len(sources) != s.shape[0] or (
            tasks is not None and len(tasks) != s.shape[0]):
        raise ValueError(f"source_scores: expected similarity [Q, C] with Q gold indices, sources (and tasks); got "
                         f"{s.shape}, {len(gold)}, {len(sources)}" + ("" if tasks is None else f", {len(tasks)}"))
    out: dict[str, dict[str, Any]] = {}
    for source in sorted(set(sources)):
        rows = [i for i, src in enumerate(sources) if src == source]
        columns = sorted({int(gold[i]) for i in rows})
        column_of = {c: j for j, c in enumerate(columns)}
        out[source] = score_similarity(s[np.ix_(rows, columns)], [column_of[int(gold[i])] for i in rows])
        if tasks is not None:
            out[source]["task"] = " / ".join(sorted({tasks[i] for i in rows}))
    return out


def candidate_pools(n_rows: int, pool_size: int | None) -> list[np.ndarray]:
    """Row indices of each candidate pool: `n_rows` rows cut in order into ceil(n_rows / pool_size) folds of equal
    size (+-1; `np.array_split`), or one fold of all rows when `pool_size` is None. File order decides the pools, so
    the rows must be in random order (the pipeline's builders shuffle test splits and write held-out tasks in the
    drawn order): a file sorted by label or source would pool neighbours. Raises ValueError for a `pool_size` below
    2 (one candidate is no ranking)."""
    if pool_size is not None and pool_size < 2:
        raise ValueError(f"candidate_pools: pool_size must be None or >= 2, got {pool_size}")
    folds = 1 if pool_size is None or n_rows <= pool_size else -(-n_rows // pool_size)
    return [fold for fold in np.array_split(np.arange(n_rows), folds) if len(fold)]


def pool_views(similarity: np.ndarray, gold: Sequence[int], pool_size: int | None
               ) -> Iterator[tuple[np.ndarray, list[int], np.ndarray, list[int]]]:
    """Per candidate pool (`candidate_pools` over the rows of `similarity` (Q, C)): (its query rows, its columns =
    the distinct gold columns of those rows, the (rows, columns) block of `similarity`, each row's gold index into
    the block's columns)."""
    for rows in candidate_pools(len(gold), pool_size):
        columns = sorted({int(gold[i]) for i in rows})
        column_of = {column: j for j, column in enumerate(columns)}
        yield rows, columns, similarity[np.ix_(rows, columns)], [column_of[int(gold[i])] for i in rows]


def pooled_scores(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One score from the scores of disjoint query sets (the candidate pools): hit@1, MRR and chance (those present)
    are means over queries, so each part weighs by its "n_queries" (exactly the mean over all queries);
    "n_candidates" is the largest pool's, "pools" the number of parts; a source's "task" labels of all parts are
    joined (`source_scores`' " / " form). Other keys are taken from the first part. Raises ValueError for no parts."""
    if not parts:
        raise ValueError("pooled_scores: no scores to pool")
    n = sum(int(p["n_queries"]) for p in parts)
    pooled = dict(parts[0])
    pooled.update({key: sum(float(p[key]) * int(p["n_queries"]) for p in parts) / n
                   for key in ("hit@1", "mrr", "chance") if key in parts[0]})
    pooled.update(n_queries=n, n_candidates=max(int(p["n_candidates"]) for p in parts), pools=len(parts))
    if "task" in pooled:  # a pool may hold only some of a source's directions
        pooled["task"] = " / ".join(sorted({t for p in parts for t in str(p.get("task", "")).split(" / ") if t}))
    return pooled


def evaluate_model(
    model_dir: str | Path,
    data_dir: str | Path,
    modalities: list[str] | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    audio_cache_dir: str | Path | None = None,
    split: str = "test",
    pool_size: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Scores of `model_dir` on `data_dir/<modality>/<split>.jsonl` (only that split's files are opened).

    Returns {modality: {"hit@1", "mrr", "n_queries", "n_candidates", "chance", "pools", "sources": {source: {"hit@1",
    "mrr", "n_queries", "n_candidates", "chance", "pools", "task"}}}}; `limit` keeps the first rows of each file;
    `pool_size` scores a file of more rows in candidate pools of at most that many rows (`candidate_pools`, module
    doc; "n_candidates" is then the largest pool's). A modality without the file is left out. Raises ValueError for
    an unknown `split` or a `pool_size` below 2.
    """
    if split not in SPLITS:
        raise ValueError(f"evaluate_model: split must be one of {SPLITS}, got {split!r}")
    candidate_pools(0, pool_size)  # checks pool_size before any model is loaded
    data_dir = Path(data_dir)
    model, processor = load_for_eval(model_dir)
    if model.config.backbone_model_type in SUPPORTED_FAMILIES:  # evaluation never trains the tower: encode items once
        vision_tower(model).requires_grad_(False)
        VisualTokenCache.install(model)
    model.audio_frames_hook = AudioFrameCache.for_model(model, audio_cache_dir)
    results = {}
    for modality in modalities or sorted(p.name for p in data_dir.iterdir() if (p / f"{split}.jsonl").exists()):
        path = data_dir / modality / f"{split}.jsonl"
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
        similarity = (q @ c.T).numpy()
        tasks = [f"{input_kind(r.query)} -> {input_kind(r.positive)}" for r in rows]
        kinds = [input_kind(c) for c in candidates]
        modality_parts, source_parts = [], {}
        for fold, columns, fold_similarity, fold_gold in pool_views(similarity, gold, pool_size):
            modality_parts.append(kind_pool_scores(fold_similarity, fold_gold, [kinds[c] for c in columns]))
            for source, score in source_scores(fold_similarity, fold_gold, [rows[i].source for i in fold],
                                               [tasks[i] for i in fold]).items():
                source_parts.setdefault(source, []).append(score)
        results[modality] = {**pooled_scores(modality_parts),
                             "sources": {src: pooled_scores(parts) for src, parts in sorted(source_parts.items())}}
    return results
