"""The pipeline report (training/pipeline/report.py) on synthetic stage results: verdicts, per-source rows, sections."""

from __future__ import annotations

import json

import pytest

from training.pipeline import report
from training.evaluation.metrics import hit_rate_interval
from training.pipeline.report import TARGETS, Verdict, source_table, target_verdicts, write_report

MODS = ("text", "image", "video", "document", "audio")


def _scores(hit: dict[str, float], n: dict[str, int] | None = None, sources: dict[str, dict] | None = None) -> dict:
    n = n or {}
    out = {}
    for m, h in hit.items():
        c = n.get(m, 20)
        out[m] = {"hit@1": h, "mrr": h, "n_queries": 20, "n_candidates": c, "chance": 1 / c}
        if sources and m in sources:
            out[m]["sources"] = sources[m]
    return out


def _src(hit: float, n: int, task: str) -> dict:
    return {"hit@1": hit, "mrr": hit, "n_queries": 10, "n_candidates": n, "chance": 1 / n, "task": task}


def _stages(teacher=None, skipped=None) -> dict:
    n = {"text": 80, "image": 50, "video": 80, "document": 80, "audio": 63}
    image_sources = lambda a, b: {"image": {"cifar10-photos": _src(a, 10, "image -> text"),  # noqa: E731
                                            "noto-emoji-cldr-names": _src(b, 40, "image -> text")}}
    base = {"text": 0.40, "image": 0.02, "video": 0.02, "document": 0.02, "audio": 0.02}
    specs = {"text": 0.60, "image": 0.30, "video": 0.10, "document": 0.12, "audio": 0.50}
    specialists = {m: {"scores": _scores({**base, m: specs[m]}, n, image_sources(0.6, 0.2) if m == "image" else None)}
                   for m in MODS}
    fused = {"text": 0.58, "image": 0.20, "video": 0.09, "document": 0.12, "audio": 0.10}
    return {
        "data": {"seconds": 10, "sources": {"image": {"cifar10-photos": {"train": 5, "dev": 2, "test": 2}}},
                 "skipped": skipped or {}},
        "base": {"seconds": 100, "scores": {"base": _scores(base, n, image_sources(0.1, 0.02)),
                                            **({"teacher": teacher} if teacher is not None else {})}},
        "specialists": {"seconds": 300, **specialists},
        "fuse": {"seconds": 20, "weights": {"text": 0.3, "image": 0.3, "video": 0.3, "document": 0.3, "audio": 0.5},
                 "scores": _scores(fused, n, image_sources(0.5, 0.1)),
                 "scores_dev_chosen": _scores({**fused, "image": 0.28}, n),
                 "dev_chosen": {"weights": {"text": 1.0, "image": 1.0, "video": 1.0, "document": 1.0, "audio": 0.5},
                                "objective": "mean dev MRR over modalities",
                                "trials": [{"weights": {"text": 0.3, "image": 0.3, "video": 0.3, "document": 0.3,
                                                        "audio": 0.5}, "objective": 0.2, "dev": _scores(fused)},
                                           {"weights": {"text": 1.0, "image": 1.0, "video": 1.0, "document": 1.0,
                                                        "audio": 0.5}, "objective": 0.3, "dev": _scores(fused)}]}},
        "drift": {"seconds": 5, "table": "drift table"},
        "recover": {"seconds": 60, "scores": _scores({**fused, "audio": 0.48}, n),
                    "scores_realigned": _scores({**fused, "audio": 0.30}, n),
                    "recovery": {"best_step": 3, "config": {"lr": 1}}, "realign": {"rank": 2}},
        "rehearse": {"seconds": 90, "scores": _scores({**fused, "audio": 0.47, "image": 0.25}, n)},
    }


def test_verdict_margins():
    assert Verdict("x", 0.40, 0.45, "r").line() == "x: 0.400 vs target >= 0.450 (r): **not met, by 0.050**"
    assert Verdict("x", 0.45, 0.45, "r").met and Verdict("x", 0.46, 0.45, "r").shortfall == 0.0
    slow = Verdict("wall", 2000, 1800, "sum", at_most=True)
    assert not slow.met and slow.shortfall == 200 and slow.line(" s").endswith("**not met, by 200 s**")


