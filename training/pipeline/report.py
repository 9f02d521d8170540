"""report.md + PNG plots of a pipeline run: scores per modality and per source after every stage, and verdicts.

Sections of report.md, in order: "Scores per modality (hit@1)", "Scores per source (hit@1)", "Verdicts against
the targets", "Held-out generalisation (unseen sources)", "What the numbers say", "Fusion weights: paper vs
dev-chosen", "Projector Drift diagnosis (audio specialist vs fused)", "Recovery vs training-free re-alignment", "Data
sources", "Stage wall times".

Every verdict is computed from the measured numbers against :data:`TARGETS` (issue 15's targets for the main job):
"met" or "not met, by X" with X the shortfall in hit@1 (or seconds), each hit@1 with its 95% Wilson interval over the
test queries (and a note where the target falls inside it); nothing here is hard-coded, so a run where a claim does
not show says so. The teacher's ceiling is read from `base/stage.json` at `scores.teacher` where the base
stage wrote one (a number: its text hit@1; or `evaluate_model`-shaped scores) and printed as "-" otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.common.modalities import MODALITIES
from training.evaluation.metrics import (SIGNIFICANCE, WELL_ABOVE_CHANCE, chance_candidates, chance_p_value,
                                         hit_rate_interval, hits_of, required_hits, well_above_chance)

# Row names of the tables (also the keys of scores.json).
BASE, TEACHER = "base (distilled text)", "teacher (all-MiniLM-L6-v2)"
FUSED, FUSED_DEV = "fused (paper weights)", "fused (dev-chosen weights)"
RECOVERED, REALIGNED, REHEARSED = "recovered (projector)", "realigned (training-free)", "rehearsed (final)"
VISUAL_TEXT = ("text", "image", "video", "document")


@dataclass(frozen=True)
class Targets:
    """Issue 15's targets for the main job (hit@1 on the held-out test split)."""

    base_text: float = 0.45            # base text hit@1 after distillation
    specialist_gain: float = 0.15      # each specialist >= base + this on its own modality ...
    document_gain: float = 0.10        # ... document: base + this
    chance_multiple: float = 5.0       # ... and >= this x chance
    fused_gap: float = 0.05            # fused within this of each visual/text specialist
    recovery_ratio: float = 0.95       # recovered audio >= this x the audio specialist
    final_ratio: float = 0.90          # rehearsed: worst modality >= this x its specialist
    heldout_chance_multiple: float = WELL_ABOVE_CHANCE  # held-out tasks: final hit@1 >= this x chance ...
    heldout_alpha: float = SIGNIFICANCE  # ... with a one-sided binomial p-value under chance below this
    wall_s: dict[str, float] = field(default_factory=lambda: {"small": 1800.0, "smoke": 180.0})


TARGETS = Targets()


@dataclass(frozen=True)
class Verdict:
    """One target check: `value` must reach `threshold` (higher is better unless `at_most`)."""

    what: str
    value: float
    threshold: float
    rule: str
    at_most: bool = False
    n_queries: int | None = None  # the test queries behind a hit@1 `value` (its 95% interval is printed)

    @property
    def met(self) -> bool:
        return self.value <= self.threshold if self.at_most else self.value >= self.threshold - 1e-9

    @property
    def shortfall(self) -> float:
        return max(0.0, (self.value - self.threshold) if self.at_most else (self.threshold - self.value))

    def line(self, unit: str = "") -> str:
        fmt = "{:.0f}" if unit == " s" else "{:.3f}"
        value, threshold = fmt.format(self.value) + unit, fmt.format(self.threshold) + unit
        sign = "<=" if self.at_most else ">="
        status = "met" if self.met else f"not met, by {fmt.format(self.shortfall)}{unit}"
        if self.n_queries:
            low, high = hit_rate_interval(hits_of({"hit@1": self.value, "n_queries": self.n_queries}), self.n_queries)
            value += f" [{low:.3f}, {high:.3f}]"
            if low <= self.threshold <= high:
                status += "; the target is inside the score's 95% interval"
        return f"{self.what}: {value} vs target {sign} {threshold} ({self.rule}): **{status}**"


# ------------------------------------------------------------------------------------------------------ tables
def _hit(scores: dict[str, Any] | None) -> dict[str, float]:
    return {m: float(v["hit@1"]) for m, v in (scores or {}).items() if isinstance(v, dict) and "hit@1" in v}


