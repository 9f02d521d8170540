"""accelerate-based training pieces shared by the specialist, rehearsal and recovery stages.

Freezing + LoRA (peft) on the backbone LLM, optimizer parameter groups, warmup schedules, one contrastive train
step (plain or GradCache, cross-device negatives), atomic `save_state` checkpoints with exact resume (model,
optimizer, scheduler, RNG and the data sampler's step), and `run_loop`: the shared optimizer-step loop
(`loop.run_steps`) fed contrastive batches, logging loss and in-batch accuracy.
The same code runs on CPU (1 or N gloo processes), DDP, FSDP2 and DeepSpeed via `accelerate launch`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.common.config import ConfigError, check_keys
from training.contrastive.checkpoint import load_training_state, rng_state, save_training_state, set_rng_state
from training.contrastive.data import ContrastiveBatch, ContrastiveCollator, OnError
from training.contrastive.gradcache import cached_step, plain_step
from training.contrastive.loop import (
    CHECKPOINT_PREFIX, LoopSettings, TrainState, checkpoint_dirs, checkpoint_folder, prune_checkpoints, resolve_resume,
    run_steps,
)
from training.contrastive.loss import LossOutput, info_nce
from training.contrastive.omni_objectives import DEFAULT_TEMPERATURE as OMNI_TEMPERATURE
from training.contrastive.omni_objectives import OmniWeights
from training.contrastive.omni_training import OBJECTIVES, OmniBatch, OmniTupleCollator, omni_train_step

logger = logging.getLogger(__name__)

LLM_PREFIX = "backbone.language_model"
# LoRA scopes: "llm" = the `targets` projections of the LLM layers; the others = every nn.Linear under the prefix
# (the paper's specialists put LoRA on all linear layers of the LLM, vision encoder, audio encoder and projector).
LORA_SCOPE_PREFIXES = {"vision": "backbone.visual.", "audio_encoder": "audio_encoder.", "projector": "audio_projector."}
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOOP_STATE_DIR = "loop_state"  # inside each checkpoint: step + sampler position (checkpoint.py format)
RNG_STATE_DIR = "rng_state_{rank}"  # inside each checkpoint: each process's generators (checkpoint.py format)
ACCELERATE_RNG_FILE = "random_states_{rank}.pkl"  # accelerate's pickled RNG file, replaced by RNG_STATE_DIR


# ---------------------------------------------------------------------------------------------- model set-up
def lora_target_regex(targets: Sequence[str], prefix: str = LLM_PREFIX) -> str:
    """A peft `target_modules` regex restricted to the LLM layers (never the vision tower or the audio encoder)."""
    if not targets:
        raise ValueError("LoRA needs at least one target module name (e.g. q_proj)")
    names = "|".join(re.escape(t) for t in targets)
    return rf"{re.escape(prefix)}\.layers\.\d+\..*\b({names})"


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    dropout: float,
    targets: Sequence[str] = DEFAULT_LORA_TARGETS,
    train_audio_projector: bool = False,
    scopes: Sequence[str] = ("llm",),
) -> nn.Module:
    """Freeze everything, add LoRA to the LLM's linear layers (and, per `scopes`, to every linear layer of the vision
    encoder, the audio encoder, the projector); the audio projector optionally trains in full instead of LoRA.

    The projector goes through peft `modules_to_save`, so the adapter folder holds its trained weights too (fusion
    reads both, training/fusion/lora.py). Raises ValueError for an unknown scope.
    """
    from peft import LoraConfig, get_peft_model

    unknown = sorted(set(scopes) - {"llm", *LORA_SCOPE_PREFIXES})
    if unknown:
        raise ValueError(f"LoRA scopes {unknown} are unknown; expected among ['llm', {', '.join(LORA_SCOPE_PREFIXES)}]")
    for param in model.parameters():
        param.requires_grad_(False)
    target_modules: str | list[str] = lora_target_regex(targets)
    prefixes = tuple(LORA_SCOPE_PREFIXES[s] for s in scopes if s != "llm"
                     and not (s == "projector" and train_audio_projector))
    if prefixes:
        llm = re.compile(target_modules) if "llm" in scopes else None
        target_modules = [
            name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and (name.startswith(prefixes) or (llm and llm.fullmatch(name)))
        ]
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none",
        modules_to_save=["audio_projector"] if train_audio_projector else None,
    )
    peft_model = get_peft_model(model, config)
    matched = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    if not matched:
        raise ValueError(f"LoRA targets {list(targets)} / scopes {list(scopes)} matched no linear layer")
    return peft_model


def lora_model_with_state(model: nn.Module, lora: LoraSettings, peft_state: dict[str, torch.Tensor],
                          train_audio_projector: bool = False) -> nn.Module:
    """`model` (the base, CPU fp32) wrapped with LoRA as `lora` says and the trained peft `peft_state` loaded strictly:
    what a stage's export merges. Raises RuntimeError when the state does not fit (other LoRA settings or base)."""
    peft_model = apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.targets,
                            train_audio_projector=train_audio_projector, scopes=lora.scopes)
    result = peft_model.load_state_dict({k: v.detach().cpu().float() for k, v in peft_state.items()}, strict=True)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"trained state does not fit the model: {result}")
    return peft_model


