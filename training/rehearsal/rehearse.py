"""Stage B (docs/ARCHITECTURE.md, data flow): balanced multi-modal rehearsal of the fused (+ recovered) model.

    python -m training.rehearse --config training/configs/rehearse_tiny.yaml
    accelerate launch --config_file training/accelerate/ddp.yaml -m training.rehearse --config CONFIG.yaml

LoRA (peft) on the fused backbone's LLM plus the audio projector in full at a lower LR (default 0.1x), the vision
tower and the Whisper encoder frozen in eval mode (our rehearsal recipe; the in-group n^0.5
sampling is the exponent-0.5 multinomial sampling of XLM, arXiv 1901.07291):
- `training.contrastive.sampling.BalancedModalitySampler`: equal mass per modality group, p ∝ n^0.5 inside a group,
  one source per device micro-batch, every step covering all groups when the world size allows (shuffled
  round-robin otherwise);
- a zero-weighted touch of the projector in every step's loss, so DDP never errors on a rank whose batch has no
  audio (`training.contrastive.trainer.zero_touch`);
- every `eval_every` steps each modality's dev score (`selection_metric`: R@1, or MRR, which is smoother on a few
  dev pairs) is divided by its specialist's (retention) and the step with the best *worst-modality* retention is
  kept (min_m score_m / specialist_m, not the mean), the minimum over the modalities whose specialist is above
  chance on dev (`selection_groups`; a specialist at chance has nothing to retain);
- `trainer.save_checkpoint` checkpoints with exact resume (model, optimizer, scheduler, RNG, sampler step); the
  selection record and the best trainable weights live next to them.
The shared pieces (data, loss, GradCache step, loop, checkpoints) come from training/contrastive/ (data, trainer).
Output: the merged model (LoRA folded in), `rehearsal_report.json`, and a new projector calibration record.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.common import hub_code
from training.common.calibration import CALIBRATION_FILE, calibrate
from training.common.cli import run_training_stage
from training.common.config import ConfigError, build_dataclass, merged, require, resolve_path
from training.common.io_utils import atomic_output_dir, save_safetensors_atomic, write_json_atomic
from training.common.modalities import MODALITY_GROUPS
from training.common.repo import load_processor, save_conan_repo
from training.contrastive.data import ExampleDataset, load_jsonl, load_sources
from training.contrastive.sampling import BalancedModalitySampler, modality_of_pair
from training.contrastive.trainer import (
    LoopSettings, LoraSettings, TrainConfig, TrainState, apply_lora, build_optimizer, build_scheduler, collator_for,
    install_feature_caches, load_checkpoint, loss_settings_from, mixed_precision_for, resolve_resume, run_loop,
    trainable_parameters, unwrap_conan,
)
from training.evaluation.embed import embed_keyed as embed_inputs
from training.evaluation.metrics import retrieval_scores

logger = logging.getLogger("training.rehearse")
SELECTION_FILE = "selection.json"
BEST_FILE = "best_trainable.safetensors"
SELECTION_METRICS = ("r@1", "mrr")  # keys of training.evaluation.metrics.retrieval_scores
SELECTION_GROUPS = ("learned", "all")  # RehearsalConfig.selection_groups


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class RehearsalData:
    train: list[str] = field(default_factory=list)  # JSONL files, every modality group mixed
    groups: dict[str, str] = field(default_factory=dict)  # source -> group override (default: inferred from rows)
    alpha: float = 0.5  # inside a group p ∝ n^alpha
    dev: dict[str, str] = field(default_factory=dict)  # group -> dev JSONL (query -> positive, ranked over positives)
    on_error: str = "fatal"
    check_media: bool = True
    num_workers: int = 0
    query_instruction: str | None = None
    target_instruction: str | None = None
    max_dev_pairs: int | None = None


@dataclass
class RehearsalConfig:
    model: str  # the fused (and projector-recovered) model folder
    output: str
    data: RehearsalData
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=16, alpha=32.0, dropout=0.05))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-5, schedule="cosine"))
    loss: dict[str, Any] = field(default_factory=dict)  # temperature, symmetric, num_negatives
    projector_lr_scale: float = 0.1  # projector LR = scale x LoRA LR unless train.lr_projector is set
    dummy_projector_pass: bool = True  # zero-weighted projector touch in every step (DDP unused-parameter guard)
    warmup_ratio: float | None = 0.05  # re-warm: overrides train.warmup_steps when set
    eval_every: int = 0  # 0 = only at the end
    specialists: dict[str, str] = field(default_factory=dict)  # group -> specialist folder (retention reference)
    specialist_scores: dict[str, float] = field(default_factory=dict)  # group -> specialist dev score, in selection_metric units
    selection_metric: str = "r@1"  # the dev score of the retention: "r@1" or "mrr"
    # "learned": the worst retention is taken over the groups whose reference (specialist) dev score is above chance
    # on their dev split by more than two standard errors (`dev_chance`; a specialist at chance has no skill to
    # retain, and its ratio is noise); the others are still scored and recorded. "all": over every group. With no
    # group above chance, all are used.
    selection_groups: str = "learned"
    checkpoint_dir: str | None = None  # default <output>.checkpoints
    save_dtype: str = "float32"
    audio_cache_dir: str | None = None  # share cached frozen-Whisper frames across stages (training/common/audio_cache.py)
    # Encode each image / page / video once with the frozen vision tower (training/common/visual_cache.py); applies
    # only where lora.scopes leaves the tower frozen (no "vision") and the backbone family is supported. Off by
    # default: the cache keeps every item's tokens on the device for the whole run, fine for the small pipeline
    # (which turns it on), not for a multi-GPU rehearsal over a large mixture.
    visual_token_cache: bool = False
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None,
                raw: dict[str, Any] | None = None) -> RehearsalConfig:
    """YAML at `path` (or the mapping `raw`) + `overrides` -> RehearsalConfig (training.common.config rules:
    ConfigError on bad keys, relative paths against the CWD first and then the repo root)."""
    raw, where = merged(path, overrides, raw)
    require(raw, ("model", "output", "data"), where)
    train = {"lr": 2e-5, "schedule": "cosine", **raw.get("train", {})}
    cfg = build_dataclass(RehearsalConfig, {
        **raw, "data": build_dataclass(RehearsalData, raw["data"], f"{where}: data"),
        "lora": build_dataclass(LoraSettings, raw.get("lora", {"r": 16, "alpha": 32.0, "dropout": 0.05}), f"{where}: lora"),
        "train": build_dataclass(TrainConfig, train, f"{where}: train"),
    }, where)
    if not cfg.data.train:
        raise ConfigError(f"{where}: data.train lists no JSONL file")
    bad = sorted({g for g in [*cfg.data.groups.values(), *cfg.data.dev, *cfg.specialists, *cfg.specialist_scores]}
                 - set(MODALITY_GROUPS))
    if bad:
        raise ConfigError(f"{where}: unknown modality group(s) {bad}; expected among {MODALITY_GROUPS}")
    loss_settings_from(cfg.loss, cfg.seed, where)  # ConfigError on bad loss keys / objective / weights
    if cfg.selection_metric not in SELECTION_METRICS:
        raise ConfigError(f"{where}: selection_metric must be one of {SELECTION_METRICS}, got {cfg.selection_metric!r}")
    if cfg.selection_groups not in SELECTION_GROUPS:
        raise ConfigError(f"{where}: selection_groups must be one of {SELECTION_GROUPS}, got {cfg.selection_groups!r}")
    if cfg.train.lr_projector is None:
        cfg.train.lr_projector = cfg.projector_lr_scale * cfg.train.lr
    fix = resolve_path
    cfg.model, cfg.output = fix(cfg.model), fix(cfg.output)
    cfg.data.train = [fix(p) for p in cfg.data.train]
    cfg.data.dev = {g: fix(p) for g, p in cfg.data.dev.items()}
    cfg.specialists = {g: fix(p) for g, p in cfg.specialists.items()}
    cfg.checkpoint_dir = fix(cfg.checkpoint_dir) if cfg.checkpoint_dir else cfg.output + ".checkpoints"
    cfg.audio_cache_dir = fix(cfg.audio_cache_dir) if cfg.audio_cache_dir else None
    return cfg


# ---------------------------------------------------------------------------------------------------- pieces
def source_groups(dataset: ExampleDataset, overrides: dict[str, str]) -> dict[str, str]:
    """Each source's modality group: the override, else the most common group of its rows."""
    out = {}
    for source, rows in dataset.by_source().items():
        if source in overrides:
            out[source] = overrides[source]
            continue
        counts = Counter(modality_of_pair(dataset[i].query, dataset[i].positive) for i in rows)
        out[source] = counts.most_common(1)[0][0]
    return out


