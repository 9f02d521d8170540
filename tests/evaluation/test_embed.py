"""The embedding loop's memo of decoded media (training/evaluation/embed.py: ParsedInputCache)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from tests.conftest import write_fading_mp4
from training.evaluation.embed import ParsedInputCache, embed_items


class CountingProcessor:
    """A stand-in whose parse_input counts calls and returns a fresh object each time."""

    def __init__(self) -> None:
        self.calls = 0

    def parse_input(self, raw, index):
        self.calls += 1
        return (object(), [])


def test_media_inputs_are_decoded_once_per_processor_and_text_never_cached(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(image)
    cache, processor, other = ParsedInputCache(), CountingProcessor(), CountingProcessor()
    first = cache.parse(processor, {"image": str(image), "text": "red"}, 0)
    assert cache.parse(processor, {"text": "red", "image": str(image)}, 5) is first and processor.calls == 1
    assert cache.parse(other, {"image": str(image), "text": "red"}, 0) is not first and other.calls == 1
    cache.parse(processor, {"text": "only text"}, 0)
    cache.parse(processor, {"text": "only text"}, 0)
    cache.parse(processor, "a plain string", 0)
    cache.parse(processor, {"image": str(tmp_path / "missing.png")}, 0)  # not cached: the processor raises as usual
    assert processor.calls == 5


def test_a_rewritten_file_is_decoded_again_and_old_entries_are_dropped(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(image)
    cache, processor = ParsedInputCache(max_items=2), CountingProcessor()
    first = cache.parse(processor, {"image": str(image)}, 0)
    Image.new("RGB", (16, 16), (0, 0, 255)).save(image)
    os.utime(image, ns=(1, 1))  # size and mtime both differ now
    assert cache.parse(processor, {"image": str(image)}, 0) is not first and processor.calls == 2
    for name in ("b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
        cache.parse(processor, {"image": str(tmp_path / name)}, 0)
    cache.parse(processor, {"image": str(image)}, 0)  # evicted by the two newer entries (max_items=2)
    assert processor.calls == 5


def test_embeddings_with_the_memo_equal_the_uncached_loop(tiny_model_and_processor, tmp_path, monkeypatch):
    model, processor = tiny_model_and_processor
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    video = write_fading_mp4(tmp_path / "v.mp4")
    items = [{"image": str(tmp_path / "x.png")}, {"video": str(video), "text": "a fading clip"}, "plain text"]
    fresh = ParsedInputCache()
    monkeypatch.setattr("training.evaluation.embed.PARSED_INPUTS", fresh)
    first = embed_items(model, processor, items, batch_size=2)
    second = embed_items(model, processor, items, batch_size=2)  # media from the memo
    calls = []
    real_parse = processor.parse_input
    monkeypatch.setattr(processor, "parse_input", lambda raw, i: calls.append(i) or real_parse(raw, i))
    monkeypatch.setattr("training.evaluation.embed.PARSED_INPUTS", ParsedInputCache())
    uncached = embed_items(model, processor, items, batch_size=2)
    assert calls == [0, 1, 2]
    torch.testing.assert_close(first, uncached, rtol=0, atol=0)
    torch.testing.assert_close(second, uncached, rtol=0, atol=0)
    assert len(fresh._stores[processor]) == 2



def test_a_relative_path_is_keyed_by_the_file_it_names_from_the_current_directory(tmp_path, monkeypatch):
    """The same relative path in two folders names two files: with equal size and mtime (a tar or `cp -p` copy of a
    fixed-size clip or glyph) the memo must not hand the first folder's decode to the second."""
    cache, processor = ParsedInputCache(), CountingProcessor()
    for name, colour in (("one", (255, 0, 0)), ("two", (0, 0, 255))):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8), colour).save(tmp_path / name / "a.bmp")  # uncompressed: equal sizes
        os.utime(tmp_path / name / "a.bmp", ns=(10**18, 10**18))
    assert os.path.getsize(tmp_path / "one" / "a.bmp") == os.path.getsize(tmp_path / "two" / "a.bmp")
    monkeypatch.chdir(tmp_path / "one")
    first = cache.parse(processor, {"image": "a.bmp"}, 0)
    monkeypatch.chdir(tmp_path / "two")
    assert cache.parse(processor, {"image": "a.bmp"}, 0) is not first and processor.calls == 2
    monkeypatch.chdir(tmp_path / "one")
    assert cache.parse(processor, {"image": "a.bmp"}, 0) is first and processor.calls == 2


