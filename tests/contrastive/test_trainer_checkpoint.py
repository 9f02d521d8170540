"""The stages' full checkpoints (`trainer.save_checkpoint` / `load_checkpoint`: accelerate `save_state` + the
pickle-free loop state) resume exactly and refuse a file that carries pickle code."""

from __future__ import annotations

import pickle

import pytest
import torch

from training.contrastive.trainer import LOOP_STATE_DIR, TrainState, build_scheduler, load_checkpoint, save_checkpoint


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 4)
        self.drop = torch.nn.Dropout(0.5)  # draws on the RNG, so a resume must restore it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc(x)).pow(2).mean()


def _setup():
    from accelerate import Accelerator

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = _Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = build_scheduler(optimizer, "cosine", 2, 10)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return accelerator, model, optimizer, scheduler


def _step(accelerator, model, optimizer, scheduler, x) -> float:
    loss = model(x)
    accelerator.backward(loss)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def test_resume_gives_the_uninterrupted_next_steps(tmp_path):
    data = torch.randn(6, 3, 6, generator=torch.Generator().manual_seed(1))
    accelerator, model, optimizer, scheduler = _setup()
    for x in data[:3]:
        _step(accelerator, model, optimizer, scheduler, x)
    folder = save_checkpoint(accelerator, tmp_path, 3, loop_state={"train_state": {"step": 3}, "sampler": None})
    assert (folder / LOOP_STATE_DIR / "state.json").is_file() and (folder / "rng_state_0" / "state.json").is_file()
    assert not list(folder.glob("*.pkl"))  # no pickled RNG or custom objects
    straight = [_step(accelerator, model, optimizer, scheduler, x) for x in data[3:]]
    weights = model.fc.weight.detach().clone()

    accelerator, model, optimizer, scheduler = _setup()
    torch.manual_seed(123)  # a different RNG: the checkpoint must restore it
    state = TrainState()
    load_checkpoint(accelerator, folder, state)
    assert state.step == 3
    resumed = [_step(accelerator, model, optimizer, scheduler, x) for x in data[3:]]
    assert resumed == straight
    assert torch.equal(model.fc.weight, weights)


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['PWNED']).write_text('x')",))


@pytest.mark.parametrize("victim", ["optimizer.bin", "scheduler.bin"])
def test_a_checkpoint_file_with_pickle_code_is_refused(tmp_path, monkeypatch, victim):
    accelerator, model, optimizer, scheduler = _setup()
    _step(accelerator, model, optimizer, scheduler, torch.randn(3, 6))
    folder = save_checkpoint(accelerator, tmp_path / "ckpt", 1)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED", str(marker))
    (folder / victim).write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only load failed"):
        load_checkpoint(accelerator, folder, TrainState())
    assert not marker.exists()
