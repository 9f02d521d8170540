"""CoMa stage-1 data: question/answer rows derived from the pipeline's pair files, and their collator.

Every pair file the data stage writes (`OUT/data/pairs/<modality>/{train,dev,test}.jsonl`, format in
training/contrastive/data.py) pairs an input with the text of its label: a CIFAR photo / an emoji with its class or
name, a manual page with a line of its text, a recording with the spoken digit / word / definition or the
instrument note, a motion clip with its caption, a WordNet gloss with its word. A QA row keeps that input and asks
for that text:

    input  = the side of the pair that holds media (the query when both sides are text: the WordNet gloss)
    answer = the other side's text (a row whose other side has no text is a DataError: nothing to answer)
    question = `QUESTIONS[kind of the input]`, e.g. "What is shown in the image?"

Splits follow the files: a stage config lists only `train.jsonl` files (the splits are disjoint by the data stage's
`split_of` keys), so nothing from dev/test reaches stage 1.

`CompressionCollator` lays each row out as CoMa does, [input | C | question | answer] (C = the base's K compression
tokens), right-padded, with per-position segment ids (training/contrastive/compression.py) for the attention mask
and the answer-only labels. The input part is the processor's own rendering of the item (chat template, media
placeholders, pixel/audio features), so the backbone sees the input exactly as in contrastive training.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from training.contrastive.compression import ANSWER, COMPRESSION, INPUT, QUESTION
from training.contrastive.data import MEDIA_KEYS, DataError, Example, OnError, load_jsonl, parse_rows

logger = logging.getLogger(__name__)

QUESTIONS = {
    "image": "What is shown in the image?",
    "document": "Which line of text appears on this page?",
    "video": "What does the video show?",
    "audio": "What is heard in the recording?",
    "text": "Which word does this text define?",
}


@dataclass(frozen=True)
class QARow:
    """One stage-1 row: `input` is a validated ITEM (absolute media paths), `question` / `answer` are text."""

    input: dict[str, Any]
    question: str
    answer: str
    source: str
    where: str


def input_kind(item: dict[str, Any]) -> str:
    """"image" / "document" / "video" / "audio" for the first media key of an ITEM, else "text"."""
    return next((kind for kind in MEDIA_KEYS if kind in item), "text")


def qa_row_from_pair(example: Example) -> QARow:
    """A validated pair row -> its QA row (module docstring). Raises DataError naming the row when the answer side
    has no text."""
    query_media, positive_media = input_kind(example.query) != "text", input_kind(example.positive) != "text"
    if positive_media and not query_media:
        item, answer_item = example.positive, example.query
    else:
        item, answer_item = example.query, example.positive
    answer = answer_item.get("text")
    if not answer or not answer.strip():
        raise DataError(f"{example.where}: the label side of the pair has no text to answer with "
                        f"(query keys {sorted(example.query)}, positive keys {sorted(example.positive)})")
    if answer_item is example.positive and input_kind(item) == "text" and not item.get("text"):
        raise DataError(f"{example.where}: the input side has neither media nor text")
    return QARow(input=item, question=QUESTIONS[input_kind(item)], answer=answer.strip(), source=example.source,
                 where=example.where)


def load_qa_rows(paths: Sequence[str | os.PathLike], on_error: OnError = "fatal",
                 check_media: bool = True) -> list[QARow]:
    """QA rows of every pair file in `paths` (in file order). Rows without a text label are fatal or, with
    `on_error="skip"`, logged and dropped; raises DataError when nothing is left."""
    rows: list[QARow] = []
    for path in paths:
        for example in load_jsonl(path, on_error=on_error, check_media=check_media):
            try:
                rows.append(qa_row_from_pair(example))
            except DataError as error:
                if on_error == "fatal":
                    raise
                logger.warning("skipping row: %s", error)
    if not rows:
        raise DataError(f"no usable QA rows in {[str(p) for p in paths]}")
    return rows


class CompressionCollator:
    """QA rows -> model inputs for [input | C | question | answer] plus `segment_ids` (B, L).

    Returns the processor's keys (`input_ids`, `attention_mask` (B, L) right-padded, `mm_token_type_ids`, pixel /
    audio features as the processor packs them) with the question and answer tokens appended after each row's real
    tokens, and `segment_ids` (`INPUT`, `COMPRESSION`, `QUESTION`, `ANSWER`; padding is `INPUT` with attention 0).
    When the processor's rendering already ends with the K compression ids (a `compression_mean` processor appends
    them) they are used as they are; otherwise they are appended here. `max_answer_tokens` truncates long answers
    (page lines, glosses) so the stage's cost stays bounded.
    """

    def __init__(self, processor: Any, compression_token_ids: Sequence[int], max_answer_tokens: int = 32,
                 on_error: OnError = "fatal"):
        if not compression_token_ids:
            raise ValueError("CompressionCollator needs the base's compression token ids (none given)")
        self.processor = processor
        self.compression = [int(i) for i in compression_token_ids]
        self.max_answer_tokens = int(max_answer_tokens)
        self.on_error = on_error
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def _tokens(self, text: str) -> list[int]:
        return list(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _parse(self, row: QARow) -> Any:
        try:
            return self.processor.parse_input(row.input, 0)
        except (ValueError, TypeError, OSError) as error:
            raise DataError(f"{row.where}: {error}") from None

    def __call__(self, rows: Sequence[QARow]) -> dict[str, torch.Tensor]:
        good, parsed = parse_rows(rows, self._parse, self.on_error)
        inputs = dict(self.processor.prepare_parsed(parsed, [None] * len(parsed), padding_side="right"))
        k = len(self.compression)
        sequences, segments = [], []
        for row, ids, mask in zip(good, inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
            real = ids[: int(sum(mask))]
            has_c = real[-k:] == self.compression
            body = real[:-k] if has_c else real
            question = self._tokens(f"\n{row.question}\n")
            answer = self._tokens(row.answer)[: self.max_answer_tokens] + [self.eos_id]
            sequences.append(body + self.compression + question + answer)
            segments.append([INPUT] * len(body) + [COMPRESSION] * k + [QUESTION] * len(question)
                            + [ANSWER] * len(answer))
        length = max(len(s) for s in sequences)
        pad = lambda rows_, value: torch.tensor([r + [value] * (length - len(r)) for r in rows_])  # noqa: E731
        input_ids = pad(sequences, self.pad_id)
        attention_mask = pad([[1] * len(s) for s in sequences], 0)
        # the appended compression / question / answer positions are text (type 0), like the processor's padding
        mm_types = inputs["mm_token_type_ids"]
        mm_token_type_ids = torch.zeros_like(input_ids, dtype=mm_types.dtype)
        mm_token_type_ids[:, : mm_types.shape[1]] = mm_types
        inputs.update(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                      segment_ids=pad(segments, INPUT))
        return inputs


__all__ = ["QUESTIONS", "CompressionCollator", "QARow", "input_kind", "load_qa_rows",
           "qa_row_from_pair"]
