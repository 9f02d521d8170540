"""Projector Recovery benchmarks: step throughput with caching, and drift repair quality/cost (recovery vs realign).

    python bench/recover.py                      # tiny random model, FSDD speech (../shared) or synthetic tones
    python bench/recover.py --model runs/fused --steps 20 --batch-size 32
    python bench/recover.py --compare            # + specialist -> fused (drift) -> recovered / realigned table

Part 1 (steps/s, same model, batch and optimizer, measured in this run):
  naive          re-encodes the batch's texts and re-runs the Whisper encoder every step (in-batch negatives only)
  cached text    text embeddings computed once (the backbone is frozen), Whisper still re-run every step
  recover        training.recover: cached text bank as negatives + cached Whisper frames
Part 2 (--compare): train a projector on the base (the "audio specialist"), perturb the LLM layers (a stand-in for
fusion), then repair the drift with Projector Recovery and with training-free realignment (relational and plain
embedding targets); report dev R@1 (FSDD dev split, 10 digit texts as candidates) and cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.common.repo import load_conan  # noqa: E402
from training.data_sources.toy_data import write_fsdd_pairs  # noqa: E402
from training.recovery import recover as R  # noqa: E402

SHARED_FSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd" / "recordings"


def make_data(root: Path, train_takes: range, dev_takes: range, speakers: list[str] | None) -> tuple[Path, Path, str]:
    """FSDD pairs where ../shared exists, else labelled synthetic tones (10 classes)."""
    if SHARED_FSDD.is_dir():
        write_fsdd_pairs(SHARED_FSDD, root / "train.jsonl", "train", takes=train_takes, speakers=speakers)
        write_fsdd_pairs(SHARED_FSDD, root / "dev.jsonl", "dev", takes=dev_takes, speakers=speakers)
        return root / "train.jsonl", root / "dev.jsonl", "FSDD speech (real)"
    import soundfile as sf

    for split, count in (("train", 6), ("dev", 2)):
        rows = []
        for label in range(10):
            for take in range(count):
                freq = 200 + 80 * label + (3 if split == "dev" else 0) * take
                t = np.arange(int(0.5 * 16000)) / 16000
                path = root / f"{split}_{label}_{take}.wav"
                sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
                rows.append({"query": {"audio": str(path)}, "positive": {"text": f"tone number {label}"},
                             "source": "tones"})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "train.jsonl", root / "dev.jsonl", "synthetic tones (labelled synthetic)"


def bench_steps(model_dir: Path, train: Path, batch_size: int, steps: int, features: Path, repeats: int = 3
                ) -> list[dict]:
    model, processor = load_conan(model_dir)
    names = R.trainable_names(model, model_dir, R.PROJECTOR_PREFIX)
    params = R.freeze_all_but(model, names)
    pad_id = int(processor.tokenizer.pad_token_id)
    pairs = R.audio_pairs(R.read_pairs(train))
    cfg = R.RecoverConfig(model=str(model_dir), output="-", train_data=str(train), progress=False,
                          feature_cache_dir=str(features))
    split = R.prepare_split(model, processor, pairs, cfg, "train")
    audio_keys = list(pairs.audio_inputs)
    partner_keys = list(pairs.partner_inputs)
    # Processor outputs (log-mel features, token ids) are prepared once for every variant: data loading is not timed.
    raw_audio: dict[str, dict] = {}  # filled lazily with the clips the timed steps use (warm-up prepares them)
    raw_text = {k: pairs.partner_inputs[k][0] for k in partner_keys}
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def audio_batch_from_features(rows: list[int]) -> dict[str, torch.Tensor]:
        keys = [audio_keys[split.audio_rows[i]] for i in rows]
        for k in keys:
            if k not in raw_audio:
                raw_audio[k] = processor.prepare([pairs.audio_inputs[k][0]], instruction=pairs.audio_inputs[k][1])
        prepared = [raw_audio[k] for k in keys]
        width = max(p["input_ids"].shape[1] for p in prepared)
        ids = torch.full((len(prepared), width), pad_id)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prepared):
            ids[r, : p["input_ids"].shape[1]] = p["input_ids"][0]
            mask[r, : p["input_ids"].shape[1]] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "input_features": torch.cat([p["input_features"] for p in prepared]),
                "audio_feature_lengths": torch.cat([p["audio_feature_lengths"] for p in prepared])}

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def step_naive(step: int) -> None:
        rows = R.batch_indices(len(split.pairs), batch_size, step, 0)
        audio = model(**audio_batch_from_features(rows)).embeddings
        texts = [raw_text[split.pairs.partner_keys[i]] for i in rows]
        with torch.no_grad():
            text_emb = model(**processor.prepare(texts)).embeddings
        positives = torch.tensor([split.partner_rows[i] for i in rows])
        uniq, inverse = torch.unique(positives, return_inverse=True)
        bank = torch.zeros(len(uniq), text_emb.shape[1])
        bank[inverse] = text_emb
        update(R.recovery_loss(audio, bank, inverse, torch.arange(len(uniq)), 0.02))

    def step_against_text_bank(step: int, audio_batch: Callable[[list[int]], dict]) -> None:
        """One recovery step against the cached text bank; the variants differ only in how audio is batched."""
        rows = R.batch_indices(len(split.pairs), batch_size, step, 0)
        audio = model(**audio_batch(rows)).embeddings
        positives = torch.tensor([split.partner_rows[i] for i in rows])
        cands = R.queue_candidates(positives, len(split.partner_bank), 4096, step, 0)
        update(R.recovery_loss(audio, split.partner_bank, positives, cands, 0.02))

    def step_cached_text(step: int) -> None:  # log-mel features in, Whisper re-run every step
        step_against_text_bank(step, audio_batch_from_features)

    def step_recover(step: int) -> None:  # cached Whisper frames in, as training.recover does
        step_against_text_bank(
            step, lambda rows: R.collate_clips(split.clips, [split.audio_rows[i] for i in rows], pad_id))

    variants = (("naive (re-encode text + Whisper)", step_naive, "in-batch unique texts"),
                ("cached text, Whisper re-run", step_cached_text, "whole text bank"),
                ("recover (cached text + frames)", step_recover, "whole text bank"))
    for s in range(steps + 1):  # untimed: the processor outputs (log-mel, ids) the uncached variants start from
        audio_batch_from_features(R.batch_indices(len(split.pairs), batch_size, s, 0))
    for _, fn, _ in variants:
        fn(0)  # warm-up
    # Interleaved repeats (median), so a burst of load from other processes hits every variant alike.
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for _ in range(repeats):
        for name, fn, _ in variants:
            t0 = time.perf_counter()
            for s in range(1, steps + 1):
                fn(s)
            times[name].append((time.perf_counter() - t0) / steps)
    results = []
    for name, _, negatives in variants:
        per_step = float(np.median(times[name]))
        results.append({"variant": name, "steps_per_s": 1 / per_step, "ms_per_step": 1000 * per_step,
                        "negatives": negatives})
    return results


def compare(base: Path, train: Path, dev: Path, work: Path, features: Path, specialist_steps: int,
            recover_steps: int) -> list[dict]:
    """specialist (projector trained on the base) -> fused (LLM perturbed) -> recovered / realigned."""
    from safetensors.torch import load_file, save_file

    from training.recovery import realign

    specialist = work / "specialist"
    t0 = time.perf_counter()
    R.recover(R.RecoverConfig(model=str(base), output=str(specialist), train_data=str(train), dev_data=str(dev),
                              trainable_prefix=R.PROJECTOR_PREFIX, max_steps=specialist_steps, batch_size=32,
                              lr=2e-3, eval_every=max(1, specialist_steps // 5), patience=100, cpu=True,
                              progress=False, feature_cache_dir=str(features)))
    specialist_seconds = time.perf_counter() - t0
    fused = work / "fused"
    shutil.copytree(specialist, fused)
    weights = load_file(fused / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    for key, value in weights.items():
        if key.startswith("backbone.language_model.layers."):
            weights[key] = value + 0.5 * value.std() * torch.randn(value.shape, generator=gen)
    save_file(weights, fused / "model.safetensors", metadata={"format": "pt"})
    (fused / "fusion_manifest.json").write_text(json.dumps(
        {"summary": {"needs_recovery": sorted(k for k in weights if k.startswith(R.PROJECTOR_PREFIX))}}))
    t0 = time.perf_counter()
    rec = R.recover(R.RecoverConfig(model=str(fused), output=str(work / "recovered"), train_data=str(train),
                                    dev_data=str(dev), max_steps=recover_steps, batch_size=32, lr=1e-3,
                                    eval_every=max(1, recover_steps // 5), patience=100, cpu=True, progress=False,
                                    feature_cache_dir=str(features)))
    recover_seconds = time.perf_counter() - t0
    base_scores = realign.run(specialist, fused, dev, progress=False, feature_cache_dir=features, iterations=0,
                              dev_data=dev)  # no fit: just the specialist / fused dev scores
    ali = base_scores
    rows = [
        {"model": "audio specialist", "dev_r@1": ali["dev_specialist"]["r@1"], "dev_mrr": ali["dev_specialist"]["mrr"],
         "cost": f"{specialist_steps} projector steps, {specialist_seconds:.1f} s"},
        {"model": "fused (drifted)", "dev_r@1": ali["dev_before"]["r@1"], "dev_mrr": ali["dev_before"]["mrr"],
         "cost": "-"},
        {"model": "Projector Recovery", "dev_r@1": rec["best_dev"]["r@1"], "dev_mrr": rec["best_dev"]["mrr"],
         "cost": f"{rec['steps']} steps (best {rec['best_step']}), {recover_seconds:.1f} s incl. load/cache"},
    ]
    for target in ("relational", "embedding"):
        t0 = time.perf_counter()
        ali = realign.run(specialist, fused, train, output=work / f"realigned-{target}", dev_data=dev, rank=6,
                          iterations=3, progress=False, feature_cache_dir=features, target=target)
        seconds = time.perf_counter() - t0
        rows.append({"model": f"realign ({target} target)", "dev_r@1": ali["dev_after"]["r@1"],
                     "dev_mrr": ali["dev_after"]["mrr"],
                     "cost": f"{ali['inference_passes']} inference passes, no labels, {seconds:.1f} s incl. load/"
                             f"cache; held-out agreement {ali['agreement_before']['holdout']:.3f}->"
                             f"{ali['agreement_after']['holdout']:.3f}"})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="Conan folder (default: a freshly built tiny random repo)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--compare", action="store_true", help="also run the recovery vs realign comparison")
    p.add_argument("--specialist-steps", type=int, default=150)
    p.add_argument("--recover-steps", type=int, default=60)
    args = p.parse_args(argv)
    command = "python bench/recover.py " + " ".join(argv if argv is not None else sys.argv[1:])
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-recover-") as scratch:
        work = Path(scratch)
        model_dir = args.model
        if model_dir is None:
            from training.base.build_base import build_tiny_repo

            model_dir = build_tiny_repo(work / "tiny")
        train_takes = range(10, 14) if args.compare else range(10, 12)
        train, dev, kind = make_data(work, train_takes, range(5, 7), None)
        rows = bench_steps(model_dir, train, args.batch_size, args.steps, work / "features", args.repeats)
        print(f"\n$ {command}")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"model: {model_dir}  data: {kind}  batch {args.batch_size}  {args.steps} steps x {args.repeats} "
              f"interleaved repeats (median)  torch threads {torch.get_num_threads()}  load avg {load:.1f}")
        print(f"{'variant':<36} {'steps/s':>8} {'ms/step':>9} {'speed-up':>9}  negatives")
        for row in rows:
            print(f"{row['variant']:<36} {row['steps_per_s']:>8.2f} {row['ms_per_step']:>9.1f} "
                  f"{row['steps_per_s'] / rows[0]['steps_per_s']:>8.2f}x  {row['negatives']}")
        if args.compare:
            table = compare(model_dir, train, dev, work, work / "features", args.specialist_steps, args.recover_steps)
            print(f"\n{'drift repair':<26} {'dev R@1':>8} {'dev MRR':>8}  cost")
            for row in table:
                print(f"{row['model']:<26} {row['dev_r@1']:>8.3f} {row['dev_mrr']:>8.3f}  {row['cost']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
