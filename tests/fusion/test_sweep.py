"""The dev-split fusion weight sweep (training/fusion/sweep.py) on small synthetic checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from training.fusion import ConfigError, FusionConfig, ModelSpec
from training.fusion.sweep import sweep_weights, weight_grid

KEY = "backbone.language_model.layers.0.mlp.up_proj.weight"


def _save(folder: Path, value: float) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "conan"}))
    save_file({KEY: torch.full((4, 4), value)}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_weight_grid_puts_the_paper_point_first_and_drops_duplicates():
    paper = {"image": 0.3, "text": 0.3, "audio": 0.5}
    grid = weight_grid(paper, {"vt": ("image", "text"), "audio": ("audio",)}, {"vt": (1.0, 0.3), "audio": (0.5, 1.0)})
    assert grid[0] == paper and len(grid) == 4
    assert {"image": 1.0, "text": 1.0, "audio": 1.0} in grid
    with pytest.raises(ValueError, match="axis 'x'"):
        weight_grid(paper, {"x": ("video",)}, {"x": (1.0,)})


def test_sweep_keeps_the_best_dev_point_and_only_scores_fused_trials(tmp_path):
    base = _save(tmp_path / "base", 0.0)
    a, b = _save(tmp_path / "a", 1.0), _save(tmp_path / "b", 10.0)   # task vectors +1 and +10
    cfg = FusionConfig(base=base, output=tmp_path / "unused", models=[ModelSpec(a, "a"), ModelSpec(b, "b")],
                       progress=False)
    grid = [{"a": 0.3, "b": 0.3}, {"a": 1.0, "b": 0.2}, {"a": 1.0, "b": 0.0}, {"a": 0.5, "b": 0.25}]
    seen = []

    def evaluate(model_dir: Path) -> dict:   # "dev score": closeness of the fused value to 3.0
        seen.append(model_dir)
        value = float(load_file(model_dir / "model.safetensors")[KEY][0, 0])
        return {"text": {"mrr": -abs(value - 3.0)}, "value": value}

    result = sweep_weights(cfg, grid, evaluate, lambda dev: dev["text"]["mrr"], tmp_path / "chosen",
                           tmp_path / "work")
    values = [t["dev"]["value"] for t in result["trials"]]
    assert values == pytest.approx([3.3, 3.0, 1.0, 3.0])
    assert result["best"] == 1 and result["weights"] == {"a": 1.0, "b": 0.2}   # first of the tied best wins
    assert float(load_file(tmp_path / "chosen" / "model.safetensors")[KEY][0, 0]) == pytest.approx(3.0)
    assert all(Path(p).parent == tmp_path / "work" for p in seen) and not (tmp_path / "work").exists()
    assert not (tmp_path / "unused").exists()


def test_sweep_rejects_a_grid_point_without_every_specialist(tmp_path):
    base, a = _save(tmp_path / "base", 0.0), _save(tmp_path / "a", 1.0)
    cfg = FusionConfig(base=base, output=tmp_path / "o", models=[ModelSpec(a, "a")], progress=False)
    with pytest.raises(ConfigError, match="grid point"):
        sweep_weights(cfg, [{"b": 1.0}], lambda d: {}, lambda d: 0.0, tmp_path / "c", tmp_path / "w")
    with pytest.raises(ConfigError, match="empty"):
        sweep_weights(cfg, [], lambda d: {}, lambda d: 0.0, tmp_path / "c", tmp_path / "w")
