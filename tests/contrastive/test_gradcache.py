"""InfoNCE (masking, hard negatives, symmetric) and GradCache == full-batch gradient, with LoRA dropout."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from training.contrastive.data import ContrastiveCollator, load_jsonl
from training.contrastive.trainer import LossSettings, apply_lora, loss_for
from training.contrastive.gradcache import cached_step, plain_step
from training.contrastive.loss import info_nce


def test_info_nce_matches_manual_and_masks_duplicates():
    torch.manual_seed(0)
    q, t, h = (F.normalize(torch.randn(n, 8), dim=-1) for n in (4, 4, 3))
    out = info_nce(q, t, h, temperature=0.1)
    logits = torch.cat([q @ t.T, q @ h.T], 1) / 0.1
    assert torch.allclose(out.value, F.cross_entropy(logits, torch.arange(4)))
    assert out.num_candidates == 7
    keys = torch.tensor([5, 6, 5, 7])  # rows 0 and 2 share a positive -> each is not the other's negative
    neg_keys = torch.tensor([6, 1, 2])  # negative 0 equals row 1's positive -> masked for row 1 only
    masked = info_nce(q, t, h, positive_keys=keys, negative_keys=neg_keys, temperature=0.1)
    expect = logits.clone()
    expect[0, 2] = expect[2, 0] = expect[1, 4] = torch.finfo(expect.dtype).min
    assert torch.allclose(masked.value, F.cross_entropy(expect, torch.arange(4)))
    assert not torch.allclose(masked.value, out.value)
    sym = info_nce(q, t, temperature=0.1, symmetric=True)
    s = q @ t.T / 0.1
    assert torch.allclose(sym.value, 0.5 * (F.cross_entropy(s, torch.arange(4)) + F.cross_entropy(s.T, torch.arange(4))))
    # symmetric with a repeated positive (rows 0 and 2: one class name): target 0 must not rank query 2 as a negative
    sym_keys = info_nce(q, t, positive_keys=keys, temperature=0.1, symmetric=True)
    forward, back = s.clone(), s.T.clone()
    forward[0, 2] = forward[2, 0] = back[0, 2] = back[2, 0] = torch.finfo(s.dtype).min
    assert torch.allclose(sym_keys.value, 0.5 * (F.cross_entropy(forward, torch.arange(4))
                                                 + F.cross_entropy(back, torch.arange(4))))
    with pytest.raises(ValueError, match="temperature"):
        info_nce(q, t, temperature=0)


def _lora_model(tiny_repo, dropout: float):
    from training.common import hub_code

    torch.manual_seed(0)
    model = apply_lora(hub_code.ConanModel.from_pretrained(tiny_repo), r=4, alpha=8, dropout=dropout,
                       train_audio_projector=True)
    for name, param in model.named_parameters():  # LoRA B starts at zero: give it values so A gets gradient too
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model.train()


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.fixture(scope="module")
def mixed_batch(tiny_repo, tmp_path_factory):
    """Variable-size images, text and audio in one batch: chunks of packed pixels of different lengths."""
    import numpy as np
    import soundfile as sf
    from PIL import Image
    from transformers import AutoProcessor

    root = tmp_path_factory.mktemp("gc")
    rows = []
    for i in range(6):
        Image.new("RGB", (28 + 14 * i, 56 - 4 * i), (40 * i, 100, 200 - 30 * i)).save(root / f"im{i}.png")
        sf.write(root / f"a{i}.wav", np.sin(np.arange(4000) * (0.05 + 0.02 * i)).astype("float32"), 8000)
        query = {"audio": f"a{i}.wav"} if i % 3 == 0 else ({"image": f"im{i}.png", "text": "what?"} if i % 3 == 1
                                                           else f"text query number {i}")
        rows.append({"query": query, "positive": {"image": f"im{i}.png"} if i % 2 else f"answer {i}",
                     "negatives": [f"wrong answer {i}"], "source": "mix"})
    (root / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_jsonl(root / "t.jsonl")
    processor = AutoProcessor.from_pretrained(tiny_repo, trust_remote_code=True)
    return examples, processor


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcache_gradient_equals_full_batch(tiny_repo, mixed_batch, dropout):
    examples, processor = mixed_batch
    model = _lora_model(tiny_repo, dropout)
    encode = lambda chunk: model(**chunk).embeddings  # noqa: E731
    settings = LossSettings(temperature=0.05, cross_device=False)
    full = ContrastiveCollator(processor, num_negatives=1, chunk_size=0)(examples)
    chunked = ContrastiveCollator(processor, num_negatives=1, chunk_size=2)(examples)

    if dropout == 0.0:
        reference_batch = full  # one forward over the whole batch
    else:
        reference_batch = chunked  # same shapes per forward, so the same dropout masks from the same seed
    torch.manual_seed(1)
    ref = plain_step(encode, reference_batch.query_chunks, reference_batch.target_chunks,
                     loss_for(reference_batch, settings))
    g_ref = _grads(model)
    torch.manual_seed(1)
    out = cached_step(encode, chunked.query_chunks, chunked.target_chunks, loss_for(chunked, settings))
    g_gc = _grads(model)
    assert torch.allclose(out.value, ref.value, atol=1e-5)
    assert g_ref.keys() == g_gc.keys() and any("audio_projector" in k for k in g_gc)
    assert sum("lora_A" in k for k in g_gc) > 0
    for name in g_ref:
        assert torch.allclose(g_gc[name], g_ref[name], atol=1e-5, rtol=1e-4), name
    if dropout:
        # without RNG replay the re-forward draws new dropout masks: the gradient must then be wrong
        torch.manual_seed(1)
        cached_step(encode, chunked.query_chunks, chunked.target_chunks, loss_for(chunked, settings), replay_rng=False)
        g_bad = _grads(model)
        worst = max(float((g_bad[n] - g_ref[n]).abs().max()) for n in g_ref)
        assert worst > 1e-3
