"""The shared optimizer-step loop (training/contrastive/loop.py): order of hooks, early stop, and an exact resume
from a `save_state_folder` checkpoint (the RNG included)."""

from __future__ import annotations

import pytest
import torch

from training.contrastive.loop import (
    LoopSettings, TrainState, checkpoint_dirs, load_state_folder, resolve_resume, run_steps, save_state_folder,
)
from training.contrastive.trainer import build_scheduler


def _run(root, max_steps, stop_after=None, resume=False, events=None, stop_at=None):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Dropout(0.5))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    scheduler = build_scheduler(optimizer, "cosine", 2, max_steps)
    state, losses = TrainState(), {}
    data = torch.randn(max_steps, 4, 5, generator=torch.Generator().manual_seed(1))
    if resume:
        torch.manual_seed(99)  # the checkpoint must put the RNG back
        saved = load_state_folder(resolve_resume("auto", root), state)
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])

    def forward_backward(step):
        loss = net(data[step]).pow(2).mean()
        loss.backward()
        return {"loss": loss}

    def after_step(step, logs):
        losses[step] = float(logs["loss"])
        if events is not None:
            events.append(("after", step))
        return step == stop_at

    def checkpoint(step):
        if events is not None:
            events.append(("checkpoint", step))
        save_state_folder(root, step, {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict()}, keep=2)

    loop = LoopSettings(max_steps=max_steps, max_grad_norm=1.0, save_every=2, stop_after=stop_after)
    on_step = (lambda step, logs: events.append(("on_step", step))) if events is not None else None
    ran = run_steps(accelerator, state, loop, optimizer, scheduler, list(net.parameters()), forward_backward,
                    after_step, checkpoint, on_step, progress=False)
    return ran, losses, net[0].weight.detach().clone()


def test_resume_from_a_state_folder_matches_an_uninterrupted_run(tmp_path):
    ran, straight, weight = _run(tmp_path / "a", 7)
    assert ran == 7 and sorted(straight) == list(range(1, 8))
    assert _run(tmp_path / "b", 7, stop_after=5)[0] == 5
    assert [p.name for p in checkpoint_dirs(tmp_path / "b")] == ["step_00000002", "step_00000004"]  # keep=2
    ran, resumed, weight2 = _run(tmp_path / "b", 7, resume=True)
    assert ran == 3 and resumed == {s: straight[s] for s in (5, 6, 7)}
    assert torch.equal(weight, weight2)


def test_hooks_run_in_order_and_after_step_stops(tmp_path):
    events = []
    ran, _, _ = _run(tmp_path, 7, events=events, stop_at=2)
    assert ran == 2
    assert events == [("after", 1), ("on_step", 1), ("after", 2), ("checkpoint", 2), ("on_step", 2)]


def test_non_finite_loss_stops_the_loop(tmp_path):
    from accelerate import Accelerator

    p = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([p], lr=0.1)
    scheduler = build_scheduler(optimizer, "constant_with_warmup", 0, 3)

    def forward_backward(step):
        loss = (p * float("nan")).sum()
        loss.backward()
        return {"loss": loss}

    with pytest.raises(FloatingPointError, match="at step 1"):
        run_steps(Accelerator(cpu=True), TrainState(), LoopSettings(max_steps=3, max_grad_norm=0.0), optimizer,
                  scheduler, [p], forward_backward, progress=False)


def test_a_loss_tensor_with_grad_is_detached_before_it_is_logged(tmp_path):
    """`float()` of a tensor that requires grad warns ("Converting a tensor with requires_grad=True to a scalar"):
    the loop detaches `logs["loss"]` first, so neither the loop nor its hooks trigger it."""
    import warnings

    from accelerate import Accelerator

    p = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([p], lr=0.1)
    scheduler = build_scheduler(optimizer, "constant_with_warmup", 0, 2)
    seen = []

    def forward_backward(step):
        loss = (p * p).sum()
        loss.backward()
        return {"loss": loss}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_steps(Accelerator(cpu=True), TrainState(), LoopSettings(max_steps=2, max_grad_norm=1.0), optimizer,
                  scheduler, [p], forward_backward, after_step=lambda step, logs: seen.append(logs["loss"]),
                  progress=False)
    assert [str(w.message) for w in caught if "requires_grad" in str(w.message)] == []
    assert len(seen) == 2 and all(not t.requires_grad for t in seen)
    assert float(seen[0]) == pytest.approx(2.0)
