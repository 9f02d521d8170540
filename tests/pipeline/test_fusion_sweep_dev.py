"""The pipeline's fusion weight search scores every point on the dev split and never opens a test file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from training.evaluation import stage_eval


def test_pipeline_fusion_sweep_reads_only_dev_pairs(tiny_repo, tmp_path, monkeypatch):
    from training.fusion.config import FusionConfig, ModelSpec
    from training.pipeline.runner import MODALITIES, PAPER_FUSION_WEIGHTS, PRESETS, Pipeline

    out = tmp_path / "run"
    shutil.copytree(tiny_repo, out / "base" / "model")
    weights = load_file(tiny_repo / "model.safetensors")
    key = next(k for k in weights if k.startswith("backbone.language_model.layers.") and weights[k].ndim == 2)
    generator = torch.Generator().manual_seed(0)
    for modality in MODALITIES:   # a specialist = the base with one LLM weight moved
        folder = out / "specialists" / modality
        shutil.copytree(tiny_repo, folder)
        moved = dict(weights)
        moved[key] = weights[key] + 0.05 * torch.randn(weights[key].shape, generator=generator)
        save_file(moved, folder / "model.safetensors", metadata={"format": "pt"})
    pairs = out / "data" / "pairs" / "text"
    pairs.mkdir(parents=True)
    words = ["apple", "river", "stone", "cloud"]
    pairs.joinpath("dev.jsonl").write_text("".join(json.dumps(
        {"query": {"text": f"definition of {w}"}, "positive": {"text": w}, "source": "defs"}) + "\n" for w in words))
    pairs.joinpath("test.jsonl").write_text("not JSON: the sweep must never read this file\n")
    opened = []
    real = stage_eval.load_jsonl
    monkeypatch.setattr(stage_eval, "load_jsonl", lambda path, **kw: opened.append(str(path)) or real(path, **kw))

    pipeline = Pipeline(out, PRESETS["smoke"], seed=0)
    cfg = FusionConfig(base=out / "base" / "model", output=out / "fuse" / "model", progress=False,
                       models=[ModelSpec(path=out / "specialists" / m, name=m, weight=PAPER_FUSION_WEIGHTS[m])
                               for m in MODALITIES])
    result = pipeline.fusion_sweep(cfg, out / "fuse" / "dev-chosen", out / "fuse" / ".sweep")

    assert opened and all(p == str(pairs / "dev.jsonl") for p in opened)
    # coordinate ascent, one round: the paper point, then each specialist's other values (2 each, audio 1)
    assert len(opened) == len(result["trials"]) == 10 and result["trials"][0]["weights"] == PAPER_FUSION_WEIGHTS
    best = max(t["objective"] for t in result["trials"])
    assert result["trials"][result["best"]]["objective"] == best
    assert all(t["objective"] < best for t in result["trials"][:result["best"]])   # the first best point
    assert result["weights"] == result["trials"][result["best"]]["weights"]
    chosen = load_file(out / "fuse" / "dev-chosen" / "model.safetensors")[key]
    expected = weights[key] + sum(result["weights"][m] * (load_file(out / "specialists" / m / "model.safetensors")[key]
                                                          - weights[key]) for m in MODALITIES)
    torch.testing.assert_close(chosen, expected, rtol=1e-5, atol=1e-6)
    assert not (out / "fuse" / ".sweep").exists()


def test_the_search_objective_leaves_out_what_recovery_repairs():
    """Projector Recovery re-trains audio's projector after fusion, so the fused model's audio MRR is not what the
    final model keeps: the objective averages the other modalities (all of them when only audio was scored)."""
    from training.pipeline.runner import RECOVERED_MODALITIES, mean_mrr

    scores = {"text": {"mrr": 0.4}, "image": {"mrr": 0.2}, "audio": {"mrr": 0.9}}
    assert RECOVERED_MODALITIES == ("audio",)
    assert mean_mrr(scores, leave_out=RECOVERED_MODALITIES) == pytest.approx(0.3)
    assert mean_mrr(scores) == pytest.approx(0.5)
    assert mean_mrr({"audio": {"mrr": 0.9}}, leave_out=RECOVERED_MODALITIES) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="no modality was scored"):
        mean_mrr({}, leave_out=RECOVERED_MODALITIES)