def teacher_scores(stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The teacher's scores as {modality: {"hit@1", ...}}: `base/stage.json` `scores.teacher` is a number (its text
    hit@1), {"hit@1": x} (text) or `evaluate_model`-shaped; {} when absent."""
    raw = stages.get("base", {}).get("scores", {}).get("teacher")
    if raw is None:
        return {}
    if isinstance(raw, (int, float)):
        return {"text": {"hit@1": float(raw)}}
    if isinstance(raw, dict) and "hit@1" in raw:
        return {"text": raw}
    if isinstance(raw, dict):
        return {m: v for m, v in raw.items() if isinstance(v, dict) and "hit@1" in v}
    raise ValueError(f"base/stage.json scores.teacher: expected a number or a dict of scores, got {raw!r}")


def stage_scores(stages: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{row name: evaluate_model scores} in pipeline order; rows a run lacks are left out (teacher included)."""
    rows: dict[str, dict[str, Any]] = {}

    def add(name: str, scores: dict[str, Any] | None) -> None:
        if scores:
            rows[name] = scores

    add(BASE, stages.get("base", {}).get("scores", {}).get("base"))
    add(TEACHER, teacher_scores(stages))
    for modality, result in sorted(stages.get("specialists", {}).items()):
        if isinstance(result, dict) and "scores" in result:
            add(f"specialist: {modality}", result["scores"])
    add(FUSED, stages.get("fuse", {}).get("scores"))
    add(FUSED_DEV, stages.get("fuse", {}).get("scores_dev_chosen"))
    add(RECOVERED, stages.get("recover", {}).get("scores"))
    add(REALIGNED, stages.get("recover", {}).get("scores_realigned"))
    add(REHEARSED, stages.get("rehearse", {}).get("scores"))
    return rows


