"""The base stage's distillations on the shared optimizer loop, resumable: one helper for text and vision.

`DistillSteps` wraps `training.contrastive.loop.run_steps` (clipping, non-finite loss check, progress) with the
checkpoints of a distillation whose trainable state is small: the student's trainable parameters, the throw-away
head, the optimizer and the LR schedule, plus whatever the caller adds (logs, best dev step), saved in the loop's
pickle-free `step_XXXXXXXX` folders (`save_state_folder`, newest kept) every `save_every` steps.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from training.contrastive.loop import (
    LoopSettings, TrainState, load_state_folder, resolve_resume, run_steps, save_state_folder,
)


class DistillSteps:
    """Resume (`resume`) then run (`run`) the optimizer steps of one distillation; the model stays on the CPU."""

    def __init__(self, model: torch.nn.Module, head: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, checkpoint_dir: str | Path | None = None, save_every: int = 0) -> None:
        self.model, self.head, self.optimizer, self.scheduler = model, head, optimizer, scheduler
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.save_every = save_every if self.checkpoint_dir is not None else 0
        self.state = TrainState()
        self.config: dict[str, Any] = {}

    def resume(self, enabled: bool = True, config: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Load the newest checkpoint under `checkpoint_dir` (when `enabled` and one exists) into the model, head,
        optimizer and schedule; returns the caller's extra state saved with it, or None when starting fresh.
        `config` (JSON values) is saved with every checkpoint by `run`; resuming one saved under another config raises
        ValueError naming the folder (a stale checkpoint of another run must not be continued silently)."""
        self.config = config or {}
        if not enabled or self.checkpoint_dir is None:
            return None
        folder = resolve_resume("auto", self.checkpoint_dir)
        if folder is None:
            return None
        saved = load_state_folder(folder, self.state)
        if saved.get("config", {}) != self.config:
            raise ValueError(f"{folder} was saved by a distillation with config {saved.get('config')}, not "
                             f"{self.config}; delete {self.checkpoint_dir} to start afresh")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in saved["student"].items():
                params[name].copy_(value)
        self.head.load_state_dict(saved["head"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        print(f"[{folder.parent.name}] resumed from {folder} at step {self.state.step}", flush=True)
        return saved["extra"]

    def run(self, steps: int, params: list[torch.nn.Parameter], forward_backward: Callable[[int], dict[str, Any]],
            after_step: Callable[[int, dict[str, Any]], bool] | None = None,
            extra_state: Callable[[], dict[str, Any]] = dict, desc: str = "distill", progress: bool = True,
            max_grad_norm: float = 1.0) -> int:
        """Steps from the current (possibly resumed) step to `steps` on `run_steps`; returns the steps run now.
        `extra_state()` is saved with every checkpoint and handed back by `resume`."""
        from accelerate import Accelerator

        def checkpoint(done: int) -> None:
            save_state_folder(self.checkpoint_dir, done, {
                "student": {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad},
                "head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "extra": extra_state(), "config": self.config}, keep=1)

        loop = make_loop_settings(steps, max_grad_norm, self.save_every, self.checkpoint_dir)
        return run_steps(Accelerator(), self.state, loop, self.optimizer, self.scheduler, params, forward_backward,
                         after_step, checkpoint, desc=desc, progress=progress)


def make_loop_settings(steps: int, max_grad_norm: float, save_every: int, checkpoint_dir: Path | None) -> LoopSettings:
    """The loop's settings for a distillation (a seam for tests that stop a run part-way: `stop_after`)."""
    return LoopSettings(max_steps=steps, max_grad_norm=max_grad_norm, save_every=save_every,
                        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir is not None else None)
