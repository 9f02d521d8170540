"""Metric code against hand-computed values (ties, empty candidate lists)."""

import math

import numpy as np
import pytest

from training.evaluation.metrics import (candidate_list_ranks, gold_rank, hit_at_k, ndcg_at_k, ndcg_at_k_single,
                                         rank_metrics)


def test_gold_rank_plain_and_ties():
    assert gold_rank([0.9, 0.1, 0.5]) == 1.0
    assert gold_rank([0.4, 0.9, 0.5]) == 3.0
    # gold tied with one other, one strictly better
    s = [0.5, 0.5, 0.7, 0.1]
    assert gold_rank(s, ties="pessimistic") == 3.0
    assert gold_rank(s, ties="optimistic") == 2.0
    assert gold_rank(s, ties="average") == 2.5
    # constant embedder: every score equal -> pessimistic puts gold last, official argmax puts it first
    assert gold_rank([0.3] * 4) == 4.0
    assert gold_rank([0.3] * 4, ties="optimistic") == 1.0
    assert gold_rank([0.2, 0.9], gold=1) == 1.0


def test_rejects_bad_candidate_lists():
    with pytest.raises(ValueError, match="candidate list is empty"):
        gold_rank([])
    with pytest.raises(ValueError, match="outside the candidate list"):
        gold_rank([0.1, 0.2], gold=2)
    with pytest.raises(ValueError, match="NaN"):
        gold_rank([float("nan"), 0.1])
    with pytest.raises(ValueError, match="ties must be"):
        gold_rank([0.1], ties="random")
    with pytest.raises(ValueError, match="empty or malformed"):
        candidate_list_ranks(np.ones((1, 2)), [np.zeros((0, 2))])
    with pytest.raises(ValueError, match="no queries"):
        rank_metrics([])


def test_hit_and_ndcg_single():
    assert hit_at_k(1, 1) == 1.0 and hit_at_k(2, 1) == 0.0 and hit_at_k(5, 5) == 1.0
    assert ndcg_at_k_single(1, 5) == 1.0
    assert ndcg_at_k_single(3, 5) == pytest.approx(0.5)  # 1/log2(4)
    assert ndcg_at_k_single(6, 5) == 0.0


def test_rank_metrics_hand_values():
    m = rank_metrics([1, 2, 6], ks=(1, 5))
    assert m["hit@1"] == pytest.approx(1 / 3)
    assert m["hit@5"] == pytest.approx(2 / 3)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 0) / 3)
    assert m["mrr"] == pytest.approx((1 + 0.5 + 1 / 6) / 3)


def test_graded_ndcg_with_ties():
    # two relevant docs (idx 0 and 2); doc 1 irrelevant ties with doc 0
    scores, rel = [0.5, 0.5, 0.9], [1, 0, 1]
    ideal = 1 + 1 / math.log2(3)
    # pessimistic order: doc2, doc1, doc0 -> 1 + 1/log2(4)
    assert ndcg_at_k(scores, rel, 5) == pytest.approx((1 + 0.5) / ideal)
    assert ndcg_at_k(scores, rel, 5, ties="optimistic") == pytest.approx(1.0)
    assert ndcg_at_k([0.1, 0.2], [0, 0], 5) == 0.0
    with pytest.raises(ValueError, match="does not match"):
        ndcg_at_k([0.1, 0.2], [1], 5)


def test_candidate_list_ranks_dot_product():
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    cands = [np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])]
    # query 2: gold (index 0) scores 0, others 0.8 and 1.0 -> rank 3
    assert candidate_list_ranks(q, cands) == [1.0, 3.0]


def test_gold_ranks_and_retrieval_scores_count_ties_against_the_query():
    from training.evaluation.metrics import gold_ranks, retrieval_scores

    scores = np.array([[0.5, 0.5, 0.1], [0.9, 0.2, 0.3], [0.2, 0.2, 0.2]])
    assert gold_ranks(scores, [0, 0, 2]).tolist() == [2.0, 1.0, 3.0]
    assert [gold_rank(row, g) for row, g in zip(scores, [0, 0, 2])] == [2.0, 1.0, 3.0]
    same = np.ones((4, 3)) / np.sqrt(3)  # a collapsed model: every query ties with every bank row
    out = retrieval_scores(same, same, [0, 1, 2, 3])
    assert out["r@1"] == 0.0 and out["r@5"] == 1.0 and out["mrr"] == pytest.approx(0.25) and out["n"] == 4
    eye = np.eye(3)
    assert retrieval_scores(eye, eye, [0, 1, 2])["r@1"] == 1.0
    with pytest.raises(ValueError, match="gold indices"):
        gold_ranks(scores, [0, 3, 0])
