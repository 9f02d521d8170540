"""CoMa's compression-aware attention mask, answer-only labels and compression-token mean pooling."""

from __future__ import annotations

import pytest
import torch

from training.contrastive.compression import (
    ANSWER, COMPRESSION, IGNORE_INDEX, INPUT, QUESTION, answer_labels, compression_attention_mask, compression_mean,
)

I, C, Q, A = INPUT, COMPRESSION, QUESTION, ANSWER
# row 0: 3 input, 2 compression, 1 question, 2 answer (no padding)
# row 1: left padding (2), then 2 input, 2 compression, 1 question, 1 answer
SEG = torch.tensor([[I, I, I, C, C, Q, A, A],
                    [I, I, I, I, C, C, Q, A]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1],
                     [0, 0, 1, 1, 1, 1, 1, 1]])


def test_answer_and_question_cannot_attend_to_input_compression_tokens_can():
    m = compression_attention_mask(SEG, MASK)
    assert m.shape == (2, 1, 8, 8) and m.dtype == torch.bool
    m = m[:, 0]
    for b in range(2):
        for i in range(8):
            for j in range(8):
                real_i, real_j = bool(MASK[b, i]), bool(MASK[b, j])
                if not real_i:
                    assert m[b, i, j] == (i == j)  # a padding row sees itself only
                    continue
                expected = j <= i and real_j and not (SEG[b, i] >= Q and SEG[b, j] == I)
                assert m[b, i, j] == expected, (b, i, j)
    # spelled out for row 0: answer token 6 sees C (3, 4), Q (5) and itself, never the input (0..2)
    assert m[0, 6].tolist() == [False, False, False, True, True, True, True, False]
    # compression token 4 sees the whole input and the compression tokens before it
    assert m[0, 4].tolist() == [True, True, True, True, True, False, False, False]
    # row 1: padding keys are never attended; the input tokens are causal among the real ones
    assert m[1, 3].tolist() == [False, False, True, True, False, False, False, False]
    assert not m[1, :, :2][MASK[1].bool()].any()


def test_additive_form_and_an_attention_step_ignores_the_input():
    additive = compression_attention_mask(SEG, MASK, dtype=torch.float32)
    assert additive.dtype == torch.float32
    assert ((additive == 0) == compression_attention_mask(SEG, MASK)).all()
    assert (additive[additive != 0] == torch.finfo(torch.float32).min).all()
    # through SDPA: changing the input tokens' values changes neither the question nor the answer outputs
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 1, 8, 4) for _ in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=additive)
    v2, k2 = v.clone(), k.clone()
    v2[0, :, :3] += 5.0
    k2[0, :, :3] -= 3.0
    out2 = torch.nn.functional.scaled_dot_product_attention(q, k2, v2, attn_mask=additive)
    assert torch.allclose(out[0, 0, 5:], out2[0, 0, 5:])  # question + answers
    assert not torch.allclose(out[0, 0, 3:5], out2[0, 0, 3:5])  # the compression tokens read the input
    assert torch.isfinite(out).all()


def test_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="out of order"):
        compression_attention_mask(torch.tensor([[I, C, I, Q, A]]))
    with pytest.raises(ValueError, match="segment_ids must be in"):
        compression_attention_mask(torch.tensor([[I, 7]]))
    with pytest.raises(ValueError, match="must match"):
        compression_attention_mask(SEG, MASK[:, :4])
    # padding in between segments does not count as out of order
    compression_attention_mask(torch.tensor([[I, I, I, C, Q, A]]), torch.tensor([[1, 0, 1, 1, 1, 1]]))


def test_answer_labels_keep_answer_tokens_only():
    ids = torch.arange(16).reshape(2, 8)
    labels = answer_labels(ids, SEG, MASK)
    assert labels[0].tolist() == [IGNORE_INDEX] * 6 + [6, 7]
    assert labels[1].tolist() == [IGNORE_INDEX] * 7 + [15]


def test_compression_mean_pools_real_compression_positions_only():
    hidden = torch.arange(2 * 8 * 2, dtype=torch.float32).reshape(2, 8, 2)
    pooled = compression_mean(hidden, SEG, MASK)
    assert pooled.shape == (2, 2)
    assert torch.allclose(pooled[0], (hidden[0, 3] + hidden[0, 4]) / 2)
    assert torch.allclose(pooled[1], (hidden[1, 4] + hidden[1, 5]) / 2)
    # a padded compression position is left out
    mask = MASK.clone()
    mask[0, 4] = 0
    assert torch.allclose(compression_mean(hidden, SEG, mask)[0], hidden[0, 3])
    assert compression_mean(hidden.to(torch.bfloat16), SEG, MASK).dtype == torch.bfloat16
    no_compression = SEG.clone()
    no_compression[0] = torch.where(SEG[0] == C, Q, SEG[0])
    with pytest.raises(ValueError, match=r"rows \[0\] have no compression token"):
        compression_mean(hidden, no_compression, MASK)
    with pytest.raises(ValueError, match="must be \\(batch, length, hidden\\)"):
        compression_mean(hidden[:, :4], SEG, MASK)