def test_verdict_prints_the_wilson_interval_of_a_hit_rate_and_whether_the_target_is_inside():
    from scipy.stats import binomtest

    inside = Verdict("fused text", 0.2125, 0.225, "r", n_queries=80)     # 17 of 80
    low, high = binomtest(17, 80).proportion_ci(confidence_level=0.95, method="wilson")
    assert f"0.212 [{low:.3f}, {high:.3f}] vs target >= 0.225" in inside.line()
    assert inside.line().endswith("**not met, by 0.013; the target is inside the score's 95% interval**")
    outside = Verdict("base text", 0.225, 0.45, "r", n_queries=80)       # 18 of 80: the interval tops out ~0.33
    assert outside.line().endswith("**not met, by 0.225**")
    assert Verdict("x", 0.5, 0.45, "r", n_queries=80).line().endswith(   # met, but not by a margin 80 queries show
        "**met; the target is inside the score's 95% interval**")
    assert Verdict("x", 0.7, 0.45, "r", n_queries=80).line().endswith("**met**")
    assert "[" not in Verdict("x", 0.40, 0.45, "r").line()                # no query count, no interval


def test_hit_rate_interval_narrows_with_queries_and_refuses_bad_counts():
    few, many = hit_rate_interval(16, 80), hit_rate_interval(64, 320)    # the same 0.2
    assert few[0] < many[0] < 0.2 < many[1] < few[1]
    assert hit_rate_interval(0, 80)[0] == pytest.approx(0.0, abs=1e-12) and hit_rate_interval(80, 80)[1] == pytest.approx(1.0)
    for hits, n in ((5, 0), (-1, 80), (81, 80)):
        with pytest.raises(ValueError, match="hit_rate_interval"):
            hit_rate_interval(hits, n)


def test_target_verdicts_carry_each_modality_query_count():
    stages = _stages(teacher=0.675)
    counts = report.query_counts(stages)
    assert counts and set(counts) <= set(report.MODALITIES)
    verdicts = {v.what: v for v in target_verdicts(report.score_table(stages), report.chance_levels(stages),
                                                   seconds=585, preset="small", n_queries=counts)}
    assert verdicts["specialist video"].n_queries == counts["video"]
    assert verdicts["recovered audio"].n_queries == counts["audio"]
    assert verdicts["wall time (preset small)"].n_queries is None


def test_target_verdicts_on_synthetic_numbers():
    stages = _stages(teacher=0.675)
    verdicts = {v.what: v for v in target_verdicts(report.score_table(stages), report.chance_levels(stages),
                                                   seconds=585, preset="small")}
    base = verdicts["base text"]
    assert not base.met and base.shortfall == pytest.approx(0.05) and "teacher 0.675" in base.rule
    # text: base 0.40 + 0.15 = 0.55 > 5 x 1/80 -> 0.60 meets it
    assert verdicts["specialist text"].threshold == pytest.approx(0.55) and verdicts["specialist text"].met
    # video: max(0.02 + 0.15, 5/80) = 0.17; 0.10 misses by 0.07
    assert verdicts["specialist video"].shortfall == pytest.approx(0.07)
    # document uses the 0.10 gain: 0.12 meets 0.12
    assert verdicts["specialist document"].threshold == pytest.approx(0.12) and verdicts["specialist document"].met
    # audio: chance 1/63 x 5 = 0.079 < 0.17
    assert verdicts["specialist audio"].threshold == pytest.approx(0.17)
    assert verdicts["fused (paper) image"].shortfall == pytest.approx(0.05)     # 0.20 vs 0.30 - 0.05
    assert verdicts["fused (dev-chosen) image"].met                            # 0.28 >= 0.25
    assert verdicts["fused (paper) text"].met and "fused (paper) audio" not in verdicts
    assert verdicts["recovered audio"].met                                      # 0.48 >= 0.95 x 0.50
    assert verdicts["realigned audio (beside it)"].shortfall == pytest.approx(0.175)
    worst = verdicts["final worst modality (image)"]                            # 0.25 / 0.30: retention 0.83
    assert worst.shortfall == pytest.approx(0.02) and worst.rule.endswith("retention 0.83")
    assert verdicts["wall time (preset small)"].met


