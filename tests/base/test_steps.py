"""DistillSteps: the base stage's distillations on the shared loop, checkpointed and resumed."""

from __future__ import annotations

import pytest
import torch

from training.base import steps as module
from training.base.steps import DistillSteps


def _run(tmp_path, total: int, config: dict, stop_after: int | None = None, monkeypatch=None):
    torch.manual_seed(0)
    model, head = torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)
    params = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / total)
    runner = DistillSteps(model, head, optimizer, schedule, tmp_path / "ckpt", save_every=2)
    extra = runner.resume(True, config) or {"losses": []}
    data = torch.randn(total, 4, 3, generator=torch.Generator().manual_seed(1))

    def forward_backward(step: int) -> dict:
        loss = head(model(data[step])).pow(2).mean()
        loss.backward()
        return {"loss": loss.item()}

    def after_step(done: int, logs: dict) -> bool:
        extra["losses"].append(logs["loss"])
        return False

    if stop_after is not None:
        real = module.make_loop_settings

        def stopping(*args):
            settings = real(*args)
            settings.stop_after = stop_after
            return settings

        monkeypatch.setattr(module, "make_loop_settings", stopping)
    runner.run(total, params, forward_backward, after_step, extra_state=lambda: extra, progress=False)
    return model, extra


def test_resumed_run_matches_the_uninterrupted_one_and_refuses_another_config(tmp_path, monkeypatch):
    full, full_extra = _run(tmp_path / "a", 6, {"steps": 6})
    with monkeypatch.context() as patch:
        _run(tmp_path / "b", 6, {"steps": 6}, stop_after=4, monkeypatch=patch)
    resumed, resumed_extra = _run(tmp_path / "b", 6, {"steps": 6})
    assert resumed_extra["losses"] == pytest.approx(full_extra["losses"])
    assert torch.allclose(resumed.weight, full.weight)
    with pytest.raises(ValueError, match="another|delete"):
        _run(tmp_path / "b", 6, {"steps": 7})
