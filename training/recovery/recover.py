"""Stage R (docs/ARCHITECTURE.md, data flow): Projector Recovery — retrain only the audio projector on the fused backbone.

    python -m training.recover --model runs/fused --config training/configs/recover_fsdd.yaml --output runs/recovered

After fusion the audio projector still speaks the audio specialist's backbone dialect (Projector Drift). Here every
tensor except the ones `fusion_manifest.json` flags (`needs_recovery`, i.e. `audio_projector.*`) is frozen in eval
mode, and the flagged tensors train in fp32 master weights with a symmetric audio<->text InfoNCE
(the paper's Projector Recovery, arXiv 2606.09331; the cached bank and the distillation below are
our design):

- the backbone is frozen, so every non-audio ("partner") embedding is a constant: it is computed once and the whole
  cache serves as a zero-staleness queue of negatives;
- the Whisper encoder is frozen, so its pooled frames are cached once per clip (only the frames that become tokens);
- optional relational distillation from the audio specialist's audio x partner similarity matrix (KL, tau_t);
- the one InfoNCE (`training.contrastive.loss.info_nce`, each distinct partner scored once), the shared cosine
  schedule with linear warm-up from lr 0 (`training.contrastive.trainer.build_scheduler`) and the shared optimizer-step
  loop (`training.contrastive.loop.run_steps`; this file gives it the step on the cached bank, the dev evaluation and
  the checkpoint);
- early stopping on audio->partner R@1 of a dev split (ties count against the clip, `evaluation.metrics`); the
  dev-best projector is kept; small resumable checkpoints (projector + optimizer + scheduler + counters + RNG) as
  `step_XXXXXXXX` folders in the pickle-free `training.contrastive.checkpoint` format (`loop.save_state_folder`).

The knobs live in `config.py`, the pairs and frozen-encoder caches in `clips.py`. This file stays a little over 400
lines because `recover` is one function on purpose: every piece of resumable state is created, saved and restored in
one place.

The output folder is the fused model with the recovered projector, plus `projector_calibration.json` recording the
fingerprint of the backbone the projector was calibrated on (and `projector_calibration_hash` in config.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.common.calibration import (
    CALIBRATION_FILE,
    PROJECTOR_PREFIX,
    backbone_fingerprint,
    backbone_matches,
    calibrate,
)
from training.common.config import ConfigError
from training.common.io_utils import atomic_output_dir, check_output_free, write_json_atomic
from training.common.repo import NotAConanRepo, load_conan, save_conan_repo
from training.contrastive.loop import LoopSettings, TrainState, load_state_folder, resolve_resume, run_steps, save_state_folder
from training.contrastive.loss import info_nce
from training.contrastive.trainer import build_scheduler
from training.evaluation.embed import embed_keyed as embed_inputs
from training.evaluation.metrics import retrieval_scores
from training.recovery.clips import (
    AudioPairs, ClipCache, audio_pairs, cache_audio, collate_clips, embed_clips, read_pairs, to_device,
)
from training.recovery.config import RecoverConfig, RecoverError, load_config

logger = logging.getLogger("training.recover")


# ============================================================================================== model loading
def trainable_names(model: torch.nn.Module, model_dir: str | os.PathLike, prefix: str | None = None) -> list[str]:
    """Tensors to recover: `--trainable-prefix` if given, else the manifest's `needs_recovery`, else the projector."""
    params = dict(model.named_parameters())
    manifest_path = Path(model_dir) / "fusion_manifest.json"
    if prefix is None and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        flagged = manifest.get("summary", {}).get("needs_recovery")
        if flagged is None:
            flagged = [k for k, e in manifest.get("tensors", {}).items() if e.get("needs_recovery")]
        if not flagged:
            raise RecoverError(
                f"{manifest_path} flags no tensor as needs_recovery; nothing to recover. Pass --trainable-prefix "
                f"{PROJECTOR_PREFIX} to train the projector anyway."
            )
        missing = sorted(set(flagged) - set(params))
        if missing:
            raise RecoverError(f"{manifest_path} flags tensors the model does not have: {missing[:5]}.")
        names = sorted(flagged)
    else:
        prefix = prefix or PROJECTOR_PREFIX
        names = sorted(n for n in params if n.startswith(prefix))
        if not names:
            raise RecoverError(f"no parameter starts with {prefix!r}; expected e.g. {PROJECTOR_PREFIX}fc1.weight.")
    outside = [n for n in names if not n.startswith(PROJECTOR_PREFIX)]
    if outside:
        raise RecoverError(
            f"Projector Recovery trains only {PROJECTOR_PREFIX}* (the text side and the Whisper frames are cached as "
            f"constants), but these tensors were flagged: {outside[:5]}."
        )
    return names


