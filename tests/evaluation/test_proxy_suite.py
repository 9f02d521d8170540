"""Proxy suite: cache, reports, real-data runs with the reference embedder, and the tiny Conan model end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from training.evaluation.cache import CachedEmbedder, EmbeddingCache, input_key, model_hash
from training.evaluation.reference import ReferenceEmbedder
from training.evaluation.report import LABEL, compare_table, markdown_table, write_reports
from training.evaluation.suite import run_with_embedder

SHARED = Path(__file__).resolve().parents[2].parent / "shared"


def _valid(entry):
    assert entry["status"] in ("ok", "skipped"), entry
    if entry["status"] == "skipped":
        assert entry["reason"]  # says what to install
        return False
    s = entry["main_score"]
    assert 0.0 <= s <= 1.0 and not math.isnan(s)
    return True


def test_cache_hits_and_keys(tmp_path):
    inner = ReferenceEmbedder()
    cached = CachedEmbedder(inner, EmbeddingCache(tmp_path, "m1"))
    a = cached.encode(["red", "blue", "red"], prompt="p")
    assert cached.n_encoded == 2  # duplicates encoded once
    again = CachedEmbedder(ReferenceEmbedder(), EmbeddingCache(tmp_path, "m1"))  # fresh process, same files
    b = again.encode(["blue", "red"], prompt="p")
    assert again.n_encoded == 0
    np.testing.assert_allclose(b, a[[1, 0]])
    assert again.encode(["red"], prompt="other") is not None and again.n_encoded == 1  # prompt is part of the key
    assert input_key({"audio": {"array": np.zeros(3, np.float32), "sampling_rate": 8000}}) != \
        input_key({"audio": {"array": np.zeros(3, np.float32), "sampling_rate": 16000}})
    with pytest.raises(TypeError, match="cannot hash"):
        input_key(object())


def test_model_hash_follows_weights(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    (tmp_path / "README.md").write_text("x")
    h1 = model_hash(tmp_path)
    (tmp_path / "README.md").write_text("y")
    assert model_hash(tmp_path) == h1
    (tmp_path / "model.safetensors").write_bytes(b"abd")
    assert model_hash(tmp_path) != h1
    with pytest.raises(ValueError, match="no weight files"):
        model_hash(_empty(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        model_hash(tmp_path / "missing")


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_reports_and_compare(tmp_path):
    r = {"model": "a", "model_hash": "h", "limit": 2, "tasks": {
        "t1": {"status": "ok", "modality": "audio", "mirrors": "X", "main_score_name": "accuracy", "main_score": 0.5,
               "n": 2},
        "t2": {"status": "skipped", "modality": "image", "mirrors": "Y", "main_score_name": "hit@1",
               "reason": "apt-get install foo"}}}
    md = markdown_table(r)
    assert LABEL in md and "| t1 | audio | X | accuracy | 50.00 | 2 |" in md and "apt-get install foo" in md
    r2 = json.loads(json.dumps(r))
    r2["tasks"]["t1"]["main_score"] = 0.25
    table = compare_table({"base": r, "fused": r2})
    assert "| t1 | accuracy | 50.00 | 25.00 |" in table and "| t2 | hit@1 | skip | skip |" in table
    paths = write_reports(r, tmp_path)
    assert json.loads(Path(paths["json"]).read_text())["tasks"]["t1"]["main_score"] == 0.5
    assert Path(paths["plot"]).stat().st_size > 1000
    with pytest.raises(ValueError, match="no results"):
        compare_table({})


def test_unknown_task_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown proxy task"):
        run_with_embedder(ReferenceEmbedder(), model_name="r", model_id="r", tasks=["nope"], cache_dir=tmp_path)


def test_real_data_with_reference_embedder(tmp_path):
    if not (SHARED / "data").exists():
        pytest.skip(f"{SHARED / 'data'} is absent (real data lives in ../shared next to the repo)")
    tasks = ["cifar10_zeroshot", "pdf_page_retrieval", "emoji_name_to_image"]
    r = run_with_embedder(ReferenceEmbedder(), model_name="reference", model_id="ref", tasks=tasks, limit=10,
                          cache_dir=tmp_path)
    assert r["label"] == LABEL
    for t in tasks:
        if _valid(r["tasks"][t]):
            assert r["tasks"][t]["n"] == 10
    again = run_with_embedder(ReferenceEmbedder(), model_name="reference", model_id="ref", tasks=tasks, limit=10,
                              cache_dir=tmp_path)
    assert all(v["newly_encoded"] == 0 for v in again["tasks"].values())
    assert {t: v.get("main_score") for t, v in again["tasks"].items()} == \
        {t: v.get("main_score") for t, v in r["tasks"].items()}


def test_tiny_conan_model_end_to_end(tiny_repo, tmp_path, capsys):
    """Random weights: the run must complete with valid scores (values are meaningless)."""
    if not (SHARED / "data").exists():
        pytest.skip(f"{SHARED / 'data'} is absent (real data lives in ../shared next to the repo)")
    pytest.importorskip("mteb", reason="fsdd_zeroshot runs through mteb (pip install mteb==2.26.24 torch==2.13.0)")
    from training.evaluation.cli import main

    tasks = ["fsdd_zeroshot", "cifar10_zeroshot", "pdf_page_retrieval"]
    out = tmp_path / "out"
    rc = main(["proxy", "--model", str(tiny_repo), "--tasks", *tasks, "--limit", "4", "--cache-dir",
               str(tmp_path / "cache"), "--out", str(out), "--compare", str(tiny_repo)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert LABEL in printed and "fsdd_zeroshot" in printed
    assert f"| {tiny_repo.name} | {tiny_repo.name}#2 |" in printed  # --compare: side by side
    res = json.loads((out / tiny_repo.name / "proxy_results.json").read_text())
    assert res["model_hash"] == model_hash(tiny_repo)
    for t in tasks:
        _valid(res["tasks"][t])
    assert any(v["status"] == "ok" for v in res["tasks"].values())