def _dev_inputs(path: str, cfg: RehearsalConfig) -> tuple[dict, dict, list[tuple[str, str]]]:
    examples = load_jsonl(path, on_error=cfg.data.on_error, check_media=cfg.data.check_media)
    examples = examples[: cfg.data.max_dev_pairs] if cfg.data.max_dev_pairs else examples
    queries, targets, pairs = {}, {}, []
    for e in examples:
        q_inst = e.instruction or cfg.data.query_instruction
        q_key = json.dumps([q_inst, e.query], sort_keys=True)
        t_key = json.dumps([cfg.data.target_instruction, e.positive], sort_keys=True)
        queries.setdefault(q_key, (e.query, q_inst))
        targets.setdefault(t_key, (e.positive, cfg.data.target_instruction))
        pairs.append((q_key, t_key))
    return queries, targets, pairs


@torch.no_grad()
def dev_scores(model: torch.nn.Module, processor: Any, cfg: RehearsalConfig, batch_size: int = 16) -> dict[str, float]:
    """`cfg.selection_metric` (R@1 or MRR) per modality group: each dev query against every distinct positive of
    its group's dev file."""
    was_training = model.training
    model.eval()
    scores = {}
    for group, path in sorted(cfg.data.dev.items()):
        queries, targets, pairs = _dev_inputs(path, cfg)
        q_emb, q_index = embed_inputs(model, processor, queries, batch_size, progress=False, desc=f"dev {group}")
        t_emb, t_index = embed_inputs(model, processor, targets, batch_size, progress=False, desc=f"dev {group}")
        first: dict[str, str] = {}
        for q, t in pairs:
            first.setdefault(q, t)
        rows = list(first)
        scores[group] = retrieval_scores(q_emb[[q_index[q] for q in rows]], t_emb,
                                         [t_index[first[q]] for q in rows])[cfg.selection_metric]
    model.train(was_training)
    return scores