def check_merged_weight_names(state: dict[str, torch.Tensor]) -> None:
    """A merged model holds only Conan weight names (no LoRA / peft wrapper keys); RuntimeError otherwise."""
    bad = [k for k in state if not k.startswith(("backbone.", "audio_encoder.", "audio_projector."))
           or "lora_" in k or "base_layer" in k or "modules_to_save" in k]
    if bad:
        raise RuntimeError(f"merged model has non-Conan weight names, e.g. {bad[:3]}")


def cast_for_save(merged: nn.Module, save_dtype: str) -> nn.Module:
    """The merged model in `save_dtype` ("float32" / "bfloat16"), its config saying so, in eval mode."""
    merged.to(getattr(torch, save_dtype))
    merged.config.dtype = save_dtype
    unwrap_conan(merged).eval()
    return merged


def set_frozen_modules_eval(model: nn.Module) -> None:
    """Frozen towers stay in eval mode (no dropout) while LoRA and the projector train."""
    base = unwrap_conan(model)
    base.backbone.visual.eval()
    base.audio_encoder.eval()


def install_feature_caches(model: nn.Module, scopes: Sequence[str], audio_cache_dir: str | os.PathLike | None = None,
                           visual: bool = True) -> dict[str, Any]:
    """Encode frozen towers once per item: the audio encoder's frames (`training/common/audio_cache.py`) when
    `audio_cache_dir` is given, the vision tower's merged tokens (`training/common/visual_cache.py`) when `visual` and
    the tower is frozen and of a supported family (else an INFO log says why not). Call after `apply_lora` (the caches
    sit on the unwrapped model).

    Why: a frozen tower gives the same output for the same item at every step, and in the small pipeline it costs
    more than the LoRA step itself (Whisper on 30-s windows, pages of 256 patches). Returns {"audio": AudioFrameCache
    | None, "visual": VisualTokenCache | None}. Raises ValueError when `audio_cache_dir` is combined with LoRA on the
    audio encoder (`scopes` holds "audio_encoder"), whose output then changes every step.
    """
    from training.common.audio_cache import AudioFrameCache
    from training.common.visual_cache import SUPPORTED_FAMILIES, VisualTokenCache, vision_tower

    conan = unwrap_conan(model)
    caches: dict[str, Any] = {"audio": None, "visual": None}
    if audio_cache_dir:
        if "audio_encoder" in scopes:
            raise ValueError("audio_cache_dir caches the frozen audio encoder's output; it cannot be combined with "
                             "LoRA on the audio encoder (lora.scopes holds 'audio_encoder').")
        caches["audio"] = conan.audio_frames_hook = AudioFrameCache.for_model(conan, audio_cache_dir)
    if visual:
        family = conan.config.backbone_model_type
        why_not = ("lora.scopes holds 'vision'" if "vision" in scopes else
                   "the vision tower has trainable parameters" if any(
                       p.requires_grad for p in vision_tower(conan).parameters()) else
                   f"backbone family {family!r} is not one of {SUPPORTED_FAMILIES}" if family not in SUPPORTED_FAMILIES
                   else None)
        if why_not is None:
            caches["visual"] = VisualTokenCache.install(conan)
        else:  # asked for (visual_token_cache: true) but not possible: say so instead of silently running uncached
            logger.info("visual token cache not installed: %s; the vision tower runs on every step", why_not)
    return caches


