"""Stage R (DESIGN.md §2): Projector Recovery — retrain only the audio projector on the fused backbone.

    python -m training.recover --model runs/fused --config training/configs/recover_fsdd.yaml --output runs/recovered

After fusion the audio projector still speaks the audio specialist's backbone dialect (Projector Drift). Here every
tensor except the ones `fusion_manifest.json` flags (`needs_recovery`, i.e. `audio_projector.*`) is frozen in eval
mode, and the flagged tensors train in fp32 master weights with a symmetric audio<->text InfoNCE
(notes/training.md §0 row R, §4.4):

- the backbone is frozen, so every non-audio ("partner") embedding is a constant: it is computed once and the whole
  cache serves as a zero-staleness queue of negatives;
- the Whisper encoder is frozen, so its pooled frames are cached once per clip (only the frames that become tokens);
- optional relational distillation from the audio specialist's audio x partner similarity matrix (KL, tau_t);
- early stopping on audio->partner R@1 of a dev split; small resumable checkpoints (projector + optimizer only).

The output folder is the fused model with the recovered projector, plus `projector_calibration.json` recording the
fingerprint of the backbone the projector was calibrated on (and `projector_calibration_hash` in config.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from training import hub_code
from training.build_base import save_conan_repo
from training.io_utils import atomic_output_dir, write_json_atomic

logger = logging.getLogger("training.recover")

PROJECTOR_PREFIX = "audio_projector."
CALIBRATION_FILE = "projector_calibration.json"
STATE_FILE = "recover_state.pt"


class RecoverError(ValueError):
    """Bad recovery input; the message names the input and what was expected."""


# ============================================================================================== configuration
@dataclass
class RecoverConfig:
    """Every knob of Projector Recovery (defaults: notes/training.md §0 row R)."""

    model: str = ""  # the fused model folder
    output: str = ""  # recovered model folder (written atomically)
    train_data: str = ""  # JSONL pairs (docs/ARCHITECTURE.md format); pairs with audio on exactly one side are used
    dev_data: str | None = None  # JSONL pairs for early stopping (audio->partner R@1)
    specialist: str | None = None  # audio specialist folder: teacher for relational distillation
    trainable_prefix: str | None = None  # override the manifest (default: manifest, else "audio_projector.")
    query_instruction: str | None = None  # when a pair has no "instruction"; None = processor default
    document_instruction: str | None = None  # instruction of the positive side; None = processor default
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_steps: int = 500
    batch_size: int = 64  # audio clips per optimizer step (global)
    queue_size: int = 4096  # cached partner negatives per step (the whole cache when smaller)
    temperature: float = 0.02
    symmetric: bool = True  # add the partner->audio direction over the batch
    kd_weight: float = 0.0  # relational distillation weight (needs `specialist`)
    kd_temperature: float = 0.05
    eval_every: int = 50
    patience: int = 5  # evaluations without dev improvement before stopping
    checkpoint_every: int = 50
    checkpoint_dir: str | None = None  # default: "<output>.recover-ckpt"
    resume: bool = True
    keep_checkpoint: bool = False
    dtype: str = "auto"  # backbone dtype on load (auto = as saved); the projector always trains in fp32
    mixed_precision: str = "no"  # accelerate: no | bf16 | fp16
    cpu: bool = False
    gradient_checkpointing: bool = False
    cache_batch_size: int = 16
    feature_cache_dir: str | None = None  # keep cached Whisper frames on disk here (reused across runs/resumes)
    max_train_pairs: int | None = None
    max_dev_pairs: int | None = None
    seed: int = 0
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if not self.model:
            raise RecoverError("config: `model` (the fused model folder) is required.")
        if not self.output:
            raise RecoverError("config: `output` (the recovered model folder) is required.")
        if not self.train_data:
            raise RecoverError("config: `train_data` (a JSONL file of audio<->text pairs) is required.")
        for name in ("max_steps", "batch_size", "queue_size", "eval_every", "checkpoint_every", "cache_batch_size"):
            if int(getattr(self, name)) < 1:
                raise RecoverError(f"config: {name} must be >= 1, got {getattr(self, name)!r}.")
        if not 0 < self.temperature <= 1 or not 0 < self.kd_temperature <= 1:
            raise RecoverError("config: temperature and kd_temperature must be in (0, 1].")
        if self.kd_weight > 0 and not self.specialist:
            raise RecoverError("config: kd_weight > 0 needs `specialist` (the audio specialist folder).")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise RecoverError(f"config: mixed_precision must be no|bf16|fp16, got {self.mixed_precision!r}.")


def load_config(path: str | os.PathLike | None, **overrides: Any) -> RecoverConfig:
    """YAML file (every key a RecoverConfig field) + overrides that are not None."""
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path) as handle:
            raw = yaml.safe_load(handle) or {}
        if not isinstance(raw, dict):
            raise RecoverError(f"{path}: expected a YAML mapping of RecoverConfig fields, got {type(raw).__name__}.")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(RecoverConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RecoverError(f"{path or 'overrides'}: unknown key(s) {unknown}; expected keys among {sorted(known)}.")
    cfg = RecoverConfig(**raw)
    cfg.validate()
    return cfg


# ============================================================================================== data
def read_pairs(path: str | os.PathLike, limit: int | None = None, on_error: str = "fatal") -> list[dict[str, Any]]:
    """JSONL pairs (training.data format, media paths resolved and probed) as plain dicts for the caches."""
    from training.data import DataError, load_jsonl

    try:
        examples = load_jsonl(path, on_error=on_error)
    except (DataError, FileNotFoundError) as error:
        raise RecoverError(str(error)) from error
    rows = [{"query": e.query, "positive": e.positive, "source": e.source, "instruction": e.instruction}
            for e in examples]
    return rows[:limit] if limit is not None else rows


def has_audio(item: Any) -> bool:
    return isinstance(item, dict) and item.get("audio") is not None


@dataclass
class AudioPairs:
    """Pairs with audio on exactly one side, as (audio input, partner input) keyed for caching."""

    audio_keys: list[str]  # per pair
    partner_keys: list[str]  # per pair
    audio_inputs: dict[str, tuple[Any, str | None]]  # key -> (input, instruction)
    partner_inputs: dict[str, tuple[Any, str | None]]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.audio_keys)


def _key(item: Any, instruction: str | None) -> str:
    return json.dumps([instruction, item], sort_keys=True, default=str)


def audio_pairs(
    pairs: list[dict[str, Any]], query_instruction: str | None = None, document_instruction: str | None = None
) -> AudioPairs:
    """Keep pairs whose audio sits on exactly one side; the other side (text/image/...) is the constant partner."""
    out = AudioPairs([], [], {}, {})
    for row in pairs:
        q_inst = row.get("instruction") or query_instruction
        sides = [(row["query"], q_inst), (row["positive"], document_instruction)]
        flags = [has_audio(item) for item, _ in sides]
        if flags.count(True) != 1:
            out.skipped += 1
            continue
        (audio_item, audio_inst), (partner_item, partner_inst) = sides if flags[0] else sides[::-1]
        a_key, p_key = _key(audio_item, audio_inst), _key(partner_item, partner_inst)
        out.audio_inputs.setdefault(a_key, (audio_item, audio_inst))
        out.partner_inputs.setdefault(p_key, (partner_item, partner_inst))
        out.audio_keys.append(a_key)
        out.partner_keys.append(p_key)
    return out


# ============================================================================================== model loading
def load_model_and_processor(path: str | os.PathLike, dtype: str = "auto") -> tuple[torch.nn.Module, Any]:
    """A Conan folder -> (model in eval mode, processor), through the repo's own classes (no remote-code prompt)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise RecoverError(f"{path} is not a Conan model folder (no config.json).")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = hub_code.ConanModel.from_pretrained(path, dtype=torch_dtype).eval()
    processor = hub_code.ConanProcessor.from_pretrained(path, trust_remote_code=True)
    return model, processor


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


