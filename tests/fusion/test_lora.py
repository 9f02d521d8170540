"""LoRA specialists: the fused ΔW must equal peft's own merge (scale·B·A with rslora and per-module rank/alpha)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from training.fusion import FusionConfig, fuse

peft = pytest.importorskip("peft")


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(12, 12, bias=False)
        self.up_proj = nn.Linear(12, 20, bias=False)


class _Tiny(nn.Module):
    """Module names mirror ours: backbone.language_model.layers.0.{q_proj,up_proj}, plus an audio projector."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.language_model = nn.Module()
        self.backbone.language_model.layers = nn.ModuleList([_Layer()])
        self.backbone.language_model.embed_tokens = nn.Embedding(30, 12)
        self.audio_projector = nn.Linear(6, 12)


def _write_base(model: nn.Module, folder: Path) -> None:
    folder.mkdir(parents=True)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "conan"}))


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_adapter_delta_matches_peft_merge(tmp_path, rslora):
    torch.manual_seed(0)
    model = _Tiny()
    _write_base(model, tmp_path / "base")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj", "embed_tokens"],
                          rank_pattern={"up_proj": 2}, alpha_pattern={"up_proj": 3}, use_rslora=rslora,
                          init_lora_weights=False, modules_to_save=["audio_projector"])
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # a trained projector: modules_to_save copies are full replacement weights
        pm.base_model.model.audio_projector.modules_to_save["default"].weight.add_(0.5)
    pm.save_pretrained(tmp_path / "adapter")
    merged = {k: v.detach().double() for k, v in pm.merge_and_unload().state_dict().items()}

    out = tmp_path / "out"
    man = fuse(FusionConfig(base=tmp_path / "base", models=[{"name": "lora", "path": tmp_path / "adapter"}],
                            output=out, reference=True, out_dtype="float64", progress=False))
    got = load_file(out / "model.safetensors")
    for key in ("backbone.language_model.layers.0.q_proj.weight", "backbone.language_model.layers.0.up_proj.weight",
                "backbone.language_model.embed_tokens.weight"):
        assert not torch.allclose(merged[key], load_file(tmp_path / "base" / "model.safetensors")[key].double())
        torch.testing.assert_close(got[key], merged[key], rtol=1e-6, atol=1e-6)
        assert man["tensors"][key]["changed_by"] == ["lora"]
    # the projector (modules_to_save) is owned by the one specialist that changed it, and flagged for recovery
    proj = man["tensors"]["audio_projector.weight"]
    assert proj["policy"] == "copy_owner" and proj["needs_recovery"] and proj["owners"] == ["lora"]
    torch.testing.assert_close(got["audio_projector.weight"].double(), merged["audio_projector.weight"])
