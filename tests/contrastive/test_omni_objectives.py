"""OmniRetriever objectives: each term against explicit log-softmax arithmetic, stop-gradient, the cycles by step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.contrastive.omni_objectives import (
    BASELINE_WEIGHTS, OmniWeights, derangement, fusion_teacher_loss, hard_negative_modality, hard_negative_tuples,
    modality_pair, omni_retriever_loss, symmetric_info_nce, tuple_info_nce,
)

TAU = 0.5  # large enough that the hand-computed values are not dominated by one logit


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def ce_rows(rows: list[list[float]]) -> float:
    """Mean over rows of -log softmax(row)[i], label = the row index: written out with exp/log, no torch loss."""
    total = 0.0
    for i, row in enumerate(rows):
        total += -(row[i] - math.log(sum(math.exp(v) for v in row)))
    return total / len(rows)


def dots(x: torch.Tensor, y: torch.Tensor) -> list[list[float]]:
    return [[float(sum(a * b for a, b in zip(xi.tolist(), yj.tolist()))) / TAU for yj in y] for xi in x]


def sym(a, b) -> float:
    return 0.5 * (ce_rows(dots(a, b)) + ce_rows(dots(b, a)))


A = unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0])
B = unit([0.8, 0.0, 0.6], [0.0, 0.6, 0.8], [0.5, 0.5, 0.7])
C = unit([0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.2, 0.9, 0.3])


def test_symmetric_info_nce_matches_hand_computation():
    out = symmetric_info_nce(A, B, temperature=TAU)
    assert out.value.item() == pytest.approx(sym(A, B), rel=1e-5)
    assert out.value.item() != pytest.approx(ce_rows(dots(A, B)), rel=1e-3)  # both directions count


def test_tuple_info_nce_appends_hard_negatives_and_detaches_them():
    fused, aug = A.clone().requires_grad_(), B.clone()
    hard = C.clone().requires_grad_()
    out = tuple_info_nce(fused, aug, hard, temperature=TAU)
    rows = [d_pos + d_neg for d_pos, d_neg in zip(dots(A, B), dots(A, C))]  # [fused.aug^T | fused.hard^T] / tau
    assert out.value.item() == pytest.approx(ce_rows(rows), rel=1e-5)
    assert out.num_candidates == 6
    out.loss.backward()
    assert fused.grad is not None and fused.grad.abs().sum() > 0
    assert hard.grad is None  # the hard negatives are no-grad
    with pytest.raises(ValueError, match="one hard negative per tuple"):
        tuple_info_nce(A, B, C[:2], temperature=TAU)


def test_fusion_teacher_matches_hand_computation_and_stops_gradient_into_teacher():
    fused = A.clone().requires_grad_()
    z_a, z_b = B.clone().requires_grad_(), C.clone().requires_grad_()
    loss, value = fusion_teacher_loss(fused, z_a, z_b, temperature=TAU)
    assert value.item() == pytest.approx(0.5 * (sym(A, B) + sym(A, C)), rel=1e-5)
    loss.backward()
    assert fused.grad is None  # sg(z_TVA): the teacher receives nothing
    assert z_a.grad.abs().sum() > 0 and z_b.grad.abs().sum() > 0
    # a missing modality falls back to the detached anchor
    _, fallback = fusion_teacher_loss(A, B, None, temperature=TAU)
    assert fallback.item() == pytest.approx(0.5 * (sym(A, B) + sym(A, A)), rel=1e-5)


def test_pair_rotation_and_hard_negative_cycle_by_step():
    assert [modality_pair(s) for s in range(6)] == [("text", "audio"), ("text", "video"), ("audio", "video")] * 2
    assert [hard_negative_modality(s) for s in range(6)] == ["text", "audio", "video"] * 2
    with pytest.raises(ValueError, match="step"):
        modality_pair(-1)


def test_hard_negative_tuples_replace_one_modality_by_another_rows():
    batch = [{"text": f"t{i}", "video": f"v{i}", "audio": f"a{i}", "id": i} for i in range(5)]
    for step, modality in zip(range(3), ["text", "audio", "video"]):
        neg = hard_negative_tuples(batch, step, seed=7)
        assert neg.modality == modality
        assert sorted(neg.source) == list(range(5)) and all(j != i for i, j in enumerate(neg.source))
        for i, (orig, new) in enumerate(zip(batch, neg.tuples)):
            assert new[modality] == batch[neg.source[i]][modality] != orig[modality]
            assert all(new[m] == orig[m] for m in ("text", "video", "audio", "id") if m != modality)
        assert neg == hard_negative_tuples(batch, step, seed=7)  # pure: a resumed run redraws the same negatives
    assert batch[0] == {"text": "t0", "video": "v0", "audio": "a0", "id": 0}  # input untouched
    draws = {tuple(derangement(6, seed=0, step=s)) for s in range(20)}
    assert len(draws) > 1  # the permutation changes with the step
    with pytest.raises(ValueError, match="at least 2"):
        hard_negative_tuples(batch[:1], 0)
    with pytest.raises(ValueError, match=r"batch\[1\] lacks \['audio'\]"):
        hard_negative_tuples([batch[0], {"text": "x", "video": "y"}], 0)


def test_combined_loss_is_the_weighted_sum_on_the_steps_pair():
    emb = {"text": A, "video": B, "audio": C}
    aug, hard = unit([0.9, 0.1, 0.0], [0.1, 0.9, 0.1], [0.5, 0.9, 0.1]), unit([0.0, 1.0, 1.0], [1.0, 0.0, 1.0],
                                                                               [1.0, 1.0, 1.0])
    fused = unit([1.0, 0.2, 0.1], [0.1, 1.0, 0.2], [0.4, 0.8, 0.4])
    weights = OmniWeights(tuple_nce=1.0, teacher=0.5, pair=2.0)
    step = 4  # pair (text, video)
    out = omni_retriever_loss(emb, step, fused, aug, hard, weights=weights, temperature=TAU)
    obj1 = ce_rows([p + n for p, n in zip(dots(fused, aug), dots(fused, hard))])
    obj2 = 0.5 * (sym(fused, A) + sym(fused, B))
    obj3 = sym(A, B)
    assert out.pair == ("text", "video")
    assert out.parts["tuple_nce"].item() == pytest.approx(obj1, rel=1e-5)
    assert out.parts["teacher"].item() == pytest.approx(obj2, rel=1e-5)
    assert out.parts["pair"].item() == pytest.approx(obj3, rel=1e-5)
    assert out.loss.item() == pytest.approx(obj1 + 0.5 * obj2 + 2.0 * obj3, rel=1e-5)
    assert out.parts["total"].item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_baseline_is_pairwise_info_nce_and_needs_no_fused_embedding():
    emb = {"text": A, "video": B, "audio": C}
    out = omni_retriever_loss(emb, step=2, weights=BASELINE_WEIGHTS, temperature=TAU)  # pair (audio, video)
    assert set(out.parts) == {"pair", "total"}
    assert out.loss.item() == pytest.approx(sym(C, B), rel=1e-5)
    with pytest.raises(ValueError, match="needs fused, augmented and hard_negatives"):
        omni_retriever_loss(emb, step=0, temperature=TAU)
    with pytest.raises(ValueError, match="embeddings\\['audio'\\]"):
        omni_retriever_loss({"text": A}, step=0, weights=BASELINE_WEIGHTS)
    with pytest.raises(ValueError, match="at least one > 0"):
        OmniWeights(0, 0, 0)
    with pytest.raises(ValueError, match="unknown modalities"):
        omni_retriever_loss({"image": A}, step=0, weights=BASELINE_WEIGHTS)


# Across processes (positives gathered, hard negatives local): tests/contrastive/test_omni_distributed.py.
