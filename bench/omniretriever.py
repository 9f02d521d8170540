"""OmniRetriever objectives vs plain pairwise InfoNCE at small scale (OmniRetriever-Bench protocol, issue 17).

    python bench/omniretriever.py --out runs/omniretriever --steps 24 --seeds 0 1 2 [--base DIR] [--tuples DIR]

Builds (or reuses) the tuple data (training.data_sources.omni_tuples: emoji clip + spoken name + caption, synthetic;
`--preset` smoke or small) and, without `--base`, a smoke base (training.base.small_base, size "smoke": random
2-layer Qwen2-VL LLM, real Whisper tiny.en, undistilled). Then, for every seed, trains two specialists from the same
base with the same data, seed, steps and LoRA:

    omni      loss.objective omni_retriever, weights 1/1/1 (Tuple-InfoNCE + fusion-as-teacher + pairwise)
    baseline  loss.objective omni_retriever, weights 0/0/1 (plain symmetric InfoNCE on the same rotating pairs)

and scores hit@1 of T->V, T->A, V->A, A->V, T->(V+A), (V+A)->T and AVG-all on the tuple test split
(training.evaluation.omni_bench) for the base, each baseline and each omni model; prints per-seed and mean ± std
(sample std over seeds) tables. The seed sets the LoRA init, the data order and the hard-negative draws; data and base
are the same for every seed. Writes OUT/results.json and OUT/omniretriever.png (bars: mean over seeds, error bars:
std; dashed: chance 1/N). Each finished (seed, arm) leaves OUT/seed<S>/<arm>/bench_scores.json, reused by a rerun
with the same settings (so an interrupted comparison resumes); `--drop-models` deletes each trained model after its
evaluation (disk). Frozen-Whisper frames are cached (OUT/audio_cache) for training and evaluation alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.common import hub_code  # noqa: E402
from training.common.audio_cache import AudioFrameCache  # noqa: E402
from training.common.io_utils import write_json_atomic  # noqa: E402
from training.data_sources.omni_tuples import PRESETS, build_tuples  # noqa: E402
from training.evaluation.omni_bench import COLUMNS, evaluate_tuples, markdown_table  # noqa: E402
from training.specialist import decouple as specialist  # noqa: E402

RUNS = {"baseline": [0.0, 0.0, 1.0], "omni": [1.0, 1.0, 1.0]}


def evaluate(model_dir: Path, tuples: Path, cache: Path) -> dict[str, float]:
    model = hub_code.ConanModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model.audio_frames_hook = AudioFrameCache.for_model(model, cache)
    processor = hub_code.ConanProcessor.from_pretrained(str(model_dir))
    return evaluate_tuples(model, processor, tuples)


def label(name: str) -> str:
    return f"{name} (w={'/'.join(f'{w:g}' for w in RUNS[name])})"


def summarise(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{column: {"mean", "std", "min", "max"}} over seeds (hit@1 in [0, 1]; std is the sample std, 0 for one seed)."""
    out = {}
    for column in COLUMNS:
        values = [scores[column] for scores in per_seed]
        out[column] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                       "min": min(values), "max": max(values)}
    return out


def summary_table(summaries: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table of mean ± std (hit@1 in %), one row per model."""
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for name, summary in summaries.items():
        cells = [f"{100 * summary[c]['mean']:.1f} ± {100 * summary[c]['std']:.1f}" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summaries: dict[str, dict[str, dict[str, float]]], chance: float, title: str, out_png: Path) -> Path | None:
    """Grouped bars (one group per direction + AVG-all, one bar per model) of mean hit@1 with std error bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(9, 4), dpi=100)
    width = 0.8 / len(summaries)
    for i, (name, summary) in enumerate(summaries.items()):
        xs = [x + i * width for x in range(len(COLUMNS))]
        ax.bar(xs, [summary[c]["mean"] for c in COLUMNS], width, yerr=[summary[c]["std"] for c in COLUMNS],
               capsize=2, label=name)
    ax.axhline(chance, color="black", linestyle="dashed", linewidth=1, label=f"chance (1/{round(1 / chance)})")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(COLUMNS))], list(COLUMNS))
    ax.set_ylabel("hit@1 on the tuple test split")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png


