"""build_base writes the chat layout the root processor defines (`processing_conan.build_chat_template`), once."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from training.common import hub_code


def test_saved_chat_template_is_the_processors_and_renders_its_layout(tiny_repo):
    processing = hub_code.load("processing_conan")
    processor = hub_code.ConanProcessor.from_pretrained(tiny_repo)
    assert processor.audio_start_token == "<|audio_start|>" and processor.audio_token == "<|AUDIO|>"
    expected = processing.build_chat_template(processor.audio_token, processor.audio_start_token,
                                              processor.audio_end_token)
    assert processor.chat_template == expected
    saved = [p for p in tiny_repo.iterdir() if "chat_template" in p.name]
    assert saved, "the repo carries its chat template"
    assert any(expected in p.read_text() or expected == p.read_text() for p in saved)

    # The Jinja form and the Python form (`render`, what the model is fed) give the same text.
    raw = {"text": "a cat", "image": Image.new("RGB", (32, 32)),
           "audio": {"array": np.zeros(1600, dtype=np.float32), "sampling_rate": 16000}}
    parsed, _ = processor.parse_input(raw, 0)
    messages = [{"role": "system", "content": "Find it."},
                {"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "a cat"}]}]
    jinja = processor.tokenizer.apply_chat_template(messages, chat_template=processor.chat_template, tokenize=False,
                                                    add_generation_prompt=True)
    assert jinja == processor.render(parsed, "Find it.")


def test_compression_base_has_the_k_tokens_config_and_initialised_rows(tiny_compression_repo, tiny_repo):
    import json

    import torch
    from transformers import AutoTokenizer

    from tests.conftest import COMPRESSION_K
    from training.base.build_base import COMPRESSION_INIT_NOISE, compression_token_names

    names = compression_token_names(COMPRESSION_K)
    assert names[0] == "<|ctoken_pad_0|>" and names[-1] == f"<|ctoken_pad_{COMPRESSION_K - 1}|>"
    tokenizer = AutoTokenizer.from_pretrained(tiny_compression_repo)
    ids = tokenizer.convert_tokens_to_ids(names)
    config = json.loads((tiny_compression_repo / "config.json").read_text())
    assert config["embedding_pooling"] == "compression_mean"
    assert config["compression_token_ids"] == ids and config["num_compression_tokens"] == COMPRESSION_K
    assert json.loads((tiny_compression_repo / "processor_config.json").read_text())["compression_tokens"] == names
    assert tokenizer.tokenize("".join(names)) == names  # special tokens: kept whole
    # the tokens come after the plain tiny repo's vocabulary, whose own ids are unchanged
    plain = AutoTokenizer.from_pretrained(tiny_repo)
    assert min(ids) == len(plain) and plain.get_vocab().items() <= tokenizer.get_vocab().items()
    # rows: the mean of the other real rows + noise of COMPRESSION_INIT_NOISE x their std, distinct per token
    model = hub_code.ConanModel.from_pretrained(tiny_compression_repo)
    table = model.get_input_embeddings().weight.detach()
    others = table[: len(tokenizer)][~torch.isin(torch.arange(len(tokenizer)), torch.tensor(ids))]
    deviation = (table[ids] - others.mean(0)) / others.std(0)
    assert deviation.abs().max() < 6 * COMPRESSION_INIT_NOISE
    assert deviation.std() > COMPRESSION_INIT_NOISE / 2
    assert torch.cdist(table[ids], table[ids]).fill_diagonal_(1.0).min() > 0


def test_compression_tokens_argument_is_checked(tmp_path):
    from training.base.build_base import add_compression_tokens, assemble_base, build_tiny_tokenizer

    with pytest.raises(ValueError, match="compression_tokens must be an int >= 0"):
        assemble_base("unused", "unused", tmp_path / "out", compression_tokens=-1)
    tokenizer = build_tiny_tokenizer()
    first = add_compression_tokens(tokenizer, 3)
    assert add_compression_tokens(tokenizer, 3) == first  # present tokens keep their ids
    with pytest.raises(ValueError, match="int >= 1"):
        add_compression_tokens(tokenizer, 0)


def test_extend_repo_with_compression_tokens_makes_a_compression_mean_repo(tiny_repo, tmp_path):
    """extend_repo_with_compression_tokens (bench/coma.py --add-compression-tokens): a base without tokens becomes a
    compression_mean repo whose processor appends them (the table grows when the tokenizer outgrows it)."""
    import json
    from pathlib import Path

    import torch

    from training.base.build_base import extend_repo_with_compression_tokens
    from training.common.repo import load_conan

    vocab = json.loads((Path(tiny_repo) / "config.json").read_text())["backbone_config"]["text_config"]["vocab_size"]
    out = extend_repo_with_compression_tokens(tiny_repo, tmp_path / "ext", 64)  # the tiny table has 60 spare rows
    model, processor = load_conan(out, dtype="float32")
    ids = model.config.compression_token_ids
    assert model.config.embedding_pooling == "compression_mean" and len(ids) == 64
    assert processor.compression_token_ids == ids
    assert model.get_input_embeddings().num_embeddings == max(ids) + 1 > vocab  # grown
    inputs = processor.prepare(["hello world"])
    assert inputs["input_ids"][0, -len(ids):].tolist() == ids
    assert torch.isfinite(model(**inputs).embeddings).all()
