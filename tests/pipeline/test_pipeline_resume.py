"""Resuming a pipeline folder: redone inputs redo what reads them, and other settings are never mixed in.

The stages are replaced by instant fakes that record their calls; the bookkeeping under test (stage.json records,
`STAGE_INPUTS`, the settings check) is the real `Pipeline`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.pipeline.runner import PRESETS, STAGE_INPUTS, STAGES, Pipeline, PipelineError, Preset, main


class FakePipeline(Pipeline):
    """Every stage writes one marker file and returns {"value": n} (n = how many stages ran before it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []
        for stage in STAGES:
            setattr(self, f"stage_{stage}", self._fake(stage))

    def _fake(self, stage):
        def run(out):
            self.calls.append(stage)
            (out / "done.txt").write_text(stage)
            return {"value": len(self.calls)}
        return run


def make(out, force=(), preset="smoke", seed=0):
    return FakePipeline(out, PRESETS[preset], seed=seed, force=set(force), preset_name=preset, command="test")


def test_stage_inputs_are_earlier_stages():
    for stage, inputs in STAGE_INPUTS.items():
        assert all(STAGES.index(i) < STAGES.index(stage) for i in inputs), stage
    assert set(STAGE_INPUTS) == set(STAGES) and set(STAGE_INPUTS["report"]) == set(STAGES[:-1])


def test_forced_stage_redoes_the_stages_that_read_it(tmp_path):
    make(tmp_path).run(list(STAGES))
    rerun = make(tmp_path, force={"specialists"})
    rerun.run(list(STAGES))
    # data and base are untouched; everything after the specialists reads them (directly or through fuse) and is
    # redone, report included.
    assert rerun.calls == [s for s in STAGES if s not in ("data", "base")]
    assert rerun.calls[:5] == ["specialists", "fuse", "drift", "recover", "rehearse"] and rerun.calls[-1] == "report"
    again = make(tmp_path)
    again.run(list(STAGES))
    assert again.calls == []


def test_drift_rerun_leaves_recovery_alone(tmp_path):
    make(tmp_path).run(list(STAGES))
    rerun = make(tmp_path, force={"drift"})
    rerun.run(list(STAGES))
    assert rerun.calls == ["drift", "report"]


def test_partial_rerun_blocks_a_stage_with_out_of_date_inputs(tmp_path, capsys):
    make(tmp_path).run(list(STAGES))
    assert capsys.readouterr().out.endswith(f"report: {tmp_path / 'report' / 'report.md'}\n")
    make(tmp_path, force={"base"}).run(["base"])
    printed = capsys.readouterr().out
    assert "out of date now" in printed and "report:" not in printed   # no report was written by this run
    report_only = make(tmp_path)
    with pytest.raises(PipelineError, match="was redone after"):
        report_only.run(["report"])
    assert report_only.calls == []
    with pytest.raises(PipelineError, match="fuse has not finished"):
        fresh = make(tmp_path / "fresh")
        fresh.run(["data", "base", "specialists", "drift"])


def test_records_from_before_finished_at_still_resume(tmp_path):
    make(tmp_path).run(list(STAGES))
    for stage in STAGES:  # as written before stage.json recorded preset, seed, time and settings
        marker = tmp_path / stage / "stage.json"
        record = json.loads(marker.read_text())
        for key in ("finished_at", "pipeline_preset", "pipeline_seed", "settings"):
            record.pop(key)
        marker.write_text(json.dumps(record))
    rerun = make(tmp_path, preset="small", force={"rehearse"})
    rerun.run(list(STAGES))
    assert rerun.calls == list(STAGES[STAGES.index("rehearse"):])   # rehearse and what reads the final model


@pytest.mark.parametrize("preset, seed", [("small", 0), ("smoke", 1)])
def test_other_preset_or_seed_is_refused(tmp_path, preset, seed):
    make(tmp_path).run(list(STAGES))
    before = (tmp_path / "run.json").read_text()
    other = make(tmp_path, preset=preset, seed=seed)
    with pytest.raises(PipelineError, match="preset smoke, seed 0") as error:
        other.run(list(STAGES))
    assert f"preset {preset}, seed {seed}" in str(error.value)
    assert other.calls == [] and (tmp_path / "run.json").read_text() == before
    everything = make(tmp_path, preset=preset, seed=seed, force={"all"})
    everything.run(list(STAGES))
    assert everything.calls == list(STAGES)


def test_cli_reports_a_mixed_folder_as_a_usage_error(tmp_path, capsys):
    make(tmp_path).run(list(STAGES))
    with pytest.raises(SystemExit) as code:
        main(["--preset", "small", "--out", str(tmp_path), "--stages", "report"])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m training.pipeline") and "preset smoke, seed 0" in err


def test_specialist_schedule_takes_each_override_else_the_preset_default():
    preset = Preset(data="smoke", backbone="smoke", distill_steps=1, specialist_steps=12, batch_size=8,
                    recover_steps=1, rehearse_steps=1, eval_limit=8, specialist_lr=2e-3,
                    specialist_batch_overrides=(("text", 64),), specialist_steps_overrides=(("image", 300),),
                    specialist_lr_overrides=(("text", 1e-3),))
    assert preset.specialist_schedule("text") == (64, 12, 1e-3)
    assert preset.specialist_schedule("image") == (8, 300, 2e-3)
    assert preset.specialist_schedule("audio") == (8, 12, 2e-3)


@pytest.mark.parametrize("continue_from, folder", [("dev-chosen", "dev-chosen"), ("paper", "model")])
def test_drift_and_recover_record_the_fused_model_they_continued_from(tmp_path, monkeypatch, continue_from, folder):
    """The report names the fused model recovery continued from by the recover stage's record: the stage picks it
    when it runs (a fuse stage finished by older code, or under another setting, does not say)."""
    import dataclasses

    from training.recovery import drift, realign
    from training.recovery import recover as recover_module

    used = []
    monkeypatch.setattr(drift, "drift_report", lambda specialist, fused, *a, **k: used.append(fused) or {})
    monkeypatch.setattr(drift, "format_table", lambda report: "table")
    monkeypatch.setattr(recover_module, "recover", lambda cfg: used.append(Path(cfg.model)) or {"best_step": 1})
    monkeypatch.setattr(realign, "run", lambda specialist, fused, *a, **k: used.append(fused) or {"rank": 1})
    pipeline = Pipeline(tmp_path, dataclasses.replace(PRESETS["smoke"], continue_from=continue_from))
    monkeypatch.setattr(pipeline, "evaluate", lambda model, split="test": {})
    for stage in ("drift", "recover"):
        (tmp_path / stage).mkdir()
        record = getattr(pipeline, f"stage_{stage}")(tmp_path / stage)
        assert record["continued_from"] == continue_from
        assert record["fused_model"] == str(tmp_path / "fuse" / folder)
    assert used == [tmp_path / "fuse" / folder] * 3


def test_each_stage_records_the_machine_it_ran_on(tmp_path):
    from training.pipeline.runner import machine_summary

    pipeline = make(tmp_path)
    pipeline.run(["data", "base"])
    assert pipeline.stage_record("base")["machine"] == machine_summary()


def test_the_specialists_summary_line_ignores_the_recorded_machine():
    from training.pipeline.runner import machine_summary, summary_line

    scores = {m: {"hit@1": 0.5} for m in ("text", "image")}
    record = {m: {"scores": scores} for m in ("text", "image")}
    assert summary_line({**record, "seconds": 3.0, "machine": machine_summary()}) == summary_line(record)
    assert summary_line(record).startswith("text->0.50 image->0.50")


def test_every_preset_field_is_a_setting_of_some_stage():
    """A field no stage lists would be a change that leaves every finished stage in place."""
    import dataclasses

    from training.pipeline.runner import STAGE_SETTINGS

    listed = {name for names in STAGE_SETTINGS.values() for name in names}
    assert {f.name for f in dataclasses.fields(Preset)} <= listed
    assert set(STAGE_SETTINGS) == set(STAGES)


def make_with(out, **changes):
    import dataclasses

    return FakePipeline(out, dataclasses.replace(PRESETS["smoke"], **changes), seed=0, preset_name="smoke",
                        command="test")


@pytest.mark.parametrize("change, first_redone", [
    ({"rehearse_steps": 11}, "rehearse"),
    ({"rehearse_batch": 4}, "rehearse"),
    ({"distill_lr": 5e-4}, "base"),
    ({"specialist_steps_overrides": (("image", 20),)}, "specialists"),
    ({"specialist_text_replay_batch": 6}, "specialists"),
    ({"continue_from": "paper"}, "drift"),
])
def test_a_changed_preset_setting_redoes_its_stage_and_what_reads_it(tmp_path, capsys, change, first_redone):
    make(tmp_path).run(list(STAGES))
    capsys.readouterr()
    edited = make_with(tmp_path, **change)
    edited.run(list(STAGES))
    name, value = next(iter(change.items()))
    assert f"[{first_redone}] redone: {first_redone} was built with other settings ({name} " in capsys.readouterr().out
    assert edited.calls[0] == first_redone and edited.calls[-1] == "report"
    assert edited.calls == list(STAGES[STAGES.index(first_redone):]) or first_redone == "drift"
    if first_redone == "drift":   # continue_from: drift, recover and what reads recover; fuse is left as it is
        assert edited.calls == ["drift", "recover", "rehearse", "heldout", "report"]
    again = make_with(tmp_path, **change)
    again.run(list(STAGES))
    assert again.calls == []   # the rerun recorded the new values


@pytest.mark.parametrize("table, stage, module, name, edit", [
    ("DATA_TABLE", "data", "training.data_sources.build", "PRESETS",
     lambda presets: {**presets,
                      "smoke": __import__("dataclasses").replace(presets["smoke"], train_caps={"image": 30})}),
    ("BACKBONE_TABLE", "base", "training.base.small_base", "PROCESSOR_LIMITS",
     lambda limits: {**limits, "video_max_frames": 4}),
])
def test_an_edited_table_the_preset_names_redoes_its_stage(tmp_path, capsys, monkeypatch, table, stage, module, name,
                                                            edit):
    """The preset names its data and backbone tables (`data="smoke"`): editing a table's contents changes the stage
    as much as editing a preset field."""
    import importlib

    make(tmp_path).run(list(STAGES))
    capsys.readouterr()
    target = importlib.import_module(module)
    monkeypatch.setattr(target, name, edit(getattr(target, name)))
    rerun = make(tmp_path)
    rerun.run(list(STAGES))
    assert f"[{stage}] redone: {stage} was built with other settings ({table} " in capsys.readouterr().out
    assert rerun.calls == list(STAGES[STAGES.index(stage):])


def test_data_built_without_a_source_that_is_installed_now_is_redone(tmp_path, capsys, monkeypatch):
    """A run on a clone without ../shared skips its sources; once ../shared is placed beside it, a rerun into the
    same folder rebuilds the data (and all that reads it) instead of keeping the smaller build."""
    from training.data_sources import build

    make(tmp_path).run(list(STAGES))
    marker = tmp_path / "data" / "stage.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()),
                                  "skipped": {"image": {"cifar10-photos": "CIFAR-10 test images not found"}}}))
    monkeypatch.setattr(build, "installed_since", lambda skipped: [])      # still missing: kept
    kept = make(tmp_path)
    kept.run(list(STAGES))
    assert kept.calls == []
    monkeypatch.setattr(build, "installed_since", lambda skipped: sorted(skipped["image"]))
    capsys.readouterr()
    rerun = make(tmp_path)
    rerun.run(list(STAGES))
    assert "[data] redone: data skipped cifar10-photos, which is installed now" in capsys.readouterr().out
    assert rerun.calls == list(STAGES)


