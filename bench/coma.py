"""CoMa compressed pre-training + contrastive vs contrastive only, at equal total steps, per modality (issue 17).

    python bench/coma.py --base BASE_WITH_COMPRESSION_TOKENS --data /work/runs/small-base/data/pairs \
        --out runs/coma-bench --coma-steps 20 --contrastive-steps 20 --seeds 0 1

For each seed:
    coma      stage 1 (training.coma, `--coma-steps` N1 on the QA rows of every listed modality's train split), then
              per modality a contrastive specialist (training.specialist, N2 = `--contrastive-steps`) from that base
    baseline  per modality a contrastive specialist from BASE for N1 + N2 steps
Same data (train splits), LoRA, batch, LR and seed for both arms; the specialists use the pipeline's small-preset
settings (training/pipeline/runner.py stage_specialists). Each model is scored on the test split with
training.evaluation.stage_eval.evaluate_model (hit@1 / MRR per modality, queries ranking all distinct positives).
The base must carry compression tokens (ConanConfig.compression_token_ids); with `embedding_pooling:
compression_mean` both arms embed through the mean of the compression tokens, so the only difference is stage 1.

Writes OUT/results.json and, with `--markdown`, a table + plot (`docs/results/coma.md`, `coma.png`).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.base.build_base import extend_repo_with_compression_tokens  # noqa: E402
from training.coma import stage as coma  # noqa: E402
from training.evaluation.stage_eval import evaluate_model  # noqa: E402
from training.specialist import decouple as specialist  # noqa: E402


def coma_stage(base: Path, data: Path, modalities: list[str], out: Path, steps: int, args: argparse.Namespace,
               seed: int) -> tuple[Path, dict[str, Any]]:
    cfg = coma.load_config(None, raw={
        "name": f"coma-seed{seed}", "base": str(base), "output": str(out), "seed": seed,
        "data": {"train": [str(data / m / "train.jsonl") for m in modalities], "on_error": "skip",
                 "max_answer_tokens": args.max_answer_tokens},
        "lora": {"r": args.lora_r, "alpha": 2.0 * args.lora_r, "dropout": 0.0},
        "train": {"per_device_batch_size": args.batch_size, "max_steps": steps, "lr": args.coma_lr,
                  "warmup_steps": min(5, steps // 4), "log_every": 5},
        "checkpoint_dir": str(out.parent / f".{out.name}-checkpoints"),
        "audio_cache_dir": str(args.out / "audio_cache"),
    })
    manifest = coma.train(cfg, resume="never", overwrite=True)
    shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)
    return out, manifest


def contrastive(base: Path, data: Path, modality: str, out: Path, steps: int, args: argparse.Namespace,
                seed: int) -> dict[str, Any]:
    cfg = specialist.SpecialistConfig(
        name=out.name, modality=modality, base=str(base), output=str(out),
        data=specialist.DataConfig(train=[str(data / modality / "train.jsonl")], on_error="skip"),
        lora=specialist.LoraSettings(r=args.lora_r, alpha=2.0 * args.lora_r, dropout=0.0),
        train=specialist.TrainConfig(per_device_batch_size=args.batch_size, max_steps=steps, lr=2e-3,
                                     lr_projector=1e-3, warmup_steps=min(5, steps // 4), log_every=10),
        loss={"temperature": 0.05, "num_negatives": 1}, train_audio_projector=modality == "audio",
        checkpoint_dir=str(out.parent / f".{out.name}-checkpoints"), seed=seed,
        audio_cache_dir=str(args.out / "audio_cache"),
    )
    manifest = specialist.train(cfg, resume="never", overwrite=True)
    shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)
    return manifest


def score(model: Path, data: Path, modality: str, args: argparse.Namespace) -> dict[str, Any]:
    result = evaluate_model(model, data, [modality], limit=args.eval_limit, audio_cache_dir=args.out / "audio_cache")
    return {k: result[modality][k] for k in ("hit@1", "mrr", "n_queries", "n_candidates", "chance")}


def markdown(results: dict[str, Any], command: str) -> str:
    seeds = results["seeds"]
    lines = [
        "# CoMa compressed pre-training vs contrastive only (issue 17)", "",
        "Command:", "", "```bash", command, "```", "",
        f"Base: `{results['base']}` ({results['base_note']}); data: `{results['data']}` (train splits for training, "
        f"test split for scoring, `training.evaluation.stage_eval.evaluate_model`).",
        f"Equal total steps: coma = {results['coma_steps']} CoMa stage-1 steps (all listed modalities' QA rows) + "
        f"{results['contrastive_steps']} contrastive steps per modality; baseline = "
        f"{results['coma_steps'] + results['contrastive_steps']} contrastive steps per modality. Batch "
        f"{results['batch_size']}, LoRA r {results['lora_r']}, seeds {seeds}. Wall time "
        + (f"{results['seconds']:.0f} s" if "seconds" in results else "not recorded (the run was cut short; "
           "rendered from its partial results.json)") + f" on {results['machine']}.", "",
        "hit@1 on the test split (mean over seeds; per-seed values in brackets; chance = 1 / candidates):", "",
        "| modality | chance | base (no training) | contrastive only | CoMa + contrastive | Δ |",
        "|---|---|---|---|---|---|",
    ]
    for m in results["modalities"]:
        per = results["scores"][m]
        base = per["base"]["hit@1"]
        done = [s for s in seeds if str(s) in per["baseline"] and str(s) in per["coma"]]
        if not done:
            lines.append(f"| {m} | {per['base']['chance']:.3f} | {base:.3f} | not run (out of time) | not run | |")
            continue
        b = [per["baseline"][str(s)]["hit@1"] for s in done]
        c = [per["coma"][str(s)]["hit@1"] for s in done]
        mb, mc = sum(b) / len(b), sum(c) / len(c)
        fmt = lambda v: ", ".join(f"{x:.3f}" for x in v)  # noqa: E731
        lines.append(f"| {m} | {per['base']['chance']:.3f} | {base:.3f} | {mb:.3f} [{fmt(b)}] | "
                     f"{mc:.3f} [{fmt(c)}] | {mc - mb:+.3f} |")
    lines += ["", "Stage-1 LM loss (answer tokens, first -> last logged window): " + "; ".join(
        f"seed {s}: {h[0]:.3f} -> {h[1]:.3f}" for s, h in results["coma_loss"].items()), "",
        "![hit@1 per modality](coma.png)", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mods, seeds = results["modalities"], results["seeds"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.27
    for offset, (arm, label) in enumerate((("base", "base"), ("baseline", "contrastive only"),
                                           ("coma", "CoMa + contrastive"))):
        values = []
        for m in mods:
            per = results["scores"][m][arm]
            done = [per[str(s)]["hit@1"] for s in seeds if str(s) in per] if arm != "base" else [per["hit@1"]]
            values.append(sum(done) / len(done) if done else float("nan"))
        ax.bar([i + (offset - 1) * width for i in range(len(mods))], values, width, label=label)
    ax.set_xticks(range(len(mods)), mods)
    ax.set_ylabel("test hit@1")
    ax.set_title(f"equal steps: {results['coma_steps']}+{results['contrastive_steps']} vs "
                 f"{results['coma_steps'] + results['contrastive_steps']} (seeds {seeds})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="Conan base (with compression tokens, or see "
                        "--add-compression-tokens)")
    parser.add_argument("--add-compression-tokens", type=int, default=0, metavar="K",
                        help="first extend --base with K compression tokens into OUT/base (a trained base without "
                             "them, e.g. the pipeline's distilled small base)")
    parser.add_argument("--base-note", default="", help="how the base was built (goes into the markdown)")
    parser.add_argument("--data", type=Path, required=True, help="the pipeline's pairs folder (<modality>/*.jsonl)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modalities", nargs="+", default=["text", "image", "document", "audio"])
    parser.add_argument("--coma-steps", type=int, default=20)
    parser.add_argument("--contrastive-steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--coma-lr", type=float, default=1e-3)
    parser.add_argument("--max-answer-tokens", type=int, default=24)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--markdown", type=Path, help="write the table here (and the plot next to it as coma.png)")
    parser.add_argument("--render", type=Path, help="only render --markdown from this (possibly partial) results.json")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(results, results.get("command", "python " + shlex.join(sys.argv))))
        plot(results, args.markdown.parent / "coma.png")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.add_compression_tokens:
        args.base_note = (args.base_note + "; " if args.base_note else "") + (
            f"{args.base} extended with {args.add_compression_tokens} compression tokens by "
            "training.base.build_base.extend_repo_with_compression_tokens")
        args.base = extend_repo_with_compression_tokens(args.base, args.out / "base", args.add_compression_tokens)
    coma.compression_token_ids(coma.hub_code.load("configuration_conan").ConanConfig.from_pretrained(args.base),
                               f"--base {args.base}")
    started = time.perf_counter()
    results: dict[str, Any] = {
        "base": str(args.base), "base_note": args.base_note, "data": str(args.data), "modalities": args.modalities,
        "coma_steps": args.coma_steps, "contrastive_steps": args.contrastive_steps, "seeds": args.seeds,
        "batch_size": args.batch_size, "lora_r": args.lora_r, "machine": f"{platform.machine()} CPU",
        "scores": {m: {"base": score(args.base, args.data, m, args), "baseline": {}, "coma": {}}
                   for m in args.modalities},
        "coma_loss": {}, "command": "python " + shlex.join(sys.argv),
    }
    for seed in args.seeds:
        coma_base, manifest = coma_stage(args.base, args.data, args.modalities, args.out / f"coma-seed{seed}",
                                         args.coma_steps, args, seed)
        history = manifest["history"]
        results["coma_loss"][str(seed)] = [history[0]["loss"], history[-1]["loss"]]
        for m in args.modalities:
            for arm, base, steps in (("baseline", args.base, args.coma_steps + args.contrastive_steps),
                                     ("coma", coma_base, args.contrastive_steps)):
                out = args.out / f"{arm}-{m}-seed{seed}"
                contrastive(base, args.data, m, out, steps, args, seed)
                results["scores"][m][arm][str(seed)] = score(out, args.data, m, args)
                print(json.dumps({"seed": seed, "modality": m, "arm": arm, **results["scores"][m][arm][str(seed)]}),
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)  # keep the disk small; the scores are what the table needs
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
    results["seconds"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(results, results["command"]))
        plot(results, args.markdown.parent / "coma.png")
    print(json.dumps({m: {a: results["scores"][m][a] for a in ("baseline", "coma")} for m in args.modalities},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