def test_final_worst_modality_is_the_lowest_retention():
    stages = _stages()
    # document keeps 0.03 of its specialist's 0.12 (retention 0.25, short of 0.9 x 0.12 by 0.078); image keeps 0.17
    # of 0.30 (retention 0.57, short by 0.10): the worst modality is document, though image misses by more hit@1.
    stages["rehearse"]["scores"] = _scores({"text": 0.60, "image": 0.17, "video": 0.10, "document": 0.03,
                                            "audio": 0.50})
    final = [v for v in target_verdicts(report.score_table(stages), report.chance_levels(stages))
             if v.what.startswith("final worst")]
    assert [v.what for v in final] == ["final worst modality (document)"]
    assert final[0].rule.endswith("retention 0.25") and final[0].shortfall == pytest.approx(0.078)
    stages["specialists"]["document"]["scores"]["document"]["hit@1"] = 0.0   # nothing to retain: not the worst
    final = [v for v in target_verdicts(report.score_table(stages), report.chance_levels(stages))
             if v.what.startswith("final worst")]
    assert final[0].what == "final worst modality (image)"


def test_a_worst_modality_whose_specialist_is_within_chance_gets_the_learned_worst_beside_it():
    stages = _stages()   # 20 queries a modality; document's candidates 80 (chance 0.0125)
    stages["rehearse"]["scores"] = _scores({"text": 0.60, "image": 0.20, "video": 0.10, "document": 0.03,
                                            "audio": 0.50})
    chance, counts = report.chance_levels(stages), report.query_counts(stages)
    stages["specialists"]["document"]["scores"]["document"]["hit@1"] = 0.05   # 1 of 20: within chance
    final = [v for v in target_verdicts(report.score_table(stages), chance, n_queries=counts) if v.what.startswith("final worst")]
    assert [v.what for v in final] == ["final worst modality (document)",
                                       "final worst modality whose specialist beats chance (image)"]
    assert final[1].rule.endswith("retention 0.67; document's specialist is within chance")
    stages["specialists"]["document"]["scores"]["document"]["hit@1"] = 0.12   # learned: one verdict, as before
    final = [v for v in target_verdicts(report.score_table(stages), chance, n_queries=counts)
             if v.what.startswith("final worst")]
    assert [v.what for v in final] == ["final worst modality (document)"]


def test_source_table_columns_and_chance():
    table = source_table(_stages(teacher={"hit@1": 0.675}))
    cifar = table["image/cifar10-photos"]
    assert cifar["chance"] == pytest.approx(0.1) and cifar["task"] == "image -> text"
    assert cifar["scores"]["own specialist"] == 0.6 and cifar["scores"][report.FUSED] == 0.5
    assert report.FUSED_DEV not in cifar["scores"]          # no per-source numbers were given for it
    assert table["image/noto-emoji-cldr-names"]["chance"] == pytest.approx(1 / 40)


def test_write_report_sections_teacher_and_skips(tmp_path):
    paths = write_report(tmp_path, _stages(skipped={"audio": {"fsdd-spoken-digits": "../shared absent"}}),
                         "small", 0, "python -m training.pipeline --preset small")
    text = (tmp_path / "report.md").read_text()
    for section in ("## Scores per modality (hit@1)", "## Scores per source (hit@1)", "## Verdicts against the targets",
                    "## What the numbers say", "## Fusion weights: paper vs dev-chosen",
                    "## Projector Drift diagnosis (audio specialist vs fused)",
                    "## Recovery vs training-free re-alignment", "## Data sources", "## Stage wall times (s)"):
        assert section in text, section
    assert "| teacher (all-MiniLM-L6-v2) | - | - | - | - | - |" in text
    assert "| chance | 0.013 | 0.020 | 0.013 | 0.013 | 0.016 |" in text
    n = report.query_counts(_stages())["text"]
    low, high = hit_rate_interval(round(0.4 * n), n)
    assert (f"base text: 0.400 [{low:.3f}, {high:.3f}] vs target >= 0.450 (absolute; teacher -): **not met, by 0.050; "
            "the target is inside the score's 95% interval**") in text
    assert "audio/fsdd-spoken-digits: ../shared absent" in text and "skipped data sources" in text
    assert "**chosen**" in text and "paper-weight" in text
    assert "its R@1 is not the audio hit@1 above" in text   # the drift table's retrieval is another measure
    assert '"config"' not in text
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["modalities"][report.FUSED_DEV]["image"] == 0.28
    if paths["plot"]:
        assert (tmp_path / "scores.png").stat().st_size > 0 and (tmp_path / "scores_by_source.png").exists()
    text_with_teacher = write_report(tmp_path, _stages(teacher=0.675), "small", 0, "cmd")["report"]
    assert "| teacher (all-MiniLM-L6-v2) | 0.675 | - |" in open(text_with_teacher).read()


