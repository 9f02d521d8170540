"""Per-source scores and chance levels of the pipeline's stage evaluation (training/evaluation/stage_eval.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.evaluation import stage_eval
from training.evaluation.stage_eval import (candidate_pools, evaluate_model, input_kind, kind_pool_scores,
                                           pooled_scores, score_similarity, source_scores)


def test_source_scores_rank_each_source_within_its_own_candidates():
    # Candidates 0-2: one source's 3 class names (several queries share one); 3-4: another source's names.
    # Query 0 (class source, gold 0) loses to candidate 3 globally but wins within its own 3 names.
    similarity = np.array([
        [0.8, 0.1, 0.2, 0.9, 0.0],   # cifar, gold 0
        [0.1, 0.7, 0.3, 0.0, 0.0],   # cifar, gold 1
        [0.5, 0.2, 0.4, 0.0, 0.0],   # cifar, gold 2 -> rank 2 (0.5 > 0.4)
        [0.0, 0.0, 0.0, 0.6, 0.2],   # emoji, gold 3
        [0.0, 0.0, 0.0, 0.6, 0.6],   # emoji, gold 4, tie -> pessimistic rank 2
    ])
    gold = [0, 1, 2, 3, 4]
    sources = ["cifar", "cifar", "cifar", "emoji", "emoji"]
    tasks = ["image -> text"] * 3 + ["image -> text"] * 2
    whole = score_similarity(similarity, gold)
    assert whole["hit@1"] == pytest.approx(2 / 5) and whole["chance"] == pytest.approx(1 / 5)
    per = source_scores(similarity, gold, sources, tasks)
    assert set(per) == {"cifar", "emoji"}
    assert per["cifar"]["n_candidates"] == 3 and per["cifar"]["chance"] == pytest.approx(1 / 3)
    assert per["cifar"]["hit@1"] == pytest.approx(2 / 3)          # query 0 now a hit, query 2 still rank 2
    assert per["cifar"]["mrr"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert per["emoji"]["n_candidates"] == 2 and per["emoji"]["chance"] == pytest.approx(1 / 2)
    assert per["emoji"]["hit@1"] == pytest.approx(1 / 2) and per["emoji"]["task"] == "image -> text"


def test_source_scores_shared_label_candidates_count_once():
    # 4 queries of one source over 2 class names: chance is 1/2, not 1/4.
    similarity = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.1], [0.6, 0.5]])
    per = source_scores(similarity, [0, 1, 0, 1], ["digits"] * 4)
    assert per["digits"]["n_candidates"] == 2 and per["digits"]["chance"] == pytest.approx(0.5)
    assert per["digits"]["hit@1"] == pytest.approx(3 / 4) and "task" not in per["digits"]


def test_kind_pool_scores_rank_each_query_within_its_gold_kind():
    # The image modality's mix: 2 CIFAR photos -> class names (text columns 0-1) and 2 emoji names -> glyphs (image
    # columns 2-3). Over the whole pool every query loses to a column of its own kind (the modality gap); within its
    # gold's kind, queries 0, 1 and 2 win.
    similarity = np.array([
        [0.3, 0.1, 0.9, 0.8],   # photo, gold text 0: beats text 1, loses to the glyphs
        [0.1, 0.2, 0.9, 0.9],   # photo, gold text 1
        [0.9, 0.9, 0.5, 0.4],   # emoji name, gold image 2
        [0.9, 0.9, 0.5, 0.4],   # emoji name, gold image 3 -> rank 2 within the images
    ])
    gold = [0, 1, 2, 3]
    kinds = ["text", "text", "image", "image"]
    assert score_similarity(similarity, gold)["hit@1"] == 0.0
    pooled = kind_pool_scores(similarity, gold, kinds)
    assert pooled["hit@1"] == pytest.approx(3 / 4) and pooled["mrr"] == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert pooled["n_candidates"] == 4 and pooled["chance"] == pytest.approx(1 / 2)
    # Unequal pools: chance is the query mean of 1 / pool size (3 queries over 1 text, 1 query over 3 images).
    uneven = kind_pool_scores(np.zeros((4, 4)), [0, 0, 0, 1], ["text", "image", "image", "image"])
    assert uneven["chance"] == pytest.approx((3 * 1.0 + 1 / 3) / 4)
    assert uneven["hit@1"] == pytest.approx(3 / 4)   # a 1-candidate pool always hits; the tie ranks the image 3rd
    with pytest.raises(ValueError, match="kind_pool_scores"):
        kind_pool_scores(similarity, gold, kinds[:3])


def test_source_scores_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="source_scores"):
        source_scores(np.zeros((3, 2)), [0, 1, 0], ["a", "b"])


def test_input_kind_names_every_part():
    assert input_kind({"image": "x.png", "text": "a photo"}) == "text+image"
    assert input_kind({"audio": "x.wav"}) == "audio"


def _write_pairs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_evaluate_model_dev_split_reads_only_dev_files(tiny_repo, tmp_path, monkeypatch):
    text = tmp_path / "pairs" / "text"
    text.mkdir(parents=True)
    words = ["apple", "river", "stone", "cloud", "violin"]
    rows = [{"query": {"text": f"definition of {w}"}, "positive": {"text": w}, "source": "defs",
             "instruction": "Given a definition, retrieve the word it defines."} for w in words[:3]]
    rows += [{"query": {"text": f"a photo of a {w}"}, "positive": {"text": "a photo"}, "source": "photos"}
             for w in words[3:]]
    _write_pairs(text / "dev.jsonl", rows)
    (text / "test.jsonl").write_text("this is not JSON: reading it would fail\n")
    opened = []
    real = stage_eval.load_jsonl
    monkeypatch.setattr(stage_eval, "load_jsonl", lambda path, **kw: opened.append(str(path)) or real(path, **kw))
    scores = evaluate_model(tiny_repo, tmp_path / "pairs", split="dev")
    assert opened == [str(text / "dev.jsonl")]
    text_scores = scores["text"]
    assert text_scores["n_queries"] == 5 and text_scores["n_candidates"] == 4
    assert text_scores["chance"] == pytest.approx(1 / 4)
    assert set(text_scores["sources"]) == {"defs", "photos"}
    assert text_scores["sources"]["defs"]["n_candidates"] == 3
    assert text_scores["sources"]["photos"] == {**text_scores["sources"]["photos"], "hit@1": 1.0, "chance": 1.0,
                                                "n_candidates": 1, "task": "text -> text"}
    with pytest.raises(ValueError, match="split"):
        evaluate_model(tiny_repo, tmp_path / "pairs", split="validation")


def test_load_for_eval_reuses_the_processor_of_an_equal_folder_only(tiny_repo, tmp_path):
    import shutil

    from training.evaluation.stage_eval import load_for_eval, processor_fingerprint

    a, b, c = (shutil.copytree(tiny_repo, tmp_path / name) for name in "abc")
    (b / "fusion_manifest.json").write_text('{"weights": "differ per trial"}')   # a report: not the processor's
    config = json.loads((c / "tokenizer_config.json").read_text())
    (c / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    assert processor_fingerprint(a) == processor_fingerprint(b) != processor_fingerprint(c)
    (model_a, proc_a), (model_b, proc_b), (_, proc_c) = (load_for_eval(p) for p in (a, b, c))
    assert proc_b is proc_a and model_b is not model_a and not model_b.training
    assert proc_c is not proc_a and proc_c.tokenizer.model_max_length == 77


def test_candidate_pools_cut_rows_in_order_into_equal_folds():
    assert [f.tolist() for f in candidate_pools(5, None)] == [[0, 1, 2, 3, 4]]
    assert [f.tolist() for f in candidate_pools(4, 4)] == [[0, 1, 2, 3]]
    assert [len(f) for f in candidate_pools(240, 80)] == [80, 80, 80]
    assert [len(f) for f in candidate_pools(193, 80)] == [65, 64, 64]
    assert np.concatenate(candidate_pools(193, 80)).tolist() == list(range(193))
    assert candidate_pools(0, 80) == []
    with pytest.raises(ValueError, match="pool_size"):
        candidate_pools(10, 1)


def test_pooled_scores_weigh_each_pool_by_its_queries():
    a = {"hit@1": 1.0, "mrr": 1.0, "chance": 0.5, "n_queries": 1, "n_candidates": 2, "task": "t"}
    b = {"hit@1": 0.0, "mrr": 0.25, "chance": 0.25, "n_queries": 3, "n_candidates": 4, "task": "t"}
    pooled = pooled_scores([a, b])
    assert pooled == {**pooled, "n_queries": 4, "n_candidates": 4, "pools": 2, "task": "t"}
    assert pooled["hit@1"] == pytest.approx(0.25) and pooled["mrr"] == pytest.approx((1 + 0.75) / 4)
    assert pooled["chance"] == pytest.approx((0.5 + 0.75) / 4)
    assert "mrr" not in pooled_scores([{"hit@1": 0.5, "n_queries": 2, "n_candidates": 2}])
    with pytest.raises(ValueError, match="no scores"):
        pooled_scores([])


def test_pooled_scores_label_every_task_of_the_pools():
    """A source asked in two directions whose first pool holds only one of them: the pooled label names both."""
    a = {"hit@1": 1.0, "chance": 0.5, "n_queries": 1, "n_candidates": 2, "task": "image -> text"}
    b = {"hit@1": 0.0, "chance": 0.5, "n_queries": 2, "n_candidates": 2, "task": "image -> text / text -> image"}
    assert pooled_scores([a, b])["task"] == "image -> text / text -> image"
    assert "task" not in pooled_scores([{k: v for k, v in a.items() if k != "task"}])


def test_evaluate_model_pools_rank_each_query_within_its_fold(tiny_repo, tmp_path):
    """Pools of 3 rows: each query ranks its fold's positives only; the pooled score is the mean over all queries,
    equal to scoring each fold as a split of its own."""
    words = ["apple", "river", "stone", "cloud", "violin", "candle"]
    rows = [{"query": {"text": f"definition of {w}"}, "positive": {"text": w}, "source": "defs"} for w in words]
    whole, folds = tmp_path / "whole", [tmp_path / "fold0", tmp_path / "fold1"]
    _write_pairs(_text_dir(whole) / "test.jsonl", rows)
    for k, folder in enumerate(folds):
        _write_pairs(_text_dir(folder) / "test.jsonl", rows[3 * k:3 * k + 3])
    pooled = evaluate_model(tiny_repo, whole, pool_size=3)["text"]
    alone = [evaluate_model(tiny_repo, folder)["text"] for folder in folds]
    assert pooled["n_queries"] == 6 and pooled["n_candidates"] == 3 and pooled["pools"] == 2
    assert pooled["chance"] == pytest.approx(1 / 3)
    for key in ("hit@1", "mrr"):
        assert pooled[key] == pytest.approx((alone[0][key] + alone[1][key]) / 2)
        assert pooled["sources"]["defs"][key] == pytest.approx(pooled[key])
    assert evaluate_model(tiny_repo, whole)["text"]["n_candidates"] == 6
    with pytest.raises(ValueError, match="pool_size"):
        evaluate_model(tiny_repo, whole, pool_size=1)


def _text_dir(root):
    folder = root / "text"
    folder.mkdir(parents=True)
    return folder
