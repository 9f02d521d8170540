"""Proxy-suite reports: JSON, a markdown table, a per-modality bar plot, and a side-by-side comparison.

Every artefact carries the label below, so a proxy number is never mistaken for an MMEB/MAEB score.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from training.common.io_utils import atomic_file, atomic_write_bytes

LABEL = "offline proxy suite (real local data), not MMEB/MAEB"


def _fmt(v: Any) -> str:
    if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
        return f"{100 * float(v):.2f}"
    return "-"


def markdown_table(result: dict[str, Any]) -> str:
    """One model's proxy results as a markdown table (scores x100)."""
    lines = [f"**{LABEL}** — model `{result.get('model', '?')}` (hash {result.get('model_hash', '?')}, "
             f"limit {result.get('limit')})", "",
             "| task | modality | mirrors | metric | score | n | note |", "|---|---|---|---|---:|---:|---|"]
    for name, r in result["tasks"].items():
        note = r.get("reason", "") if r["status"] != "ok" else ("synthetic speech" if r.get("synthetic") else "")
        lines.append(f"| {name} | {r['modality']} | {r['mirrors']} | {r['main_score_name']} | "
                     f"{_fmt(r.get('main_score'))} | {r.get('n', '-')} | {note} |")
    return "\n".join(lines) + "\n"


def compare_table(results_by_name: dict[str, dict[str, Any]]) -> str:
    """Markdown table with one column per model (the pipeline prints this after each stage)."""
    if not results_by_name:
        raise ValueError("compare_table: no results to compare")
    names = list(results_by_name)
    tasks: list[str] = []
    for r in results_by_name.values():
        tasks += [t for t in r["tasks"] if t not in tasks]
    head = "| task | metric | " + " | ".join(names) + " |"
    lines = [f"**{LABEL}** (scores x100)", "", head, "|---|---|" + "---:|" * len(names)]
    for t in tasks:
        metric = next(r["tasks"][t]["main_score_name"] for r in results_by_name.values() if t in r["tasks"])
        cells = []
        for n in names:
            r = results_by_name[n]["tasks"].get(t)
            cells.append(_fmt(r.get("main_score")) if r and r["status"] == "ok" else "skip")
        lines.append(f"| {t} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_bars(result: dict[str, Any], out_png: Path) -> Path | None:
    """Bar plot of main scores, one panel per modality; None when no task succeeded."""
    ok = {n: r for n, r in result["tasks"].items() if r["status"] == "ok"}
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mods = sorted({r["modality"] for r in ok.values()})
    fig, axes = plt.subplots(1, len(mods), figsize=(4.2 * len(mods), 3.8), squeeze=False)
    for ax, m in zip(axes[0], mods):
        names = [n for n, r in ok.items() if r["modality"] == m]
        vals = [100 * float(ok[n]["main_score"]) for n in names]
        ax.bar(range(len(names)), vals, color="#4C72B0")
        ax.set_xticks(range(len(names)), [f"{n}\n({ok[n]['main_score_name']})" for n in names], rotation=30,
                      ha="right", fontsize=7)
        ax.set_ylim(0, 100)
        ax.set_title(m)
        for i, v in enumerate(vals):
            ax.text(i, v + 1, f"{v:.1f}", ha="center", fontsize=7)
    fig.suptitle(f"{LABEL}\n{result.get('model', '')}", fontsize=9)
    fig.tight_layout()
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_png


def write_reports(result: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write ``proxy_results.json``, ``proxy_results.md`` and ``proxy_results.png`` into ``out_dir``."""
    out = Path(out_dir)
    files = {"json": out / "proxy_results.json", "markdown": out / "proxy_results.md"}
    atomic_write_bytes(files["json"], json.dumps(result, indent=2, default=float).encode())
    atomic_write_bytes(files["markdown"], markdown_table(result).encode())
    png = plot_bars(result, out / "proxy_results.png")
    paths = {k: str(v) for k, v in files.items()}
    if png is not None:
        paths["plot"] = str(png)
    return paths
