"""`python -m training.fuse`: flags and YAML give the same result; user errors exit 2 with one line."""

from __future__ import annotations

import json

import pytest

from tests.fusion.fusion_reference import SPECIALISTS, fusion_cfg
from training.fusion import ConfigError, fuse
from training.fusion.cli import main as cli_main


def test_output_exists_and_bad_config_errors(ckpts, tmp_path):
    (tmp_path / "o").mkdir()
    with pytest.raises(FileExistsError):
        fuse(fusion_cfg(ckpts, tmp_path / "o"))
    with pytest.raises(ConfigError, match="method must be one of"):
        fusion_cfg(ckpts, tmp_path / "o", method="slerpy")
    with pytest.raises(ConfigError, match="lambda_groups names unknown groups"):
        fusion_cfg(ckpts, tmp_path / "o", lambda_groups={"visoin": 1.0})


def test_cli_flags_and_yaml(ckpts, tmp_path, capsys):
    args = ["--base", str(ckpts["root"] / "base"), "--output", str(tmp_path / "o"), "--method", "ties",
            "--density", "0.3", "--lambda-group", "llm=0.5", "--trim-scope", "tensor", "--no-progress"]
    for n in SPECIALISTS:
        args += ["--model", f"{n}={ckpts['root'] / n}:1.0"]
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["needs_recovery"] == ["audio_projector.fc1.weight", "audio_projector.fc2.weight"]
    assert summary["trim_scope"] == "tensor"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base: {ckpts['root'] / 'base'}\noutput: {tmp_path / 'y'}\nmethod: linear\nprogress: false\n"
                   f"models:\n  - {{name: a, path: {ckpts['root'] / 'image'}}}\n")
    assert cli_main(["--config", str(cfg)]) == 0
    assert cli_main(["--config", str(cfg)]) == 2  # output exists -> clear error, exit 2
    assert "already exists" in capsys.readouterr().err
