"""Config keys of bool / int / float fields must hold that type: a wrong one is an error naming the key, not a
silently different run (a quoted "false" is truthy)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from training.common.config import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


def _rehearsal_raw():
    return yaml.safe_load((CONFIGS / "rehearse_tiny.yaml").read_text())


@pytest.mark.parametrize("patch, message", [
    ({"visual_token_cache": "false"}, "visual_token_cache must be true or false, got 'false' (str)"),
    ({"eval_every": "10"}, "eval_every must be int, got '10' (str)"),
    ({"eval_every": 10.5}, "eval_every must be int"),
    ({"seed": True}, "seed must be int, got True (bool)"),
    ({"projector_lr_scale": "1e-1"}, "write 1.0e-4"),
])
def test_rehearsal_config_refuses_wrong_scalar_types(patch, message):
    from training.rehearsal.rehearse import load_config

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, raw={**_rehearsal_raw(), **patch})


def test_nested_sections_are_checked_and_numbers_accepted():
    from training.rehearsal.rehearse import load_config

    raw = _rehearsal_raw()
    with pytest.raises(ConfigError, match="train: lr must be float, got '5e-4'"):
        load_config(None, raw={**raw, "train": {**raw["train"], "lr": "5e-4"}})
    cfg = load_config(None, raw={**raw, "lora": {"r": 8, "alpha": 16, "dropout": 0}, "visual_token_cache": True,
                                 "warmup_ratio": None})
    assert cfg.lora.alpha == 16 and cfg.visual_token_cache is True and cfg.warmup_ratio is None


def test_specialist_config_refuses_a_quoted_bool():
    from training.specialist.decouple import load_config

    raw = yaml.safe_load((CONFIGS / "specialist_tiny_image.yaml").read_text())
    with pytest.raises(ConfigError, match="visual_token_cache must be true or false"):
        load_config(None, raw={**raw, "visual_token_cache": "no"})


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("**/*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_passes(path):
    from training.coma.stage import load_config as coma
    from training.fusion.config import load_config as fusion
    from training.recovery.config import load_config as recover
    from training.rehearsal.rehearse import load_config as rehearse
    from training.specialist.decouple import load_config as specialist

    if path.parent.name == "fusion":
        fusion(path)
    elif path.name.startswith("recover_"):
        recover(path, {"model": "runs/fused"})   # the fused model comes from --model
    else:
        {"coma": coma, "rehearse": rehearse, "specialist": specialist}[path.name.split("_")[0]](path)


@pytest.mark.parametrize("module, config, prog", [
    ("training.rehearsal.rehearse", "rehearse_tiny.yaml", "rehearse"),
    ("training.specialist.decouple", "specialist_tiny_image.yaml", "specialist")])
def test_stage_cli_names_a_missing_model_folder(module, config, prog, tmp_path, capsys):
    import importlib

    main = importlib.import_module(module).main
    code = main(["--config", str(CONFIGS / config), "--model", str(tmp_path / "no-model"),
                 "--output", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"python -m training.{prog}: error: ") and "no such model folder" in err
    assert str(tmp_path / "no-model") in err
