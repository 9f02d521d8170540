"""OmniRetriever's objectives in the training loop: the tuple collator and one train step (plain or GradCache).

Turned on by a stage config's `loss.objective: omni_retriever` (specialist and rehearsal; `trainer.loss_settings`):

    loss: {objective: omni_retriever, weights: [1.0, 1.0, 1.0], temperature: 0.01}

The data are tuple rows (docs/omni_tuples.md): `query` the anchor (text, video, audio) tuple, `positive` its augmented
copy. One optimiser step at step s (the checkpointed `TrainState.step`) embeds, for the local batch of B tuples:

- the fused anchor z_TVA: text + video + audio in one input, one forward (Conan's own pooled embedding);
- the fused augmented copy (Obj1's positive) and, under `torch.no_grad()`, the hard-negative tuples
  (`hard_negative_tuples(batch, s, seed)`: text swapped / audio permuted / video permuted by s % 3, donors a
  derangement drawn from (seed, s), so a resumed run rebuilds exactly the same ones);
- the single-modal embeddings z_a, z_b of the step's pair `modality_pair(s)`: (T,A), (T,V), (A,V), repeating;

and backpropagates `omni_retriever_loss` (w1·Obj1 + w2·Obj2 + w3·Obj3). Only what a non-zero weight needs is
embedded: the baseline (weights 0/0/1) runs the two single-modal forwards alone. Every item of a row uses the row's
instruction (or `data.query_instruction`), so fused, single-modal and evaluation items share one prompt.

GradCache: the groups with gradient (fused, z_a as "queries"; augmented, z_b as "targets") are the chunk lists of
`gradcache.cached_step`, and the loss function splits them back by the batch size; the hard negatives are embedded
(no grad) before the cache pass. The result is the same gradient as the plain step (tests/contrastive).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from training.contrastive.data import DataError, Example, OnError, parse_rows, process_in_chunks
from training.contrastive.gradcache import cached_step, plain_step
from training.contrastive.loss import LossOutput
from training.contrastive.omni_objectives import (
    AUDIO, MODALITIES, TEXT, VIDEO, OmniWeights, hard_negative_tuples, modality_pair, omni_retriever_loss,
)


OBJECTIVES = ("info_nce", "omni_retriever")


def single_modal(parsed: Any, modality: str) -> Any:
    """The `modality` part of a parsed (text, video, audio) input as its own parsed input (`ParsedInput`)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return type(parsed)(**{modality: getattr(parsed, modality)})


def recombine(parsed: Any, **parts: Any) -> Any:
    """A parsed input with some of text / video / audio replaced (the hard-negative tuples)."""
    return type(parsed)(text=parts.get(TEXT, parsed.text), video=parts.get(VIDEO, parsed.video),
                        audio=parts.get(AUDIO, parsed.audio))


def is_tuple_row(example: Example) -> bool:
    """True when the row's query and positive both hold exactly text, video and audio (docs/omni_tuples.md)."""
    return all(set(item) == set(MODALITIES) for item in (example.query, example.positive))


@dataclass
class OmniBatch:
    """Parsed (text, video, audio) tuples of one micro-batch; model inputs are prepared per step (`inputs`), since
    the hard negatives depend on the step. `prepare` turns parsed inputs into model inputs (chunked by rows)."""

    anchors: list[Any]  # ParsedInput with text, video and audio
    augmented: list[Any]
    instructions: list[str | None]
    prepare: Callable[[list[Any], list[str | None]], list[dict[str, torch.Tensor]]]
    sources: list[str]
    where: list[str] = field(default_factory=list)
    device: torch.device | str = "cpu"

    @property
    def num_queries(self) -> int:
        return len(self.anchors)

    def to(self, device: torch.device | str) -> OmniBatch:
        self.device = device
        return self

    def chunks(self, parsed: list[Any]) -> list[dict[str, torch.Tensor]]:
        """Model inputs of `parsed` (one per row, this batch's instructions), chunked, on the batch's device."""
        return [{k: v.to(self.device) for k, v in c.items()} for c in self.prepare(parsed, self.instructions)]

    def group(self, name: str, step: int = 0, seed: int = 0) -> list[dict[str, torch.Tensor]]:
        """Model-input chunks of one group: "fused", "augmented", "hard_negatives" (needs step, seed) or a modality."""
        if name == "fused":
            return self.chunks(self.anchors)
        if name == "augmented":
            return self.chunks(self.augmented)
        if name == "hard_negatives":
            parts = [{m: getattr(p, m) for m in MODALITIES} for p in self.anchors]
            hard = hard_negative_tuples(parts, step, seed)
            swapped = [recombine(p, **{hard.modality: t[hard.modality]}) for p, t in zip(self.anchors, hard.tuples)]
            return self.chunks(swapped)
        if name in MODALITIES:
            return self.chunks([single_modal(p, name) for p in self.anchors])
        raise ValueError(f"unknown group {name!r}; expected fused, augmented, hard_negatives or one of {MODALITIES}")


