"""Training data: JSONL validation with file:line errors, skip/fatal, the collator and the mixture sampler."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.contrastive.data import ContrastiveCollator, DataError, load_jsonl, load_sources
from training.contrastive.sampling import SourceMixtureSampler


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    return tmp_path


def test_bad_rows_are_named_by_file_and_line(data_dir):
    rows = [
        {"query": "a red square", "positive": {"image": "red.png"}, "source": "s"},
        {"query": "missing file", "positive": {"image": "nope.png"}, "source": "s"},
        {"query": "   ", "positive": "x", "source": "s"},
        {"query": "broken", "positive": {"image": "broken.png"}, "source": "s"},
        "{not json",
        {"query": "no source", "positive": "x"},
        {"query": {"txt": "typo"}, "positive": "x", "source": "s"},
    ]
    path = _write(data_dir / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"train\.jsonl:2: positive\.image: file .*nope\.png.* does not exist"):
        load_jsonl(path, on_error="fatal")
    kept = load_jsonl(path, on_error="skip")
    assert [e.where.rsplit(":", 1)[1] for e in kept] == ["1"]
    assert kept[0].positive["image"] == str(data_dir / "red.png")  # resolved relative to the file
    messages = []
    for line in range(2, 8):
        single = _write(data_dir / f"one{line}.jsonl", [rows[line - 1]])
        with pytest.raises(DataError) as info:
            load_jsonl(single)
        messages.append(str(info.value))
        assert str(info.value).startswith(f"{single}:1:")
    assert "non-empty" in messages[1] and "could not be read" in messages[2] and "invalid JSON" in messages[3]
    assert "missing 'source'" in messages[4] and "unknown key(s) ['txt']" in messages[5]


def test_collator_chunks_keys_and_hard_negatives(data_dir, tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    rows = [{"query": f"query {i}", "positive": {"image": "red.png"} if i % 2 else f"doc {i % 2}",
             "negatives": ["neg a", "neg b"], "source": "s"} for i in range(5)]
    examples = load_jsonl(_write(data_dir / "t.jsonl", rows))
    batch = ContrastiveCollator(processor, num_negatives=1, chunk_size=2)(examples)
    assert [c["input_ids"].shape[0] for c in batch.query_chunks] == [2, 2, 1]
    assert sum(c["input_ids"].shape[0] for c in batch.target_chunks) == 5 + 5  # positives + 1 negative each
    # rows 1 and 3 share the image positive, 0/2/4 share "doc 0": duplicate keys drive the false-negative mask
    keys = batch.positive_keys.tolist()
    assert keys[1] == keys[3] and keys[0] == keys[2] == keys[4] and keys[0] != keys[1]
    assert len(set(batch.negative_keys.tolist())) == 1


def test_collator_skips_rows_that_fail_to_decode(data_dir, tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    rows = [{"query": "ok", "positive": {"image": "red.png"}, "source": "s"},
            {"query": "bad", "positive": {"image": "broken.png"}, "source": "s"}]
    examples = load_jsonl(_write(data_dir / "t.jsonl", rows), check_media=False)  # slips past the loader
    with pytest.raises(DataError, match=r"t\.jsonl:2: .*broken\.png"):
        ContrastiveCollator(processor, on_error="fatal")(examples)
    batch = ContrastiveCollator(processor, on_error="skip")(examples)
    assert batch.num_queries == 1 and batch.where[0].endswith(":1")


def test_sampler_homogeneous_weighted_and_resumable():
    sources = {"a": range(0, 40), "b": range(40, 100), "c": range(100, 110)}
    sampler = SourceMixtureSampler(sources, {"a": 1.0, "b": 3.0, "c": 0.0}, batch_size=4, seed=3, max_steps=400)
    batches = list(sampler)
    owner = lambda i: "a" if i < 40 else ("b" if i < 100 else "c")  # noqa: E731
    kinds = [{owner(i) for i in b} for b in batches]
    assert all(len(k) == 1 for k in kinds) and all(len(b) == 4 for b in batches)
    share = Counter(next(iter(k)) for k in kinds)
    assert share["c"] == 0 and abs(share["b"] / 400 - 0.75) < 0.07
    # within an epoch of a source no row repeats
    a_rows = [i for b, k in zip(batches, kinds) if k == {"a"} for i in b][:40]
    assert len(set(a_rows)) == len(a_rows)
    # resume: a fresh sampler restored to step 123 yields exactly the remaining batches
    other = SourceMixtureSampler(sources, {"a": 1.0, "b": 3.0, "c": 0.0}, batch_size=4, seed=3, max_steps=400)
    other.load_state_dict({**sampler.state_dict(), "step": 123})
    assert list(other) == batches[123:]
    with pytest.raises(ValueError, match="same data and seed"):
        SourceMixtureSampler(sources, None, 4, seed=4).load_state_dict(sampler.state_dict())


def test_sampler_ranks_partition_the_global_batch():
    sources = {"a": range(50), "b": range(50, 90)}
    ranks = [list(SourceMixtureSampler(sources, None, 3, rank=r, world_size=2, max_steps=30)) for r in range(2)]
    single = list(SourceMixtureSampler(sources, None, 6, rank=0, world_size=1, max_steps=30))
    assert [r0 + r1 for r0, r1 in zip(*ranks)] == single
    with pytest.raises(ValueError, match="source 'b' has 40 rows"):
        SourceMixtureSampler(sources, None, 25, world_size=2)
    with pytest.raises(ValueError, match="lacks"):
        SourceMixtureSampler(sources, {"zzz": 1.0}, 2)


def test_sampler_source_batch_sizes_per_source_and_across_ranks():
    """A source with a batch size of its own draws that many rows a step; each rank still takes its slice of the
    global batch; resuming replays the same rows; sizes for unknown sources, non-positive sizes and mode "device"
    are refused."""
    sources = {"a": range(0, 40), "b": range(40, 100)}
    sampler = SourceMixtureSampler(sources, None, 2, seed=1, max_steps=60, source_batch_sizes={"b": 6})
    batches = list(sampler)
    assert all(len(b) == (6 if b[0] >= 40 else 2) for b in batches) and {len(b) for b in batches} == {2, 6}
    other = SourceMixtureSampler(sources, None, 2, seed=1, max_steps=60, source_batch_sizes={"b": 6})
    other.load_state_dict({**sampler.state_dict(), "step": 17})
    assert list(other) == batches[17:]
    ranks = [list(SourceMixtureSampler(sources, None, 1, rank=r, world_size=2, seed=1, max_steps=60,
                                       source_batch_sizes={"b": 3})) for r in range(2)]
    assert [r0 + r1 for r0, r1 in zip(*ranks)] == batches
    with pytest.raises(ValueError, match=r"source 'b' has 60 rows but one draw takes 122"):
        SourceMixtureSampler(sources, None, 2, world_size=2, source_batch_sizes={"b": 61})
    with pytest.raises(ValueError, match=r"source_batch_sizes name source\(s\) \['zzz'\]"):
        SourceMixtureSampler(sources, None, 2, source_batch_sizes={"zzz": 4})
    with pytest.raises(ValueError, match="positive integers"):
        SourceMixtureSampler(sources, None, 2, source_batch_sizes={"a": 0})
    with pytest.raises(ValueError, match="mode 'device'"):
        SourceMixtureSampler(sources, None, 2, mode="device", source_batch_sizes={"a": 4})
    with pytest.raises(ValueError, match="positive integers"):
        SourceMixtureSampler(sources, None, 2, source_batch_sizes={"a": True})
    resized = SourceMixtureSampler(sources, None, 2, seed=1, max_steps=60, source_batch_sizes={"b": 4})
    with pytest.raises(ValueError, match=r"\{'b': '6 -> 4'\}; resume with the same batch sizes"):
        resized.load_state_dict(sampler.state_dict())
    older = {k: v for k, v in sampler.state_dict().items() if k != "batch_sizes"}   # a checkpoint from before
    other.load_state_dict(older)


def test_toy_fsdd_rows_use_train_split_only(tmp_path):
    from tests.conftest import shared_path
    from training.data_sources.toy_data import fsdd_rows

    shared_path("data", "fsdd", "recordings")
    rows = fsdd_rows(tmp_path, "train")
    indices = {int(Path(r["query"]["audio"]).stem.split("_")[2]) for r in rows}
    assert len(rows) == 2400 and min(indices) == 10 and max(indices) == 49
    path = _write(tmp_path / "audio.jsonl", rows[:20])
    examples = load_sources([path]).examples
    assert all(Path(e.query["audio"]).is_file() for e in examples)
    assert np.all([e.negatives[0]["text"] != e.positive["text"] for e in examples])
