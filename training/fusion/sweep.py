"""Choose per-specialist fusion weights by a small search scored on a DEV split (never the test split).

Task arithmetic's scale is a hyperparameter the literature tunes on validation data (fusion.md §2: "λ tuned on
validation"; the paper grid-searched α on a diagnostic validation set disjoint from MMEB/MAEB, paper.md). Two
searches: a grid (`sweep_weights`) and per-specialist coordinate ascent (`coordinate_ascent_weights`). Each fuses one
model per weight point, asks the caller's `evaluate(model_dir)` for its dev scores, reduces them to one number
with `objective`, keeps the best model and deletes the others. It never looks at data itself: which split is read is
the caller's `evaluate`, so the pipeline passes one that opens only `dev.jsonl` (tests check that). Why our own loop:
the searches are a handful of points and each trial is a full fused model folder, which no tuning library writes for us.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from training.common.io_utils import atomic_output_dir

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


class _Trials:
    """Fuses and dev-scores weight points, each point once, keeping only the best trial's folder.

    Shared by the grid sweep and the coordinate ascent: both are sequences of `score(weights)` calls, and both check
    up front that every point names each specialist.
    """

    def __init__(self, config: FusionConfig, evaluate: Callable[[Path], dict[str, Any]],
                 objective: Callable[[dict[str, Any]], float], work_dir: Path):
        self.config, self.evaluate, self.objective = config, evaluate, objective
        self.work_dir = Path(work_dir)
        self.trials: list[dict[str, Any]] = []
        self.best, self.best_dir = -1, None

    def score(self, weights: Mapping[str, float]) -> float:
        """The objective of `weights` (fused and evaluated on the first call; later calls reuse the trial), for
        comparing: a NaN objective (recorded as it is in the trial) counts as -inf, below every number."""
        weights = {name: float(weights[name]) for name in weights}
        for trial in self.trials:
            if trial["weights"] == weights:
                return _rank(trial["objective"])
        i = len(self.trials)
        trial_dir = self.work_dir / f"trial-{i}"
        models = [ModelSpec(path=m.path, name=m.name, weight=weights[m.name], kind=m.kind) for m in self.config.models]
        fuse(replace(self.config, models=models, output=trial_dir, overwrite=True, progress=False))
        dev = self.evaluate(trial_dir)
        score = float(self.objective(dev))
        self.trials.append({"weights": weights, "objective": score, "dev": dev})
        if self.best < 0 or _rank(score) > _rank(self.trials[self.best]["objective"]):
            if self.best_dir is not None:
                shutil.rmtree(self.best_dir)
            self.best, self.best_dir = i, trial_dir
        else:
            shutil.rmtree(trial_dir)
        return _rank(score)

    def run(self, search: Callable[[], None], output: Path) -> dict[str, Any]:
        """Run `search` (which calls `score`), move the best trial to `output` (`atomic_output_dir`: an earlier
        `output` is replaced in one rename, so a killed run leaves the old model or the new one), delete `work_dir`."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            search()
            with atomic_output_dir(output, overwrite=True) as staging:
                for entry in self.best_dir.iterdir():   # a rename on one file system, a copy across two
                    shutil.move(str(entry), str(staging / entry.name))
        finally:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        return {"trials": self.trials, "best": self.best, "weights": self.trials[self.best]["weights"]}


def _rank(objective: float) -> float:
    """`objective` for comparisons: NaN (which compares False both ways) as -inf."""
    return -math.inf if math.isnan(objective) else objective


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
    fused model folder and returns its dev scores; `objective` maps those to one number (higher is better, NaN
    lowest; the first best grid point wins ties). Trial folders live under `work_dir` and are deleted; `output` is
    replaced by the best one. Returns {"trials": [{"weights", "objective", "dev"}], "best": index, "weights": best
    weights}. Raises ConfigError when a grid point misses a specialist name or the grid is empty.
    """
    names = [m.name for m in config.models]
    if not grid:
        raise ConfigError("sweep_weights: the weight grid is empty")
    for weights in grid:
        if set(weights) != set(names):
            raise ConfigError(f"sweep_weights: grid point {dict(weights)} must give a weight to each of {names}")
    trials = _Trials(config, evaluate, objective, work_dir)
    return trials.run(lambda: [trials.score(weights) for weights in grid], output)


def coordinate_ascent_weights(
    config: FusionConfig,
    start: Mapping[str, float],
    values: Mapping[str, Sequence[float]],
    evaluate: Callable[[Path], dict[str, Any]],
    objective: Callable[[dict[str, Any]], float],
    output: Path,
    work_dir: Path,
    rounds: int = 1,
) -> dict[str, Any]:
    """Per-specialist weights by coordinate ascent on the caller's dev data, from `start` (e.g. the paper's α).

    Each round visits the specialists in `values`' order and moves one weight at a time to the value of
    `values[name]` with the best objective, the others held; a move needs a strictly better objective (ties keep the
    current point, so the start wins ties). Stops after `rounds` rounds or a round without a move. Cost: 1 + the sum
    of len(values[name]) - 1 fused models a round, against the product of them for a full grid. Why: per-specialist
    weights can do better than one shared α (a video delta that also helps image), and a grid over five specialists
    is too dear for the main job's budget. Returns what `sweep_weights` returns (trials in visiting order). Raises
    ConfigError when `start` misses a specialist, `values` names an unknown one or gives none, or `rounds` < 1.
    """
    names = [m.name for m in config.models]
    if set(start) != set(names):
        raise ConfigError(f"coordinate_ascent_weights: start {dict(start)} must give a weight to each of {names}")
    unknown = sorted(set(values) - set(names))
    if unknown or any(not values[name] for name in values) or rounds < 1:
        raise ConfigError(f"coordinate_ascent_weights: values must give at least one weight to specialists out of "
                          f"{names} and rounds must be >= 1; got values {dict(values)}, rounds {rounds}")
    trials = _Trials(config, evaluate, objective, work_dir)

    def search() -> None:
        current = {name: float(start[name]) for name in names}
        current_score = trials.score(current)
        for _ in range(rounds):
            moved = False
            for name, candidates in values.items():
                for value in candidates:
                    point = {**current, name: float(value)}
                    if point == current:
                        continue
                    score = trials.score(point)
                    if score > current_score:
                        current, current_score, moved = point, score, True
            if not moved:
                break

    return trials.run(search, output)
