"""OmniRetriever's training objectives for (text, video, audio) tuples, on the one `info_nce` of `loss.py`.

Source: OmniRetriever (arXiv 2605.26641 §3, Apache-2.0), as its released training code implements it:

- Obj1, Tuple-InfoNCE: the fused tuple embedding z_TVA (one forward over text + video + audio) against the same tuple
  with augmented frames / audio / caption, plus one no-grad hard negative per step, the kind cycling by step % 3:
  text swapped, audio permuted within the batch (a derangement), video permuted.
- Obj2, fusion-as-teacher: ½[symInfoNCE(sg(z_TVA), z_a) + symInfoNCE(sg(z_TVA), z_b)], (a, b) rotating over
  (T,A), (T,V), (A,V) by step; a missing modality falls back to the detached anchor.
- Obj3: symInfoNCE(z_a, z_b) for the same pair.
- L = w1·Obj1 + w2·Obj2 + w3·Obj3 with w = (1, 1, 1) and τ = 0.01 in their recipe. The baseline the issue compares
  against is plain pairwise InfoNCE on the same rotating pairs: w = (0, 0, 1) (`BASELINE_WEIGHTS`).

What is ours (differences from their code, all deliberate):
- Every term is the project's one `info_nce` (so the cross-device convention, the W-scaled `loss` and the logged
  `value` are the same as every other stage's). Their symmetric InfoNCE ½(CE(a·B_allᵀ/τ) + CE(b·A_allᵀ/τ)) is
  `info_nce(a, b, symmetric=True)`.
- Cross-process, as their code and the issue define it: positives gathered, hard negatives local. `info_nce`
  gathers every column without gradient (each rank computes the whole loss, scaled by W); Obj1 passes
  `local_negatives=True`, so query i's hard-negative columns are those of its own rank only. On one process this is
  the plain definition. Tested (tests/contrastive/test_omni_distributed.py): 2 gloo processes running
  `omni_train_step` on halves of a batch give the loss parts and (DDP-averaged) gradients of the definition written
  out by hand on the global batch (all positives, each query's own rank's hard negatives), plain and GradCache.
- Obj1 is one-directional (anchor -> augmented copy + hard negatives): the hard negatives only make sense as
  candidates for the anchor.
- z_TVA is whatever the caller passes; the issue asks for Conan's own pooled embedding (not their all-layer
  concatenation + linear head).
- "Text swapped" takes another tuple's caption from the same batch (a derangement, like audio and video).

Inputs are expected L2-normalised (Conan's embeddings are), as `info_nce` expects. The training loop's side (tuple
collator, the per-step forwards, GradCache) is `omni_training.py`, turned on by `loss.objective: omni_retriever`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from training.contrastive.loss import LossOutput, info_nce

TEXT, VIDEO, AUDIO = "text", "video", "audio"
MODALITIES = (TEXT, VIDEO, AUDIO)
PAIR_CYCLE: tuple[tuple[str, str], ...] = ((TEXT, AUDIO), (TEXT, VIDEO), (AUDIO, VIDEO))
HARD_NEGATIVE_CYCLE: tuple[str, ...] = (TEXT, AUDIO, VIDEO)  # step % 3: text swapped, audio permuted, video permuted
DEFAULT_TEMPERATURE = 0.01  # their recipe


@dataclass(frozen=True)
class OmniWeights:
    """w1 (Obj1 Tuple-InfoNCE), w2 (Obj2 fusion-as-teacher), w3 (Obj3 pairwise). Their recipe: all 1."""

    tuple_nce: float = 1.0
    teacher: float = 1.0
    pair: float = 1.0

    def __post_init__(self) -> None:
        values = (self.tuple_nce, self.teacher, self.pair)
        if any(w < 0 for w in values) or not any(w > 0 for w in values):
            raise ValueError(f"OmniWeights must be >= 0 with at least one > 0, got {values}")


BASELINE_WEIGHTS = OmniWeights(tuple_nce=0.0, teacher=0.0, pair=1.0)


def modality_pair(step: int) -> tuple[str, str]:
    """The (a, b) pair of Obj2 / Obj3 at optimiser step `step` (>= 0): (T,A), (T,V), (A,V), repeating."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return PAIR_CYCLE[step % len(PAIR_CYCLE)]