def test_a_stage_that_reads_a_stage_with_changed_settings_refuses_to_start(tmp_path):
    make(tmp_path).run(list(STAGES))
    edited = make_with(tmp_path, distill_steps=31)
    with pytest.raises(PipelineError, match=r"reads base, which is not up to date \(base was built with other "
                                            r"settings \(distill_steps 30 -> 31\)\)"):
        edited.run(["report"])
    assert edited.calls == []


def test_records_from_before_settings_are_not_checked(tmp_path):
    make(tmp_path).run(list(STAGES))
    for stage in STAGES:
        marker = tmp_path / stage / "stage.json"
        record = json.loads(marker.read_text())
        record.pop("settings")
        marker.write_text(json.dumps(record))
    rerun = make_with(tmp_path, rehearse_steps=11)
    rerun.run(list(STAGES))
    assert rerun.calls == []


@pytest.mark.parametrize("shared_present", [True, False])
def test_vision_distillation_adds_the_train_split_photos_or_says_they_were_skipped(tmp_path, monkeypatch,
                                                                                  shared_present):
    import dataclasses

    from training.base import distill_vision as module
    from training.common.shared_data import SourceMissing

    seen = {}
    pair_items = [{"image": str(tmp_path / "pair.png")}]
    photos = [{"image": str(tmp_path / "photo.png")}]

    def photos_or_missing():
        if not shared_present:
            raise SourceMissing("CIFAR-10 test images not found at /nowhere")
        return photos

    monkeypatch.setattr(module, "training_visual_items", lambda data_dir: pair_items)
    monkeypatch.setattr(module, "train_split_photos", photos_or_missing)
    monkeypatch.setattr(module, "distinct_media", lambda items: items)
    monkeypatch.setattr(module, "distill_vision", lambda model, items, *a, **k: seen.update(items=items) or
                        {"items": {"image": len(items)}, "log": []})
    preset = dataclasses.replace(PRESETS["smoke"], vision_distill_train_photos=True)
    record = Pipeline(tmp_path, preset).distill_vision(tmp_path / "model")
    if shared_present:
        assert seen["items"] == pair_items + photos and "train_photos_skipped" not in record
    else:
        assert seen["items"] == pair_items and "not found" in record["train_photos_skipped"]


def test_a_setting_the_record_lacks_is_named_as_not_recorded_not_as_null(tmp_path):
    """A stage.json from before a setting was listed: the reason must not claim the old value was None."""
    make(tmp_path).run(list(STAGES))
    marker = tmp_path / "base" / "stage.json"
    record = json.loads(marker.read_text())
    record["settings"].pop("vision_distill_train_photos")
    record["settings"]["distill_groups"] = None
    marker.write_text(json.dumps(record))
    pipeline = make(tmp_path)
    changed = pipeline.changed_settings("base", pipeline.stage_record("base"))
    assert changed == ["distill_groups null -> 500", "vision_distill_train_photos (not recorded) -> false"]


@pytest.mark.parametrize("name, value", [("rehearse_batch", 0), ("specialist_text_replay_batch", 64.5),
                                         ("rehearse_batch", "64")])
def test_a_preset_batch_that_is_not_a_positive_integer_is_refused(name, value):
    import dataclasses

    with pytest.raises(ValueError, match=f"Preset.{name} must be a positive integer or None; got {value!r}"):
        dataclasses.replace(PRESETS["smoke"], **{name: value})
