"""One split rule for every dataset, so training data never overlaps dev/test data used by evaluation."""

from __future__ import annotations

import hashlib
from typing import Literal

Split = Literal["train", "dev", "test"]


def split_of(key: str) -> Split:
    """Stable split of an item from its identity (e.g. "emoji:grinning face"): 70% train, 10% dev, 20% test."""
    bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % 10
    return "train" if bucket < 7 else ("dev" if bucket == 7 else "test")


def fsdd_split(index: int) -> Split:
    """FSDD recordings `{digit}_{speaker}_{index}.wav`: the official test split is index 0-4."""
    return "test" if index < 5 else ("dev" if index < 10 else "train")


def cifar_split(index: int) -> Split:
    """CIFAR-10 test-set JPEGs `<class>/NNNN.jpg` (1,000 a class): 0-699 train, 700-799 dev, 800-999 test."""
    return "train" if index < 700 else ("dev" if index < 800 else "test")