def score_table(stages: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{row name: {modality: hit@1}} in pipeline order."""
    return {name: _hit(scores) for name, scores in stage_scores(stages).items()}


def _first_per_modality(stages: dict[str, dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """{modality: the first stage score (pipeline order) that has a non-zero `key`}: every stage scores the same
    test split, so the split's facts (query and candidate counts, chance) are read from whichever scored it first."""
    first: dict[str, dict[str, Any]] = {}
    for scores in stage_scores(stages).values():
        for m, v in scores.items():
            if m not in first and isinstance(v, dict) and v.get(key):
                first[m] = v
    return first


def query_counts(stages: dict[str, dict[str, Any]]) -> dict[str, int]:
    """{modality: test queries} from the first scores that give `n_queries`."""
    return {m: int(v["n_queries"]) for m, v in _first_per_modality(stages, "n_queries").items()}


def test_sizes_line(stages: dict[str, dict[str, Any]]) -> str:
    """One sentence with each modality's test queries and candidate pools (`stage_eval.candidate_pools`), e.g.
    "text 240 queries in 3 pools of up to 80 candidates"; "" when no score gives query counts."""
    first = _first_per_modality(stages, "n_queries")
    parts = [f"{m} {int(v['n_queries'])} queries" + (
        f" in {int(v['pools'])} pools of up to {int(v['n_candidates'])} candidates" if int(v.get("pools", 1)) > 1
        else f", {int(v['n_candidates'])} candidates") for m, v in sorted(first.items())]
    if not parts:
        return ""
    return ("Test split: " + "; ".join(parts) + ". A split of more rows than one pool is cut, in file order, into equal "
            "folds and each query ranks only its fold's candidates (the COCO 1K-test protocol); a score is the mean "
            "over all of the modality's queries.")


def chance_levels(stages: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{modality: chance hit@1} (1 / candidates of the test split) from the first scores that give one."""
    return {m: float(v.get("chance", 1.0 / v["n_candidates"]))
            for m, v in _first_per_modality(stages, "n_candidates").items()}


def source_table(stages: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{"modality/source": {"task", "n_candidates", "chance", "scores": {row name: hit@1}}}.

    The specialist column holds the specialist of the source's own modality (row name "own specialist"). A score
    without a per-source breakdown (e.g. the teacher's text number) fills a source only where its modality has just
    that one source, whose candidates are then exactly the modality's.
    """
    rows = stage_scores(stages)
    table: dict[str, dict[str, Any]] = {}
    for name, scores in rows.items():
        for modality, v in scores.items():
            if name.startswith("specialist: ") and name != f"specialist: {modality}":
                continue
            column = "own specialist" if name.startswith("specialist: ") else name
            for source, s in (v.get("sources") or {}).items():
                entry = table.setdefault(f"{modality}/{source}", {
                    "task": s.get("task", ""), "n_queries": s.get("n_queries"), "n_candidates": s.get("n_candidates"),
                    "chance": s.get("chance"), "scores": {}})
                entry["scores"][column] = float(s["hit@1"])
    for name, scores in rows.items():  # modality-level numbers of single-source modalities
        column = "own specialist" if name.startswith("specialist: ") else name
        for modality, v in scores.items():
            keys = [k for k in table if k.startswith(f"{modality}/")]
            if len(keys) == 1 and column not in table[keys[0]]["scores"] and (
                    not name.startswith("specialist: ") or name == f"specialist: {modality}"):
                table[keys[0]]["scores"][column] = float(v["hit@1"])
    return dict(sorted(table.items()))


def _above_chance(score: float, chance: float | None, n_queries: int | None) -> bool:
    """Whether a hit@1's 95% Wilson interval lies above `chance` (unknown query count or chance: assumed so)."""
    if chance is None or not n_queries:
        return True
    return hit_rate_interval(hits_of({"hit@1": score, "n_queries": n_queries}), n_queries)[0] > chance


def best_specialist(rows: dict[str, dict[str, float]], modality: str) -> float | None:
    value = rows.get(f"specialist: {modality}", {}).get(modality)
    return None if value is None else float(value)


# ---------------------------------------------------------------------------------------------------- verdicts
def target_verdicts(rows: dict[str, dict[str, float]], chance: dict[str, float], seconds: float | None = None,
                    preset: str = "", targets: Targets = TARGETS,
                    n_queries: dict[str, int] | None = None) -> list[Verdict]:
    """Each of issue 15's targets that the numbers allow checking, as a :class:`Verdict` (rows: score_table).
    n_queries ({modality: test queries}, `query_counts`) puts each hit@1's 95% interval into its verdict line."""
    counts = n_queries or {}
    out: list[Verdict] = []
    base, teacher = rows.get(BASE, {}), rows.get(TEACHER, {})
    if "text" in base:
        ceiling = f"; teacher {teacher['text']:.3f}" if "text" in teacher else "; teacher -"
        out.append(Verdict("base text", base["text"], targets.base_text, f"absolute{ceiling}",
                           n_queries=counts.get("text")))
    for m in MODALITIES:
        spec = best_specialist(rows, m)
        if spec is None or m not in base or m not in chance:
            continue
        gain = targets.document_gain if m == "document" else targets.specialist_gain
        need_gain, need_chance = base[m] + gain, targets.chance_multiple * chance[m]
        rule = (f"max(base {base[m]:.3f} + {gain:.2f}, {targets.chance_multiple:g} x chance {chance[m]:.3f})")
        out.append(Verdict(f"specialist {m}", spec, max(need_gain, need_chance), rule, n_queries=counts.get(m)))
    for label, row in (("fused (paper)", FUSED), ("fused (dev-chosen)", FUSED_DEV)):
        for m in VISUAL_TEXT:
            spec = best_specialist(rows, m)
            if spec is not None and m in rows.get(row, {}):
                out.append(Verdict(f"{label} {m}", rows[row][m], max(0.0, spec - targets.fused_gap),
                                   f"specialist {spec:.3f} - {targets.fused_gap:.2f}", n_queries=counts.get(m)))
    audio = best_specialist(rows, "audio")
    if audio is not None:
        for label, row in (("recovered audio", RECOVERED), ("realigned audio (beside it)", REALIGNED)):
            if "audio" in rows.get(row, {}):
                out.append(Verdict(label, rows[row]["audio"], targets.recovery_ratio * audio,
                                   f"{targets.recovery_ratio:.0%} of the audio specialist {audio:.3f}",
                                   n_queries=counts.get("audio")))
    final = rows.get(REHEARSED, {})
    # The worst modality is the one with the lowest retention final / specialist (as rehearsal's own selection
    # ranks them), not the largest shortfall in hit@1: a weak specialist's modality can lose most of itself while
    # falling only a little in absolute terms. A specialist at 0 hit@1 leaves nothing to retain.
    ratios = [(final[m] / spec, m) for m in MODALITIES
              if m in final and (spec := best_specialist(rows, m)) is not None and spec > 0]
    if ratios:
        retained, worst = min(ratios)
        spec = best_specialist(rows, worst)
        out.append(Verdict(f"final worst modality ({worst})", final[worst], targets.final_ratio * spec,
                           f"{targets.final_ratio:.0%} of its specialist {spec:.3f}; retention {retained:.2f}",
                           n_queries=counts.get(worst)))
        # A specialist whose score its queries cannot tell from chance has no skill to retain: where the worst is
        # one, the worst among the specialists that learned is given beside it.
        learned = [(r, m) for r, m in ratios if _above_chance(best_specialist(rows, m), chance.get(m), counts.get(m))]
        if learned and worst not in {m for _, m in learned}:
            retained, m = min(learned)
            spec = best_specialist(rows, m)
            out.append(Verdict(f"final worst modality whose specialist beats chance ({m})", final[m],
                               targets.final_ratio * spec, f"{targets.final_ratio:.0%} of its specialist {spec:.3f}; "
                               f"retention {retained:.2f}; {worst}'s specialist is within chance", n_queries=counts.get(m)))
    if seconds is not None and preset in targets.wall_s:
        out.append(Verdict(f"wall time (preset {preset})", seconds, targets.wall_s[preset], "sum of stage times",
                           at_most=True))
    return out


def _heldout_threshold(score: dict[str, Any], targets: Targets = TARGETS) -> float:
    """The hit@1 of `required_hits` (the fewest hits that are well above chance) over the task's queries."""
    hits = required_hits(int(score["n_queries"]), chance_candidates(score), targets.heldout_chance_multiple,
                         targets.heldout_alpha)
    return hits / int(score["n_queries"])


def _heldout_rule(targets: Targets = TARGETS) -> str:
    return (f"hit@1 >= {targets.heldout_chance_multiple:g} x chance and a one-sided binomial p-value under chance "
            f"below {targets.heldout_alpha:g}")


def heldout_verdicts(heldout: dict[str, Any], targets: Targets = TARGETS) -> list[Verdict]:
    """One :class:`Verdict` per held-out task of the `heldout` stage result: the final model's hit@1 against the
    fewest hits that are well above chance (`_heldout_rule`); [] when the stage scored nothing."""
    out = []
    for task, s in sorted((heldout.get("scores", {}).get("final") or {}).items()):
        kind = heldout.get("tasks", {}).get(task, {}).get("kind", "")
        hits, n = hits_of(s), int(s["n_queries"])
        needed = round(_heldout_threshold(s, targets) * n)
        out.append(Verdict(f"held-out {task} ({kind}), final", float(s["hit@1"]), _heldout_threshold(s, targets),
                           f"needs {needed} of {n} hits: >= {targets.heldout_chance_multiple:g} x chance 1/"
                           f"{chance_candidates(s):.4g} and p < {targets.heldout_alpha:g}; has {hits}, p = "
                           f"{chance_p_value(hits, n, chance_candidates(s)):.2g}"))
    return out


def _heldout_lines(heldout: dict[str, Any], targets: Targets = TARGETS) -> list[str]:
    """The "Held-out generalisation (unseen sources)" section: one row per task, skipped sources listed."""
    if not heldout:
        return ["Not measured: this run has no `heldout` stage (`python -m training.pipeline --out OUT --stages "
                "heldout report --force report` adds it to a finished run)."]
    scores = heldout.get("scores", {})
    where = "/".join(Path(heldout.get("tasks_dir", "data/heldout")).parts[-2:])  # relative to the run folder
    lines = [f"Tasks from sources no stage trains on, built under the run's `{where}` (up to "
             f"{heldout.get('cap')} queries a task, seed {heldout.get('seed')}; training/data_sources/heldout.py); each "
             "model loaded as a user does, `SentenceTransformer(model, trust_remote_code=True)`, queries through "
             "`encode_query(..., prompt=instruction)`, candidates (every distinct positive of the task, or of the "
             "query's candidate pool where a task has more queries than one pool: the pools of the test split above) "
             "through `encode_document`; hit@1, chance = 1 / candidates; p = the one-sided binomial probability of the final "
             f"model's hits or more under chance. Verdict rule: **well above chance** := {_heldout_rule(targets)}.", ""]
    body = []
    for task, info in sorted(heldout.get("tasks", {}).items()):
        final = (scores.get("final") or {}).get(task)
        base, teacher = (scores.get("base") or {}).get(task), (scores.get("teacher") or {}).get(task)
        ref = final or base
        verdict = "-" if final is None else (
            "well above chance" if well_above_chance(final, targets.heldout_chance_multiple, targets.heldout_alpha)
            else "not well above chance")
        p_value = "-" if final is None else \
            f"{chance_p_value(hits_of(final), int(final['n_queries']), chance_candidates(final)):.2g}"
        body.append([task, info.get("source", ""), info.get("kind", ""),
                     str(ref["n_candidates"]) if ref else "-", _fmt(ref["chance"]) if ref else "-",
                     _fmt(base and base["hit@1"]), _fmt(final and final["hit@1"]), p_value,
                     _fmt(teacher and teacher["hit@1"]), verdict])
    lines += _markdown_table(["task", "source", "kind", "candidates", "chance", "base", "final", "final p",
                              "teacher (all-MiniLM-L6-v2)", "final verdict"], body)
    skipped = heldout.get("skipped") or {}
    lines += ["", "Skipped held-out sources: " + ("none." if not skipped else "")]
    lines += [f"- {source}: {why}" for source, why in sorted(skipped.items())]
    return lines


def observations(rows: dict[str, dict[str, float]], continued_from: str = "paper") -> list[str]:
    """Plain statements about the paper's story (drift, recovery, composition), each computed from the table.

    `continued_from`: the fused model recovery started from ("paper" or "dev-chosen": `continued_from(stages)`)."""
    lines = []
    fused, recovered = rows.get(FUSED, {}), rows.get(RECOVERED, {})
    start = rows.get(FUSED_DEV if continued_from == "dev-chosen" else FUSED, {})
    audio_spec = best_specialist(rows, "audio")
    for label, row in (("paper", FUSED), ("dev-chosen", FUSED_DEV)):
        if audio_spec is not None and "audio" in rows.get(row, {}):
            after = rows[row]["audio"]
            drop = audio_spec - after
            shows = "shows" if drop > 0.02 else "does NOT show"
            lines.append(f"Projector Drift {shows} at {label} weights: audio hit@1 {audio_spec:.3f} (audio specialist) "
                         f"-> {after:.3f} after fusion (drop {drop:+.3f}).")
    if "audio" in start and "audio" in recovered:
        gain = recovered["audio"] - start["audio"]
        word = "recovered" if gain > 0.02 else "did not recover"
        lines.append(f"Projector Recovery {word} audio: {start['audio']:.3f} ({continued_from} weights) -> "
                     f"{recovered['audio']:.3f} ({gain:+.3f}); the backbone was frozen, so the other modalities are "
                     "unchanged by construction.")
    base = rows.get(BASE, {})
    for m in VISUAL_TEXT:
        spec = best_specialist(rows, m)
        if spec is not None and m in fused:
            dev = rows.get(FUSED_DEV, {}).get(m)
            lines.append(f"{m}: base {base.get(m, float('nan')):.3f} -> specialist {spec:.3f} -> fused {fused[m]:.3f} "
                         f"(paper weights)" + ("" if dev is None else f", {dev:.3f} (dev-chosen weights)") + ".")
    return lines


# -------------------------------------------------------------------------------------------------------- plots
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _bars(ax, groups: list[str], series: dict[str, list[float | None]], chance: list[float | None],
          rotation: float = 0) -> None:
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(groups))], [v or 0.0 for v in values], width, label=name)
    for x, c in enumerate(chance):
        if c is not None:
            ax.hlines(c, x - width / 2, x + 0.8 - width / 2, colors="black", linestyles="dashed",
                      label="chance" if x == 0 else None)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], groups, fontsize=7, rotation=rotation,
                  ha="right" if rotation else "center")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, ncol=3)


