"""The dev-split fusion weight sweep (training/fusion/sweep.py) on small synthetic checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from training.fusion import ConfigError, FusionConfig, ModelSpec
from training.fusion.sweep import coordinate_ascent_weights, sweep_weights, weight_grid

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


def _three_specialists(tmp_path: Path) -> FusionConfig:
    base = _save(tmp_path / "base", 0.0)
    a, b, c = _save(tmp_path / "a", 1.0), _save(tmp_path / "b", 10.0), _save(tmp_path / "c", 100.0)
    return FusionConfig(base=base, output=tmp_path / "unused", progress=False,
                        models=[ModelSpec(a, "a"), ModelSpec(b, "b"), ModelSpec(c, "c")])


def _value(model_dir: Path) -> float:
    return float(load_file(model_dir / "model.safetensors")[KEY][0, 0])


def test_coordinate_ascent_moves_one_weight_at_a_time_and_scores_each_point_once(tmp_path):
    cfg = _three_specialists(tmp_path)   # fused value = a + 10 b + 100 c
    seen = []

    def evaluate(model_dir: Path) -> dict:   # "dev score": closeness to 12.0, reached at a 0.0, b 0.2, c 0.1
        seen.append(_value(model_dir))
        return {"value": seen[-1]}

    result = coordinate_ascent_weights(
        cfg, {"a": 1.0, "b": 0.0, "c": 0.0}, {"a": (0.0, 1.0), "b": (0.0, 0.2, 0.5), "c": (0.0, 0.1)},
        evaluate, lambda dev: -abs(dev["value"] - 12.0), tmp_path / "chosen", tmp_path / "work", rounds=3)
    assert result["weights"] == {"a": 0.0, "b": 0.2, "c": 0.1}
    assert _value(tmp_path / "chosen") == pytest.approx(12.0)
    # round 1: start 1.0 -> a 0.0 (0.0: worse) -> b 0.2 (3.0: moves), b 0.5 (6.0: moves) -> c 0.1 (16.0: 4 from 12,
    # moves); round 2 moves a to 0.0 and b to 0.2; round 3 finds no move and stops
    assert seen[:5] == pytest.approx([1.0, 0.0, 3.0, 6.0, 16.0])
    # every point fused once, the best trial kept at `output`, the work folder gone
    points = [tuple(sorted(t["weights"].items())) for t in result["trials"]]
    assert len(points) == len(set(points)) == len(seen)
    assert not (tmp_path / "work").exists()


def test_coordinate_ascent_keeps_the_start_on_ties_and_stops_after_a_still_round(tmp_path):
    cfg = _three_specialists(tmp_path)
    result = coordinate_ascent_weights(cfg, {"a": 0.3, "b": 0.3, "c": 0.5}, {"a": (0.3, 1.0), "c": (0.5, 1.0)},
                                       lambda d: {}, lambda dev: 0.0, tmp_path / "chosen", tmp_path / "w", rounds=5)
    assert result["weights"] == {"a": 0.3, "b": 0.3, "c": 0.5} and result["best"] == 0
    assert len(result["trials"]) == 3   # start, a 1.0, c 1.0; no second round after one without a move


def test_coordinate_ascent_rejects_bad_arguments(tmp_path):
    cfg = _three_specialists(tmp_path)
    start = {"a": 0.3, "b": 0.3, "c": 0.5}
    with pytest.raises(ConfigError, match="start"):
        coordinate_ascent_weights(cfg, {"a": 0.3}, {"a": (1.0,)}, lambda d: {}, lambda d: 0.0, tmp_path / "o", tmp_path / "w")
    for values, rounds in (({"z": (1.0,)}, 1), ({"a": ()}, 1), ({"a": (1.0,)}, 0)):
        with pytest.raises(ConfigError, match="values must give"):
            coordinate_ascent_weights(cfg, start, values, lambda d: {}, lambda d: 0.0, tmp_path / "o", tmp_path / "w",
                                      rounds=rounds)
    assert not (tmp_path / "o").exists()


def test_a_nan_objective_never_wins(tmp_path):
    """A trial whose objective is NaN (e.g. a fused model whose embeddings went non-finite) ranks below every number:
    NaN compares False both ways, so a NaN first trial was kept as the best, and a NaN start stopped every move."""
    cfg = _three_specialists(tmp_path)
    nan_at = lambda value: (lambda dev: float("nan") if dev["value"] == pytest.approx(value) else -abs(dev["value"]))  # noqa: E731
    evaluate = lambda model_dir: {"value": _value(model_dir)}  # noqa: E731
    grid = [{"a": 1.0, "b": 0.0, "c": 0.0}, {"a": 0.0, "b": 0.5, "c": 0.0}]
    result = sweep_weights(cfg, grid, evaluate, nan_at(1.0), tmp_path / "chosen", tmp_path / "work")
    assert result["best"] == 1 and _value(tmp_path / "chosen") == pytest.approx(5.0)
    result = coordinate_ascent_weights(cfg, grid[0], {"a": (0.0, 1.0)}, evaluate, nan_at(1.0), tmp_path / "chosen",
                                       tmp_path / "work")
    assert result["weights"] == {"a": 0.0, "b": 0.0, "c": 0.0} and _value(tmp_path / "chosen") == pytest.approx(0.0)


def test_the_chosen_model_replaces_an_earlier_output_whole_and_a_failed_search_keeps_it(tmp_path):
    cfg = _three_specialists(tmp_path)
    chosen = tmp_path / "chosen"
    _save(chosen, -1.0)
    (chosen / "stale.txt").write_text("from an earlier search")

    def failing(model_dir: Path) -> dict:
        raise RuntimeError("dev evaluation failed")

    with pytest.raises(RuntimeError, match="dev evaluation failed"):
        coordinate_ascent_weights(cfg, {"a": 1.0, "b": 0.0, "c": 0.0}, {"a": (0.0,)}, failing, lambda d: 0.0,
                                  chosen, tmp_path / "work")
    assert _value(chosen) == -1.0 and not (tmp_path / "work").exists()
    coordinate_ascent_weights(cfg, {"a": 1.0, "b": 0.0, "c": 0.0}, {"a": (0.0,)}, lambda d: {"value": _value(d)},
                              lambda dev: dev["value"], chosen, tmp_path / "work")
    assert _value(chosen) == 1.0 and not (chosen / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".chosen")] == []   # no partial or old folder