def hard_negative_modality(step: int) -> str:
    """Which modality of the tuple the step's hard negative replaces: text, audio, video, repeating (step % 3)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return HARD_NEGATIVE_CYCLE[step % len(HARD_NEGATIVE_CYCLE)]


def derangement(n: int, seed: int, step: int) -> list[int]:
    """A permutation of range(n) with no fixed point, a pure function of (n, seed, step) so a resumed run redraws it.

    Sattolo's algorithm (uniform over the cyclic permutations, each a derangement); `random.Random` with a str seed
    is deterministic across processes and Python runs. Needs n >= 2.
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    rng = random.Random(f"omni-hard-negative:{seed}:{step}")
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i: Sattolo, never leaves i in place
        perm[i], perm[j] = perm[j], perm[i]
    return perm


@dataclass(frozen=True)
class HardNegatives:
    """The step's hard-negative tuples: row i is tuple i with `modality` taken from tuple `source[i]` (!= i)."""

    tuples: list[dict[str, Any]]
    modality: str
    source: list[int]


def hard_negative_tuples(batch: Sequence[Mapping[str, Any]], step: int, seed: int = 0) -> HardNegatives:
    """Build one hard negative per tuple for step `step`: the same tuple with one modality from another tuple.

    `batch`: B >= 2 tuples, each a mapping with the keys "text", "video", "audio" (any values; other keys are copied).
    The replaced modality cycles by step (`hard_negative_modality`); the donor rows are a derangement of the batch
    (`derangement(B, seed, step)`). Pure: the inputs are not modified, the same arguments give the same result.
    The caller embeds the returned tuples under `torch.no_grad()` (one no-grad hard negative per tuple and step).
    """
    modality = hard_negative_modality(step)
    for i, item in enumerate(batch):
        missing = [m for m in MODALITIES if m not in item]
        if missing:
            raise ValueError(f"batch[{i}] lacks {missing}; a (text, video, audio) tuple needs keys {list(MODALITIES)}")
    source = derangement(len(batch), seed, step)
    tuples = [{**item, modality: batch[j][modality]} for item, j in zip(batch, source)]
    return HardNegatives(tuples=tuples, modality=modality, source=source)


def symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE,
                       cross_device: bool = True) -> LossOutput:
    """½(CE(a·Bᵀ/τ) + CE(b·Aᵀ/τ)) over the (gathered) batch: `info_nce(a, b, symmetric=True)`. a, b: (B, H)."""
    return info_nce(a, b, temperature=temperature, symmetric=True, cross_device=cross_device)


def tuple_info_nce(fused: torch.Tensor, augmented: torch.Tensor, hard_negatives: torch.Tensor,
                   temperature: float = DEFAULT_TEMPERATURE, cross_device: bool = True) -> LossOutput:
    """Obj1: InfoNCE of z_TVA (B, H) against its augmented copy (B, H), plus the hard negatives (B, H) as extra columns.

    The hard negatives are detached here whatever the caller passed (their code embeds them under no_grad). Across
    processes the augmented copies are gathered and the hard negatives stay local (each query sees its own rank's).
    """
    if hard_negatives.shape != fused.shape:
        raise ValueError(f"hard_negatives {tuple(hard_negatives.shape)} must match fused {tuple(fused.shape)}: "
                         "one hard negative per tuple")
    return info_nce(fused, augmented, hard_negatives.detach(), temperature=temperature, cross_device=cross_device,
                    local_negatives=True)


