"""embedding_pooling="compression_mean" (CoMa) through the config, the processor, the model and sentence-transformers.

Tolerances: batched vs one-by-one and left vs right padding agree within 1e-5 (fp32 CPU, as the last_token tests
in test_model_package.py: padding changes the matmul shapes, hence the summation order); the model's pooled
embedding equals the hand-computed mean of its own `last_hidden_state` within 1e-6 (same tensors, only the
reduction differs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.conftest import COMPRESSION_K, assert_compression_mean_embeddings

RNG = np.random.default_rng(0)
IMAGE = Image.fromarray(RNG.integers(0, 255, (40, 60, 3), dtype=np.uint8))
VIDEO = RNG.integers(0, 255, (5, 30, 40, 3), dtype=np.uint8)
AUDIO = {"array": (RNG.standard_normal(8000 * 3) * 0.1).astype(np.float32), "sampling_rate": 8000}
INPUTS = {
    "text": "a cat on a mat",
    "image": IMAGE,
    "audio": {"audio": AUDIO},
    "video": {"video": VIDEO},
    "image+text": {"text": "what is in the picture?", "image": IMAGE},
    "video+audio": {"video": VIDEO, "audio": AUDIO},
}
MIXED = list(INPUTS.values())


def _real_rows(batch) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


# ------------------------------------------------------------------------------------------------------ config
def test_config_round_trip_and_fields(tiny_compression_repo):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_compression_repo, trust_remote_code=True)
    assert config.embedding_pooling == "compression_mean"
    assert config.num_compression_tokens == COMPRESSION_K == len(config.compression_token_ids)
    again = type(config).from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert again.compression_token_ids == config.compression_token_ids


@pytest.mark.parametrize("change, message", [
    ({"embedding_pooling": "mean"}, "expected one of"),
    ({"compression_token_ids": None}, "needs compression_token_ids"),
    ({"compression_token_ids": []}, "needs compression_token_ids"),
    ({"compression_token_ids": [5, 5]}, "distinct"),
    ({"compression_token_ids": [10**7]}, "outside the vocabulary"),
    ({"compression_token_ids": [-1]}, "outside the vocabulary"),
    ({"compression_token_ids": ["<|ctoken_pad_0|>"]}, "must be ints"),
    ({"num_compression_tokens": 3}, "num_compression_tokens=3"),
    ({"num_compression_tokens": -1}, ">= 0"),
    ({"embedding_pooling": "last_token"}, "only with embedding_pooling='compression_mean'"),
])
def test_config_rejects_bad_pooling_fields(tiny_compression_repo, change, message):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_compression_repo, trust_remote_code=True)
    with pytest.raises(ValueError, match=message):
        type(config).from_dict({**config.to_dict(), **change})


def test_config_rejects_media_placeholder_ids(tiny_compression_repo):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_compression_repo, trust_remote_code=True)
    with pytest.raises(ValueError, match="media placeholder"):
        type(config).from_dict({**config.to_dict(), "compression_token_ids": [config.audio_token_id]})


def test_last_token_repo_has_no_compression_fields(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    assert model.config.embedding_pooling == "last_token"
    assert model.config.compression_token_ids is None and model.config.num_compression_tokens == 0
    assert processor.compression_tokens is None and processor.compression_token_ids == []


# --------------------------------------------------------------------------------------------------- processor
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_processor_appends_exactly_k_ids_at_the_end(tiny_compression_model_and_processor, padding_side):
    model, processor = tiny_compression_model_and_processor
    ids = model.config.compression_token_ids
    assert processor.compression_token_ids == ids
    batch = processor.prepare(MIXED, padding_side=padding_side)
    for name, row in zip(INPUTS, _real_rows(batch)):
        assert row[-COMPRESSION_K:] == ids, name
        assert sum(t in ids for t in row) == COMPRESSION_K, name
    assert (batch["mm_token_type_ids"][torch.isin(batch["input_ids"], torch.tensor(ids))] == 0).all()


def test_typed_compression_token_text_stays_text(tiny_compression_model_and_processor):
    model, processor = tiny_compression_model_and_processor
    ids = model.config.compression_token_ids
    row = _real_rows(processor.prepare(["<|ctoken_pad_0|><|ctoken_pad_1|> typed by a user"]))[0]
    assert sum(t in ids for t in row) == COMPRESSION_K and row[-COMPRESSION_K:] == ids


@pytest.mark.parametrize("name", ["text", "image+text"])
def test_truncation_cuts_the_text_not_the_compression_tokens(tiny_compression_model_and_processor, name, caplog):
    model, processor = tiny_compression_model_and_processor
    ids = model.config.compression_token_ids
    item = INPUTS[name]
    long = ("many words about cats and dogs " * 40).strip()
    item = {**item, "text": long} if isinstance(item, dict) else long
    full = _real_rows(processor.prepare([item]))[0]
    limit = len(full) - 20
    row = _real_rows(processor.prepare([item], max_length=limit))[0]
    assert len(row) == limit
    assert row[-COMPRESSION_K:] == ids
    assert sum(t in ids for t in row) == COMPRESSION_K
    assert "truncated" in caplog.text


def test_max_length_below_the_fixed_tokens_is_refused(tiny_compression_model_and_processor):
    _, processor = tiny_compression_model_and_processor
    with pytest.raises(ValueError, match="media and template tokens alone"):
        processor.prepare(["a cat"], max_length=COMPRESSION_K + 2)


def test_add_compression_tokens_false_leaves_them_out(tiny_compression_model_and_processor):
    model, processor = tiny_compression_model_and_processor
    ids = model.config.compression_token_ids
    batch = processor.prepare(["a cat on a mat"], add_compression_tokens=False)
    assert not torch.isin(batch["input_ids"], torch.tensor(ids)).any()
    with pytest.raises(ValueError, match="hold none of the compression tokens.*ConanProcessor"), torch.no_grad():
        model(**batch)


def test_processor_rejects_bad_compression_tokens(tiny_compression_repo):
    from transformers import AutoProcessor

    with pytest.raises(ValueError, match="non-empty list"):
        AutoProcessor.from_pretrained(tiny_compression_repo, trust_remote_code=True, compression_tokens="<|x|>")
    with pytest.raises(ValueError, match="no '<|nope|>' token"):
        AutoProcessor.from_pretrained(tiny_compression_repo, trust_remote_code=True, compression_tokens=["<|nope|>"])


# ------------------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_embedding_is_the_mean_over_compression_positions(tiny_compression_model_and_processor, padding_side):
    model, processor = tiny_compression_model_and_processor
    output, batch = assert_compression_mean_embeddings(model, processor, MIXED, padding_side=padding_side)
    # and it is not the last-token embedding (the pooling really changed)
    assert not torch.allclose(output.embeddings, _last_token(output, batch), atol=1e-3)


def _last_token(output, batch) -> torch.Tensor:
    mask = batch["attention_mask"]
    last = mask.shape[1] - 1 - mask.flip(dims=[1]).long().argmax(dim=1)
    return F.normalize(output.last_hidden_state[torch.arange(len(last)), last], dim=-1)


def test_batched_equals_one_by_one_and_padding_sides_agree(tiny_compression_model_and_processor):
    model, processor = tiny_compression_model_and_processor
    with torch.no_grad():
        right = model(**processor.prepare(MIXED, padding_side="right")).embeddings
        left = model(**processor.prepare(MIXED, padding_side="left")).embeddings
        single = torch.cat([model(**processor.prepare([x])).embeddings for x in MIXED])
    torch.testing.assert_close(right, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(left, single, atol=1e-5, rtol=0)


def test_compression_mean_pool_errors_and_training_side_agrees(tiny_compression_model_and_processor):
    from training.common import hub_code
    from training.contrastive.compression import COMPRESSION, INPUT, compression_mean

    modeling = hub_code.load("modeling_conan")
    model, processor = tiny_compression_model_and_processor
    ids = model.config.compression_token_ids
    batch = processor.prepare(MIXED[:3], padding_side="left")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    by_id = modeling.compression_mean_pool(hidden, batch["input_ids"], batch["attention_mask"], ids)
    segments = torch.where(torch.isin(batch["input_ids"], torch.tensor(ids)), COMPRESSION, INPUT)
    by_segment = compression_mean(hidden, segments, batch["attention_mask"])
    torch.testing.assert_close(by_id, by_segment, atol=0, rtol=0)
    with pytest.raises(ValueError, match="must be \\(batch, seq, hidden\\)"):
        modeling.compression_mean_pool(hidden[0], batch["input_ids"], batch["attention_mask"], ids)
    with pytest.raises(ValueError, match="compression_token_ids is empty"):
        modeling.compression_mean_pool(hidden, batch["input_ids"], batch["attention_mask"], [])


# ------------------------------------------------------------------------------------------ sentence-transformers
def test_sentence_transformers_equals_automodel(tiny_compression_repo, tiny_compression_model_and_processor):
    from sentence_transformers import SentenceTransformer

    model, processor = tiny_compression_model_and_processor
    st = SentenceTransformer(str(tiny_compression_repo), trust_remote_code=True, device="cpu")
    inputs = ["a cat on a mat", "a much longer sentence about two dogs in a park", IMAGE, {"audio": AUDIO}]
    encoded = st.encode(inputs, convert_to_tensor=True, batch_size=4)
    with torch.no_grad():
        expected = torch.cat([model(**processor.prepare([x])).embeddings for x in inputs])
    torch.testing.assert_close(encoded.float(), expected, atol=1e-5, rtol=0)
    query = st.encode_query(["a cat"], convert_to_tensor=True)
    with torch.no_grad():
        expected_query = model(**processor.prepare(["a cat"], instruction=st.prompts["query"])).embeddings
    torch.testing.assert_close(query.float(), expected_query, atol=1e-5, rtol=0)


def test_sentence_module_refuses_a_processor_that_disagrees(tiny_compression_model_and_processor,
                                                            tiny_model_and_processor):
    from training.common import hub_code

    model, processor = tiny_compression_model_and_processor
    plain_model, plain_processor = tiny_model_and_processor
    with pytest.raises(ValueError, match="compression_token_ids"):
        hub_code.ConanEmbedder(model, plain_processor)
    with pytest.raises(ValueError, match="last_token"):
        hub_code.ConanEmbedder(plain_model, processor)
    assert hub_code.ConanEmbedder(model, processor).processor is processor
