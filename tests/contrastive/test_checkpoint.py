"""The pickle-free training-state format (training/contrastive/checkpoint.py) round-trips optimizer state exactly."""

import json

import pytest
import torch

from training.contrastive.checkpoint import JSON_FILE, load_training_state, save_training_state


def _trained():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    for _ in range(3):
        layer(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return layer, opt, sched


def test_round_trip_resumes_exactly(tmp_path):
    layer, opt, sched = _trained()
    state = {"model": layer.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "trainer": {"step": 3, "best": (0.5, 0.25), "history": [{"loss": 1.5}], "best_state": None}}
    save_training_state(tmp_path / "ckpt", state)
    assert "__tensor__" in (tmp_path / "ckpt" / JSON_FILE).read_text()
    loaded = load_training_state(tmp_path / "ckpt")
    assert loaded["trainer"] == state["trainer"] and isinstance(loaded["trainer"]["best"], tuple)
    assert list(loaded["optimizer"]["state"]) == [0, 1]  # int keys survive JSON
    layer2, opt2, sched2 = _trained()
    layer2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    x = torch.randn(5, 4)
    for model, optimizer, scheduler in ((layer, opt, sched), (layer2, opt2, sched2)):
        model(x).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
    assert torch.equal(layer.weight, layer2.weight) and sched.get_last_lr() == sched2.get_last_lr()


def test_refuses_what_json_cannot_hold_and_foreign_folders(tmp_path):
    with pytest.raises(TypeError, match=r"state\.x holds a set"):
        save_training_state(tmp_path / "bad", {"x": {1, 2}})
    assert not (tmp_path / "bad").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / JSON_FILE).write_text(json.dumps({"format": "x", "state": {}}))
    (tmp_path / "other" / "state.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="format 'x'"):
        load_training_state(tmp_path / "other")
