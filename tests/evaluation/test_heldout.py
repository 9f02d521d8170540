"""The held-out scorer (training/evaluation/heldout.py) and `python -m training.heldout` on the tiny random repo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.evaluation.heldout import score_heldout, task_files
from training.evaluation.metrics import (WELL_ABOVE_CHANCE, chance_candidates, chance_p_value, required_hits,
                                        well_above_chance)
from training.evaluation.metrics import gold_ranks


def write_tasks(root: Path, cap: int = 3, seed: int = 0, skipped: dict[str, str] | None = None) -> Path:
    """Two tiny tasks in the builder's layout: text definition -> word (one word twice: 2 distinct candidates for 3
    queries) and name -> image (PNGs under root/media)."""
    (root / "media").mkdir(parents=True)
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255)), ("green", (0, 255, 0))):
        Image.new("RGB", (32, 32), colour).save(root / "media" / f"{name}.png")
    text = [("a domestic animal that barks", "dog"), ("a small animal that purrs", "cat"),
            ("a loyal pet kept for guarding", "dog")]
    rows = {
        "defs": [{"query": {"text": q}, "positive": {"text": w}, "negatives": [], "source": "toy-dict",
                  "instruction": "Given a definition, retrieve the word it defines."} for q, w in text],
        "names": [{"query": {"text": f"a {c} square"}, "positive": {"image": f"../media/{c}.png"}, "negatives": [],
                   "source": "toy-emoji", "instruction": "Retrieve the emoji that this name describes."}
                  for c in ("red", "blue", "green")],
    }
    for task, task_rows in rows.items():
        (root / task).mkdir()
        (root / task / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_rows))
    manifest = {"cap": cap, "seed": seed, "skipped": skipped or {},
                "tasks": {"defs": {"source": "toy-dict", "kind": "text definition -> word"},
                          "names": {"source": "toy-emoji", "kind": "name -> image"}}}
    (root / "tasks.json").write_text(json.dumps(manifest))
    return root


def test_score_heldout_matches_encode_query_and_encode_document(tiny_repo, tiny_st, tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    scores = score_heldout(tiny_repo, tasks, batch_size=2, progress=False)
    assert list(scores) == ["defs", "names"]
    assert scores["defs"]["n_queries"] == 3 and scores["defs"]["n_candidates"] == 2
    assert scores["defs"]["chance"] == pytest.approx(0.5) and scores["names"]["chance"] == pytest.approx(1 / 3)
    assert scores["defs"]["source"] == "toy-dict"
    # the same numbers by hand through the wrapper a user loads
    q = tiny_st.encode_query([{"text": t} for t in ("a domestic animal that barks", "a small animal that purrs",
                                                     "a loyal pet kept for guarding")],
                             prompt="Given a definition, retrieve the word it defines.")
    c = tiny_st.encode_document([{"text": "dog"}, {"text": "cat"}])
    ranks = gold_ranks(q @ c.T, [0, 1, 0])
    assert scores["defs"]["hit@1"] == pytest.approx(float(np.mean(ranks == 1)))
    assert scores["defs"]["mrr"] == pytest.approx(float(np.mean(1 / ranks)))
    images = tiny_st.encode_document([{"image": str(tasks / "media" / f"{c}.png")} for c in ("red", "blue", "green")])
    names = tiny_st.encode_query([{"text": f"a {c} square"} for c in ("red", "blue", "green")],
                                 prompt="Retrieve the emoji that this name describes.")
    ranks = gold_ranks(names @ images.T, [0, 1, 2])
    assert scores["names"]["mrr"] == pytest.approx(float(np.mean(1 / ranks)))


def test_score_heldout_pools_rank_each_query_within_its_fold(tiny_repo, tiny_st, tmp_path):
    """Pools of 2 rows over the 3 name -> image queries: folds [red, blue] and [green] (np.array_split), each query
    ranking its fold's images only; the pooled MRR is the mean over the three queries."""
    tasks = write_tasks(tmp_path / "tasks")
    pooled = score_heldout(tiny_repo, tasks, batch_size=2, progress=False, pool_size=2)["names"]
    assert pooled["n_queries"] == 3 and pooled["n_candidates"] == 2 and pooled["pools"] == 2
    assert pooled["chance"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    names = tiny_st.encode_query([{"text": f"a {c} square"} for c in ("red", "blue", "green")],
                                 prompt="Retrieve the emoji that this name describes.")
    images = tiny_st.encode_document([{"image": str(tasks / "media" / f"{c}.png")} for c in ("red", "blue")])
    ranks = np.concatenate([gold_ranks(names[:2] @ images.T, [0, 1]), [1.0]])  # green alone in its pool: rank 1
    assert pooled["mrr"] == pytest.approx(float(np.mean(1 / ranks)))
    assert pooled["hit@1"] == pytest.approx(float(np.mean(ranks == 1)))
    with pytest.raises(ValueError, match="pool_size"):
        score_heldout(tiny_repo, tasks, progress=False, pool_size=1)


def test_score_heldout_refuses_mixed_instructions_and_empty_folders(tiny_repo, tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    rows = (tasks / "defs" / "test.jsonl").read_text().splitlines()
    changed = json.loads(rows[0])
    changed["instruction"] = "Another instruction."
    (tasks / "defs" / "test.jsonl").write_text("\n".join([json.dumps(changed), *rows[1:]]) + "\n")
    with pytest.raises(ValueError, match="one instruction for all rows"):
        score_heldout(tiny_repo, tasks, progress=False)
    with pytest.raises(FileNotFoundError, match="no held-out task"):
        task_files(tmp_path / "empty")


def test_well_above_chance_needs_three_times_chance_and_significance():
    assert WELL_ABOVE_CHANCE == 3.0
    score = lambda hits, n=80, c=80: {"hit@1": hits / n, "n_queries": n, "n_candidates": c, "chance": 1 / c}  # noqa: E731
    # 3 of 80 among 80 candidates is 3 x chance, but chance gives 3 or more 8% of the time: 5 are needed (p 0.3%)
    assert chance_p_value(3, 80, 80) == pytest.approx(0.0797, abs=1e-3)
    assert required_hits(80, 80) == 5
    assert not well_above_chance(score(4)) and well_above_chance(score(5))
    # with 10 candidates 3 x chance (24 of 80) is already far beyond chance: the multiple decides
    assert required_hits(80, 10) == 24
    assert well_above_chance(score(24, c=10)) and not well_above_chance(score(23, c=10))
    assert required_hits(2, 2) == 3   # 2 queries can never show it: more hits than queries
    with pytest.raises(ValueError, match="n_candidates >= 1"):
        chance_p_value(1, 4, 0)


def test_well_above_chance_of_pools_of_unequal_size_uses_the_pooled_chance():
    """Two pools of 80 queries, one with 80 distinct candidates and one with 40 (repeated positives): chance is
    (1/80 + 1/40) / 2 = 0.01875, 3 hits expected; the largest pool's 80 candidates would claim chance 0.0125 and let
    8 hits (7 needed there) pass. The binomial at the pooled chance bounds the tail of the per-query chances."""
    pooled = {"hit@1": 8 / 160, "n_queries": 160, "n_candidates": 80, "pools": 2, "chance": (1 / 80 + 1 / 40) / 2}
    assert chance_candidates(pooled) == pytest.approx(1 / 0.01875)
    assert required_hits(160, chance_candidates(pooled)) == 9
    assert not well_above_chance(pooled) and well_above_chance({**pooled, "hit@1": 9 / 160})
    assert chance_candidates({"n_candidates": 80, "n_queries": 80}) == 80  # a score without "chance"


def test_cli_scores_a_prebuilt_task_folder(tiny_repo, tmp_path, capsys):
    from training.heldout import main

    tasks = write_tasks(tmp_path / "tasks", cap=3, seed=0)
    assert main(["--model", str(tiny_repo), "--tasks", str(tasks), "--cap", "3", "--out",
                 str(tmp_path / "scores.json")]) == 0
    captured = capsys.readouterr()
    assert "defs" in captured.out and "chance 0.500" in captured.out
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert set(saved["scores"]) == {"defs", "names"} and saved["skipped"] == {}
    assert main(["--model", str(tiny_repo), "--tasks", str(tasks), "--cap", "3", "--pool-size", "2", "--out",
                 str(tmp_path / "pooled.json")]) == 0
    pooled = json.loads((tmp_path / "pooled.json").read_text())["scores"]["names"]
    assert pooled["pools"] == 2 and pooled["n_candidates"] == 2 and pooled["n_queries"] == 3
    with pytest.raises(SystemExit) as stopped:  # one `python -m training.heldout: error:` line, as every CLI
        main(["--model", str(tmp_path / "no-model"), "--tasks", str(tasks), "--cap", "3"])
    assert stopped.value.code == 2
    assert "python -m training.heldout: error: --model" in capsys.readouterr().err


def test_audio_cache_reuses_encoder_outputs_without_changing_scores(tiny_repo, tmp_path):
    import soundfile as sf

    root = tmp_path / "tasks"
    (root / "spoken").mkdir(parents=True)
    rows = []
    for i, freq in enumerate((220.0, 440.0, 880.0)):
        t = np.arange(8000) / 16000
        sf.write(str(root / "spoken" / f"c{i}.wav"), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
        rows.append({"query": {"audio": f"c{i}.wav"}, "positive": {"text": f"word {i}"}, "negatives": [],
                     "source": "toy-speech", "instruction": "Identify the word spoken in the recording."})
    (root / "spoken" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = score_heldout(tiny_repo, root, progress=False)
    cached = score_heldout(tiny_repo, root, progress=False, audio_cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 3
    again = score_heldout(tiny_repo, root, progress=False, audio_cache_dir=tmp_path / "cache")
    assert plain == cached == again and plain["spoken"]["n_candidates"] == 3


def test_ensure_tasks_reuses_only_a_complete_build_of_the_same_cap_and_seed(tmp_path, monkeypatch):
    from training.data_sources import heldout as builder

    calls = []
    monkeypatch.setattr(builder, "build_heldout_tasks", lambda d, cap, seed: calls.append((cap, seed)) or {"cap": cap})
    write_tasks(tmp_path / "full", cap=3, seed=0)
    assert builder.ensure_tasks(tmp_path / "full", cap=3, seed=0)["tasks"] and calls == []
    builder.ensure_tasks(tmp_path / "full", cap=4, seed=0)
    builder.ensure_tasks(tmp_path / "full", cap=3, seed=1)
    write_tasks(tmp_path / "partial", cap=3, seed=0, skipped={"flite": "flite not found on PATH"})
    builder.ensure_tasks(tmp_path / "partial", cap=3, seed=0)   # a source may have been installed since
    assert calls == [(4, 0), (3, 1), (3, 0)]
