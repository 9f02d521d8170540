"""The one embedding loop over a model in memory: raw inputs (+ one instruction each) -> L2-normalised fp32 rows.

Every training-side evaluation goes through `embed_items`: per-stage test scores (`stage_eval`), recovery's dev
early stopping and partner bank, rehearsal's dev selection and the drift diagnosis. The evaluators that talk to a
saved model go through `Embedder` (embedder.py) instead; both end in the same `ConanModel.forward`.
"""

from __future__ import annotations

import json
import os
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

MEDIA_KEYS = ("image", "document", "video", "audio")


class ParsedInputCache:
    """A process-wide memo of `processor.parse_input` for inputs that name media files, per processor object.

    Why: a pipeline embeds the same test and dev files with ~20 models (specialists, fusion trials, recovery and
    rehearsal dev checks), and decoding them is most of a small model's evaluation on CPU (measured: PyAV frame
    conversion 6 s of a 9.6 s video test evaluation, 240 clips; WAV read + resample per clip). `parse_input` only
    reads the file (the resize, patches and audio features come later, in `prepare_parsed`, which does not change
    its input), so the decoded `ParsedInput` can be shared. An entry's key is the input as JSON plus each media
    file's absolute path, size and mtime, so a rewritten file is decoded again; inputs without a file path (text,
    in-memory arrays, PIL images) are not cached. Least recently used entries are dropped beyond `max_items` or
    `max_bytes` (decoded pixels and samples, `parsed_nbytes`) per processor; an entry larger than `max_bytes` alone is
    returned uncached (long real videos must not pile up in memory).
    """

    def __init__(self, max_items: int = 4096, max_bytes: int = 2 << 30) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._stores: weakref.WeakKeyDictionary[Any, OrderedDict[str, tuple[Any, int]]] = weakref.WeakKeyDictionary()
        self._bytes: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    @staticmethod
    def key(raw: Any) -> str | None:
        """The cache key of a raw input, or None when it names no media file (or a file that does not exist)."""
        if not isinstance(raw, dict):
            return None
        paths = [raw[k] for k in MEDIA_KEYS if isinstance(raw.get(k), (str, os.PathLike))]
        if not paths:
            return None
        try:
            # the absolute path: a relative one names another file after a change of the current directory
            stats = [(os.path.abspath(path), st.st_size, st.st_mtime_ns) for path in paths for st in [os.stat(path)]]
            return json.dumps([raw, stats], sort_keys=True, default=os.fspath)
        except (OSError, TypeError):  # a missing file or a value JSON cannot hold: parse as usual, uncached
            return None

    def parse(self, processor: Any, raw: Any, index: int) -> Any:
        """`processor.parse_input(raw, index)`, from the memo when this processor parsed the same input before."""
        key = self.key(raw)
        if key is None:
            return processor.parse_input(raw, index)
        store = self._stores.setdefault(processor, OrderedDict())
        if key in store:
            store.move_to_end(key)
            return store[key][0]
        parsed = processor.parse_input(raw, index)
        size = parsed_nbytes(parsed)
        if size > self.max_bytes:
            return parsed
        store[key] = (parsed, size)
        total = self._bytes.get(processor, 0) + size
        while len(store) > self.max_items or total > self.max_bytes:
            total -= store.popitem(last=False)[1][1]
        self._bytes[processor] = total
        return parsed

    def nbytes(self, processor: Any) -> int:
        """Bytes of decoded media held for `processor` (`parsed_nbytes` of its entries)."""
        return self._bytes.get(processor, 0)


def parsed_nbytes(parsed: Any) -> int:
    """Bytes of a `ParsedInput`'s decoded media: PIL images (width x height x bands), video frames and audio arrays.

    `parsed` is what `parse_input` returns: ConanProcessor's is a (ParsedInput, document flags) pair, whose first
    element is counted; a bare ParsedInput is counted as it is."""
    if isinstance(parsed, tuple) and parsed:
        parsed = parsed[0]
    images = sum(image.width * image.height * len(image.getbands()) for image in getattr(parsed, "images", []) or [])
    frames = sum(np.asarray(frame).nbytes for frame in getattr(parsed, "video", None) or [])
    audio = getattr(parsed, "audio", None)
    return images + frames + (0 if audio is None else np.asarray(audio).nbytes)


PARSED_INPUTS = ParsedInputCache()


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed_items(
    model: torch.nn.Module, processor: Any, items: Sequence[Any], instructions: Sequence[str | None] | None = None,
    batch_size: int = 16, progress: bool = False, desc: str = "embed",
) -> torch.Tensor:
    """(N, H) fp32 CPU embeddings of `items` (user input format), row i under `instructions[i]` (None: default).

    Rows are batched in order, `batch_size` at a time, on the model's device. Inputs naming media files are decoded
    once per processor (`PARSED_INPUTS`). Raises ValueError when the two lists differ in length.
    """
    instructions = list(instructions) if instructions is not None else [None] * len(items)
    if len(instructions) != len(items):
        raise ValueError(f"embed_items: {len(items)} items but {len(instructions)} instructions; expected one each")
    device = model_device(model)
    rows: list[torch.Tensor] = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = range(start, min(start + batch_size, len(items)))
        parsed = [PARSED_INPUTS.parse(processor, items[i], i) for i in chunk]
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