def plot(rows: dict[str, dict[str, float]], chance: dict[str, float], out_png: Path) -> Path | None:
    """Per-modality hit@1 of the own specialist and every non-specialist row, chance dashed."""
    plt = _pyplot()
    if plt is None:
        return None
    series = {"own specialist": [best_specialist(rows, m) for m in MODALITIES]}
    series.update({r: [rows[r].get(m) for m in MODALITIES] for r in rows if not r.startswith("specialist:")})
    fig, ax = plt.subplots(figsize=(10, 4), dpi=100)
    _bars(ax, list(MODALITIES), series, [chance.get(m) for m in MODALITIES])
    ax.set_ylabel("hit@1 on held-out test pairs")
    ax.set_title("Conan pipeline: per-modality retrieval after each stage (offline proxy)")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def plot_sources(sources: dict[str, dict[str, Any]], out_png: Path) -> Path | None:
    """Per-source hit@1 of every column of :func:`source_table`, chance dashed."""
    plt = _pyplot()
    if plt is None or not sources:
        return None
    columns = list(dict.fromkeys(c for e in sources.values() for c in e["scores"]))
    series = {c: [e["scores"].get(c) for e in sources.values()] for c in columns}
    fig, ax = plt.subplots(figsize=(max(10, 1.4 * len(sources)), 5), dpi=100)
    _bars(ax, list(sources), series, [e["chance"] for e in sources.values()], rotation=15)
    ax.set_ylabel("hit@1 within the source's own candidates")
    ax.set_title("Conan pipeline: per-source retrieval after each stage (offline proxy)")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


