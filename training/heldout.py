"""Entry point `python -m training.heldout`: held-out generalisation of a saved model on unseen sources.

    python -m training.heldout --model runs/pipeline-small/final-model [--tasks runs/heldout-tasks] [--out s.json]
    python -m training.heldout --model runs/pipeline-small/final-model --cap 160 --pool-size 80   # as the small pipeline

Builds the tasks (training/data_sources/heldout.py: GCIDE definitions, Twemoji names <-> images, flite spoken words,
gnuplot manual pages) into `--tasks` unless that folder already holds them for the same `--cap` and `--seed`,
then scores the model through `SentenceTransformer(..., trust_remote_code=True)` (training/evaluation/heldout.py) and
prints one line per task (hit@1, chance, the one-sided binomial p-value of its hits under chance; "well above
chance" = hit@1 >= 3 x chance and p < 0.01). Sources that are not
installed are skipped with the install command. Entry module (not in training/evaluation/) because building reads
training/data_sources, which the evaluation layer may not import.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from training.common.cli import require_model_folder, user_errors
from training.common.io_utils import write_json_atomic
from training.data_sources.heldout import ensure_tasks
from training.evaluation.heldout import score_heldout
from training.evaluation.metrics import (SIGNIFICANCE, WELL_ABOVE_CHANCE, chance_candidates, chance_p_value, hits_of,
                                         well_above_chance)


def format_scores(scores: dict[str, dict[str, Any]]) -> str:
    """One line per task: hit@1, MRR, chance, sizes, the p-value of the hits under chance and the verdict."""
    lines = []
    for task, s in scores.items():
        verdict = "well above chance" if well_above_chance(s) else \
            f"NOT well above chance (>= {WELL_ABOVE_CHANCE:g} x chance and p < {SIGNIFICANCE:g})"
        p_value = chance_p_value(hits_of(s), int(s["n_queries"]), chance_candidates(s))
        lines.append(f"{task:24s} hit@1 {s['hit@1']:.3f}  mrr {s['mrr']:.3f}  chance {s['chance']:.3f}  "
                     f"p {p_value:.2g}  ({s['n_queries']} queries, {s['n_candidates']} candidates): {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.heldout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder SentenceTransformer loads (e.g. final-model)")
    parser.add_argument("--tasks", default="runs/heldout-tasks", help="held-out task folder (built if absent)")
    parser.add_argument("--output", "--out", dest="output", help="write the scores here as JSON")
    parser.add_argument("--cap", type=int, default=80, help="queries per task (default 80)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pool-size", type=int, default=None,
                        help="score each task in candidate pools of at most this many queries (the small pipeline: "
                             "--cap 160 --pool-size 80); default: one pool of the whole task")
    args = parser.parse_args(argv)
    require_model_folder(parser, "--model", args.model)
    with user_errors(parser):
        manifest = ensure_tasks(args.tasks, cap=args.cap, seed=args.seed)
        for source, why in manifest["skipped"].items():
            print(f"skipped {source}: {why}", file=sys.stderr)
        scores = score_heldout(args.model, args.tasks, batch_size=args.batch_size, pool_size=args.pool_size)
    print(format_scores(scores))
    if args.output:
        write_json_atomic(Path(args.output), {"model": str(args.model), "tasks": str(args.tasks),
                                              "skipped": manifest["skipped"], "scores": scores})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
