"""Training-free re-alignment (training/recovery/realign.py): moves the fused model toward the specialist, touches
only fc2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.recovery.test_drift import perturbed, tone_pairs  # noqa: F401  (module fixtures)
from training.recovery import realign as A


def test_realign_moves_fused_audio_embeddings_toward_the_specialist(tiny_repo, perturbed, tone_pairs, tmp_path):  # noqa: F811
    out = tmp_path / "realigned"
    report = A.run(tiny_repo, perturbed, tone_pairs, output=out, rank=3, iterations=1, progress=False,
                   feature_cache_dir=tmp_path / "features")
    assert report["parameters"] == 12 and report["inference_passes"] == 2 + 1 + 2 * 12 + 1 + 4 * 2 + 2
    assert report["target"] == "relational" and report["anchors"] == 6
    assert report["agreement_after"]["fit"] > report["agreement_before"]["fit"]
    assert report["agreement_after"]["holdout"] >= report["agreement_before"]["holdout"]
    before, after = load_file(perturbed / "model.safetensors"), load_file(out / "model.safetensors")
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["audio_projector.fc2.bias", "audio_projector.fc2.weight"]
    record = json.loads((out / "projector_calibration.json").read_text())
    assert json.loads((out / "config.json").read_text())["projector_calibration_hash"] == record["backbone_fingerprint"]


def test_realign_is_a_no_op_without_drift(tiny_repo, tone_pairs, tmp_path):  # noqa: F811
    report = A.run(tiny_repo, tiny_repo, tone_pairs, rank=2, iterations=1, progress=False,
                   feature_cache_dir=tmp_path)
    assert report["agreement_before"]["fit"] == pytest.approx(1.0, abs=1e-6)
    assert report["agreement_after"]["fit"] == pytest.approx(1.0, abs=1e-6)
    assert report["history"][0]["step_size"] == 0.0 or report["agreement_after"]["holdout"] == pytest.approx(1.0)


def test_relational_targets_keep_the_specialists_similarity_profile():
    torch.manual_seed(0)
    norm = torch.nn.functional.normalize
    spec_audio, spec_anchors = norm(torch.randn(5, 16), dim=-1), norm(torch.randn(4, 16), dim=-1)
    fused_anchors = norm(spec_anchors + 0.3 * torch.randn(4, 16), dim=-1)
    targets = A.relational_targets(spec_audio, spec_anchors, fused_anchors)
    assert torch.allclose(targets.norm(dim=-1), torch.ones(5), atol=1e-6)
    # before renormalisation the profile is exact; after it, the profile matches up to each row's scale
    wanted, got = spec_audio @ spec_anchors.T, targets @ fused_anchors.T
    ratio = got / wanted
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)
    assert torch.allclose(A.relational_targets(spec_audio, spec_anchors, spec_anchors), spec_audio, atol=1e-6)