def fusion_teacher_loss(fused: torch.Tensor, z_a: torch.Tensor | None, z_b: torch.Tensor | None,
                        temperature: float = DEFAULT_TEMPERATURE,
                        cross_device: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Obj2: ½[symInfoNCE(sg(z_TVA), z_a) + symInfoNCE(sg(z_TVA), z_b)]; all (B, H). Returns (loss, value).

    The fused embedding is the stop-gradient teacher: no gradient reaches it from this term. A missing modality
    (None) falls back to the detached anchor, as in their code (that half then carries no gradient).
    """
    teacher = fused.detach()
    halves = [symmetric_info_nce(teacher, teacher if z is None else z, temperature, cross_device) for z in (z_a, z_b)]
    return 0.5 * (halves[0].loss + halves[1].loss), 0.5 * (halves[0].value + halves[1].value)


@dataclass
class OmniLossOutput:
    """`loss` to backpropagate (W-scaled like `LossOutput.loss`); `parts`: each weighted term's detached value."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    pair: tuple[str, str] = (TEXT, AUDIO)


def omni_retriever_loss(
    embeddings: Mapping[str, torch.Tensor],
    step: int,
    fused: torch.Tensor | None = None,
    augmented: torch.Tensor | None = None,
    hard_negatives: torch.Tensor | None = None,
    weights: OmniWeights = OmniWeights(),
    temperature: float = DEFAULT_TEMPERATURE,
    cross_device: bool = True,
) -> OmniLossOutput:
    """L = w1·Obj1 + w2·Obj2 + w3·Obj3 at step `step`, with (a, b) = `modality_pair(step)`.

    `embeddings`: single-modal embeddings (B, H) by modality name ("text", "video", "audio"); Obj3 needs both of
    the step's pair, Obj2 falls back to the detached anchor for a missing one. `fused` (z_TVA), `augmented` (z_TVA of
    the augmented tuples) and `hard_negatives` (z_TVA of `hard_negative_tuples(...)`, no grad) are needed only for a
    non-zero w1 (fused also for w2), so the baseline `BASELINE_WEIGHTS` needs the single-modal embeddings alone.
    `parts` holds "tuple_nce", "teacher", "pair" (unweighted, detached values) for each non-zero weight, and
    "total" (their weighted sum, unscaled by the world size, unlike `loss`).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    unknown = set(embeddings) - set(MODALITIES)
    if unknown:
        raise ValueError(f"embeddings has unknown modalities {sorted(unknown)}; expected some of {list(MODALITIES)}")
    a, b = modality_pair(step)
    z_a, z_b = embeddings.get(a), embeddings.get(b)
    terms: list[tuple[float, torch.Tensor]] = []
    parts: dict[str, torch.Tensor] = {}
    if weights.tuple_nce > 0:
        if fused is None or augmented is None or hard_negatives is None:
            raise ValueError("weights.tuple_nce > 0 needs fused, augmented and hard_negatives embeddings")
        out = tuple_info_nce(fused, augmented, hard_negatives, temperature, cross_device)
        terms.append((weights.tuple_nce, out.loss))
        parts["tuple_nce"] = out.value
    if weights.teacher > 0:
        if fused is None:
            raise ValueError("weights.teacher > 0 needs the fused (z_TVA) embedding")
        loss, value = fusion_teacher_loss(fused, z_a, z_b, temperature, cross_device)
        terms.append((weights.teacher, loss))
        parts["teacher"] = value
    if weights.pair > 0:
        if z_a is None or z_b is None:
            raise ValueError(f"weights.pair > 0 needs embeddings[{a!r}] and embeddings[{b!r}] at step {step}")
        out = symmetric_info_nce(z_a, z_b, temperature, cross_device)
        terms.append((weights.pair, out.loss))
        parts["pair"] = out.value
    weight_of = {"tuple_nce": weights.tuple_nce, "teacher": weights.teacher, "pair": weights.pair}
    logged = sum(weight_of[name] * value for name, value in parts.items())
    parts["total"] = logged
    return OmniLossOutput(loss=sum(w * t for w, t in terms), parts=parts, pair=(a, b))


__all__ = ["AUDIO", "BASELINE_WEIGHTS", "DEFAULT_TEMPERATURE", "HARD_NEGATIVE_CYCLE", "HardNegatives", "MODALITIES",
           "OmniLossOutput", "OmniWeights", "PAIR_CYCLE", "TEXT", "VIDEO", "derangement", "fusion_teacher_loss",
           "hard_negative_modality", "hard_negative_tuples", "modality_pair", "omni_retriever_loss",
           "symmetric_info_nce", "tuple_info_nce"]