def train_arm(name: str, seed: int, base: Path, tuples: Path, out: Path, cache: Path,
              args: argparse.Namespace) -> dict[str, Any]:
    """Train one (arm, seed) specialist and score it; reuse OUT/seed<S>/<arm>/bench_scores.json from the same settings."""
    run_dir = out / f"seed{seed}" / name
    settings = {"arm": name, "weights": RUNS[name], "seed": seed, "base": str(base), "tuples": str(tuples),
                **{k: getattr(args, k) for k in ("steps", "batch_size", "chunk_size", "lr", "temperature")}}
    done = run_dir / "bench_scores.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved.get("settings") == settings:
            print(f"reusing {done}", flush=True)
            return saved
    cfg = specialist.load_config(None, raw={
        "name": f"omni-bench-{name}-seed{seed}", "modality": "video", "base": str(base), "output": str(run_dir),
        "seed": seed, "train_audio_projector": True, "audio_cache_dir": str(cache),
        "data": {"train": [str(tuples / "train.jsonl")], "check_media": False},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
        "loss": {"objective": "omni_retriever", "weights": RUNS[name], "temperature": args.temperature},
        "train": {"per_device_batch_size": args.batch_size, "chunk_size": args.chunk_size,
                  "max_steps": args.steps, "lr": args.lr, "warmup_steps": max(1, args.steps // 10),
                  "schedule": "cosine", "log_every": max(1, args.steps // 6), "save_every": 0},
    })
    start = time.perf_counter()
    manifest = specialist.train(cfg, resume="never", overwrite=True)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = evaluate(run_dir, tuples / "test.jsonl", cache)
    result = {"settings": settings, "scores": scores, "train_seconds": train_s,
              "eval_seconds": time.perf_counter() - start, "history": manifest["history"]}
    if args.drop_models:
        for child in run_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    write_json_atomic(done, result)
    print(f"seed {seed} {name}: train {train_s:.0f} s, AVG-all {100 * scores['AVG-all']:.1f}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/omniretriever")
    parser.add_argument("--base", help="a Conan base folder (default: build the smoke base into OUT/base)")
    parser.add_argument("--tuples", help="a tuple data folder (default: build `--preset` tuples into OUT/tuples)")
    parser.add_argument("--preset", default="smoke", choices=sorted(PRESETS), help="tuple preset when building them")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=0, help="GradCache chunk (0: off)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (data and base: the first)")
    parser.add_argument("--drop-models", action="store_true", help="delete each trained model after scoring it")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "audio_cache"
    t0 = time.perf_counter()
    tuples = Path(args.tuples).resolve() if args.tuples else out / "tuples"
    if not (tuples / "train.jsonl").is_file():
        build_tuples(tuples, args.preset, seed=args.seeds[0])
    base = Path(args.base).resolve() if args.base else out / "base"
    if not (base / "config.json").is_file():
        from training.base.small_base import build_small_base

        build_small_base(base, size="smoke", seed=args.seeds[0])
    base_file = out / "base_scores.json"
    base_scores = json.loads(base_file.read_text()) if base_file.is_file() else {}
    if base_scores.get("base") != str(base) or base_scores.get("tuples") != str(tuples):
        base_scores = {"base": str(base), "tuples": str(tuples), "scores": evaluate(base, tuples / "test.jsonl", cache)}
        write_json_atomic(base_file, base_scores)
    by_seed = {seed: {name: train_arm(name, seed, base, tuples, out, cache, args) for name in RUNS}
               for seed in args.seeds}  # seed by seed, so an interrupted comparison leaves whole seeds behind
    runs = {name: [by_seed[seed][name] for seed in args.seeds] for name in RUNS}
    n_test = int(base_scores["scores"]["n"])
    summaries = {"base (untrained)": summarise([base_scores["scores"]])}
    summaries.update({label(name): summarise([r["scores"] for r in results]) for name, results in runs.items()})
    command = "python bench/omniretriever.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": command, "args": vars(args), "base": str(base), "tuples": str(tuples), "n_test": n_test,
              "chance": 1 / n_test, "base_scores": base_scores["scores"], "summary": summaries,
              "runs": {name: {str(seed): r for seed, r in zip(args.seeds, results)} for name, results in runs.items()},
              "wall_seconds": time.perf_counter() - t0,
              "environment": {"python": platform.python_version(), "torch": torch.__version__,
                              "threads": torch.get_num_threads()}}
    write_json_atomic(out / "results.json", report)
    title = (f"OmniRetriever objectives vs pairwise InfoNCE: {n_test} test tuples, {args.steps} steps, "
             f"seeds {args.seeds}")
    png = plot(summaries, 1 / n_test, title, out / "omniretriever.png")
    print(f"$ {command}")
    print(f"test tuples: {n_test} (chance {100 / n_test:.1f}%), steps {args.steps}, batch {args.batch_size}, "
          f"seeds {args.seeds}, wall {report['wall_seconds']:.0f} s")
    for name, results in runs.items():
        print(f"{name} train s: " + ", ".join(f"{r['train_seconds']:.0f}" for r in results))
    print(markdown_table({"base (untrained)": base_scores["scores"],
                          **{f"{label(name)} seed {seed}": r["scores"] for name, results in runs.items()
                             for seed, r in zip(args.seeds, results)}}))
    print()
    print(summary_table(summaries))
    if png is not None:
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
