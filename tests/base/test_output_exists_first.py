"""A forgotten --force fails before the work, not after it: each writer checks its output folder first.

Every call below gets inputs it could not train on (no texts, no items, no model folders), so the only way to see
FileExistsError is a check that runs before anything else.
"""

from __future__ import annotations

import pytest


def _existing(tmp_path):
    out = tmp_path / "already-there"
    out.mkdir()
    return out


def test_distill_text_checks_the_output_first(tmp_path):
    from training.base.distill_text import distill_text

    with pytest.raises(FileExistsError, match="already-there"):
        distill_text(tmp_path / "no-model", [], _existing(tmp_path))


def test_distill_vision_checks_the_output_first(tmp_path):
    from training.base.distill_vision import distill_vision

    with pytest.raises(FileExistsError, match="already-there"):
        distill_vision(tmp_path / "no-model", [], _existing(tmp_path))


def test_recover_checks_the_output_first(tmp_path):
    from training.recovery.config import RecoverConfig
    from training.recovery.recover import recover

    cfg = RecoverConfig(model=str(tmp_path / "no-model"), output=str(_existing(tmp_path)),
                        train_data=str(tmp_path / "no.jsonl"))
    with pytest.raises(FileExistsError, match="already-there"):
        recover(cfg)


def test_realign_checks_the_output_first(tmp_path):
    from training.recovery.realign import run

    with pytest.raises(FileExistsError, match="already-there"):
        run(tmp_path / "no-specialist", tmp_path / "no-fused", tmp_path / "no.jsonl", output=_existing(tmp_path))


def test_overwrite_lets_the_work_start(tmp_path):
    from training.base.distill_text import distill_text

    with pytest.raises(ValueError, match="distinct texts"):   # past the output check, stopped by the empty corpus
        distill_text(tmp_path / "no-model", [], _existing(tmp_path), overwrite=True)
