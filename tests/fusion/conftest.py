"""Fixtures of the fusion tests: the checkpoints (built once per session; tests only read them)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.fusion.fusion_reference import BUFFER, SHAPES, SPECIALISTS, bf16_grid, save_folder


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict:
    """Base (2 shards) + 4 specialists: video freezes the vision tower, only audio changes the projector and adds
    a union key; a fraction of each delta is exactly zero; an int64 buffer everywhere."""
    root = tmp_path_factory.mktemp("ckpts")
    g = torch.Generator().manual_seed(0)
    base = {k: bf16_grid(torch.randn(s, generator=g) * 0.05) for k, s in SHAPES.items()}
    base[BUFFER] = torch.arange(10, dtype=torch.int64).view(1, 10)
    save_folder(root / "base", base, shards=2)
    specs = {}
    for i, name in enumerate(SPECIALISTS):
        sd = {}
        for k, t in base.items():
            if not t.is_floating_point():
                sd[k] = t.clone()
                continue
            frozen = k.startswith("audio_encoder.") or (name == "video" and k.startswith("backbone.visual.")) or (
                k.startswith("audio_projector.") and name != "audio")
            if frozen:
                sd[k] = t.clone()
                continue
            d = torch.randn(t.shape, generator=g) * 0.01
            d[torch.rand(t.shape, generator=g) < 0.1] = 0
            sd[k] = bf16_grid(t.float() + d)
        if name == "audio":
            sd["audio_projector.fc2.weight"] = bf16_grid(torch.randn(16, 16, generator=g) * 0.05)
        save_folder(root / name, sd)
        specs[name] = sd
    return {"root": root, "base": base, "specs": specs}


@pytest.fixture(scope="session")
def dare_ckpts(tmp_path_factory) -> dict:
    """fp32 base + one fp32 specialist with a dense delta, so kept entries are visible exactly in the output."""
    root = tmp_path_factory.mktemp("dare")
    g = torch.Generator().manual_seed(1)
    base = {"backbone.language_model.layers.0.mlp.up_proj.weight": torch.randn(100, 201, generator=g)}  # odd rows
    tau = {k: torch.randn(v.shape, generator=g) * 0.1 + 0.05 for k, v in base.items()}
    save_folder(root / "base", base)
    save_folder(root / "ft", {k: base[k] + tau[k] for k in base})
    return {"root": root, "base": base, "tau": {k: load_file(root / "ft" / "model.safetensors")[k] - base[k]
                                                 for k in base}}