def dev_chance(cfg: RehearsalConfig) -> dict[str, dict[str, float]]:
    """Each dev group's `cfg.selection_metric` under a random ranking, what `dev_scores` gives a model without the
    skill: {"mean", "bound"}, bound = mean + 2 standard errors over the group's q dev queries (a one-sided ~98% test
    that a score is above chance, as the report's Wilson intervals do for hit@1). Per query, with n distinct dev
    positives and the rank uniform: R@1 is Bernoulli(1/n); the reciprocal rank has mean H_n / n and second moment
    (sum of 1/k^2) / n."""
    chance = {}
    for group, path in sorted(cfg.data.dev.items()):
        _, targets, pairs = _dev_inputs(path, cfg)
        n, queries = len(targets), len({q for q, _ in pairs})
        if cfg.selection_metric == "r@1":
            mean, second = 1.0 / n, 1.0 / n
        else:
            mean, second = sum(1.0 / k for k in range(1, n + 1)) / n, sum(1.0 / k**2 for k in range(1, n + 1)) / n
        chance[group] = {"mean": mean, "bound": mean + 2.0 * math.sqrt(max(second - mean**2, 0.0) / queries)}
    return chance


def selection_groups(references: dict[str, float], chance: dict[str, dict[str, float]], mode: str) -> list[str]:
    """The groups the worst retention is taken over (`RehearsalConfig.selection_groups`): with "learned", those
    whose reference score is above their `dev_chance` bound (all of them when none is); raises ValueError for an
    unknown `mode`."""
    if mode not in SELECTION_GROUPS:
        raise ValueError(f"selection_groups must be one of {SELECTION_GROUPS}, got {mode!r}")
    learned = [g for g in sorted(references)
               if mode == "all" or g not in chance or references[g] > chance[g]["bound"]]
    return learned or sorted(references)


def retention(scores: dict[str, float], references: dict[str, float]) -> dict[str, float]:
    """score_m / reference_m per group (1.0 when the reference is 0 and the score is not below it)."""
    out = {}
    for group, score in scores.items():
        ref = references.get(group)
        if ref is None or (isinstance(ref, float) and math.isnan(ref)):
            continue
        out[group] = score / ref if ref > 0 else (1.0 if score >= ref else 0.0)
    return out