# ------------------------------------------------------------------------------------------------------- report
def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in body]


def continued_from(stages: dict[str, dict[str, Any]]) -> str:
    """The fused model ("paper" or "dev-chosen") that drift, recovery and rehearsal continued from: the recover stage's
    record (it picks the model when it runs), else the drift stage's, else an older fuse stage's (fuse records it no
    more: it builds both models whatever `Preset.continue_from` says), else "paper" (run folders from before any
    recorded it continued from `fuse/model`)."""
    for stage in ("recover", "drift", "fuse"):
        if stages.get(stage, {}).get("continued_from"):
            return stages[stage]["continued_from"]
    return "paper"


def search_kind(fuse: dict[str, Any]) -> str:
    """The dev weight search the fuse stage ran: its record's `dev_chosen.search`; a record without it is the grid
    sweep's, unless it has `continued_from` (the first coordinate-ascent fuse records had that, not `search`)."""
    search = fuse.get("dev_chosen", {}).get("search")
    return search or ("coordinate ascent" if "continued_from" in fuse else "grid")


def _search_description(fuse: dict[str, Any]) -> str:
    if search_kind(fuse) == "grid":
        return "The sweep fuses one model per grid point and scores "
    return ("The search (coordinate ascent: from the paper point, each specialist's α in turn moves to its best value "
            "with the others held, a move needing a strictly better dev score) fuses one model per point and scores ")