def unwrap_conan(model: nn.Module) -> nn.Module:
    """The ConanModel inside DDP/FSDP/peft wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Counts of trainable / total parameters (logged and written to the manifest)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.0, lr_projector: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only: a LoRA group and an audio-projector group (own LR)."""
    lora, projector = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (projector if "audio_projector" in name else lora).append(param)
    if not lora and not projector:
        raise ValueError("the model has no trainable parameters; check the LoRA / projector settings")
    groups = []
    if lora:
        groups.append({"params": lora, "lr": lr, "weight_decay": weight_decay, "name": "lora"})
    if projector:
        groups.append({"params": projector, "lr": lr_projector or lr, "weight_decay": 0.0, "name": "projector"})
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int) -> Any:
    """Linear / cosine / constant decay after linear warmup (transformers' schedulers)."""
    from transformers import get_scheduler

    allowed = ("linear", "cosine", "constant_with_warmup")
    if name not in allowed:
        raise ValueError(f"schedule must be one of {allowed}, got {name!r}")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


# ------------------------------------------------------------------------------------------------- one step
LOSS_KEYS = ("temperature", "symmetric", "num_negatives", "objective", "weights")  # a stage config's `loss:` mapping


@dataclass
class LossSettings:
    """`objective` "info_nce" (pairs, `info_nce`) or "omni_retriever" (tuples, `omni_training.omni_train_step`, with
    `weights` = OmniWeights (w1, w2, w3) and `seed` drawing the per-step hard negatives)."""

    temperature: float = 0.02
    symmetric: bool = False
    cross_device: bool = True
    objective: str = "info_nce"
    weights: OmniWeights = field(default_factory=OmniWeights)
    seed: int = 0


def loss_settings_from(raw: dict[str, Any], seed: int = 0, where: str = "config") -> LossSettings:
    """A stage config's `loss:` mapping -> LossSettings; ConfigError names `where` and the bad key.

    `objective: info_nce` (default; temperature 0.02, symmetric, num_negatives) or `objective: omni_retriever`
    (temperature 0.01 by default as in OmniRetriever's recipe, `weights: [w1, w2, w3]`, default [1, 1, 1];
    [0, 0, 1] is the plain pairwise baseline). `seed` is the stage seed (the hard negatives' draws).
    """
    check_keys(raw, LOSS_KEYS, f"{where}: loss")
    objective = raw.get("objective", "info_nce")
    if objective not in OBJECTIVES:
        raise ConfigError(f"{where}: loss.objective is {objective!r}; expected one of {list(OBJECTIVES)}")
    if objective == "info_nce":
        if "weights" in raw:
            raise ConfigError(f"{where}: loss.weights applies to objective omni_retriever only")
        return LossSettings(temperature=float(raw.get("temperature", 0.02)), symmetric=bool(raw.get("symmetric", False)),
                            seed=seed)
    extra = sorted({"symmetric", "num_negatives"} & set(raw))
    if extra:
        raise ConfigError(f"{where}: loss {extra} do not apply to objective omni_retriever (its terms are fixed: "
                          "symmetric pair terms, one hard negative per tuple built each step)")
    weights = raw.get("weights", [1.0, 1.0, 1.0])
    if not isinstance(weights, (list, tuple)) or len(weights) != 3:
        raise ConfigError(f"{where}: loss.weights is {weights!r}; expected [w1, w2, w3] (Tuple-InfoNCE, "
                          "fusion-as-teacher, pairwise)")
    try:
        omni = OmniWeights(*(float(w) for w in weights))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: loss.weights: {error}") from None
    temperature = float(raw.get("temperature", OMNI_TEMPERATURE))
    if temperature <= 0:
        raise ConfigError(f"{where}: loss.temperature must be > 0, got {temperature}")
    return LossSettings(temperature=temperature, objective=objective, weights=omni, seed=seed)


def collator_for(settings: LossSettings, processor: Any, num_negatives: int = 0, chunk_size: int = 0,
                 query_instruction: str | None = None, target_instruction: str | None = None,
                 on_error: OnError = "fatal", pair_batches: bool = False) -> ContrastiveCollator | OmniTupleCollator:
    """The collator the objective needs: pairs (`ContrastiveCollator`) or (text, video, audio) tuples.

    `pair_batches` (omni objective only): micro-batches without tuple rows become pair batches trained with
    `info_nce` at the same temperature (rehearsal: tuple sources next to pair sources); otherwise they are an error.
    """
    pairs = ContrastiveCollator(processor, num_negatives=num_negatives, chunk_size=chunk_size,
                                query_instruction=query_instruction, target_instruction=target_instruction,
                                on_error=on_error)
    if settings.objective == "omni_retriever":
        return OmniTupleCollator(processor, chunk_size=chunk_size, query_instruction=query_instruction,
                                 on_error=on_error, pairs=pairs if pair_batches else None)
    return pairs