# ============================================================================================== fingerprints
def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


backbone_fingerprint = hub_code.load("modeling_conan").backbone_fingerprint


def full_hash(model: torch.nn.Module, prefix: str = "backbone.") -> str:
    """sha256 over every byte of the tensors under `prefix` (the exact record; slower than the fingerprint)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(prefix):
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


# ============================================================================================== caches
@dataclass
class ClipCache:
    """Per clip: prompt ids with audio placeholders, the frozen encoder's pooled frames (real tokens only)."""

    input_ids: list[torch.Tensor]
    frames: list[torch.Tensor]  # (windows, tokens_max_of_clip, d_audio)
    lengths: list[torch.Tensor]  # (windows,) mel frames per window
    index: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def cache_audio(
    model: torch.nn.Module, processor: Any, inputs: dict[str, tuple[Any, str | None]], batch_size: int = 16,
    progress: bool = True, cache_dir: str | os.PathLike | None = None,
) -> ClipCache:
    """Run the frozen Whisper encoder once per clip and keep only the frames the projector turns into tokens.

    With `cache_dir` the encoder's frames go through the shared per-window cache (training/audio_cache.py, keyed by
    the encoder's fingerprint and the window's features), so every stage and every run encodes each clip once.
    """
    from training.audio_cache import AudioFrameCache

    cache = ClipCache([], [], [])
    keys = list(inputs)
    device = _model_device(model)
    previous = model.audio_frame_cache
    if cache_dir is not None:
        model.audio_frame_cache = AudioFrameCache.for_model(model, cache_dir)
    try:
        for start in tqdm(range(0, len(keys), batch_size), desc="cache audio", disable=not progress, leave=False):
            chunk = keys[start : start + batch_size]
            prepared = [processor.prepare([inputs[key][0]], instruction=inputs[key][1]) for key in chunk]
            width = max(p["input_features"].shape[-1] for p in prepared)  # Qwen3-Omni rows have per-clip lengths
            features = torch.cat([F.pad(p["input_features"], (0, width - p["input_features"].shape[-1]))
                                  for p in prepared]).to(device)
            lengths_all = torch.cat([p["audio_feature_lengths"] for p in prepared])
            frames = model.encode_audio_frames(features, lengths_all).float().cpu()
            row = 0
            for key, p in zip(chunk, prepared):
                lengths = p["audio_feature_lengths"].cpu()
                windows = lengths.shape[0]
                keep = max(model.config.audio_token_count(int(n)) for n in lengths.tolist())
                cache.index[key] = len(cache.input_ids)
                cache.input_ids.append(p["input_ids"][0].cpu())
                cache.frames.append(frames[row : row + windows, :keep].clone())
                cache.lengths.append(lengths)
                row += windows
    finally:
        model.audio_frame_cache = previous
    return cache


