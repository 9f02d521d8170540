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


GLOBAL_BATCH = 4


def omni_step_grads(out: str | None = None) -> dict:
    """Loss parts and parameter gradients of three steps (one per pair / hard-negative kind) of a tiny linear encoder
    on this rank's share of a fixed global batch; under torch.distributed the gradients are averaged over ranks the
    way DDP does. Rank 0 saves them to `out`."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    encoder = torch.nn.Linear(6, 4)
    feats = torch.randn(6, GLOBAL_BATCH, 6)  # text, video, audio, fused, augmented, hard-negative inputs
    share = GLOBAL_BATCH // world
    text, video, audio, fused, aug, hard = (f[rank * share:(rank + 1) * share] for f in feats)

    def embed(x):
        return F.normalize(encoder(x), dim=-1)

    result = {"parts": [], "grads": []}
    for step in range(3):
        encoder.zero_grad()
        with torch.no_grad():
            hard_negatives = embed(hard)
        loss = omni_retriever_loss({"text": embed(text), "video": embed(video), "audio": embed(audio)}, step,
                                   embed(fused), embed(aug), hard_negatives, temperature=0.1)
        loss.loss.backward()
        grads = []
        for p in encoder.parameters():
            g = p.grad.clone()
            if distributed:
                dist.all_reduce(g)
                g /= world
            grads.append(g)
        result["parts"].append({k: v.clone() for k, v in loss.parts.items()})
        result["grads"].append(grads)
    if out is not None and rank == 0:
        torch.save(result, out)
    return result


def test_two_gloo_processes_match_one_process(tmp_path):
    """Positives gathered across ranks (and the no-grad hard negatives with them): 2 processes on halves of the batch
    give the 1-process loss parts and gradients, for all three steps of the cycle."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    two = tmp_path / "two.pt"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", __file__, str(two)],
        check=True, env=env, timeout=300,
    )
    one, b = omni_step_grads(), torch.load(two)
    for step in range(3):
        assert one["parts"][step].keys() == b["parts"][step].keys() == {"tuple_nce", "teacher", "pair", "total"}
        for name, value in one["parts"][step].items():
            assert torch.allclose(b["parts"][step][name], value, atol=1e-5), (step, name)
        for g1, g2 in zip(one["grads"][step], b["grads"][step]):
            assert g1.abs().max() > 0
            assert torch.allclose(g2, g1, atol=1e-6, rtol=1e-4), step


if __name__ == "__main__":
    import sys

    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        omni_step_grads(sys.argv[1])
    finally:
        dist.destroy_process_group()
