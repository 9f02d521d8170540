"""OmniRetriever objectives vs plain pairwise InfoNCE at small scale (OmniRetriever-Bench protocol, issue 17).

    python bench/omniretriever.py --out runs/omniretriever --steps 24

Builds (or reuses) the smoke tuple data (training.data_sources.omni_tuples: emoji clip + spoken name + caption,
synthetic) and a smoke base (training.base.small_base, size "smoke": random 2-layer Qwen2-VL LLM, real Whisper
tiny.en, undistilled), then trains two specialists from the same base with the same data, seed, steps and LoRA:

    omni      loss.objective omni_retriever, weights 1/1/1 (Tuple-InfoNCE + fusion-as-teacher + pairwise)
    baseline  loss.objective omni_retriever, weights 0/0/1 (plain symmetric InfoNCE on the same rotating pairs)

and prints hit@1 of T->V, T->A, V->A, A->V, T->(V+A), (V+A)->T and AVG-all on the tuple test split for the base, the
baseline and the omni model (training.evaluation.omni_bench). Writes OUT/results.json. Frozen-Whisper frames are
cached (OUT/audio_cache) for training and evaluation alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.common import hub_code  # noqa: E402
from training.common.audio_cache import AudioFrameCache  # noqa: E402
from training.data_sources.omni_tuples import build_tuples  # noqa: E402
from training.evaluation.omni_bench import evaluate_tuples, markdown_table  # noqa: E402
from training.specialist import decouple as specialist  # noqa: E402

RUNS = {"baseline": [0.0, 0.0, 1.0], "omni": [1.0, 1.0, 1.0]}


def evaluate(model_dir: Path, tuples: Path, cache: Path) -> dict[str, float]:
    model = hub_code.ConanModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model.audio_frames_hook = AudioFrameCache.for_model(model, cache)
    processor = hub_code.ConanProcessor.from_pretrained(str(model_dir))
    return evaluate_tuples(model, processor, tuples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/omniretriever")
    parser.add_argument("--base", help="a Conan base folder (default: build the smoke base into OUT/base)")
    parser.add_argument("--tuples", help="a tuple data folder (default: build the smoke tuples into OUT/tuples)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=0, help="GradCache chunk (0: off)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "audio_cache"
    t0 = time.perf_counter()
    tuples = Path(args.tuples).resolve() if args.tuples else out / "tuples"
    if not (tuples / "train.jsonl").is_file():
        build_tuples(tuples, "smoke", seed=args.seed)
    base = Path(args.base).resolve() if args.base else out / "base"
    if not (base / "config.json").is_file():
        from training.base.small_base import build_small_base

        build_small_base(base, size="smoke", seed=args.seed)
    results = {"base (untrained)": evaluate(base, tuples / "test.jsonl", cache)}
    timings, histories = {}, {}
    for name, weights in RUNS.items():
        cfg = specialist.load_config(None, raw={
            "name": f"omni-bench-{name}", "modality": "video", "base": str(base), "output": str(out / name),
            "seed": args.seed, "train_audio_projector": True, "audio_cache_dir": str(cache),
            "data": {"train": [str(tuples / "train.jsonl")], "check_media": False},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
            "loss": {"objective": "omni_retriever", "weights": weights, "temperature": args.temperature},
            "train": {"per_device_batch_size": args.batch_size, "chunk_size": args.chunk_size,
                      "max_steps": args.steps, "lr": args.lr, "warmup_steps": max(1, args.steps // 10),
                      "schedule": "cosine", "log_every": max(1, args.steps // 6), "save_every": 0},
        })
        start = time.perf_counter()
        manifest = specialist.train(cfg, resume="never", overwrite=True)
        timings[name] = time.perf_counter() - start
        histories[name] = manifest["history"]
        results[f"{name} (w={'/'.join(f'{w:g}' for w in weights)})"] = evaluate(out / name, tuples / "test.jsonl",
                                                                                 cache)
    command = "python bench/omniretriever.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": command, "args": vars(args), "results": results, "train_seconds": timings,
              "history": histories, "total_seconds": time.perf_counter() - t0,
              "environment": {"python": platform.python_version(), "torch": torch.__version__,
                              "threads": torch.get_num_threads()},
              "n_test": next(iter(results.values()))["n"]}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"$ {command}")
    print(f"test tuples: {report['n_test']}, steps {args.steps}, batch {args.batch_size}, seed {args.seed}, "
          f"train s: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