def freeze_all_but(model: torch.nn.Module, names: Iterable[str]) -> list[torch.nn.Parameter]:
    """requires_grad only on `names`, which become fp32 master weights; the whole model stays in eval mode."""
    wanted = set(names)
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)
        if name in wanted:
            if param.dtype != torch.float32:
                param.data = param.data.float()
            trainable.append(param)
    model.eval()
    return trainable


# ============================================================================================== losses / metrics
def recovery_loss(
    audio: torch.Tensor, partner_bank: torch.Tensor, positives: torch.Tensor, candidates: torch.Tensor,
    temperature: float, symmetric: bool = True,
) -> torch.Tensor:
    """The one InfoNCE (`training.contrastive.loss.info_nce`) of audio (B, H) against the cached partner bank.

    `positives` (B,) are bank rows, `candidates` the bank rows scored (every positive plus the queue of cached
    negatives). Bank row ids are the duplicate keys, so clips sharing a partner (ten FSDD clips of "seven") never
    count that partner as a negative, and in the symmetric partner->audio direction the other clips of the same
    partner are masked out. Computed on this process's rows only (no cross-device gather: the bank is global).
    """
    queue = candidates[~torch.isin(candidates, positives)]
    return info_nce(audio, partner_bank[positives], partner_bank[queue], positive_keys=positives,
                    negative_keys=queue, query_keys=positives, temperature=temperature, symmetric=symmetric,
                    cross_device=False, unique_candidates=True).loss


