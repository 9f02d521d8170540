"""The one optimizer-step loop and its checkpoint folders, shared by every training stage.

`run_steps` drives optimizer steps from `state.step` to `loop.max_steps`: the caller's `forward_backward(step)`
computes the step's loss and calls `accelerator.backward`; the loop clips the gradient norm (when
`loop.max_grad_norm > 0`), steps the optimizer and the LR scheduler, zeroes the gradients, counts the step, refuses a
non-finite loss, shows progress, and then calls `after_step` (logging, dev evaluation; may stop early), the
checkpoint every `loop.save_every` steps, and `on_step`, in that order, so a step is checkpointed before anything
the caller runs afterwards can interrupt it. This is the inner loop of transformers' `Trainer` and of accelerate's
examples without their data handling: the stages feed it different data (a DataLoader of contrastive batches in
`trainer.run_loop`, a cached clip bank in recovery), so the loop takes a step function rather than a DataLoader.

Checkpoints are `step_XXXXXXXX` folders under one root (`checkpoint_dirs`, `resolve_resume`); `save_state_folder`
/ `load_state_folder` write one such folder in the pickle-free format of `checkpoint.py` with this process's RNG
state included, for stages whose trainable state is small enough to live in one file (recovery: the projector and
its optimizer). `trainer.save_checkpoint` writes the same folder names for full accelerate `save_state` checkpoints.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.contrastive.checkpoint import load_training_state, rng_state, save_training_state, set_rng_state

CHECKPOINT_PREFIX = "step_"


class TrainState:
    """The loop's step counter; saved as JSON in every checkpoint, never pickled."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


@dataclass
class LoopSettings:
    max_steps: int
    gradcache: bool = True  # used by trainer.run_loop's contrastive step
    max_grad_norm: float = 1.0  # 0 = no clipping
    log_every: int = 10
    save_every: int = 0  # 0 = no checkpoints
    keep_checkpoints: int = 2  # newest checkpoint folders kept (0 = all)
    checkpoint_dir: str | None = None
    stop_after: int | None = None  # stop (as if interrupted) after this step; for tests and time-boxed jobs


def run_steps(
    accelerator: Any,
    state: TrainState,
    loop: LoopSettings,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    params: Sequence[nn.Parameter],
    forward_backward: Callable[[int], dict[str, Any]],
    after_step: Callable[[int, dict[str, Any]], bool] | None = None,
    checkpoint: Callable[[int], None] | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> int:
    """Optimizer steps until `loop.max_steps` (or `loop.stop_after`, or `after_step` returning True); returns the
    number of steps run now.

    `forward_backward(step)` gets the 0-based index of the step being taken and returns its logs; `logs["loss"]` (a
    float or a 0-dim tensor; a tensor is detached here, so `after_step` / `on_step` get a value without autograd
    history) is required. The loop adds `lr` (the first group's, after the scheduler step) and
    `grad_norm` (when clipping) to the logs before `after_step(step, logs)` / `on_step(step, logs)`, which get the
    1-based count of steps done. Raises FloatingPointError on a non-finite loss.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=loop.max_steps, initial=state.step, desc=desc, dynamic_ncols=True,
               disable=not progress or not accelerator.is_local_main_process)
    steps_run = 0
    stop = False
    while state.step < loop.max_steps and not stop:
        logs = forward_backward(state.step)
        if isinstance(logs.get("loss"), torch.Tensor):
            logs["loss"] = logs["loss"].detach()  # float() of a tensor that requires grad warns (and keeps the graph)
        if loop.max_grad_norm and loop.max_grad_norm > 0:
            logs["grad_norm"] = float(accelerator.clip_grad_norm_(list(params), loop.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        steps_run += 1
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {state.step}; lower the LR or check the data")
        logs["lr"] = float(scheduler.get_last_lr()[0])
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if after_step is not None:
            stop = bool(after_step(state.step, logs))
        if checkpoint is not None and loop.save_every and state.step % loop.save_every == 0:
            checkpoint(state.step)
        if on_step is not None:
            on_step(state.step, logs)
        if loop.stop_after is not None and state.step >= loop.stop_after:
            break
    bar.close()
    return steps_run


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Completed checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def checkpoint_folder(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"{CHECKPOINT_PREFIX}{step:08d}"


def prune_checkpoints(root: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints under `root` (keep 0 = delete none)."""
    if keep > 0:
        for old in checkpoint_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def resolve_resume(resume: str | None, root: str | os.PathLike) -> Path | None:
    """`None`/"never" -> fresh; "auto" -> newest checkpoint under root if any; else an explicit folder.
    Raises FileNotFoundError for an explicit folder that does not exist."""
    if resume in (None, "", "never", False):
        return None
    if resume == "auto":
        found = checkpoint_dirs(root)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume checkpoint {path} does not exist")
    return path


def save_state_folder(root: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 0) -> Path:
    """`state` (module doc of checkpoint.py) + `{"train_state": {"step": step}}` + this process's RNG state as
    `root/step_XXXXXXXX` (atomic), then prune to the newest `keep`. Single-process writers only (the caller decides
    which process writes)."""
    folder = save_training_state(checkpoint_folder(root, step),
                                 {**state, "train_state": {"step": step}, "rng": rng_state()})
    prune_checkpoints(root, keep)
    return folder


def load_state_folder(folder: str | os.PathLike, state: TrainState) -> dict[str, Any]:
    """Restore the RNG and `state.step` from a `save_state_folder` checkpoint; returns the rest of its state."""
    saved = load_training_state(folder)
    set_rng_state(saved.pop("rng"))
    state.load_state_dict(saved.pop("train_state"))
    return saved


__all__ = [
    "CHECKPOINT_PREFIX", "LoopSettings", "TrainState", "checkpoint_dirs", "checkpoint_folder", "load_state_folder",
    "prune_checkpoints", "resolve_resume", "run_steps", "save_state_folder",
]
