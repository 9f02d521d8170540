"""Fusion of two specialists of a compression_mean (CoMa) base keeps the compression tokens, the config and the
processor, and fuses the compression-token embedding rows like every other row."""

from __future__ import annotations

import shutil

import torch

from tests.conftest import assert_compression_mean_embeddings
from training.common import hub_code


def _specialist(base, out, seed: int):
    """A copy of the base repo whose backbone moved by seeded noise (the compression rows included)."""
    shutil.copytree(base, out)
    model = hub_code.ConanModel.from_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("backbone."):
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    for weights in out.glob("model*.safetensors*"):
        weights.unlink()
    model.save_pretrained(out)
    return out


def test_fused_compression_repo_keeps_tokens_config_and_pooling(tiny_compression_repo, tmp_path):
    from transformers import AutoModel, AutoProcessor

    from training.fusion.config import FusionConfig, ModelSpec
    from training.fusion.engine import fuse

    a, b = _specialist(tiny_compression_repo, tmp_path / "a", 1), _specialist(tiny_compression_repo, tmp_path / "b", 2)
    fuse(FusionConfig(base=tiny_compression_repo, models=[ModelSpec(a, "a", 0.5), ModelSpec(b, "b", 0.5)],
                      output=tmp_path / "fused", normalize=False, progress=False, workers=1))
    fused = AutoModel.from_pretrained(tmp_path / "fused", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "fused", trust_remote_code=True)
    base = hub_code.ConanModel.from_pretrained(tiny_compression_repo)
    ids = base.config.compression_token_ids
    assert fused.config.embedding_pooling == "compression_mean" and fused.config.compression_token_ids == ids
    assert processor.compression_token_ids == ids
    rows = {name: m.get_input_embeddings().weight.detach()[ids] for name, m in (
        ("base", base), ("a", hub_code.ConanModel.from_pretrained(a)), ("b", hub_code.ConanModel.from_pretrained(b)),
        ("fused", fused))}
    expected = rows["base"] + 0.5 * (rows["a"] - rows["base"]) + 0.5 * (rows["b"] - rows["base"])
    torch.testing.assert_close(rows["fused"], expected, atol=1e-6, rtol=0)
    assert_compression_mean_embeddings(fused, processor, ["a cat on a mat", "two dogs"])