def test_report_says_which_fused_model_recovery_continued_from(tmp_path):
    stages = _stages()   # paper fused audio 0.10, recovered 0.48
    stages["fuse"]["scores_dev_chosen"] = _scores({"text": 0.58, "image": 0.28, "video": 0.09, "document": 0.12,
                                                   "audio": 0.30})
    for folder in ("p", "d"):
        (tmp_path / folder).mkdir()
    paper = open(write_report(tmp_path / "p", stages, "small", 0, "cmd")["report"]).read()
    assert "continue from the **paper-weight** fused model" in paper
    assert "Projector Recovery recovered audio: 0.100 (paper weights) -> 0.480 (+0.380)" in paper
    stages["fuse"]["continued_from"] = "dev-chosen"
    dev = open(write_report(tmp_path / "d", stages, "small", 0, "cmd")["report"]).read()
    assert "continue from the **dev-chosen** fused model (`fuse/dev-chosen`)" in dev
    assert "Projector Recovery recovered audio: 0.300 (dev-chosen weights) -> 0.480 (+0.180)" in dev


@pytest.mark.parametrize("teacher, printed, value", [(0.675, "teacher: 0.68", 0.675),
                                                     ({"hit@1": 0.6}, "teacher: 0.60", 0.6),
                                                     ({"text": {"hit@1": 0.6}}, "teacher: text=0.60", 0.6)])
def test_stage_summary_line_and_report_read_every_teacher_form(teacher, printed, value):
    from training.pipeline.runner import summary_line

    stages = _stages(teacher=teacher)
    assert summary_line({"scores": stages["base"]["scores"]}).endswith(printed)
    assert report.score_table(stages)[report.TEACHER] == {"text": pytest.approx(value)}
    assert source_table(stages)["image/cifar10-photos"]["scores"].get(report.TEACHER) is None
    with pytest.raises(ValueError, match="scores.teacher"):
        report.teacher_scores({"base": {"scores": {"teacher": "high"}}})


def _heldout(final_hits: dict[str, float], skipped: dict[str, str] | None = None) -> dict:
    tasks = {"gcide-definitions": ("gcide", "text definition -> word"), "flite-spoken-words": ("flite", "spoken word -> text")}
    score = lambda h: {"hit@1": h, "mrr": h, "n_queries": 80, "n_candidates": 80, "chance": 1 / 80}  # noqa: E731
    return {"seconds": 30, "tasks_dir": "OUT/data/heldout", "cap": 80, "seed": 0,
            "tasks": {t: {"source": s, "kind": k} for t, (s, k) in tasks.items()}, "skipped": skipped or {},
            "scores": {"base": {t: score(0.0125) for t in tasks}, "final": {t: score(h) for t, h in final_hits.items()},
                       "teacher": {"gcide-definitions": score(0.6)}}}


def test_heldout_verdicts_need_three_times_chance_and_significance_per_task():
    verdicts = {v.what: v for v in report.heldout_verdicts(_heldout({"gcide-definitions": 5 / 80,
                                                                     "flite-spoken-words": 3 / 80}))}
    gcide, flite = (verdicts[f"held-out {t}, final"] for t in ("gcide-definitions (text definition -> word)",
                                                                "flite-spoken-words (spoken word -> text)"))
    assert gcide.met and gcide.threshold == pytest.approx(5 / 80)
    # 3 of 80 is 3 x chance but p = 0.08 under chance: not well above it
    assert not flite.met and flite.shortfall == pytest.approx(2 / 80)
    assert "(needs 5 of 80 hits: >= 3 x chance 1/80 and p < 0.01; has 5, p = 0.0034): **met**" in gcide.line()
    assert report.heldout_verdicts({}) == []


