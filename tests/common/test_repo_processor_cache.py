"""`training.common.repo.load_processor`: one parse per distinct set of processor files, callers kept apart."""

from __future__ import annotations

import shutil

from training.common import hub_code
from training.common.repo import PROCESSOR_FILES, load_processor


def test_same_files_parse_once_and_callers_keep_their_own_settings(tiny_repo, tmp_path):
    copy_dir = tmp_path / "copy"
    shutil.copytree(tiny_repo, copy_dir)  # another folder, the same bytes: the same cache entry
    first, second = load_processor(tiny_repo), load_processor(copy_dir)
    assert first.tokenizer.backend_tokenizer is second.tokenizer.backend_tokenizer
    assert first is not second and first.tokenizer is not second.tokenizer

    first.tokenizer.padding_side = "left" if second.tokenizer.padding_side == "right" else "right"
    first.default_instruction = "changed by one caller"
    assert first.tokenizer.padding_side != second.tokenizer.padding_side
    assert load_processor(tiny_repo).default_instruction != "changed by one caller"


def test_the_cached_processor_encodes_as_a_fresh_load(tiny_repo):
    fresh = hub_code.ConanProcessor.from_pretrained(tiny_repo)
    cached = load_processor(tiny_repo)
    texts = ["a red bicycle", "two words and a longer third text"]
    for a, b in zip(fresh(text=texts, padding=True).values(), cached(text=texts, padding=True).values()):
        assert a.tolist() == b.tolist()


def test_other_processor_files_get_their_own_load(tiny_repo, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_repo, other)
    config = other / "processor_config.json"
    assert config.name in PROCESSOR_FILES
    config.write_text(config.read_text().replace('"max_length"', '"max_length" ', 1))  # new bytes, same settings
    assert load_processor(other).tokenizer.backend_tokenizer is not load_processor(tiny_repo).tokenizer.backend_tokenizer


def test_special_tokens_and_sub_processors_stay_the_callers(tiny_repo):
    """Only the Rust tokenizer backend is shared: a caller's pad token, image-processor bounds or in-place list edits
    reach neither another caller's processor nor later loads."""
    first, second = load_processor(tiny_repo), load_processor(tiny_repo)
    pad, mean = second.tokenizer.pad_token, list(second.image_processor.image_mean)
    first.tokenizer.pad_token = "<|im_end|>" if pad != "<|im_end|>" else "<|endoftext|>"
    first.image_processor.image_mean = [0.0, 0.0, 0.0]
    first.feature_extractor.sampling_rate = 8000
    first.tokenizer.init_kwargs["changed_by_one_caller"] = True
    for other in (second, load_processor(tiny_repo)):
        assert other.tokenizer.pad_token == pad
        assert list(other.image_processor.image_mean) == mean
        assert other.feature_extractor.sampling_rate == 16000
        assert "changed_by_one_caller" not in other.tokenizer.init_kwargs
    assert first.tokenizer.backend_tokenizer is second.tokenizer.backend_tokenizer