def _sweep_lines(fuse: dict[str, Any], continued: str = "paper") -> list[str]:
    trials = fuse.get("dev_chosen", {}).get("trials", [])
    if not trials:
        return ["No dev weight search was recorded for this run."]
    chosen = fuse["dev_chosen"].get("weights")
    header = [f"weights α ({', '.join(MODALITIES)})", "dev objective",
              *[f"dev hit@1 {m}" for m in MODALITIES], ""]
    body = []
    for t in trials:
        w = t["weights"]
        tag = ("paper" if w == fuse.get("weights") else "") + (" **chosen**" if w == chosen else "")
        body.append([", ".join(f"{w.get(m, 0):g}" for m in MODALITIES),
                     f"{t['objective']:.3f}", *[_fmt(t["dev"].get(m, {}).get("hit@1")) for m in MODALITIES], tag])
    paper = ", ".join(f"{m} {fuse.get('weights', {}).get(m, '-')}" for m in MODALITIES)
    return [f"Task arithmetic θ = θ₀ + Σ α_m τ_m. Paper weights: {paper} (text: our choice, the "
            f"visual α, since the paper has no text specialist). {_search_description(fuse)}"
            f"it on the **dev** split only ({fuse['dev_chosen'].get('objective', 'mean dev MRR')}); the best is "
            f"`fuse/dev-chosen`, scored once on test above. {_continued_from_line(continued)}", "",
            *_markdown_table(header, body)]


def machine_line(machine: dict[str, Any]) -> str:
    """The report's machine line: the same command reproduces the report exactly on the same CPU and thread count;
    on another CPU training rounds differently and the scores move (measured: the same training code and seed on two
    VMs of this project's kind, 2026-11-30, gave video specialists of 0.121 and 0.083 test hit@1; on 2026-12-01 two
    VMs that both call their CPU "AMD EPYC" gave image specialists of 0.258 and 0.263, hence `cpu_id` and
    `cpu_capability` in `runner.machine_summary`)."""
    return (f"Machine: {_machine_words(machine)}. The same command reproduces these numbers on the same CPU (name, "
            "family / model / stepping and kernel ISA where shown) and thread count; on another CPU training rounds "
            "differently and the scores move.")


