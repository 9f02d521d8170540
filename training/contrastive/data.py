"""Contrastive training data: the JSONL pair format, its loader, the collator and the source-mixture batch sampler.

One line of a training file (docs/ARCHITECTURE.md, "User input format"):

    {"query": ITEM, "positive": ITEM, "negatives": [ITEM, ...], "source": "fsdd", "instruction": "..."}

ITEM is a str (text) or a dict with keys among text/image/document/page/video/audio; media paths are relative to the
JSONL file. Bad rows are reported as `file:line: what is wrong` and skipped (`on_error="skip"`) or fatal.

Batches are homogeneous per source (VLM2Vec-V2 `src/data/loader/mixed_dataset.py`, MoCa `src/dataset.py`): each step draws a source with
probability p_i = w_i / Σw, then takes consecutive rows of that source's shuffled epoch order. The sampler is a pure
function of (seed, step), so resuming needs only the step (`state_dict`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

ITEM_KEYS = ("text", "image", "document", "page", "video", "audio")
MEDIA_KEYS = ("image", "document", "video", "audio")
ROW_KEYS = ("query", "positive", "negatives", "source", "instruction", "meta")  # meta: bookkeeping, see docs
OnError = Literal["skip", "fatal"]


class DataError(ValueError):
    """A training row that cannot be used; the message starts with `file:line`."""


@dataclass(frozen=True)
class Example:
    """One validated training row; media paths are absolute."""

    query: dict[str, Any]
    positive: dict[str, Any]
    negatives: tuple[dict[str, Any], ...]
    source: str
    instruction: str | None
    where: str  # "path/to/file.jsonl:LINE", used in every later error


# --------------------------------------------------------------------------------------------------- validation
def _probe_media(kind: str, path: str, page: Any) -> None:
    """Open the file just enough to know it decodes (headers), so a bad file fails at load time, not mid-epoch."""
    if kind == "image" or (kind == "document" and not path.lower().endswith(".pdf")):
        from PIL import Image

        with Image.open(path) as image:
            image.verify()
    elif kind == "document":
        import pypdfium2

        pdf = pypdfium2.PdfDocument(path)
        try:
            n_pages = len(pdf)
        finally:
            pdf.close()
        if not 0 <= int(page or 0) < n_pages:
            raise ValueError(f"page {page} is out of range for a PDF of {n_pages} pages")
    elif kind == "audio":
        import soundfile

        try:
            info = soundfile.info(path)
            if info.frames == 0:
                raise ValueError("audio file has 0 samples")
        except RuntimeError:  # formats libsndfile lacks: fall back to PyAV like media_conan does
            import av

            with av.open(path) as container:
                if not container.streams.audio:
                    raise ValueError("no audio stream") from None
    elif kind == "video":
        import av

        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError("no video stream")


def _item_key(item: dict[str, Any]) -> int:
    """Content identity of an item (text + resolved paths) as a signed int64, for duplicate-target masking."""
    digest = hashlib.blake2b(json.dumps(item, sort_keys=True).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def normalise_item(raw: Any, base_dir: Path, what: str, check_media: bool) -> dict[str, Any]:
    """Validate one ITEM and resolve its media paths against `base_dir`. Raises ValueError naming `what`."""
    if isinstance(raw, str):
        raw = {"text": raw}
    if not isinstance(raw, dict):
        raise ValueError(f"{what} has type {type(raw).__name__}; expected a str or a dict with keys {ITEM_KEYS}")
    unknown = sorted(set(raw) - set(ITEM_KEYS))
    if unknown:
        raise ValueError(f"{what} has unknown key(s) {unknown}; expected keys among {ITEM_KEYS}")
    item: dict[str, Any] = {}
    if raw.get("text") is not None:
        if not isinstance(raw["text"], str) or not raw["text"].strip():
            raise ValueError(f"{what}.text is {raw['text']!r}; expected non-empty text")
        item["text"] = raw["text"]
    for kind in MEDIA_KEYS:
        value = raw.get(kind)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise ValueError(f"{what}.{kind} is {value!r}; expected a file path (relative to the JSONL file)")
        path = value if os.path.isabs(value) else os.path.normpath(base_dir / value)
        if not os.path.isfile(path):
            raise ValueError(f"{what}.{kind}: file {path!r} does not exist")
        if check_media:
            try:
                _probe_media(kind, path, raw.get("page"))
            except Exception as error:  # any decoder error means the row is unusable
                raise ValueError(f"{what}.{kind}: file {path!r} could not be read: {error}") from error
        item[kind] = path
    if raw.get("page") is not None:
        if "document" not in item:
            raise ValueError(f"{what} has 'page' but no 'document'")
        if not isinstance(raw["page"], int) or isinstance(raw["page"], bool) or raw["page"] < 0:
            raise ValueError(f"{what}.page is {raw['page']!r}; expected a 0-based int")
        item["page"] = raw["page"]
    if not any(k in item for k in ("text", *MEDIA_KEYS)):
        raise ValueError(f"{what} is empty; expected at least one of text/image/document/video/audio")
    return item


def parse_row(row: Any, base_dir: Path, where: str, check_media: bool = True) -> Example:
    """One decoded JSON line -> Example; raises DataError('file:line: ...')."""
    try:
        if not isinstance(row, dict):
            raise ValueError(f"row is a {type(row).__name__}; expected a JSON object with keys {ROW_KEYS}")
        unknown = sorted(set(row) - set(ROW_KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; expected keys among {ROW_KEYS}")
        for key in ("query", "positive", "source"):
            if row.get(key) is None:
                raise ValueError(f"missing {key!r}")
        if not isinstance(row["source"], str) or not row["source"]:
            raise ValueError(f"source is {row['source']!r}; expected a non-empty str")
        negatives = row.get("negatives") or []
        if not isinstance(negatives, list):
            raise ValueError(f"negatives is a {type(negatives).__name__}; expected a list of items")
        instruction = row.get("instruction")
        if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
            raise ValueError(f"instruction is {instruction!r}; expected a non-empty str or no key")
        return Example(
            query=normalise_item(row["query"], base_dir, "query", check_media),
            positive=normalise_item(row["positive"], base_dir, "positive", check_media),
            negatives=tuple(
                normalise_item(n, base_dir, f"negatives[{i}]", check_media) for i, n in enumerate(negatives)
            ),
            source=row["source"],
            instruction=instruction,
            where=where,
        )
    except ValueError as error:
        raise DataError(f"{where}: {error}") from None


def load_jsonl(path: str | os.PathLike, on_error: OnError = "fatal", check_media: bool = True) -> list[Example]:
    """Read and validate a training JSONL file. Bad rows raise DataError (fatal) or are logged and dropped (skip)."""
    if on_error not in ("skip", "fatal"):
        raise ValueError(f"on_error must be 'skip' or 'fatal', got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training data file {path} does not exist")
    examples, skipped = [], 0
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
                examples.append(parse_row(row, path.parent, where, check_media))
            except DataError as error:
                if on_error == "fatal":
                    raise
                skipped += 1
                logger.warning("skipping bad row: %s", error)
    if skipped:
        logger.warning("%s: skipped %d bad row(s), kept %d", path, skipped, len(examples))
    if not examples:
        raise DataError(f"{path}: no usable rows")
    return examples


# ------------------------------------------------------------------------------------------------------ collator
@dataclass
class ContrastiveBatch:
    """Processor outputs for one micro-batch, split into GradCache chunks (one chunk when GradCache is off).

    Targets are the positives (row order) followed by the hard negatives. Keys identify item content for
    duplicate-target masking.
    """

    query_chunks: list[dict[str, torch.Tensor]]
    target_chunks: list[dict[str, torch.Tensor]]
    query_keys: torch.Tensor  # (B,) int64
    positive_keys: torch.Tensor  # (B,)
    negative_keys: torch.Tensor  # (M,)
    sources: list[str]
    where: list[str] = field(default_factory=list)

    @property
    def num_queries(self) -> int:
        return int(self.query_keys.numel())

    def to(self, device: torch.device | str) -> ContrastiveBatch:
        move = lambda chunks: [{k: v.to(device) for k, v in c.items()} for c in chunks]  # noqa: E731
        return ContrastiveBatch(
            move(self.query_chunks), move(self.target_chunks), self.query_keys.to(device),
            self.positive_keys.to(device), self.negative_keys.to(device), self.sources, self.where,
        )


def process_parsed(processor: Any, parsed: Sequence[tuple[Any, list[bool]]], instructions: Sequence[str | None]
                   ) -> dict[str, torch.Tensor]:
    """Already-parsed inputs (`processor.parse_input` results) -> model inputs, rendered with per-row instructions."""
    return dict(processor.prepare_parsed(list(parsed), list(instructions)))


def process_in_chunks(processor: Any, parsed: Sequence[tuple[Any, list[bool]]], instructions: Sequence[str | None],
                      chunk_size: int = 0) -> list[dict[str, torch.Tensor]]:
    """`process_parsed` over consecutive chunks of `chunk_size` rows (GradCache's sub-batches); 0 = one chunk."""
    size = chunk_size if chunk_size > 0 else max(len(parsed), 1)
    return [process_parsed(processor, parsed[i : i + size], instructions[i : i + size])
            for i in range(0, len(parsed), size)]


def parse_rows(examples: Sequence[Example], parse: Callable[[Example], Any], on_error: OnError
               ) -> tuple[list[Example], list[Any]]:
    """(kept rows, their `parse` results) of a micro-batch: a row whose `parse` raises DataError is fatal or, with
    `on_error="skip"`, logged and dropped. Raises DataError when no row is left."""
    good, parsed = [], []
    for example in examples:
        try:
            parsed.append(parse(example))
            good.append(example)
        except DataError as error:
            if on_error == "fatal":
                raise
            logger.warning("skipping bad row in batch: %s", error)
    if not good:
        raise DataError("every row of a micro-batch failed to decode: " + ", ".join(e.where for e in examples))
    return good, parsed


class ContrastiveCollator:
    """Examples -> ContrastiveBatch. Decoding errors name the row (`file:line`); in skip mode the row is dropped.

    `num_negatives` caps the hard negatives taken per row (the first k). `chunk_size` splits queries and targets
    into GradCache chunks by row, each prepared on its own, so packed pixel/audio tensors never need slicing.
    """

    def __init__(
        self,
        processor: Any,
        num_negatives: int = 0,
        chunk_size: int = 0,
        query_instruction: str | None = None,
        target_instruction: str | None = None,
        on_error: OnError = "fatal",
    ):
        self.processor = processor
        self.num_negatives = num_negatives
        self.chunk_size = chunk_size
        self.query_instruction = query_instruction
        self.target_instruction = target_instruction
        self.on_error = on_error

    def _chunks(self, parsed: list[Any], instructions: list[str | None]) -> list[dict[str, torch.Tensor]]:
        return process_in_chunks(self.processor, parsed, instructions, self.chunk_size)

    def _parse_row(self, example: Example) -> list[Any]:
        """Decode every item of the row (query, positive, first k negatives); errors name this row."""
        items = [example.query, example.positive, *example.negatives[: self.num_negatives]]
        parsed = []
        for i, item in enumerate(items):
            try:
                parsed.append(self.processor.parse_input(item, i))
            except (ValueError, TypeError, OSError) as error:
                raise DataError(f"{example.where}: {error}") from None
        return parsed

    def __call__(self, examples: Sequence[Example]) -> ContrastiveBatch:
        good, parsed = parse_rows(examples, self._parse_row, self.on_error)
        q_instr = [e.instruction or self.query_instruction for e in good]
        negatives = [n for e in good for n in e.negatives[: self.num_negatives]]
        target_parsed = [p[1] for p in parsed] + [n for p in parsed for n in p[2:]]
        t_instr = [self.target_instruction] * len(target_parsed)
        return ContrastiveBatch(
            query_chunks=self._chunks([p[0] for p in parsed], q_instr),
            target_chunks=self._chunks(target_parsed, t_instr),
            query_keys=torch.tensor([_item_key(e.query) for e in good], dtype=torch.int64),
            positive_keys=torch.tensor([_item_key(e.positive) for e in good], dtype=torch.int64),
            negative_keys=torch.tensor([_item_key(n) for n in negatives], dtype=torch.int64),
            sources=[e.source for e in good],
            where=[e.where for e in good],
        )


class ExampleDataset(torch.utils.data.Dataset):
    """Examples by index (the sampler yields indices into the concatenated files)."""

    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    def by_source(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for i, example in enumerate(self.examples):
            groups.setdefault(example.source, []).append(i)
        return groups


def load_sources(
    paths: Sequence[str | os.PathLike], on_error: OnError = "fatal", check_media: bool = True
) -> ExampleDataset:
    """Concatenate several JSONL files into one dataset (sources come from each row's `source`)."""
    examples: list[Example] = []
    for path in paths:
        examples.extend(load_jsonl(path, on_error=on_error, check_media=check_media))
    return ExampleDataset(examples)


__all__ = [
    "ContrastiveBatch", "ContrastiveCollator", "DataError", "Example", "ExampleDataset",
    "load_jsonl", "load_sources", "normalise_item", "parse_row", "parse_rows", "process_parsed",
]
