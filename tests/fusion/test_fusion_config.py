"""Fusion configs load through the common loader (training/common/config.py): one ConfigError, paths resolved."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.fusion import ConfigError


def test_example_config_parses():
    import yaml

    from training.fusion.config import load_config

    path = Path(__file__).resolve().parents[2] / "training" / "configs" / "fusion" / "example.yaml"
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    assert cfg.method == raw["method"] and cfg.lambda_for("backbone.visual.blocks.0.mlp.fc1.weight") == 0.5


def test_config_loader_is_the_common_one(tmp_path, monkeypatch):
    from training.common.config import ConfigError as CommonConfigError
    from training.fusion.config import load_config

    assert ConfigError is CommonConfigError
    cfg_path = tmp_path / "f.yaml"
    cfg_path.write_text("base: b\noutput: out\nlambda: 0.5\nmodels:\n  - {name: a, path: a}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cfg_path)
    assert cfg.base == tmp_path / "b" and cfg.output == tmp_path / "out" and cfg.models[0].path == tmp_path / "a"
    assert cfg.lambda_ == 0.5
    cfg_path.write_text("base: b\noutput: out\nmodels:\n  - {name: a, path: a, wieght: 2}\n")
    with pytest.raises(ConfigError, match=r"models\[0\]: unknown key\(s\) \['wieght'\]"):
        load_config(cfg_path)
    with pytest.raises(ConfigError, match="missing required key 'models'"):
        load_config(None, base="b", output="o")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
