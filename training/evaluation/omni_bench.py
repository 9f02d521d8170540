"""OmniRetriever-Bench's protocol on (text, video, audio) tuples: hit@1 of six retrieval directions and AVG-all.

Source: OmniRetriever (arXiv 2605.26641), its benchmark table: T->V, T->A, V->A, A->V, T->(V+A), (V+A)->T, each the
hit@1 of retrieving tuple i's item among the N tuples' items of the other side, and AVG-all their mean. V+A is one
input holding the clip and its soundtrack (one forward, Conan's pooled embedding). Here on a tuple file's rows
(docs/omni_tuples.md: the anchor tuple `query` of each row), at whatever scale the file has; ties count against the
query (`metrics.gold_ranks`), so a model embedding everything alike scores 0, not 1.

    python -m training.evaluation.omni_bench --model DIR --tuples DIR/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.evaluation.embed import embed_items
from training.evaluation.metrics import gold_ranks

SIDES = ("T", "V", "A", "VA")  # text, video, audio, video + audio in one input
DIRECTIONS: tuple[tuple[str, str], ...] = (("T", "V"), ("T", "A"), ("V", "A"), ("A", "V"), ("T", "VA"), ("VA", "T"))
COLUMNS = tuple(f"{q}->{c}" for q, c in DIRECTIONS) + ("AVG-all",)
SIDE_KEYS = {"T": ("text",), "V": ("video",), "A": ("audio",), "VA": ("video", "audio")}


def omni_bench_scores(embeddings: Mapping[str, Any]) -> dict[str, float]:
    """hit@1 (in [0, 1]) per direction and "AVG-all" from {side: (N, H) L2-normalised embeddings}, row i of every
    side being tuple i. Sides: "T", "V", "A", "VA". Raises ValueError for a missing side or mismatched shapes."""
    missing = [s for s in SIDES if s not in embeddings]
    if missing:
        raise ValueError(f"omni_bench_scores: embeddings lack sides {missing}; expected {list(SIDES)}")
    mats = {s: np.asarray(embeddings[s].detach().cpu() if hasattr(embeddings[s], "detach") else embeddings[s],
                          dtype=np.float64) for s in SIDES}
    shapes = {s: m.shape for s, m in mats.items()}
    if len({m.shape for m in mats.values()}) != 1 or mats["T"].ndim != 2 or mats["T"].shape[0] < 2:
        raise ValueError(f"omni_bench_scores: every side must be the same (N >= 2, H) matrix, got {shapes}")
    n = mats["T"].shape[0]
    scores = {}
    for q, c in DIRECTIONS:
        ranks = gold_ranks(mats[q] @ mats[c].T, list(range(n)))
        scores[f"{q}->{c}"] = float(np.mean(ranks == 1))
    scores["AVG-all"] = float(np.mean([scores[f"{q}->{c}"] for q, c in DIRECTIONS]))
    return scores


def tuple_items(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """{side: the N input items} from tuple rows (their `query` anchor; media paths as stored in the rows)."""
    return {side: [{k: row["query"][k] for k in keys} for row in rows] for side, keys in SIDE_KEYS.items()}


def evaluate_tuples(model: torch.nn.Module, processor: Any, tuples_jsonl: str | Path, batch_size: int = 8,
                    instruction: str | None = None) -> dict[str, float]:
    """Embed the four sides of a tuple file's rows (each under its row's instruction unless `instruction` is given)
    and score them (`omni_bench_scores`); `n` = number of tuples."""
    from training.contrastive.data import load_jsonl

    examples = load_jsonl(tuples_jsonl, check_media=False)
    rows = [{"query": e.query} for e in examples]
    instructions = [instruction or e.instruction for e in examples]
    was_training = model.training
    model.eval()
    try:
        embeddings = {side: embed_items(model, processor, items, instructions, batch_size)
                      for side, items in tuple_items(rows).items()}
    finally:
        model.train(was_training)
    return {**omni_bench_scores(embeddings), "n": len(rows)}


def markdown_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table, one row per model (hit@1 in %), columns `COLUMNS`."""
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for name, scores in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * scores[c]:.1f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a Conan model folder")
    parser.add_argument("--tuples", required=True, help="a tuple JSONL file (docs/omni_tuples.md)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    from training.common import hub_code

    model = hub_code.ConanModel.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = hub_code.ConanProcessor.from_pretrained(args.model)
    scores = evaluate_tuples(model, processor, args.tuples, args.batch_size)
    print(markdown_table({Path(args.model).name: scores}))
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["COLUMNS", "DIRECTIONS", "SIDES", "evaluate_tuples", "markdown_table", "omni_bench_scores", "tuple_items"]