def encoder_of(model: nn.Module) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """chunk -> L2-normalised embeddings through the (wrapped) model, so DDP/FSDP hooks run."""
    return lambda chunk: model(**chunk).embeddings


def loss_for(batch: ContrastiveBatch, settings: LossSettings) -> Callable[[torch.Tensor, torch.Tensor], LossOutput]:
    """(queries, positives+negatives) -> LossOutput for this batch's keys."""
    n = batch.num_queries

    def loss_fn(queries: torch.Tensor, targets: torch.Tensor) -> LossOutput:
        return info_nce(
            queries, targets[:n], targets[n:], positive_keys=batch.positive_keys,
            negative_keys=batch.negative_keys, query_keys=batch.query_keys, temperature=settings.temperature,
            symmetric=settings.symmetric, cross_device=settings.cross_device,
        )

    return loss_fn


def zero_touch(params: Sequence[nn.Parameter]) -> Callable[[], torch.Tensor] | None:
    """0 * sum(params): makes DDP see every trainable parameter used even when a batch skips a module (e.g. the
    audio projector on a text-only chunk), the "dummy pass" that avoids DDP's `find_unused_parameters=True`."""
    if not params:
        return None
    return lambda: sum(p.sum() for p in params) * 0.0


def train_step(
    accelerator: Any,
    model: nn.Module,
    batch: ContrastiveBatch | OmniBatch,
    settings: LossSettings,
    gradcache: bool,
    touch: Sequence[nn.Parameter] = (),
    step: int = 0,
) -> LossOutput:
    """Forward + backward of one contrastive micro-batch (no optimizer step) at optimiser step `step` (the omni
    objective's pair and hard negatives depend on it)."""
    encode = encoder_of(model)
    extra = zero_touch(touch)
    if isinstance(batch, OmniBatch) and settings.objective != "omni_retriever":
        raise TypeError(f"loss.objective {settings.objective!r} got an OmniBatch; build the loader's collator with "
                        "trainer.collator_for(settings, ...)")
    if isinstance(batch, OmniBatch):
        return omni_train_step(encode, batch, step, settings.weights, settings.temperature, settings.seed,
                               settings.cross_device, gradcache, backward=accelerator.backward,
                               no_sync=lambda: accelerator.no_sync(model), extra_loss=extra)
    if gradcache:
        return cached_step(
            encode, batch.query_chunks, batch.target_chunks, loss_for(batch, settings),
            backward=accelerator.backward, no_sync=lambda: accelerator.no_sync(model), extra_loss=extra,
        )
    return plain_step(encode, batch.query_chunks, batch.target_chunks, loss_for(batch, settings),
                      backward=accelerator.backward, extra_loss=extra)


# ------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(accelerator: Any, root: str | os.PathLike, step: int, keep: int = 0,
                    loop_state: dict[str, Any] | None = None) -> Path:
    """`save_state` + `loop_state` (`LOOP_STATE_DIR`) + each process's RNG (`RNG_STATE_DIR`, in place of accelerate's
    pickled `random_states_N.pkl`) into a temp folder, then one rename by the main process; prune to the newest
    `keep`. Every file loads without unpickling (see checkpoint.py)."""
    root = Path(root)
    final = checkpoint_folder(root, step)
    tmp = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    rng = rng_state()  # before save_state, which draws nothing but keeps this independent of its internals
    accelerator.save_state(str(tmp))
    (tmp / ACCELERATE_RNG_FILE.format(rank=rank)).unlink(missing_ok=True)
    save_training_state(tmp / RNG_STATE_DIR.format(rank=rank), rng)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_training_state(tmp / LOOP_STATE_DIR, loop_state or {"train_state": {"step": step}})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(root, keep)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, folder: str | os.PathLike, state: TrainState, sampler: Any = None) -> None:
    """Restore model, optimizer and scheduler (`accelerator.load_state` with `weights_only=True`: a file carrying
    pickle code raises `pickle.UnpicklingError`), this process's RNG and the loop's step and sampler position
    (safetensors + JSON). Raises FileNotFoundError when this process's RNG state is missing (a checkpoint saved
    with fewer processes) and RuntimeError when the step and the sampler disagree."""
    folder = Path(folder)
    accelerator.load_state(str(folder), load_kwargs={"weights_only": True})
    set_rng_state(load_training_state(folder / RNG_STATE_DIR.format(rank=accelerator.process_index)))
    loop_state = load_training_state(folder / LOOP_STATE_DIR)
    state.load_state_dict(loop_state["train_state"])
    if sampler is not None:
        sampler.load_state_dict(loop_state["sampler"])
        if sampler.step != state.step:
            raise RuntimeError(f"{folder}: sampler step {sampler.step} != train step {state.step}")


