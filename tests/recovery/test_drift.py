"""diagnose_drift: zero drift for identical models, visible drift for a perturbed (fused-like) backbone."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.recovery.test_recover import make_fused
from training.recovery import drift as D


@pytest.fixture(scope="module")
def tone_pairs(tmp_path_factory):
    """Six short synthetic tones (labelled synthetic) paired with a text description: no ../shared needed."""
    root = tmp_path_factory.mktemp("tones")
    rows = []
    for i, freq in enumerate((220, 330, 440, 550, 660, 880)):
        t = np.arange(int(0.4 * 16000)) / 16000
        sf.write(root / f"tone_{freq}.wav", (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
        rows.append({"query": {"audio": f"tone_{freq}.wav"}, "positive": {"text": f"a synthetic tone of {freq} hertz"},
                     "source": "synthetic-tones"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "pairs.jsonl"


@pytest.fixture(scope="module")
def perturbed(tiny_repo, tmp_path_factory):
    return make_fused(tiny_repo, tmp_path_factory.mktemp("drift") / "fused", scale=0.5)


def test_zero_drift_when_specialist_is_fused(tiny_repo, tone_pairs, tmp_path):
    report = D.drift_report(tiny_repo, tiny_repo, tone_pairs, progress=False, feature_cache_dir=tmp_path)
    assert report["backbones_identical"] and report["clips"] == 6
    for row in report["layers"]:
        assert row["audio_token_cos"] == pytest.approx(1.0, abs=1e-5), row
        assert row["audio_token_cka"] == pytest.approx(1.0, abs=1e-6), row
        assert row["clip_mean_cka"] == pytest.approx(1.0, abs=1e-6), row
    assert report["pooled"]["cos_min"] == pytest.approx(1.0, abs=1e-5)
    assert report["pooled"]["nn_agreement"] == 1.0
    assert report["drift"]["embedding"] == pytest.approx(0.0, abs=1e-5)
    assert report["drift"]["final_cka"] == pytest.approx(0.0, abs=1e-6)
    assert report["drift"]["retrieval_r1_drop"] == 0.0
    assert report["retrieval"]["specialist"] == report["retrieval"]["fused"]
    assert not report["projector"]["text_table_changed"]


def test_perturbed_backbone_shows_drift_in_the_layers_not_the_inputs(tiny_repo, perturbed, tone_pairs, tmp_path):
    report = D.drift_report(tiny_repo, perturbed, tone_pairs, progress=False, feature_cache_dir=tmp_path)
    assert not report["backbones_identical"]
    layers = {row["layer"]: row for row in report["layers"]}
    assert layers["embeddings"]["audio_token_cos"] == pytest.approx(1.0, abs=1e-6)  # same projector, same table
    assert layers["final_norm"]["audio_token_cos"] < 0.99
    assert report["drift"]["embedding"] > 0.01
    assert report["projector"]["projector_output_cos"] == pytest.approx(1.0, abs=1e-6)


def test_cli_prints_a_table_and_writes_json(tiny_repo, perturbed, tone_pairs, tmp_path, capsys):
    out = tmp_path / "drift.json"
    assert D.main(["--specialist", str(tiny_repo), "--fused", str(perturbed), "--data", str(tone_pairs),
                   "--out", str(out), "--feature-cache-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "audio-token CKA" in printed and "R@1" in printed
    saved = json.loads(out.read_text())
    assert len(saved["layers"]) == 4 and math.isfinite(saved["pooled"]["cka"])


def test_linear_cka_properties():
    torch.manual_seed(0)
    x = torch.randn(50, 8)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    assert D.linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-9)
    assert D.linear_cka(x, torch.randn(50, 8)) < 0.5
    with pytest.raises(ValueError, match="same number of rows"):
        D.linear_cka(x, x[:10])
