"""Scores of a saved model on the held-out tasks (unseen sources), through the sentence-transformers wrapper.

The tasks are built by ``training/data_sources/heldout.py`` (``build_heldout_tasks``): ``TASKS/<task>/test.jsonl``
in the pair format + ``TASKS/tasks.json``. Each task is scored exactly as a user would call the published model:
``SentenceTransformer(model_dir, trust_remote_code=True)``, queries through ``encode_query(..., prompt=
instruction)`` and candidates (every distinct positive of the task, or of the query's candidate pool: ``pool_size``,
``stage_eval.candidate_pools``) through ``encode_document``; cosine ranks with ties against the query
(``metrics.gold_ranks`` via ``stage_eval.score_similarity``); chance = 1 / candidates.

    python -m training.heldout --model runs/pipeline-small/final-model      # builds the tasks, then scores
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from training.common.audio_cache import AudioFrameCache
from training.contrastive.data import load_jsonl
from training.evaluation.stage_eval import candidate_pools, pool_views, pooled_scores, score_similarity


def task_files(tasks_dir: str | Path) -> dict[str, Path]:
    """{task: TASKS/<task>/test.jsonl} in the order of TASKS/tasks.json (else sorted). Raises FileNotFoundError
    when the folder holds no task."""
    tasks_dir = Path(tasks_dir)
    manifest = tasks_dir / "tasks.json"
    names = list(json.loads(manifest.read_text())["tasks"]) if manifest.exists() else sorted(
        p.parent.name for p in tasks_dir.glob("*/test.jsonl"))
    files = {name: tasks_dir / name / "test.jsonl" for name in names if (tasks_dir / name / "test.jsonl").exists()}
    if not files:
        raise FileNotFoundError(f"no held-out task (<task>/test.jsonl) under {tasks_dir}; build them with "
                                "training.data_sources.heldout.build_heldout_tasks or `python -m training.heldout`")
    return files


def score_heldout(model_dir: str | Path, tasks_dir: str | Path, batch_size: int = 16, progress: bool = True,
                  device: str = "cpu", audio_cache_dir: str | Path | None = None,
                  pool_size: int | None = None) -> dict[str, dict[str, Any]]:
    """{task: {"hit@1", "mrr", "chance", "n_queries", "n_candidates", "pools", "source"}} of the model at
    ``model_dir`` (a folder ``SentenceTransformer(..., trust_remote_code=True)`` loads) on every task under
    ``tasks_dir``. With ``pool_size``, a task of more rows is scored in candidate pools of at most that many rows
    (``stage_eval.candidate_pools``; "n_candidates" is the largest pool's); a ``pool_size`` below 2 raises ValueError.

    Every row of a task must carry the task's one instruction (the query prompt); a task mixing instructions raises
    ValueError naming it. Media paths in the rows are relative to their JSONL file. ``audio_cache_dir``: attach the
    on-disk cache of the frozen audio encoder's outputs (training/common/audio_cache.py, keyed by the clip's features
    and the encoder's fingerprint) to the loaded model, so models sharing an audio encoder (the pipeline's base and
    final model) run it once per clip; the vectors are unchanged. Whisper on a 30 s window is ~1 s a clip on CPU,
    ~95% of the scoring time here.
    """
    from sentence_transformers import SentenceTransformer

    candidate_pools(0, pool_size)  # checks pool_size before the model loads
    model = SentenceTransformer(str(model_dir), trust_remote_code=True, device=device)
    if audio_cache_dir is not None:
        conan = model[0].model
        conan.audio_frames_hook = AudioFrameCache.for_model(conan, audio_cache_dir)
    results: dict[str, dict[str, Any]] = {}
    files = task_files(tasks_dir)
    for task, path in tqdm(files.items(), desc="held-out tasks", disable=not progress):
        rows = load_jsonl(path, check_media=False)
        instructions = {r.instruction for r in rows}
        if len(instructions) != 1:
            raise ValueError(f"{path}: a held-out task needs one instruction for all rows, found "
                             f"{sorted(map(str, instructions))}")
        positives = [json.dumps(r.positive, sort_keys=True) for r in rows]
        unique = list(dict.fromkeys(positives))
        gold = [unique.index(p) for p in positives]
        queries = model.encode_query([r.query for r in rows], prompt=instructions.pop(), batch_size=batch_size,
                                     convert_to_numpy=True)
        candidates = model.encode_document([json.loads(p) for p in unique], batch_size=batch_size,
                                           convert_to_numpy=True)
        similarity = np.asarray(queries) @ np.asarray(candidates).T
        parts = [score_similarity(block, block_gold) for _, _, block, block_gold in
                 pool_views(similarity, gold, pool_size)]
        results[task] = {**pooled_scores(parts), "source": rows[0].source}
    return results