# ------------------------------------------------------------------------------------------------- the loop
@dataclass
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    scopes: list[str] = field(default_factory=lambda: ["llm"])  # + vision / audio_encoder / projector (apply_lora)


@dataclass
class TrainConfig:
    per_device_batch_size: int = 8
    chunk_size: int = 0  # GradCache chunk (rows); 0 = no GradCache
    max_steps: int = 100
    lr: float = 5e-5
    lr_projector: float | None = None
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU; or "no" / "bf16" / "fp16"
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2


def mixed_precision_for(setting: str) -> str:
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if setting not in ("no", "bf16", "fp16"):
        raise ConfigError(f"train.mixed_precision must be auto/no/bf16/fp16, got {setting!r}")
    return setting

def run_loop(
    accelerator: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batches: Iterable[ContrastiveBatch],
    state: TrainState,
    loss_settings: LossSettings,
    loop: LoopSettings,
    sampler: Any = None,
    touch: Sequence[nn.Parameter] = (),
) -> list[dict[str, float]]:
    """Contrastive optimizer steps from `state.step` to `loop.max_steps` on the shared `loop.run_steps`; returns the
    logged metrics (loss and in-batch accuracy averaged over `log_every` steps; also in metrics.jsonl)."""
    history: list[dict[str, float]] = []
    metrics_path = Path(loop.checkpoint_dir) / "metrics.jsonl" if loop.checkpoint_dir else None
    iterator = iter(batches)
    window: list[LossOutput] = []
    clock = {"t0": time.perf_counter(), "samples": 0}

    def forward_backward(step: int) -> dict[str, Any]:
        batch = next(iterator).to(accelerator.device)
        out = train_step(accelerator, model, batch, loss_settings, loop.gradcache, touch, step=step)
        window.append(out)
        clock["samples"] += out.num_queries
        return {"loss": out.value}

    def after_step(step: int, logs: dict[str, Any]) -> bool:
        if sampler is not None:
            sampler.step = step
        if step % max(loop.log_every, 1) == 0 or step == loop.max_steps:
            record = {
                "step": step,
                "loss": float(torch.stack([o.value for o in window]).mean()),
                "accuracy": float(torch.stack([o.accuracy for o in window]).mean()),
                "lr": logs["lr"],
                "samples_per_s": clock["samples"] / max(time.perf_counter() - clock["t0"], 1e-9),
                "candidates": window[-1].num_candidates,
            }
            for part in getattr(window[-1], "parts", {}):  # the omni objective's terms
                record[f"loss_{part}"] = float(torch.stack([o.parts[part] for o in window]).mean())
            if "grad_norm" in logs:
                record["grad_norm"] = logs["grad_norm"]
            history.append(record)
            if accelerator.is_main_process and metrics_path is not None:
                metrics_path.parent.mkdir(parents=True, exist_ok=True)
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            window.clear()
            clock.update(t0=time.perf_counter(), samples=0)
        return False

    def checkpoint(step: int) -> None:
        loop_state = {"train_state": state.state_dict(),
                      "sampler": sampler.state_dict() if sampler is not None else None}
        save_checkpoint(accelerator, loop.checkpoint_dir, step, loop.keep_checkpoints, loop_state)

    model.train()
    set_frozen_modules_eval(model)
    run_steps(accelerator, state, loop, optimizer, scheduler, [p for p in model.parameters() if p.requires_grad],
              forward_backward, after_step, checkpoint if loop.checkpoint_dir else None)
    return history


__all__ = [
    "DEFAULT_LORA_TARGETS", "LOSS_KEYS", "LoraSettings", "LossSettings", "LoopSettings", "TrainConfig", "TrainState", "apply_lora", "build_optimizer", "collator_for", "loss_settings_from",
    "build_scheduler", "checkpoint_dirs", "encoder_of", "load_checkpoint", "lora_target_regex", "mixed_precision_for", "resolve_resume", "run_loop",
    "save_checkpoint", "set_frozen_modules_eval", "train_step", "trainable_parameters", "unwrap_conan",
]