class DecodingProcessor(CountingProcessor):
    """parse_input decodes the image into a (ParsedInput, document flags) pair, as ConanProcessor does."""

    def parse_input(self, raw, index):
        from training.common import hub_code

        self.calls += 1
        return hub_code.load("processing_conan").ParsedInput(images=[Image.open(raw["image"]).convert("RGB")]), [False]


def test_the_memo_holds_at_most_max_bytes_of_decoded_media(tmp_path):
    from training.evaluation.embed import parsed_nbytes

    for name, side in (("a.png", 10), ("b.png", 10), ("big.png", 40)):
        Image.new("RGB", (side, side)).save(tmp_path / name)
    cache, processor = ParsedInputCache(max_bytes=700), DecodingProcessor()   # 10x10 RGB: 300 bytes; 40x40: 4,800
    a = cache.parse(processor, {"image": str(tmp_path / "a.png")}, 0)
    assert parsed_nbytes(a) == 300 and cache.nbytes(processor) == 300
    cache.parse(processor, {"image": str(tmp_path / "b.png")}, 0)
    assert cache.nbytes(processor) == 600 and processor.calls == 2
    big = cache.parse(processor, {"image": str(tmp_path / "big.png")}, 0)   # over the budget alone: not cached
    assert parsed_nbytes(big) == 4800 and cache.nbytes(processor) == 600
    assert cache.parse(processor, {"image": str(tmp_path / "big.png")}, 0) is not big and processor.calls == 4
    assert cache.parse(processor, {"image": str(tmp_path / "a.png")}, 0) is a and processor.calls == 4
    Image.new("RGB", (10, 10)).save(tmp_path / "c.png")
    cache.parse(processor, {"image": str(tmp_path / "c.png")}, 0)   # 900 > 700: the least recently used (b) goes
    assert cache.nbytes(processor) == 600
    cache.parse(processor, {"image": str(tmp_path / "a.png")}, 0)
    cache.parse(processor, {"image": str(tmp_path / "b.png")}, 0)
    assert processor.calls == 6   # a still cached, b decoded again


def test_the_byte_budget_counts_what_the_real_processor_returns(tiny_model_and_processor, tmp_path):
    """ConanProcessor.parse_input returns (ParsedInput, document flags), not a bare ParsedInput: the budget must count
    that pair's media (it counted 0 bytes for every real input, so `max_bytes` never bounded anything)."""
    from training.evaluation.embed import parsed_nbytes

    _, processor = tiny_model_and_processor
    Image.new("RGB", (40, 30)).save(tmp_path / "x.png")
    video = write_fading_mp4(tmp_path / "v.mp4")
    parsed = processor.parse_input({"image": str(tmp_path / "x.png")}, 0)
    assert isinstance(parsed, tuple) and parsed_nbytes(parsed) == 40 * 30 * 3
    clip = processor.parse_input({"video": str(video)}, 0)
    assert parsed_nbytes(clip) == sum(frame.nbytes for frame in clip[0].video) > 0
    cache = ParsedInputCache(max_bytes=40 * 30 * 3)
    cache.parse(processor, {"image": str(tmp_path / "x.png")}, 0)
    assert cache.nbytes(processor) == 40 * 30 * 3
    cache.parse(processor, {"video": str(video)}, 0)   # larger than the whole budget: returned uncached
    assert cache.nbytes(processor) == 40 * 30 * 3 and len(cache._stores[processor]) == 1
