"""The main job end to end on its smoke preset: every stage runs, the final repo loads and embeds every modality."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared_path


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    shared_path("data", "fsdd")
    shared_path("data", "cifar10-test")
    from training.pipeline.runner import PRESETS, STAGES, Pipeline

    out = tmp_path_factory.mktemp("pipeline") / "smoke"
    pipeline = Pipeline(out, PRESETS["smoke"], seed=0, preset_name="smoke",
                        command="python -m training.pipeline --preset smoke")
    pipeline.run(list(STAGES))
    return out


def test_every_stage_finished_and_was_evaluated(smoke_run):
    from training.pipeline.runner import MODALITIES, PRESETS, STAGES

    for stage in STAGES:
        assert (smoke_run / stage / "stage.json").exists(), stage
    base = json.loads((smoke_run / "base" / "stage.json").read_text())["scores"]
    assert set(base["base"]) == set(MODALITIES) and 0.0 <= base["teacher"]["text"]["hit@1"] <= 1.0
    for stage in ("fuse", "recover", "rehearse"):
        scores = json.loads((smoke_run / stage / "stage.json").read_text())["scores"]
        assert set(scores) == set(MODALITIES)
        assert all(0.0 <= v["hit@1"] <= 1.0 for v in scores.values())
        assert all(0.0 < v["chance"] <= 1.0 and v["sources"] for v in scores.values())
    specialists = json.loads((smoke_run / "specialists" / "stage.json").read_text())
    share = PRESETS["smoke"].specialist_text_replay
    assert share > 0 and specialists["text"]["data_mix"] == {"wordnet-definitions": 1.0}
    for modality in ("image", "video", "document", "audio"):   # text replay: the share of the sampler's draws
        assert specialists[modality]["data_mix"]["wordnet-definitions"] == pytest.approx(share)
    manifest = json.loads((smoke_run / "fuse" / "model" / "fusion_manifest.json").read_text())
    assert any(k.startswith("audio_projector.") for k in manifest["summary"]["needs_recovery"])
    assert {m["weight"] for m in manifest["config"]["models"]} == {0.3, 0.5}   # the paper's weights
    fuse = json.loads((smoke_run / "fuse" / "stage.json").read_text())
    assert (smoke_run / "fuse" / "dev-chosen" / "model.safetensors").exists() and len(fuse["dev_chosen"]["trials"]) == 10
    assert fuse["dev_chosen"]["weights"] in [t["weights"] for t in fuse["dev_chosen"]["trials"]]
    assert set(fuse["scores_dev_chosen"]) == set(MODALITIES)
    selection = json.loads((smoke_run / "rehearse" / "stage.json").read_text())["selection"]
    assert selection["mode"] == "learned" and set(selection["groups"]) <= set(MODALITIES)
    assert selection["best"]["step"] > 0   # the smoke preset checks dev at its last step at least
    heldout = json.loads((smoke_run / "heldout" / "stage.json").read_text())
    assert heldout["cap"] == PRESETS["smoke"].heldout_cap and set(heldout["tasks"]) | set(heldout["skipped"])
    for model in ("base", "final"):
        assert set(heldout["scores"].get(model, {})) == set(heldout["tasks"])
        assert all(v["n_queries"] <= heldout["cap"] and 0.0 <= v["hit@1"] <= 1.0
                   for v in heldout["scores"].get(model, {}).values())
    report = (smoke_run / "report" / "report.md").read_text()
    assert "## Held-out generalisation (unseen sources)" in report and "3 x chance" in report
    assert "| fused (paper weights) |" in report and "| fused (dev-chosen weights) |" in report
    assert "Projector" in report and "image/cifar10-photos" in report and "## Verdicts against the targets" in report


def test_recovery_changed_only_the_projector(smoke_run):
    from safetensors.torch import load_file

    from training.pipeline.runner import FUSED_MODELS

    continued_from = json.loads((smoke_run / "recover" / "stage.json").read_text())["continued_from"]
    fused = load_file(smoke_run / "fuse" / FUSED_MODELS[continued_from] / "model.safetensors")
    recovered = load_file(smoke_run / "recover" / "model" / "model.safetensors")
    assert fused.keys() == recovered.keys()
    changed = {k for k in fused if not (fused[k] == recovered[k]).all()}
    assert all(k.startswith("audio_projector.") for k in changed)
    report = json.loads((smoke_run / "recover" / "stage.json").read_text())["recovery"]
    # Early stopping may keep the starting projector when no step beats it on dev; otherwise it must have moved.
    assert bool(changed) == (report["best_step"] > 0), (report["best_step"], changed)


def test_rerun_skips_finished_stages(smoke_run, capsys):
    from training.pipeline.runner import PRESETS, STAGES, Pipeline

    pipeline = Pipeline(smoke_run, PRESETS["smoke"], seed=0, preset_name="smoke", command="rerun")
    pipeline.run(list(STAGES[:-1]))
    assert capsys.readouterr().out.count("skipped") == len(STAGES) - 1


def test_final_model_loads_and_encodes_every_modality(smoke_run):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(smoke_run / "final-model"), trust_remote_code=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    audio = {"array": (rng.standard_normal(8000) * 0.1).astype(np.float32), "sampling_rate": 16000}
    inputs = ["the spoken digit seven", image, {"document": image}, {"video": rng.integers(0, 255, (4, 32, 32, 3),
                                                                                           dtype=np.uint8)},
              {"audio": audio}, {"image": image, "text": "a photo"}]
    vectors = model.encode(inputs)
    assert vectors.shape == (len(inputs), model.get_embedding_dimension())
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