def machine_lines(stages: dict[str, dict[str, Any]], machine: dict[str, Any] | None) -> list[str]:
    """The machine the stages ran on, from their records (`machine`, each stage's own); where none has one, the run's
    `machine` (OUT/run.json, rewritten by a resumed run: older folders only). Stages run on several machines (a run
    resumed elsewhere) are listed by machine, without the reproduction claim."""
    by_machine: list[tuple[dict[str, Any], list[str]]] = []
    for stage, record in stages.items():
        recorded = record.get("machine")
        if isinstance(recorded, dict):
            index = next((i for i, (m, _) in enumerate(by_machine) if _same_machine(m, recorded)), None)
            if index is None:
                by_machine.append((dict(recorded), [stage]))
            else:   # described by what both records say (an older one lacks cpu_id / cpu_capability)
                known, names = by_machine[index]
                by_machine[index] = ({k: v for k, v in known.items() if k in recorded}, [*names, stage])
    if len(by_machine) == 1:
        return [machine_line(by_machine[0][0])]
    if not by_machine:
        return [machine_line(machine)] if machine else []
    return ["Machines: the stages ran on more than one machine, so the scores mix their roundings: " + "; ".join(
        f"{_machine_words(m)} ({', '.join(names)})" for m, names in by_machine) + "."]