def relational_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(S_teacher/t) || softmax(S_student/t)) over rows of two similarity matrices (in the spirit of UniME's stage-1 distillation, arXiv 2504.17432)."""
    return F.kl_div(
        F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
        log_target=True, reduction="batchmean",
    )


# ============================================================================================== the trainer
@dataclass
class SplitData:
    pairs: AudioPairs
    clips: ClipCache
    partner_bank: torch.Tensor
    partner_index: dict[str, int]
    audio_rows: list[int]  # per pair: row in clips
    partner_rows: list[int]  # per pair: row in partner_bank

    def dev_positives(self) -> tuple[list[int], list[int]]:
        """Unique clips and their partner rows (a clip appearing in two pairs is scored once, first partner)."""
        seen: dict[int, int] = {}
        for a, p in zip(self.audio_rows, self.partner_rows):
            seen.setdefault(a, p)
        return list(seen), list(seen.values())


def prepare_split(model: torch.nn.Module, processor: Any, pairs: AudioPairs, cfg: RecoverConfig, name: str) -> SplitData:
    if len(pairs) == 0:
        raise RecoverError(f"{name}: no pair has audio on exactly one side ({pairs.skipped} skipped); expected "
                           "audio<->text pairs, e.g. {'query': {'audio': 'a.wav'}, 'positive': {'text': '...'}}.")
    clips = cache_audio(model, processor, pairs.audio_inputs, cfg.cache_batch_size, cfg.progress,
                        cfg.feature_cache_dir)
    bank, index = embed_inputs(model, processor, pairs.partner_inputs, cfg.cache_batch_size, cfg.progress,
                               desc=f"cache {name} partners")
    return SplitData(pairs, clips, bank, index, [clips.index[k] for k in pairs.audio_keys],
                     [index[k] for k in pairs.partner_keys])


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Pair indices of global step `step`: a pure function of (seed, epoch, step), so resume needs no RNG state."""
    per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    epoch, pos = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen).tolist()
    if n < batch_size:
        return perm
    return perm[pos * batch_size : (pos + 1) * batch_size]


def queue_candidates(positives: torch.Tensor, bank_size: int, queue_size: int, step: int, seed: int) -> torch.Tensor:
    """The batch's positives plus a random sample of other cached partners (deterministic per step)."""
    if bank_size <= queue_size:
        return torch.arange(bank_size)
    gen = torch.Generator().manual_seed(seed * 7_919 + step + 1)
    extra = torch.randperm(bank_size, generator=gen)[: queue_size]
    merged = torch.unique(torch.cat([positives.cpu(), extra]))
    return merged


def recover(cfg: RecoverConfig, on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Run Projector Recovery end to end; returns the report (also written to `<output>/recovery_report.json`)."""
    from accelerate import Accelerator

    cfg.validate()
    check_output_free(cfg.output, cfg.overwrite)  # before the training, not after it
    t_start = time.perf_counter()
    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision)
    torch.manual_seed(cfg.seed)
    model, processor = load_conan(cfg.model, cfg.dtype)
    names = trainable_names(model, cfg.model, cfg.trainable_prefix)
    saved_dtype = {n: p.dtype for n, p in model.named_parameters() if n in set(names)}
    params = freeze_all_but(model, names)
    if cfg.gradient_checkpointing:
        _enable_frozen_checkpointing(model)
    model.to(accelerator.device)
    fingerprint = backbone_fingerprint(model)
    previous_hash = getattr(model.config, "projector_calibration_hash", None)
    if previous_hash and backbone_matches(previous_hash, model):
        logger.warning("%s: the projector is already calibrated on this backbone (projector_calibration_hash "
                       "matches); recovering anyway.", cfg.model)
    pad_id = int(processor.tokenizer.pad_token_id)

    train = prepare_split(model, processor, audio_pairs(read_pairs(cfg.train_data, cfg.max_train_pairs),
                          cfg.query_instruction, cfg.document_instruction), cfg, "train_data")
    dev = None
    if cfg.dev_data:
        dev = prepare_split(model, processor, audio_pairs(read_pairs(cfg.dev_data, cfg.max_dev_pairs),
                            cfg.query_instruction, cfg.document_instruction), cfg, "dev_data")
    else:
        logger.warning("No dev_data: no early stopping; the last step's projector is kept.")
    teacher_audio = teacher_bank = None
    if cfg.kd_weight > 0:
        teacher, _ = load_conan(cfg.specialist, cfg.dtype)
        teacher.to(accelerator.device)
        teacher_audio = embed_clips(teacher, _recache(teacher, processor, train, cfg), list(range(len(train.clips))),
                                    pad_id, cfg.cache_batch_size)
        teacher_bank, t_index = embed_inputs(teacher, processor, train.pairs.partner_inputs, cfg.cache_batch_size,
                                             cfg.progress, desc="teacher partners")
        teacher_bank = teacher_bank[[t_index[k] for k in sorted(train.partner_index, key=train.partner_index.get)]]
        del teacher
    cache_seconds = time.perf_counter() - t_start

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, "cosine", int(round(cfg.warmup_ratio * cfg.max_steps)), cfg.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    projector = raw_model.audio_projector

    ckpt_dir = Path(cfg.checkpoint_dir or f"{cfg.output}.recover-ckpt")
    counter = TrainState()
    state = {"best": None, "best_state": None, "bad_evals": 0, "history": [], "stopped_early": False}
    resume_from = resolve_resume("auto" if cfg.resume else None, ckpt_dir)
    if resume_from is not None:
        saved = load_state_folder(resume_from, counter)
        if saved.get("fingerprint") != fingerprint:
            raise RecoverError(f"{resume_from}: checkpoint was made on a different backbone; delete {ckpt_dir} or "
                               "set resume: false.")
        projector.load_state_dict(saved["projector"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["trainer"]
        accelerator.print(f"resumed from {resume_from} at step {counter.step}")

    def evaluate() -> dict[str, float]:
        if dev is None:
            return {}
        clips, partners = dev.dev_positives()
        emb = embed_clips(raw_model, dev.clips, clips, pad_id, cfg.cache_batch_size).cpu()
        return retrieval_scores(emb, dev.partner_bank, partners)

    if counter.step == 0 and not state["history"] and dev is not None:
        initial = evaluate()
        state["history"].append({"step": 0, **{f"dev_{k}": v for k, v in initial.items()}})
        state["best"] = (initial["r@1"], initial["mrr"])
        state["best_state"] = {k: v.detach().cpu().clone() for k, v in projector.state_dict().items()}
        state["initial_dev"] = initial

    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size < world:
        raise RecoverError(f"batch_size {cfg.batch_size} is smaller than the {world} processes; each needs a clip.")
    bank = train.partner_bank.to(accelerator.device)

    def forward_backward(step: int) -> dict[str, Any]:
        pairs = batch_indices(len(train.pairs), cfg.batch_size, step, cfg.seed)[rank::world]
        a_rows = [train.audio_rows[i] for i in pairs]
        positives = torch.tensor([train.partner_rows[i] for i in pairs])
        candidates = queue_candidates(positives, len(bank), cfg.queue_size, step, cfg.seed)
        batch = to_device(collate_clips(train.clips, a_rows, pad_id), accelerator.device)
        with accelerator.autocast():
            audio = model(**batch).embeddings.float()
        pos_dev, cand_dev = positives.to(accelerator.device), candidates.to(accelerator.device)
        loss = recovery_loss(audio, bank, pos_dev, cand_dev, cfg.temperature, cfg.symmetric)
        logs = {"loss_nce": loss.item()}
        if cfg.kd_weight > 0:
            t_audio = teacher_audio[a_rows].to(accelerator.device)
            t_sims = t_audio @ teacher_bank.to(accelerator.device)[cand_dev].T
            kd = relational_kd(audio @ bank[cand_dev].T, t_sims, cfg.kd_temperature)
            loss = loss + cfg.kd_weight * kd
            logs["loss_kd"] = kd.item()
        accelerator.backward(loss)
        logs["loss"] = loss.item()
        return logs

    def after_step(step: int, logs: dict[str, Any]) -> bool:
        """Dev evaluation every `eval_every` steps: keep the best projector (R@1, then MRR), count patience."""
        if dev is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            scores = evaluate()
            logs.update({f"dev_{k}": v for k, v in scores.items()})
            key = (scores["r@1"], scores["mrr"])
            if state["best"] is None or key > tuple(state["best"]):
                state.update(best=key, bad_evals=0, best_step=step,
                             best_state={k: v.detach().cpu().clone() for k, v in projector.state_dict().items()})
            else:
                state["bad_evals"] += 1
                if state["bad_evals"] >= cfg.patience:
                    state["stopped_early"] = True
        state["history"].append({"step": step, **logs})
        return state["stopped_early"]

    def checkpoint(step: int) -> None:
        """Projector + optimizer + scheduler + trainer counters; small (no frozen weights), pickle-free, atomic."""
        if accelerator.is_main_process:
            save_state_folder(ckpt_dir, step, {
                "projector": projector.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "trainer": state, "fingerprint": fingerprint}, keep=1)

    # The shared loop: no gradient clipping (recovery never clipped), checkpoints every `checkpoint_every` steps.
    loop = LoopSettings(max_steps=cfg.max_steps, max_grad_norm=0.0, save_every=cfg.checkpoint_every,
                        checkpoint_dir=str(ckpt_dir))
    t_train = time.perf_counter()
    steps_run = 0
    if not state["stopped_early"]:
        steps_run = run_steps(accelerator, counter, loop, optimizer, scheduler, params, forward_backward, after_step,
                              checkpoint, on_step, desc="recover", progress=cfg.progress)
    train_seconds = time.perf_counter() - t_train
    state["step"] = counter.step

    if state["best_state"] is not None:
        projector.load_state_dict(state["best_state"])
    report = {
        "model": str(cfg.model), "trainable": names, "projector_calibration_hash_before": previous_hash,
        "backbone_fingerprint": fingerprint, "steps": state["step"], "steps_this_run": steps_run,
        "stopped_early": state["stopped_early"], "best_step": state.get("best_step", 0 if dev else state["step"]),
        "initial_dev": state.get("initial_dev"), "best_dev": None if state["best"] is None else
        {"r@1": state["best"][0], "mrr": state["best"][1]},
        "train_pairs": len(train.pairs), "train_clips": len(train.clips), "partner_bank": len(train.partner_bank),
        "skipped_pairs": train.pairs.skipped, "cache_seconds": round(cache_seconds, 3),
        "train_seconds": round(train_seconds, 3), "steps_per_second": round(steps_run / max(train_seconds, 1e-9), 3),
        "history": state["history"], "config": dataclasses.asdict(cfg),
    }
    if accelerator.is_main_process:
        for name, param in raw_model.named_parameters():  # back to the dtype the fused model was saved in
            if name in saved_dtype:
                param.data = param.data.to(saved_dtype[name])
        raw_model.to("cpu")
        write_recovered(raw_model, processor, cfg, fingerprint, report)
        if not cfg.keep_checkpoint:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return report


def _recache(teacher: torch.nn.Module, processor: Any, split: SplitData, cfg: RecoverConfig) -> ClipCache:
    """The teacher has its own (identical, frozen) Whisper encoder; re-encode so a different one would still work."""
    cache = cache_audio(teacher, processor, split.pairs.audio_inputs, cfg.cache_batch_size, cfg.progress,
                        cfg.feature_cache_dir)
    if [cache.index[k] for k in split.pairs.audio_inputs] != [split.clips.index[k] for k in split.pairs.audio_inputs]:
        raise RecoverError("internal: teacher clip order differs from the student's.")
    return cache


def _enable_frozen_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing for a frozen backbone (HF only checkpoints layers in training mode)."""
    for module in model.backbone.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            raise RecoverError("gradient_checkpointing needs a dropout-free backbone (it runs the layers in train mode).")
    if getattr(model.config.text_config, "attention_dropout", 0.0):
        raise RecoverError("gradient_checkpointing needs text_config.attention_dropout == 0.")
    model.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.backbone.language_model.train()  # dropout-free: only switches checkpointing on


def write_recovered(model: torch.nn.Module, processor: Any, cfg: RecoverConfig, fingerprint: str,
                    report: dict[str, Any]) -> Path:
    """The fused model with the recovered projector + the calibration record, written atomically."""
    record = calibrate(model, cfg.model, "projector_recovery")
    if record["backbone_fingerprint"] != fingerprint:
        raise RecoverError("internal: the backbone changed during Projector Recovery (it must stay frozen).")
    with atomic_output_dir(cfg.output, overwrite=cfg.overwrite) as tmp:
        save_conan_repo(model, processor, tmp)
        write_json_atomic(tmp / CALIBRATION_FILE, record)
        write_json_atomic(tmp / "recovery_report.json", report)
        for side in ("fusion_manifest.json", "build_info.json"):
            if (Path(cfg.model) / side).is_file():
                shutil.copy2(Path(cfg.model) / side, tmp / side)
    return Path(cfg.output)


# ============================================================================================== CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.recover", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML of RecoverConfig fields (flags override it)")
    p.add_argument("--model", help="fused model folder (with fusion_manifest.json)")
    p.add_argument("--output", help="recovered model folder")
    p.add_argument("--train-data", help="JSONL audio<->text pairs")
    p.add_argument("--dev-data", help="JSONL pairs for early stopping")
    p.add_argument("--specialist", help="audio specialist folder (relational distillation teacher)")
    p.add_argument("--trainable-prefix", help=f"train tensors with this prefix instead of the manifest's ({PROJECTOR_PREFIX})")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--kd-weight", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--cpu", action="store_true", default=None)
    p.add_argument("--force", action="store_true", default=None, help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, dict(
            model=args.model, output=args.output, train_data=args.train_data, dev_data=args.dev_data,
            specialist=args.specialist, trainable_prefix=args.trainable_prefix, max_steps=args.max_steps,
            batch_size=args.batch_size, lr=args.lr, kd_weight=args.kd_weight, seed=args.seed, cpu=args.cpu,
            overwrite=args.force, progress=False if args.no_progress else None,
        ))
        report = recover(cfg)
    except (ConfigError, NotAConanRepo, FileExistsError) as error:
        print(f"recover: error: {error}", file=sys.stderr)
        return 2
    summary = {k: report[k] for k in ("steps", "best_step", "stopped_early", "initial_dev", "best_dev",
                                      "steps_per_second", "cache_seconds")}
    print(json.dumps({"output": cfg.output, **summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
