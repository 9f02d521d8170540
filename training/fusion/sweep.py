"""Choose per-specialist fusion weights by a small grid sweep scored on a DEV split (never the test split).

Task arithmetic's scale is a hyperparameter the literature tunes on validation data (fusion.md §2: "λ tuned on
validation"; the paper grid-searched α on a diagnostic validation set disjoint from MMEB/MAEB, paper.md). This module
fuses one model per grid point, asks the caller's `evaluate(model_dir)` for its dev scores, reduces them to one number
with `objective`, keeps the best model and deletes the others. It never looks at data itself: which split is read is
the caller's `evaluate`, so the pipeline passes one that opens only `dev.jsonl` (tests check that). Why our own loop:
the grid is a handful of points and each trial is a full fused model folder, which no tuning library writes for us.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import ConfigError, FusionConfig, ModelSpec
from .engine import fuse


def weight_grid(paper: Mapping[str, float], axes: Mapping[str, Sequence[str]],
                values: Mapping[str, Sequence[float]]) -> list[dict[str, float]]:
    """Every combination of `values[axis]` given to the specialists of `axes[axis]`, others keeping `paper`.

    E.g. axes {"visual_text": ["image", "video", "document", "text"], "audio": ["audio"]} with values
    {"visual_text": [0.3, 1.0], "audio": [0.5, 1.0]} gives 4 weight dicts. `paper` comes first whatever the order of
    `values` (a tie in the sweep then keeps the paper weights); duplicates are dropped. Raises ValueError when an axis
    names a specialist `paper` lacks or has no values.
    """
    for axis, names in axes.items():
        unknown = [n for n in names if n not in paper]
        if unknown or not values.get(axis):
            raise ValueError(f"weight_grid: axis {axis!r} needs specialists out of {sorted(paper)} and at least one "
                             f"value; got specialists {list(names)}, values {values.get(axis)}")
    grid: list[dict[str, float]] = [dict(paper)]
    combos: list[dict[str, float]] = [{}]
    for axis, names in axes.items():
        combos = [{**c, **{n: float(v) for n in names}} for c in combos for v in values[axis]]
    for combo in combos:
        weights = {**paper, **combo}
        if weights not in grid:
            grid.append(weights)
    return grid


def sweep_weights(
    config: FusionConfig,
    grid: Sequence[Mapping[str, float]],
    evaluate: Callable[[Path], dict[str, Any]],
    objective: Callable[[dict[str, Any]], float],
    output: Path,
    work_dir: Path,
) -> dict[str, Any]:
    """Fuse `config` once per weight dict of `grid`, score each on the caller's dev data, keep the best at `output`.

    `config.models` give the specialists (their `weight` is replaced by the grid's, by model name); `evaluate` gets a
    fused model folder and returns its dev scores; `objective` maps those to one number (higher is better; the first
    best grid point wins ties). Trial folders live under `work_dir` and are deleted; `output` is replaced by the best
    one. Returns {"trials": [{"weights", "objective", "dev"}], "best": index, "weights": best weights}. Raises
    ConfigError when a grid point misses a specialist name or the grid is empty.
    """
    names = [m.name for m in config.models]
    if not grid:
        raise ConfigError("sweep_weights: the weight grid is empty")
    for weights in grid:
        if set(weights) != set(names):
            raise ConfigError(f"sweep_weights: grid point {dict(weights)} must give a weight to each of {names}")
    work_dir, output = Path(work_dir), Path(output)
    work_dir.mkdir(parents=True, exist_ok=True)
    trials: list[dict[str, Any]] = []
    best, best_dir = -1, None
    try:
        for i, weights in enumerate(grid):
            trial_dir = work_dir / f"trial-{i}"
            models = [ModelSpec(path=m.path, name=m.name, weight=float(weights[m.name]), kind=m.kind)
                      for m in config.models]
            fuse(replace(config, models=models, output=trial_dir, overwrite=True, progress=False))
            dev = evaluate(trial_dir)
            score = float(objective(dev))
            trials.append({"weights": dict(weights), "objective": score, "dev": dev})
            if best < 0 or score > trials[best]["objective"]:
                if best_dir is not None:
                    shutil.rmtree(best_dir)
                best, best_dir = i, trial_dir
            else:
                shutil.rmtree(trial_dir)
        if output.exists():
            shutil.rmtree(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        best_dir.rename(output)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return {"trials": trials, "best": best, "weights": trials[best]["weights"]}
