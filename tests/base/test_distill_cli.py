"""The distillation commands answer a user's bad input with one line naming it and exit status 2 (the convention
of training/common/cli.py), before any model or teacher is loaded."""

from __future__ import annotations

import pytest


def _error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as code:
        main(argv)
    assert code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_distill_text_names_the_bad_input(tmp_path, capsys):
    from training.base.distill_text import main

    model, texts = tmp_path / "model", tmp_path / "texts.txt"
    model.mkdir()
    texts.write_text("one\ntwo\n")
    line = _error(main, ["--model", str(tmp_path / "nope"), "--texts", str(texts), "--out", str(tmp_path / "o")], capsys)
    assert line == f"python -m training.distill_text: error: --model {tmp_path / 'nope'}: no such model folder"
    line = _error(main, ["--model", str(model), "--texts", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")],
                  capsys)
    assert line.startswith("python -m training.distill_text: error:") and "missing.txt" in line
    line = _error(main, ["--model", str(model), "--texts", str(texts), "--out", str(model)], capsys)
    assert "already exists" in line and str(model) in line
    line = _error(main, ["--model", str(model), "--texts", str(texts), "--out", str(tmp_path / "o")], capsys)
    assert "distinct texts" in line   # 2 texts for a batch of 32


def test_distill_vision_names_the_bad_input(tmp_path, capsys):
    from training.base.distill_vision import main

    model = tmp_path / "model"
    model.mkdir()
    line = _error(main, ["--model", str(model), "--data", str(tmp_path / "pairs"), "--out", str(tmp_path / "o")], capsys)
    assert line.startswith("python -m training.distill_vision: error: no train.jsonl under")