class OmniTupleCollator:
    """Tuple rows -> OmniBatch. Decoding errors name the row (`file:line`); in skip mode the row is dropped.

    A row whose `query` or `positive` lacks one of text / video / audio is a DataError (a pair file given to the
    omni objective), unless `pairs` is given: then a micro-batch with no tuple row goes to that collator (a
    `ContrastiveBatch`, trained with `info_nce`; rehearsal mixes tuple sources with pair sources, each batch one
    source). `chunk_size` > 0 splits every group into GradCache chunks of that many rows.
    """

    def __init__(self, processor: Any, chunk_size: int = 0, query_instruction: str | None = None,
                 on_error: OnError = "fatal", pairs: Callable[[Sequence[Example]], Any] | None = None):
        self.processor = processor
        self.chunk_size = chunk_size
        self.query_instruction = query_instruction
        self.on_error = on_error
        self.pairs = pairs

    def prepare(self, parsed: list[Any], instructions: list[str | None]) -> list[dict[str, torch.Tensor]]:
        return process_in_chunks(self.processor, [(p, []) for p in parsed], instructions, self.chunk_size)

    def _parse(self, example: Example) -> tuple[Any, Any]:
        out = []
        for name, item in (("query", example.query), ("positive", example.positive)):
            if set(item) != set(MODALITIES):
                raise DataError(f"{example.where}: {name} has keys {sorted(item)}; loss.objective omni_retriever "
                                f"needs (text, video, audio) tuple rows, each of query and positive with exactly "
                                f"{list(MODALITIES)} (docs/omni_tuples.md)")
            try:
                parsed, _ = self.processor.parse_input(item, len(out))
            except (ValueError, TypeError, OSError) as error:
                raise DataError(f"{example.where}: {name}: {error}") from None
            out.append(parsed)
        return out[0], out[1]

    def __call__(self, examples: Sequence[Example]) -> Any:
        if self.pairs is not None and not any(is_tuple_row(e) for e in examples):
            return self.pairs(examples)
        good, parsed = parse_rows(examples, self._parse, self.on_error)
        return OmniBatch(anchors=[p[0] for p in parsed], augmented=[p[1] for p in parsed],
                         instructions=[e.instruction or self.query_instruction for e in good], prepare=self.prepare,
                         sources=[e.source for e in good], where=[e.where for e in good])


@dataclass
class OmniStepOutput(LossOutput):
    """`LossOutput` of an omni step: `value` is the weighted total; `parts` the unweighted terms (logged)."""

    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def omni_train_step(
    encode: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    batch: OmniBatch,
    step: int,
    weights: OmniWeights,
    temperature: float,
    seed: int = 0,
    cross_device: bool = True,
    gradcache: bool = False,
    backward: Callable[[torch.Tensor], None] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
) -> OmniStepOutput:
    """Forward + backward of one omni micro-batch at optimiser step `step` (no optimiser step); see module doc.

    `encode`: model-input chunk -> (rows, H) L2-normalised embeddings (`trainer.encoder_of(model)`). `accuracy`: the
    in-batch top-1 (local batch) of z_a -> z_b for the step's pair, or of fused -> augmented when w2 = w3 = 0.
    Raises ValueError for a batch of fewer than 2 tuples when w1 > 0 (a hard negative needs another tuple).
    """
    n = batch.num_queries
    a, b = modality_pair(step)
    need_pair = weights.teacher > 0 or weights.pair > 0
    query_groups = (["fused"] if weights.tuple_nce > 0 else []) + ([a] if need_pair else [])
    target_groups = (["augmented"] if weights.tuple_nce > 0 else []) + ([b] if need_pair else [])
    fixed: dict[str, torch.Tensor] = {}
    with torch.no_grad():  # no-grad inputs: the hard negatives, and the teacher when Obj1 is off
        if weights.tuple_nce > 0:
            if n < 2:
                raise ValueError(f"the omni objective's hard negatives need >= 2 tuples a micro-batch, got {n}")
            fixed["hard_negatives"] = torch.cat([encode(c) for c in batch.group("hard_negatives", step, seed)])
        elif weights.teacher > 0:
            fixed["fused"] = torch.cat([encode(c) for c in batch.group("fused")])

    def loss_fn(queries: torch.Tensor, targets: torch.Tensor) -> OmniStepOutput:
        got = {**dict(zip(query_groups, queries.split(n))), **dict(zip(target_groups, targets.split(n))), **fixed}
        out = omni_retriever_loss({m: got[m] for m in (a, b) if m in got}, step, fused=got.get("fused"),
                                  augmented=got.get("augmented"), hard_negatives=got.get("hard_negatives"),
                                  weights=weights, temperature=temperature, cross_device=cross_device)
        left, right = (got[a], got[b]) if need_pair else (got["fused"], got["augmented"])
        with torch.no_grad():
            accuracy = ((left @ right.T).argmax(dim=1) == torch.arange(n, device=left.device)).float().mean()
        return OmniStepOutput(loss=out.loss, value=out.parts["total"].detach(), accuracy=accuracy, num_queries=n,
                              num_candidates=n, parts={k: v.detach() for k, v in out.parts.items()})

    query_chunks = [c for g in query_groups for c in batch.group(g)]
    target_chunks = [c for g in target_groups for c in batch.group(g)]
    if gradcache:
        return cached_step(encode, query_chunks, target_chunks, loss_fn, backward=backward, no_sync=no_sync,
                           extra_loss=extra_loss)
    return plain_step(encode, query_chunks, target_chunks, loss_fn, backward=backward, extra_loss=extra_loss)


__all__ = ["OBJECTIVES", "OmniBatch", "OmniStepOutput", "OmniTupleCollator", "is_tuple_row", "omni_train_step",
           "recombine", "single_modal"]