def reference_scores(cfg: RehearsalConfig, start_scores: dict[str, float], processor: Any) -> dict[str, Any]:
    """Each group's reference: a given number, else its specialist's dev score (`cfg.selection_metric`), else the
    starting model's score."""
    refs, origin = {}, {}
    for group in cfg.data.dev:
        if group in cfg.specialist_scores:
            refs[group], origin[group] = float(cfg.specialist_scores[group]), "given"
        elif group in cfg.specialists:
            spec = hub_code.ConanModel.from_pretrained(cfg.specialists[group], dtype=torch.float32).eval()
            spec.requires_grad_(False)  # only scored: its towers are frozen, so their outputs can be cached too
            install_feature_caches(spec, (), cfg.audio_cache_dir, visual=cfg.visual_token_cache)
            sub = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dev={group: cfg.data.dev[group]}))
            refs[group], origin[group] = dev_scores(spec, processor, sub)[group], cfg.specialists[group]
            del spec
        else:
            refs[group], origin[group] = start_scores[group], "start (no specialist given)"
    return {"scores": refs, "origin": origin}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------------ train
def rehearse(cfg: RehearsalConfig, resume: str | None = "auto", stop_after: int | None = None,
             overwrite: bool = False) -> dict[str, Any]:
    """Run stage B; returns the report (`output` is None when stopped early by `stop_after`)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from safetensors.torch import load_file

    accelerator = Accelerator(mixed_precision=mixed_precision_for(cfg.train.mixed_precision))
    if Path(cfg.output).exists() and not overwrite:
        raise FileExistsError(f"output {cfg.output} exists; pass --force to replace it")
    set_seed(cfg.seed)
    gradcache = 0 < cfg.train.chunk_size < cfg.train.per_device_batch_size
    model = hub_code.ConanModel.from_pretrained(cfg.model, dtype=torch.float32)
    processor = load_processor(cfg.model)
    if cfg.train.gradient_checkpointing:
        # use_reentrant=False: with frozen embeddings reentrant checkpointing silently drops LoRA gradients.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets,
                       train_audio_projector=True, scopes=cfg.lora.scopes)
    install_feature_caches(model, cfg.lora.scopes, cfg.audio_cache_dir, visual=cfg.visual_token_cache)
    dataset = load_sources(cfg.data.train, on_error=cfg.data.on_error, check_media=cfg.data.check_media)
    groups = source_groups(dataset, cfg.data.groups)
    sampler = BalancedModalitySampler(
        dataset.by_source(), groups, cfg.train.per_device_batch_size, rank=accelerator.process_index,
        world_size=accelerator.num_processes, seed=cfg.seed, alpha=cfg.data.alpha, max_steps=cfg.train.max_steps,
    )
    losses = loss_settings_from(cfg.loss, cfg.seed)
    collator = collator_for(
        losses, processor, num_negatives=int(cfg.loss.get("num_negatives", 0)),
        chunk_size=cfg.train.chunk_size if gradcache else 0, query_instruction=cfg.data.query_instruction,
        target_instruction=cfg.data.target_instruction, on_error=cfg.data.on_error,
        pair_batches=True,  # omni objective: tuple sources get it, the other modalities' pair sources info_nce
    )
    optimizer = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.lr_projector)
    warmup = cfg.train.warmup_steps if cfg.warmup_ratio is None else int(round(cfg.warmup_ratio * cfg.train.max_steps))
    scheduler = build_scheduler(optimizer, cfg.train.schedule, warmup, cfg.train.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState()
    ckpt_root = Path(cfg.checkpoint_dir)
    checkpoint = resolve_resume(resume, ckpt_root)
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint, state, sampler)
        logger.info("resumed from %s at step %d", checkpoint, state.step)
    selection_path = ckpt_root / SELECTION_FILE
    selection: dict[str, Any] = {"metric": cfg.selection_metric, "mode": cfg.selection_groups, "evals": {},
                                 "best": None}
    if selection_path.is_file() and checkpoint is not None:
        selection = json.loads(selection_path.read_text())
        was = (selection.get("metric", "r@1"), selection.get("mode", "all"))
        if was != (cfg.selection_metric, cfg.selection_groups):
            raise ValueError(f"{selection_path} holds retentions scored by {was[0]!r} over {was[1]!r} groups, but "
                             f"this run asks for {cfg.selection_metric!r} over {cfg.selection_groups!r}; resume with "
                             f"the same selection_metric and selection_groups or start from a fresh checkpoint_dir")
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator,
                                         num_workers=cfg.data.num_workers,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    touch = [p for n, p in model.named_parameters() if p.requires_grad and "audio_projector" in n] \
        if cfg.dummy_projector_pass else []
    peft_model = accelerator.unwrap_model(model)
    conan = unwrap_conan(model)

    def evaluate(step: int) -> None:
        if not cfg.data.dev:
            return
        scores = dev_scores(conan, processor, cfg)
        if "references" not in selection:
            selection["references"] = reference_scores(cfg, scores, processor)
        if "groups" not in selection:
            chance = dev_chance(cfg)
            selection["chance"] = chance
            selection["groups"] = selection_groups(selection["references"]["scores"], chance, cfg.selection_groups)
        kept = retention(scores, selection["references"]["scores"])
        judged = {g: r for g, r in kept.items() if g in selection["groups"]}
        worst = min(judged.values()) if judged else float("nan")
        selection["evals"][str(step)] = {"scores": scores, "retention": kept, "worst_retention": worst,
                                         "worst_group": min(judged, key=judged.get) if judged else None}
        best = selection["best"]
        if step > 0 and (best is None or worst > best["worst_retention"]):
            selection["best"] = {"step": step, "worst_retention": worst}
            if accelerator.is_main_process:
                save_safetensors_atomic(ckpt_root / BEST_FILE, trainable_state(peft_model))
        if accelerator.is_main_process:
            write_json_atomic(selection_path, selection)

    if cfg.data.dev and "0" not in selection["evals"]:
        evaluate(0)
    history: list[dict[str, float]] = []
    every = cfg.eval_every if cfg.eval_every > 0 else cfg.train.max_steps
    while state.step < cfg.train.max_steps:
        if cfg.data.dev and state.step > 0 and state.step % every == 0 and str(state.step) not in selection["evals"]:
            evaluate(state.step)  # resumed at an eval point whose evaluation was lost
        segment_end = min((state.step // every + 1) * every, cfg.train.max_steps)
        history += run_loop(
            accelerator, model, optimizer, scheduler, loader, state,
            losses,
            LoopSettings(max_steps=segment_end, gradcache=gradcache, max_grad_norm=cfg.train.max_grad_norm,
                         log_every=cfg.train.log_every, save_every=cfg.train.save_every,
                         keep_checkpoints=cfg.train.keep_checkpoints, checkpoint_dir=str(ckpt_root),
                         stop_after=stop_after),
            sampler=sampler, touch=touch,
        )
        if state.step == segment_end:
            evaluate(state.step)
        if stop_after is not None and state.step >= stop_after:
            break

    report = {
        "format": "conan-rehearsal-report/1", "model": cfg.model, "config": cfg.to_dict(), "steps": state.step,
        "world_size": accelerator.num_processes, "groups": groups, "mixture": sampler.mixture,
        "parameters": trainable_parameters(model), "history": history, "selection": selection, "output": None,
    }
    if state.step < cfg.train.max_steps:
        return report
    report["selected_step"] = selection["best"]["step"] if selection.get("best") else state.step
    if accelerator.is_main_process:  # the main process wrote the best weights and is the only one exporting
        if selection.get("best") is not None:
            best = load_file(str(ckpt_root / BEST_FILE))
            missing = set(best) - set(dict(peft_model.named_parameters()))
            if missing:
                raise RuntimeError(f"best checkpoint names do not match the model: {sorted(missing)[:3]}")
            peft_model.load_state_dict(best, strict=False)
        export_rehearsed(cfg, peft_model, processor, report, overwrite)
        report["output"] = cfg.output
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


def export_rehearsed(cfg: RehearsalConfig, peft_model: torch.nn.Module, processor: Any, report: dict[str, Any],
                     overwrite: bool = False) -> Path:
    """Fold LoRA into the backbone (and the trained projector copy into place); write the model atomically."""
    merged = peft_model.merge_and_unload().to("cpu", getattr(torch, cfg.save_dtype))
    merged.eval()
    record = calibrate(merged, "rehearsal (projector trained jointly with the backbone LoRA)", "rehearsal")
    with atomic_output_dir(cfg.output, overwrite=overwrite) as tmp:
        save_conan_repo(merged, processor, tmp)
        write_json_atomic(tmp / CALIBRATION_FILE, record)
        write_json_atomic(tmp / "rehearsal_report.json", report)
    return Path(cfg.output)


def main(argv: list[str] | None = None) -> int:
    def summary(report: dict[str, Any]) -> dict[str, Any]:
        return {"output": report["output"], "steps": report["steps"], "selected": report["selection"].get("best"),
                "mixture": report["mixture"]}

    return run_training_stage(argv, "rehearse", __doc__, "rehearsal YAML (training/configs/rehearse_*.yaml)",
                              ("--model",), "model", load_config, rehearse, summary)


if __name__ == "__main__":
    sys.exit(main())