def test_heldout_verdict_of_unequal_pools_uses_their_pooled_chance():
    """A task scored in two pools of 80 queries with 80 and 40 distinct candidates: chance 0.01875 (not 1/80), so
    9 of 160 hits are needed and 8 are not enough."""
    stage = _heldout({"gcide-definitions": 8 / 160})
    stage["scores"]["final"]["gcide-definitions"].update(n_queries=160, pools=2, chance=(1 / 80 + 1 / 40) / 2)
    verdict, = report.heldout_verdicts(stage)
    assert not verdict.met and verdict.threshold == pytest.approx(9 / 160)
    assert "needs 9 of 160 hits" in verdict.line()
    assert "| not well above chance |" in "\n".join(report._heldout_lines(stage))


def test_write_report_heldout_section_and_skips(tmp_path):
    stages = {**_stages(), "heldout": _heldout({"gcide-definitions": 0.2, "flite-spoken-words": 0.0},
                                               skipped={"twemoji": "Twemoji artwork not found: npm install ..."})}
    write_report(tmp_path, stages, "small", 0, "cmd")
    text = (tmp_path / "report.md").read_text()
    section = text.split("## Held-out generalisation (unseen sources)")[1].split("## What the numbers say")[0]
    assert "hit@1 >= 3 x chance and a one-sided binomial p-value under chance below 0.01" in section
    assert "| gcide-definitions | gcide | text definition -> word | 80 | 0.013 | 0.013 | 0.200 | 4.5e-15 | 0.600 | " \
           "well above chance |" in section
    assert "| flite-spoken-words | flite | spoken word -> text | 80 | 0.013 | 0.013 | 0.000 | 1 | - | not well above" \
        in section
    assert "- twemoji: Twemoji artwork not found" in section
    assert "held-out gcide-definitions (text definition -> word), final: 0.200 vs target >= 0.062 (needs 5 of 80 " \
           "hits: >= 3 x chance 1/80 and p < 0.01; has 16, p = 4.5e-15): **met**" in text
    assert json.loads((tmp_path / "scores.json").read_text())["heldout"]["final"]["gcide-definitions"]["hit@1"] == 0.2
    write_report(tmp_path, _stages(), "small", 0, "cmd")   # a run without the stage says so
    assert "Not measured: this run has no `heldout` stage" in (tmp_path / "report.md").read_text()


def test_report_prints_the_machine_its_numbers_come_from(tmp_path):
    from training.pipeline.runner import machine_summary

    machine = machine_summary()
    assert machine["cores"] >= 1 and machine["torch_threads"] >= 1 and machine["torch"] and machine["cpu"]
    text = open(write_report(tmp_path, _stages(), "small", 0, "cmd", machine=machine)["report"]).read()
    detail = ", ".join(machine[k] for k in ("cpu_id", "cpu_capability") if machine.get(k))
    cpu = f"{machine['cpu']} ({detail})" if detail else machine["cpu"]
    assert f"Machine: {cpu}, {machine['cores']} cores, torch {machine['torch']}" in text
    assert "Machine:" not in open(write_report(tmp_path, _stages(), "small", 0, "cmd")["report"]).read()


def test_machine_line_names_the_cpu_id_and_kernel_isa_where_recorded():
    """Two VMs that both say "AMD EPYC" trained the same code to different scores; the family / model / stepping and
    the ISA torch dispatches to tell them apart. Records from before these fields print as they did."""
    from training.pipeline.report import machine_line

    new = {"cpu": "AMD EPYC", "cpu_id": "family 25 model 17 stepping 1", "cpu_capability": "AVX512", "cores": 2,
           "torch_threads": 2, "torch": "2.13.0+cpu", "python": "3.11.7"}
    assert machine_line(new).startswith("Machine: AMD EPYC (family 25 model 17 stepping 1, AVX512), 2 cores, torch")
    old = {k: v for k, v in new.items() if k not in ("cpu_id", "cpu_capability")}
    assert machine_line(old).startswith("Machine: AMD EPYC, 2 cores, torch 2.13.0+cpu on 2 threads")