def collate_clips(cache: ClipCache, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Model inputs (right padded) for cached clips: forward(input_ids, attention_mask, audio_frames, lengths)."""
    ids = [cache.input_ids[i] for i in rows]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, x in enumerate(ids):
        input_ids[r, : len(x)] = x
        attention_mask[r, : len(x)] = 1
    frames = [cache.frames[i] for i in rows]
    t_max = max(f.shape[1] for f in frames)
    frames = torch.cat([F.pad(f, (0, 0, 0, t_max - f.shape[1])) for f in frames])
    lengths = torch.cat([cache.lengths[i] for i in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "audio_frames": frames,
            "audio_feature_lengths": lengths}


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def embed_inputs(
    model: torch.nn.Module, processor: Any, inputs: dict[str, tuple[Any, str | None]], batch_size: int = 16,
    progress: bool = True, desc: str = "embed",
) -> tuple[torch.Tensor, dict[str, int]]:
    """Embeddings (fp32, CPU) of `inputs` grouped by instruction; returns (matrix, key -> row)."""
    keys = list(inputs)
    out = torch.empty(0)
    rows: list[torch.Tensor] = []
    device = _model_device(model)
    order: list[str] = []
    by_inst: dict[str | None, list[str]] = {}
    for key in keys:
        by_inst.setdefault(inputs[key][1], []).append(key)
    for inst, group in by_inst.items():
        for start in tqdm(range(0, len(group), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = group[start : start + batch_size]
            batch = processor.prepare([inputs[key][0] for key in chunk], instruction=inst)
            rows.append(model(**_to(dict(batch), device)).embeddings.float().cpu())
            order.extend(chunk)
    if rows:
        out = torch.cat(rows)
    return out, {key: i for i, key in enumerate(order)}


def embed_clips(model: torch.nn.Module, cache: ClipCache, rows: list[int], pad_id: int, batch_size: int = 32,
                grad: bool = False) -> torch.Tensor:
    """Embeddings of cached clips (through projector + backbone); with grad only where the projector trains."""
    device = _model_device(model)
    outs = []
    for start in range(0, len(rows), batch_size):
        batch = _to(collate_clips(cache, rows[start : start + batch_size], pad_id), device)
        with torch.set_grad_enabled(grad):
            outs.append(model(**batch).embeddings.float())
    return torch.cat(outs)


# ============================================================================================== losses / metrics
def recovery_loss(
    audio: torch.Tensor, partner_bank: torch.Tensor, positives: torch.Tensor, candidates: torch.Tensor,
    temperature: float, symmetric: bool = True,
) -> torch.Tensor:
    """InfoNCE audio->partner over `candidates` (bank rows incl. every positive) + partner->audio over the batch.

    Duplicate partners (e.g. ten FSDD clips of "seven") are one bank row, so they are never each other's negatives;
    in the partner->audio direction the other clips sharing the partner are masked out.
    """
    cand = partner_bank[candidates]
    logits = audio @ cand.T / temperature
    where = {int(c): i for i, c in enumerate(candidates.tolist())}
    target = torch.tensor([where[int(p)] for p in positives.tolist()], device=audio.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        pos = partner_bank[positives]
        t2a = pos @ audio.T / temperature
        same = positives.unsqueeze(0) == positives.unsqueeze(1)
        same.fill_diagonal_(False)
        t2a = t2a.masked_fill(same, float("-inf"))
        loss = 0.5 * (loss + F.cross_entropy(t2a, torch.arange(len(positives), device=audio.device)))
    return loss


def relational_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(S_teacher/t) || softmax(S_student/t)) over rows of two similarity matrices (notes §4.4)."""
    return F.kl_div(
        F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
        log_target=True, reduction="batchmean",
    )


def retrieval_scores(queries: torch.Tensor, bank: torch.Tensor, positives: list[int]) -> dict[str, float]:
    """R@1, R@5 and MRR of each query's positive bank row (cosine; inputs are unit-norm)."""
    if len(positives) == 0:
        return {"r@1": float("nan"), "r@5": float("nan"), "mrr": float("nan"), "n": 0}
    sims = queries @ bank.T
    pos = torch.tensor(positives)
    pos_sim = sims[torch.arange(len(pos)), pos]
    rank = (sims > pos_sim.unsqueeze(1)).sum(1)  # 0 = top (ties count in the query's favour)
    return {"r@1": float((rank < 1).float().mean()), "r@5": float((rank < 5).float().mean()),
            "mrr": float((1.0 / (rank + 1).float()).mean()), "n": int(len(pos))}


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


def _lr_lambda(max_steps: int, warmup: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, max_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return fn


def recover(cfg: RecoverConfig, on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Run Projector Recovery end to end; returns the report (also written to `<output>/recovery_report.json`)."""
    from accelerate import Accelerator

    cfg.validate()
    t_start = time.perf_counter()
    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision)
    torch.manual_seed(cfg.seed)
    model, processor = load_model_and_processor(cfg.model, cfg.dtype)
    names = trainable_names(model, cfg.model, cfg.trainable_prefix)
    saved_dtype = {n: p.dtype for n, p in model.named_parameters() if n in set(names)}
    params = freeze_all_but(model, names)
    if cfg.gradient_checkpointing:
        _enable_frozen_checkpointing(model)
    model.to(accelerator.device)
    fingerprint = backbone_fingerprint(model)
    previous_hash = getattr(model.config, "projector_calibration_hash", None)
    if previous_hash == fingerprint:
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
        teacher, _ = load_model_and_processor(cfg.specialist, cfg.dtype)
        teacher.to(accelerator.device)
        teacher_audio = embed_clips(teacher, _recache(teacher, processor, train, cfg), list(range(len(train.clips))),
                                    pad_id, cfg.cache_batch_size)
        teacher_bank, t_index = embed_inputs(teacher, processor, train.pairs.partner_inputs, cfg.cache_batch_size,
                                             cfg.progress, desc="teacher partners")
        teacher_bank = teacher_bank[[t_index[k] for k in sorted(train.partner_index, key=train.partner_index.get)]]
        del teacher
    cache_seconds = time.perf_counter() - t_start

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg.max_steps, int(round(cfg.warmup_ratio * cfg.max_steps))))
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    projector = raw_model.audio_projector

    ckpt_dir = Path(cfg.checkpoint_dir or f"{cfg.output}.recover-ckpt")
    state = {"step": 0, "best": None, "best_state": None, "bad_evals": 0, "history": [], "stopped_early": False}
    if cfg.resume and (ckpt_dir / STATE_FILE).is_file():
        saved = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=False)
        if saved.get("fingerprint") != fingerprint:
            raise RecoverError(f"{ckpt_dir}: checkpoint was made on a different backbone; delete it or set resume: false.")
        projector.load_state_dict(saved["projector"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["trainer"]
        accelerator.print(f"resumed from {ckpt_dir} at step {state['step']}")

    def evaluate() -> dict[str, float]:
        if dev is None:
            return {}
        clips, partners = dev.dev_positives()
        emb = embed_clips(raw_model, dev.clips, clips, pad_id, cfg.cache_batch_size).cpu()
        return retrieval_scores(emb, dev.partner_bank, partners)

    if state["step"] == 0 and not state["history"] and dev is not None:
        initial = evaluate()
        state["history"].append({"step": 0, **{f"dev_{k}": v for k, v in initial.items()}})
        state["best"] = (initial["r@1"], initial["mrr"])
        state["best_state"] = {k: v.detach().cpu().clone() for k, v in projector.state_dict().items()}
        state["initial_dev"] = initial

    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size < world:
        raise RecoverError(f"batch_size {cfg.batch_size} is smaller than the {world} processes; each needs a clip.")
    bank = train.partner_bank.to(accelerator.device)
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="recover", disable=not cfg.progress
               or not accelerator.is_main_process)
    t_train = time.perf_counter()
    steps_run = 0
    while state["step"] < cfg.max_steps and not state["stopped_early"]:
        step = state["step"]
        pairs = batch_indices(len(train.pairs), cfg.batch_size, step, cfg.seed)[rank::world]
        a_rows = [train.audio_rows[i] for i in pairs]
        positives = torch.tensor([train.partner_rows[i] for i in pairs])
        candidates = queue_candidates(positives, len(bank), cfg.queue_size, step, cfg.seed)
        batch = _to(collate_clips(train.clips, a_rows, pad_id), accelerator.device)
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
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        state["step"] = step + 1
        steps_run += 1
        logs.update(loss=loss.item(), lr=scheduler.get_last_lr()[0])
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if dev is not None and (state["step"] % cfg.eval_every == 0 or state["step"] == cfg.max_steps):
            scores = evaluate()
            logs.update({f"dev_{k}": v for k, v in scores.items()})
            key = (scores["r@1"], scores["mrr"])
            if state["best"] is None or key > tuple(state["best"]):
                state.update(best=key, bad_evals=0, best_step=state["step"],
                             best_state={k: v.detach().cpu().clone() for k, v in projector.state_dict().items()})
            else:
                state["bad_evals"] += 1
                if state["bad_evals"] >= cfg.patience:
                    state["stopped_early"] = True
        state["history"].append({"step": state["step"], **logs})
        if state["step"] % cfg.checkpoint_every == 0 and accelerator.is_main_process:
            _save_state(ckpt_dir, projector, optimizer, scheduler, state, fingerprint)
        if on_step is not None:
            on_step(state["step"], logs)
    bar.close()
    train_seconds = time.perf_counter() - t_train

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


def _save_state(ckpt_dir: Path, projector: torch.nn.Module, optimizer: Any, scheduler: Any, state: dict,
                fingerprint: str) -> None:
    """Projector + optimizer + scheduler + trainer counters; small (no frozen weights), written atomically."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / f".{STATE_FILE}.tmp"
    torch.save({"projector": projector.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "trainer": state, "fingerprint": fingerprint}, tmp)
    os.replace(tmp, ckpt_dir / STATE_FILE)


def write_recovered(model: torch.nn.Module, processor: Any, cfg: RecoverConfig, fingerprint: str,
                    report: dict[str, Any]) -> Path:
    """The fused model with the recovered projector + the calibration record, written atomically."""
    record = {
        "format": "conan-projector-calibration/1",
        "backbone_fingerprint": fingerprint,
        "backbone_sha256": full_hash(model),
        "projector_sha256": full_hash(model, PROJECTOR_PREFIX),
        "calibrated_on": str(cfg.model),
        "method": "projector_recovery",
        "fingerprint_rule": "training.recover.backbone_fingerprint (sha256 of name|shape|dtype + 4096 strided "
                            "elements per backbone.* tensor)",
    }
    model.config.projector_calibration_hash = fingerprint
    with atomic_output_dir(cfg.output, overwrite=cfg.overwrite) as tmp:
        save_conan_repo(model, processor, tmp)
        write_json_atomic(tmp / CALIBRATION_FILE, record)
        write_json_atomic(tmp / "recovery_report.json", report)
        for side in ("fusion_manifest.json", "build_info.json"):
            if (Path(cfg.model) / side).is_file():
                shutil.copy2(Path(cfg.model) / side, tmp / side)
    return Path(cfg.output)


# ============================================================================================== demo data
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_fsdd_pairs(recordings: str | os.PathLike, out: str | os.PathLike, split: str,
                     takes: Iterable[int] | None = None, speakers: Iterable[str] | None = None) -> int:
    """JSONL audio->text pairs from the Free Spoken Digit Dataset (real speech), split by `training.splits`.

    Each line: {"query": {"audio": ABS_PATH}, "positive": {"text": "the spoken digit seven"}, "source": "fsdd"}.
    `takes` restricts the take index (e.g. range(10, 14)); returns the number of lines written.
    """
    from training.splits import fsdd_split

    recordings = Path(recordings)
    if not recordings.is_dir():
        raise RecoverError(f"{recordings} is not a folder of FSDD recordings ({{digit}}_{{speaker}}_{{index}}.wav).")
    wanted_takes = None if takes is None else set(takes)
    wanted_speakers = None if speakers is None else set(speakers)
    rows = []
    for wav in sorted(recordings.glob("*.wav")):
        digit, speaker, take = wav.stem.split("_")
        if fsdd_split(int(take)) != split:
            continue
        if (wanted_takes is not None and int(take) not in wanted_takes) or (
                wanted_speakers is not None and speaker not in wanted_speakers):
            continue
        rows.append({"query": {"audio": str(wav.resolve())},
                     "positive": {"text": f"the spoken digit {DIGIT_WORDS[int(digit)]}"}, "source": "fsdd"})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return len(rows)


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
        cfg = load_config(
            args.config, model=args.model, output=args.output, train_data=args.train_data, dev_data=args.dev_data,
            specialist=args.specialist, trainable_prefix=args.trainable_prefix, max_steps=args.max_steps,
            batch_size=args.batch_size, lr=args.lr, kd_weight=args.kd_weight, seed=args.seed, cpu=args.cpu,
            overwrite=args.force, progress=False if args.no_progress else None,
        )
        report = recover(cfg)
    except (RecoverError, FileExistsError) as error:
        print(f"recover: error: {error}", file=sys.stderr)
        return 2
    summary = {k: report[k] for k in ("steps", "best_step", "stopped_early", "initial_dev", "best_dev",
                                      "steps_per_second", "cache_seconds")}
    print(json.dumps({"output": cfg.output, **summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
