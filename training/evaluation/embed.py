"""The one embedding loop over a model in memory: raw inputs (+ one instruction each) -> L2-normalised fp32 rows.

Every training-side evaluation goes through `embed_items`: per-stage test scores (`stage_eval`), recovery's dev
early stopping and partner bank, rehearsal's dev selection and the drift diagnosis. The evaluators that talk to a
saved model go through `Embedder` (embedder.py) instead; both end in the same `ConanModel.forward`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed_items(
    model: torch.nn.Module, processor: Any, items: Sequence[Any], instructions: Sequence[str | None] | None = None,
    batch_size: int = 16, progress: bool = False, desc: str = "embed",
) -> torch.Tensor:
    """(N, H) fp32 CPU embeddings of `items` (user input format), row i under `instructions[i]` (None: default).

    Rows are batched in order, `batch_size` at a time, on the model's device. Raises ValueError when the two lists
    differ in length.
    """
    instructions = list(instructions) if instructions is not None else [None] * len(items)
    if len(instructions) != len(items):
        raise ValueError(f"embed_items: {len(items)} items but {len(instructions)} instructions; expected one each")
    device = model_device(model)
    rows: list[torch.Tensor] = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = range(start, min(start + batch_size, len(items)))
        parsed = [processor.parse_input(items[i], i) for i in chunk]
        batch = processor.prepare_parsed(parsed, [instructions[i] for i in chunk])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        rows.append(model(**batch).embeddings.float().cpu())
    return torch.cat(rows) if rows else torch.empty(0)


def embed_keyed(
    model: torch.nn.Module, processor: Any, inputs: Mapping[Hashable, tuple[Any, str | None]], batch_size: int = 16,
    progress: bool = False, desc: str = "embed",
) -> tuple[torch.Tensor, dict[Hashable, int]]:
    """`embed_items` over {key: (input, instruction)}; returns (matrix, key -> row)."""
    keys = list(inputs)
    matrix = embed_items(model, processor, [inputs[k][0] for k in keys], [inputs[k][1] for k in keys], batch_size,
                         progress, desc)
    return matrix, {key: row for row, key in enumerate(keys)}
