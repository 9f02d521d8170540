"""The (text, video, audio) tuple builder: disjoint splits by the one split rule, rows the pair loader reads."""

from __future__ import annotations

import json

import pytest

from training.common.splits import split_of
from training.contrastive.data import load_jsonl
from training.data_sources import omni_tuples
from training.data_sources.common import BuildContext, SourceMissing


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("tuples") / "omni"
    try:
        omni_tuples.check(BuildContext(root=out.parent, seed=0))
    except SourceMissing as error:
        pytest.skip(str(error))
    manifest = omni_tuples.build_tuples(out, {"train": 6, "dev": 2, "test": 4}, seed=0)
    return out, manifest


def test_splits_are_disjoint_and_follow_split_of(built):
    out, manifest = built
    keys = {}
    for split in ("train", "dev", "test"):
        rows = [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == manifest["counts"][split] > 0
        keys[split] = {r["meta"]["key"] for r in rows}
        assert len(keys[split]) == len(rows)  # one tuple per emoji
        assert all(split_of(k) == split for k in keys[split])
        media = {r["query"][m] for r in rows for m in ("video", "audio")}
        if split != "train":
            train_media = {r["query"][m] for r in map(json.loads, (out / "train.jsonl").read_text().splitlines())
                           for m in ("video", "audio")}
            assert not media & train_media
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["dev"] and not keys["dev"] & keys["test"]
    assert manifest["synthetic"] and "synthetic" in manifest["source"]["name"]


def test_rows_are_full_tuples_with_a_different_augmented_copy(built):
    out, _ = built
    examples = load_jsonl(out / "train.jsonl", check_media=True)  # every MP4 / WAV opens
    for ex in examples:
        assert set(ex.query) == set(ex.positive) == {"text", "video", "audio"}
        assert all(ex.query[m] != ex.positive[m] for m in ("text", "video", "audio"))
        assert ex.negatives == ()


def test_existing_output_is_not_replaced_silently(built, tmp_path):
    out, _ = built
    with pytest.raises(FileExistsError):
        omni_tuples.build_tuples(out, "smoke")
    with pytest.raises(ValueError, match="preset"):
        omni_tuples.build_tuples(tmp_path / "x", {"train": 1})
