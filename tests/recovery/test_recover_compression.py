"""Projector Recovery on a compression_mean (CoMa) repo: the cached clips keep the compression tokens, only the
projector trains, and the recovered repo still pools over the compression tokens."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tests.conftest import assert_compression_mean_embeddings
from tests.recovery.test_recover import _cfg, fsdd_data, make_fused  # noqa: F401 (fsdd_data: a fixture)
from training.recovery import recover as R


def test_recovery_on_a_compression_repo(tiny_compression_repo, fsdd_data, tmp_path):  # noqa: F811
    from transformers import AutoModel, AutoProcessor

    fused = make_fused(tiny_compression_repo, tmp_path / "fused")
    out = tmp_path / "recovered"
    report = R.recover(_cfg(fused, fsdd_data, out, max_steps=2, eval_every=2, checkpoint_every=2))
    assert report["steps"] == 2
    before, after = load_file(fused / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("audio_projector."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("audio_projector."))
    config = json.loads((out / "config.json").read_text())
    assert config["embedding_pooling"] == "compression_mean"
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    clip = json.loads(fsdd_data["train"].read_text().splitlines()[0])["positive"]
    assert_compression_mean_embeddings(model, processor, [clip, "seven"])
