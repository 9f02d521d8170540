"""ConanModel.forward with a custom 4-D attention mask (B, 1, L, L) plus its 2-D `padding_mask`.

A 4-D mask equal to causal + padding must reproduce the 2-D path: the same M-RoPE position ids (exactly: both come
from `get_rope_index` on the same padding), and the same hidden states at real positions and embeddings within 1e-5
(fp32 CPU, as the batched-vs-single tests in test_model_package.py: the 2-D path lets SDPA run its causal kernel
where a row has no padding, the 4-D path always applies the explicit mask, so the summation order can differ).
Padding query rows attend to themselves only, as in CoMa's mask, so no softmax row is empty.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

RNG = np.random.default_rng(0)
IMAGE = Image.fromarray(RNG.integers(0, 255, (40, 60, 3), dtype=np.uint8))
VIDEO = RNG.integers(0, 255, (5, 30, 40, 3), dtype=np.uint8)
AUDIO = {"array": (RNG.standard_normal(8000 * 3) * 0.1).astype(np.float32), "sampling_rate": 8000}
MIXED = ["a cat on a mat", IMAGE, {"video": VIDEO}, {"audio": AUDIO}, {"text": "what is in the picture?",
                                                                        "image": IMAGE}]


def causal_padding_mask(padding: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, 1, L, L): causal over real keys; a padding query sees itself only. Bool, or additive in `dtype`."""
    length = padding.shape[1]
    real = padding.bool()
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & real[:, None, :]
    allowed = torch.where(~real[:, :, None], torch.eye(length, dtype=torch.bool)[None], allowed)[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _run(model, batch, **masks):
    """(output, position_ids the language model received)."""
    seen = {}

    def hook(module, args, kwargs):
        seen["position_ids"] = kwargs["position_ids"].clone()

    handle = model.backbone.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            inputs = {k: v for k, v in batch.items() if k != "attention_mask"}
            return model(**inputs, **masks), seen["position_ids"]
    finally:
        handle.remove()


def assert_4d_mask_matches_2d(model, processor, padding_side: str, form: str, inputs: list = MIXED):
    """A causal + padding 4-D mask (bool or additive) gives the 2-D path's M-RoPE positions (exactly), embeddings
    and real-position hidden states (1e-5), on a padded batch of `inputs`."""
    batch = processor.prepare(inputs, padding_side=padding_side)
    padding = batch["attention_mask"]
    assert (padding == 0).any()  # the batch is padded, so the padding part of the mask is exercised
    plain, plain_positions = _run(model, batch, attention_mask=padding)
    dtype = None if form == "bool" else torch.float32
    custom, custom_positions = _run(model, batch, attention_mask=causal_padding_mask(padding, dtype),
                                    padding_mask=padding)
    assert plain_positions.shape[0] == 3  # M-RoPE (temporal, height, width)
    assert torch.equal(custom_positions, plain_positions)
    torch.testing.assert_close(custom.embeddings, plain.embeddings, atol=1e-5, rtol=0)
    real = padding.bool()
    torch.testing.assert_close(custom.last_hidden_state[real], plain.last_hidden_state[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("form", ["bool", "additive"])
def test_causal_padding_4d_mask_gives_the_2d_embeddings(tiny_model_and_processor, padding_side, form):
    model, processor = tiny_model_and_processor
    assert model.backbone.language_model.config._attn_implementation == "sdpa"
    assert_4d_mask_matches_2d(model, processor, padding_side, form)


def test_compression_mean_pooling_reads_the_padding_mask(tiny_compression_model_and_processor):
    model, processor = tiny_compression_model_and_processor
    assert_4d_mask_matches_2d(model, processor, "left", "bool")


def test_eager_attention_gets_the_bool_mask_in_additive_form(tiny_repo):
    """Eager attention adds the mask to the scores: a bool mask passed as-is would add 1 where allowed and block
    nothing, so this fails unless ConanModel converts it."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(tiny_repo, trust_remote_code=True, attn_implementation="eager").eval()
    assert model.backbone.language_model.config._attn_implementation == "eager"
    assert_4d_mask_matches_2d(model, AutoProcessor.from_pretrained(tiny_repo, trust_remote_code=True), "right", "bool")


def test_the_4d_mask_reaches_every_layer(tiny_model_and_processor):
    """Blocking one more key (a real token the causal mask allows) changes the later tokens' states: the mask is
    used, not rebuilt from the padding."""
    model, processor = tiny_model_and_processor
    batch = processor.prepare(["a cat on a mat"])
    padding = batch["attention_mask"]
    mask = causal_padding_mask(padding)
    base, _ = _run(model, batch, attention_mask=mask, padding_mask=padding)
    blocked = mask.clone()
    blocked[0, 0, 3:, 1] = False
    changed, _ = _run(model, batch, attention_mask=blocked, padding_mask=padding)
    torch.testing.assert_close(changed.last_hidden_state[0, :3], base.last_hidden_state[0, :3], atol=1e-6, rtol=0)
    assert not torch.allclose(changed.last_hidden_state[0, 3:], base.last_hidden_state[0, 3:], atol=1e-4)


def test_bad_masks_raise_naming_the_shape(tiny_model_and_processor, monkeypatch):
    model, processor = tiny_model_and_processor
    batch = processor.prepare(["a cat", "a cat on a mat"])
    ids, padding = batch["input_ids"], batch["attention_mask"]
    b, n = ids.shape
    good = causal_padding_mask(padding)
    cases = [
        ({"attention_mask": good[:, 0]}, rf"attention_mask \({b}, {n}, {n}\) must be"),
        ({"attention_mask": good[:, :, :-1, :-1], "padding_mask": padding}, rf"\({b}, 1, {n - 1}, {n - 1}\) must be"),
        ({"attention_mask": good.expand(b, 2, n, n), "padding_mask": padding}, rf"\({b}, 2, {n}, {n}\) must be"),
        ({"attention_mask": good.long(), "padding_mask": padding}, "bool .* or float"),
        ({"attention_mask": good}, "needs padding_mask .* got None"),
        ({"attention_mask": good, "padding_mask": padding[:, 1:]}, rf"got \({b}, {n - 1}\)"),
        ({"attention_mask": padding, "padding_mask": padding}, "padding_mask is only used with a 4-D"),
        ({"attention_mask": padding[:, 1:]}, rf"attention_mask \({b}, {n - 1}\) must be \(batch, seq\)"),
    ]
    for masks, match in cases:
        with pytest.raises(ValueError, match=match):
            model(input_ids=ids, **masks)
    config = model.backbone.language_model.config
    monkeypatch.setitem(config.__dict__, "_attn_implementation_internal", "flash_attention_2")
    assert config._attn_implementation == "flash_attention_2"
    with pytest.raises(ValueError, match="needs eager or sdpa attention.*'flash_attention_2'"):
        model(input_ids=ids, attention_mask=good, padding_mask=padding)