def test_report_reads_which_fused_model_recovery_continued_from_off_the_recover_stage(tmp_path):
    """The recover stage picks the fused model it continues from (runner.Pipeline.continued_fused_model) when it
    runs, so its own record says which; a fuse stage from before `continued_from` was recorded (or another setting)
    must not make the report name the other model."""
    stages = _stages()
    stages["fuse"]["scores_dev_chosen"] = _scores({"text": 0.58, "image": 0.28, "video": 0.09, "document": 0.12,
                                                   "audio": 0.30})
    stages["recover"]["continued_from"] = "dev-chosen"     # fuse record without it: an older fuse stage
    text = open(write_report(tmp_path, stages, "small", 0, "cmd")["report"]).read()
    assert "continue from the **dev-chosen** fused model (`fuse/dev-chosen`)" in text
    assert "Projector Recovery recovered audio: 0.300 (dev-chosen weights) -> 0.480 (+0.180)" in text
    stages["fuse"]["continued_from"], stages["recover"]["continued_from"] = "dev-chosen", "paper"
    text = open(write_report(tmp_path, stages, "small", 0, "cmd")["report"]).read()
    assert "continue from the **paper-weight** fused model" in text
    assert "Projector Recovery recovered audio: 0.100 (paper weights) -> 0.480 (+0.380)" in text


def test_report_describes_the_search_the_fuse_stage_ran(tmp_path):
    """A fuse stage from before the coordinate ascent (no `continued_from`, no `search`) ran the grid sweep: its report
    must not describe a coordinate ascent."""
    stages = _stages()
    old = open(write_report(tmp_path, stages, "small", 0, "cmd")["report"]).read()
    assert "coordinate ascent" not in old and "one model per grid point" in old
    stages["fuse"]["continued_from"] = "dev-chosen"        # the first records of the coordinate ascent had no `search`
    new = open(write_report(tmp_path, stages, "small", 0, "cmd")["report"]).read()
    assert "coordinate ascent" in new and "grid point" not in new
    del stages["fuse"]["continued_from"]
    stages["fuse"]["dev_chosen"]["search"] = "coordinate ascent"
    assert "coordinate ascent" in open(write_report(tmp_path, stages, "small", 0, "cmd")["report"]).read()


def test_report_machine_comes_from_the_stages_and_says_when_they_ran_on_several(tmp_path):
    """run.json is rewritten by every run that lists the data stage (a plain resumed run does, skipping it), so its
    machine may not be the one the finished stages ran on; each stage records its own."""
    one = {"cpu": "CPU A", "cores": 2, "torch": "2.5", "torch_threads": 2, "python": "3.12"}
    two = {**one, "cpu": "CPU B"}
    stages = _stages()
    for name in stages:
        stages[name]["machine"] = one
    text = open(write_report(tmp_path, stages, "small", 0, "cmd", machine=two)["report"]).read()
    assert "Machine: CPU A, 2 cores" in text and "CPU B" not in text
    stages["recover"]["machine"] = stages["rehearse"]["machine"] = two
    text = open(write_report(tmp_path, stages, "small", 0, "cmd", machine=two)["report"]).read()
    assert "Machines: the stages ran on more than one machine" in text
    assert "CPU A, 2 cores" in text and "(data, base, specialists, fuse, drift)" in text
    assert "CPU B, 2 cores" in text and "(recover, rehearse)" in text
    assert "The same command reproduces these numbers" not in text


def test_report_counts_a_record_without_cpu_id_as_the_same_machine_by_the_fields_both_have(tmp_path):
    """A stage redone with newer code in an older folder: its record has cpu_id / cpu_capability, the older stages'
    do not. They are one machine as far as both records tell (the line prints only what both say); a record that
    disagrees on a shared field is another machine."""
    old = {"cpu": "AMD EPYC", "cores": 2, "torch": "2.13.0+cpu", "torch_threads": 2, "python": "3.11.7"}
    new = {**old, "cpu_id": "family 25 model 17 stepping 1", "cpu_capability": "AVX512"}
    stages = _stages()
    for name in stages:
        stages[name]["machine"] = old
    stages["rehearse"]["machine"] = new
    text = open(write_report(tmp_path, stages, "small", 0, "cmd")["report"]).read()
    assert "Machine: AMD EPYC, 2 cores" in text and "more than one machine" not in text and "AVX512" not in text
    stages["rehearse"]["machine"] = {**new, "torch_threads": 1}
    text = open(write_report(tmp_path, stages, "small", 0, "cmd")["report"]).read()
    assert "Machines: the stages ran on more than one machine" in text and "AVX512" in text