def _same_machine(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two stage records' machines agree on every field both have: a record written before `cpu_id` and
    `cpu_capability` were recorded is not told apart from a newer one of the same name, cores and versions."""
    return all(a[k] == b[k] for k in a.keys() & b.keys())


def _machine_words(machine: dict[str, Any]) -> str:
    """`machine` (runner.machine_summary) in words; `cpu_id` and `cpu_capability` where recorded (older runs lack
    them)."""
    detail = ", ".join(str(machine[k]) for k in ("cpu_id", "cpu_capability") if machine.get(k))
    cpu = f"{machine.get('cpu', '?')} ({detail})" if detail else machine.get("cpu", "?")
    return (f"{cpu}, {machine.get('cores', '?')} cores, torch {machine.get('torch', '?')} on "
            f"{machine.get('torch_threads', '?')} threads, Python {machine.get('python', '?')}")


def _continued_from_line(continued: str) -> str:
    if continued == "paper":
        return ("Drift, recovery and rehearsal continue from the **paper-weight** fused model (`fuse/model`).")
    return ("Drift, recovery and rehearsal continue from the **dev-chosen** fused model (`fuse/dev-chosen`), as the "
            "paper continues from the α its validation search chose.")


def _data_lines(data: dict[str, Any]) -> list[str]:
    sources, skipped = data.get("sources", {}), data.get("skipped", {})
    body = [[m, s, *(str(c.get(split, 0)) for split in ("train", "dev", "test"))]
            for m, srcs in sorted(sources.items()) for s, c in sorted(srcs.items())]
    lines = _markdown_table(["modality", "source", "train", "dev", "test"], body) if body else []
    if skipped:
        lines += ["", "Skipped sources (the targets apply to the full run with every source):"]
        lines += [f"- {m}/{s}: {why}" for m, srcs in sorted(skipped.items()) for s, why in sorted(srcs.items())]
    elif "skipped" in data:
        lines += ["", "Skipped sources: none (every source, `../shared` included, was installed)."]
    else:
        lines += ["", "Skipped sources: unknown (the data stage of this run did not record them)."]
    return lines


def write_report(out: Path, stages: dict[str, dict[str, Any]], preset: str, seed: int, command: str,
                 targets: Targets = TARGETS, machine: dict[str, Any] | None = None) -> dict[str, str]:
    """Write `out/report.md`, `out/scores.json` (per-modality and per-source tables, held-out task scores) and the
    PNG plots. `machine`: the run's `runner.machine_summary()` (printed under the command where no stage record has its
    own: `machine_lines`)."""
    out = Path(out)
    rows, chance, sources = score_table(stages), chance_levels(stages), source_table(stages)
    timings = {s: round(v.get("seconds", 0.0)) for s, v in stages.items()}
    total = sum(v.get("seconds", 0.0) for v in stages.values())
    if TEACHER not in rows:
        rows_display = {BASE: rows.get(BASE, {}), TEACHER: {}, **rows}
    else:
        rows_display = rows
    lines = [
        "# Conan-embedding-v3 pipeline report",
        "",
        f"Command: `{command}` (preset `{preset}`, seed {seed}). Scores: hit@1 of each modality's held-out test",
        "queries against all test candidates of that modality of the kind the query retrieves (an image query ranks",
        "the modality's texts, a text query its images; offline proxy on real local data, **not MMEB/MAEB**);",
        "chance = mean over queries of 1 / candidates. Per source, a source's queries rank only that source's candidates (CIFAR-10: its 10",
        "class names, i.e. zero-shot accuracy; spoken digits: the 10 digit names).",
        *([sizes] if (sizes := test_sizes_line(stages)) else []),
        *machine_lines(stages, machine),
        "",
        "## Scores per modality (hit@1)",
        "",
        *_markdown_table(["model", *MODALITIES], [[name, *(_fmt(s.get(m)) for m in MODALITIES)]
                                                  for name, s in rows_display.items() if name in (BASE, TEACHER)
                                                  or s]),
        "| chance | " + " | ".join(_fmt(chance.get(m)) for m in MODALITIES) + " |",
        "",
        "## Scores per source (hit@1)",
        "",
    ]
    columns = [BASE, "own specialist", FUSED, FUSED_DEV, RECOVERED, REALIGNED, REHEARSED, TEACHER]
    lines += _markdown_table(
        ["source", "task", "queries", "candidates", "chance", *columns],
        [[key, e["task"], str(e.get("n_queries", "-")), str(e["n_candidates"]), _fmt(e["chance"]),
          *(_fmt(e["scores"].get(c)) for c in columns)]
         for key, e in sources.items()])
    lines += ["", "## Verdicts against the targets", "",
              "A hit@1 in a verdict carries its 95% Wilson interval over the modality's test queries in brackets "
              "(scipy.stats.binomtest); where the target lies inside that interval the line says so: this run's "
              "queries cannot tell the score from the target. The interval treats the target as a fixed number; where "
              "the target is itself built from another score (a base, a specialist), that score's noise adds to it.",
              ""]
    lines += [f"- {v.line(' s' if v.what.startswith('wall time') else '')}"
              for v in target_verdicts(rows, chance, total, preset, targets, query_counts(stages))]
    heldout = stages.get("heldout", {})
    held = heldout_verdicts(heldout, targets)
    lines += [f"- {v.line()}" for v in held] or [
        "- held-out generalisation (unseen sources): not measured (no held-out task was scored in this run; see "
        "below)."]
    if stages.get("data", {}).get("skipped"):
        lines += ["- This run skipped data sources (see Data sources); the targets apply to the full run."]
    lines += ["", "## Held-out generalisation (unseen sources)", "", *_heldout_lines(heldout, targets)]
    continued = continued_from(stages)
    lines += ["", "## What the numbers say", ""] + [f"- {v}" for v in observations(rows, continued)]
    lines += ["", "## Fusion weights: paper vs dev-chosen", "", *_sweep_lines(stages.get("fuse", {}), continued)]
    drift = stages.get("drift", {}).get("table")
    if drift:
        lines += ["", "## Projector Drift diagnosis (audio specialist vs fused)", "",
                  "Its audio->partner retrieval ranks every test clip's partner among all of them (training/recovery/"
                  "drift.py), so its R@1 is not the audio hit@1 above, which asks each source in its own direction "
                  "(spoken words: text -> audio).", "", drift]
    recover = stages.get("recover", {})
    if recover:
        compact = {k: {kk: vv for kk, vv in (recover.get(k) or {}).items()
                       if kk != "config" and len(json.dumps(vv, default=str)) <= 200}   # no hashes, no configs
                   for k in ("recovery", "realign")}
        lines += ["", "## Recovery vs training-free re-alignment", "",
                  "```json", json.dumps(compact, indent=1, default=str), "```"]
    lines += ["", "## Data sources", "", *_data_lines(stages.get("data", {}))]
    lines += ["", "## Stage wall times (s)", "", " | ".join(f"{k}: {v}" for k, v in timings.items()),
              f"total: {round(total)} s" + (f" (target <= {targets.wall_s[preset]:.0f} s for preset {preset})"
                                            if preset in targets.wall_s else ""), ""]
    png = plot(rows, chance, out / "scores.png")
    png_sources = plot_sources(sources, out / "scores_by_source.png")
    if png:
        lines += ["![per-modality scores](scores.png)", ""]
    if png_sources:
        lines += ["![per-source scores](scores_by_source.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "scores.json").write_text(json.dumps({"modalities": rows, "chance": chance, "sources": sources,
                                                 "heldout": heldout.get("scores", {})}, indent=1))
    return {"report": str(out / "report.md"), "plot": str(png) if png else "",
            "plot_sources": str(png_sources) if png_sources else ""}
