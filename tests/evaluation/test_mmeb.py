"""MMEB runner on the hand-written set in tests/data/mmeb_mini, scored by hand with the RGB reference embedder."""

import json
import math
from pathlib import Path

import pytest

from training.evaluation.mmeb import load_mmeb_jsonl, row_from_dict, run_mmeb, score_rows
from training.evaluation.reference import ReferenceEmbedder

MINI = Path(__file__).resolve().parents[1] / "data" / "mmeb_mini"


def test_image_set_hit_at_1_pessimistic_and_official_ties():
    rows = load_mmeb_jsonl(MINI / "image.jsonl")
    assert len(rows) == 5 and rows[0].qry_text is None and rows[0].qry_inst.startswith("Represent")
    # hand-computed gold ranks: red 1, yellow 1, gray 3 (white better, red tied), green tie 2, blue t2i 1
    res = score_rows(ReferenceEmbedder(), rows, kind="image")
    assert res["main_score_name"] == "hit@1"
    assert res["hit@1"] == pytest.approx(3 / 5)
    assert res["ndcg@5"] == pytest.approx((3 + 0.5 + 1 / math.log2(3)) / 5)
    # the official VLM2Vec argmax lets the gold win ties: ranks 1,1,2,1,1
    res_off = score_rows(ReferenceEmbedder(), rows, kind="image", ties="optimistic")
    assert res_off["hit@1"] == pytest.approx(4 / 5)


def test_visdoc_uses_ndcg5_and_overall_mean():
    out = run_mmeb(ReferenceEmbedder(), {"mini-img": (load_mmeb_jsonl(MINI / "image.jsonl"), "image"),
                                         "mini-doc": (load_mmeb_jsonl(MINI / "visdoc.jsonl"), "visdoc")})
    doc = out["datasets"]["mini-doc"]
    assert doc["main_score_name"] == "ndcg@5"
    assert doc["main_score"] == pytest.approx((1 + 0.5) / 2)  # ranks 1 and 3
    assert doc["hit@1"] == pytest.approx(0.5)
    assert out["overall"] == pytest.approx((0.6 + 0.75) / 2)
    assert out["by_kind"] == {"image": pytest.approx(0.6), "visdoc": pytest.approx(0.75)}


def test_instruction_goes_to_queries_only():
    emb = ReferenceEmbedder()
    score_rows(emb, load_mmeb_jsonl(MINI / "visdoc.jsonl"), kind="visdoc")
    prompts = {p for _, p in emb.calls}
    assert prompts == {"Find a document image that matches the given query", None}


def test_bad_rows_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="empty candidate list"):
        row_from_dict({"qry_text": "x", "tgt_text": [], "tgt_img_path": []})
    with pytest.raises(ValueError, match="must be a list"):
        row_from_dict({"qry_text": "x", "tgt_text": "red"})
    with pytest.raises(FileNotFoundError, match="--image-root"):
        row_from_dict({"qry_text": "x", "qry_img_path": "nope.png", "tgt_text": ["a"]}, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"qry_text": "x", "tgt_text": ["a"]}) + "\n{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_mmeb_jsonl(bad)
    with pytest.raises(ValueError, match="kind must be"):
        score_rows(ReferenceEmbedder(), load_mmeb_jsonl(MINI / "visdoc.jsonl"), kind="audio")
