"""MMEB runner in the official VLM2Vec format.

A row is ``{"qry_text", "qry_img_path", "tgt_text": [...], "tgt_img_path": [...]}`` with optional ``qry_inst`` /
``tgt_inst`` (MMEB-V2 "Instruct" mirrors). **The first candidate is the ground truth.** Each query is ranked against
its own candidate list (dot product of L2-normalised embeddings); the score is hit@1 for image and video sets and
NDCG@5 (linear gain) for visual-document sets, as in VLM2Vec's ``report_score_v2.py``. Phi-3.5-V image tokens
(``<|image_1|>``) are removed from the text; the image goes in as an image.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .embedder import Embedder
from .metrics import TieMode, gold_rank, rank_metrics

IMAGE_TOKEN_RE = re.compile(r"<\|image_\d+\|>|<image>")
MAIN_SCORE = {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg@5"}


@dataclass
class MMEBRow:
    """One query with its candidate list (index 0 = ground truth)."""

    qry_text: str | None
    qry_image: Any  # path (str/Path), PIL image, or None
    tgt_texts: list[str | None]
    tgt_images: list[Any]
    qry_inst: str | None = None
    tgt_inst: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _clean(text: Any) -> str | None:
    if text is None:
        return None
    t = IMAGE_TOKEN_RE.sub("", str(text)).strip()
    return t or None


def _resolve(img: Any, image_root: Path | None) -> Any:
    if img is None or img == "":
        return None
    if isinstance(img, (str, Path)):
        p = Path(img)
        if not p.is_absolute() and image_root is not None:
            p = image_root / p
        if not p.exists():
            raise FileNotFoundError(f"MMEB image {img!r} not found (looked at {p}); pass --image-root to the folder "
                                    "that holds the MMEB images")
        return str(p)
    return img  # PIL image (HF datasets with decoded images)


def row_from_dict(d: dict[str, Any], image_root: Path | None = None, where: str = "row") -> MMEBRow:
    """Validate one VLM2Vec-format dict and turn it into an :class:`MMEBRow`."""
    for key in ("tgt_text", "tgt_img_path"):
        if key in d and d[key] is not None and not isinstance(d[key], (list, tuple)):
            raise ValueError(f"{where}: {key} must be a list of candidates, got {type(d[key]).__name__}")
    tt = list(d.get("tgt_text") or [])
    ti = list(d.get("tgt_img_path") or [])
    n = max(len(tt), len(ti))
    if n == 0:
        raise ValueError(f"{where}: empty candidate list (tgt_text and tgt_img_path are both empty); the first "
                         "candidate must be the ground truth")
    if tt and ti and len(tt) != len(ti):
        raise ValueError(f"{where}: tgt_text has {len(tt)} entries but tgt_img_path has {len(ti)}")
    tt = tt or [None] * n
    ti = ti or [None] * n
    qt, qi = _clean(d.get("qry_text", d.get("qry"))), _resolve(d.get("qry_img_path"), image_root)
    if qt is None and qi is None:
        raise ValueError(f"{where}: the query has neither text nor image")
    row = MMEBRow(qry_text=qt, qry_image=qi, tgt_texts=[_clean(t) for t in tt],
                  tgt_images=[_resolve(i, image_root) for i in ti],
                  qry_inst=_clean(d.get("qry_inst")), tgt_inst=_clean(d.get("tgt_inst")))
    for j, (t, i) in enumerate(zip(row.tgt_texts, row.tgt_images)):
        if t is None and i is None:
            raise ValueError(f"{where}: candidate {j} has neither text nor image")
    return row


def load_mmeb_jsonl(path: str | Path, image_root: str | Path | None = None, limit: int | None = None) -> list[MMEBRow]:
    """Read a VLM2Vec-format JSONL file (image paths relative to ``image_root``, default: the file's folder)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    rows = []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{ln}: not valid JSON ({e})") from e
            rows.append(row_from_dict(d, root, where=f"{path}:{ln}"))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def load_mmeb_hf(subset: str, image_root: str | Path, *, dataset: str = "TIGER-Lab/MMEB-eval",
                 split: str = "test", limit: int | None = None) -> list[MMEBRow]:
    """Load one official MMEB subset from the Hugging Face Hub (needs network; images from ``images.zip``)."""
    from datasets import load_dataset  # lazy: only the Hub path needs datasets

    ds = load_dataset(dataset, subset, split=split)
    rows = []
    for i, d in enumerate(ds):
        rows.append(row_from_dict(dict(d), Path(image_root), where=f"{dataset}/{subset}[{i}]"))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def to_input(text: str | None, image: Any) -> Any:
    """Map a (text, image) pair to the user input format of docs/ARCHITECTURE.md."""
    if image is None:
        return text
    if text is None:
        return {"image": image}
    return {"text": text, "image": image}


def _encode_unique(embedder: Embedder, items: list[tuple[Any, str | None]],
                   batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Encode (input, prompt) pairs once per distinct pair, grouped by prompt; returns (unique rows, index per item).

    Identity of an input is its ``repr`` (strings, paths) or object identity (PIL images), so reusing the same
    candidate objects across rows encodes each only once.
    """
    keyed: dict[tuple[str, str | None], int] = {}
    uniq: list[tuple[Any, str | None]] = []
    idx = np.empty(len(items), dtype=np.int64)
    for n, (inp, prompt) in enumerate(items):
        k = (repr(inp), prompt)
        if k not in keyed:
            keyed[k] = len(uniq)
            uniq.append((inp, prompt))
        idx[n] = keyed[k]
    out: np.ndarray | None = None
    by_prompt: dict[str | None, list[int]] = {}
    for j, (_, p) in enumerate(uniq):
        by_prompt.setdefault(p, []).append(j)
    for p, js in by_prompt.items():
        emb = np.asarray(embedder.encode([uniq[j][0] for j in js], prompt=p, batch_size=batch_size))
        if emb.ndim != 2 or emb.shape[0] != len(js):
            raise ValueError(f"embedder returned shape {emb.shape} for {len(js)} inputs")
        if out is None:
            out = np.zeros((len(uniq), emb.shape[1]), dtype=np.float32)
        out[js] = emb
    assert out is not None
    return out, idx


def score_rows(embedder: Embedder, rows: Sequence[MMEBRow], *, kind: str = "image", batch_size: int = 8,
               ties: TieMode = "pessimistic", query_prompt: str | None = None) -> dict[str, Any]:
    """Encode a dataset's queries and candidates and compute hit@1/5/10, NDCG@1/5/10, MRR; ``main_score`` by kind."""
    if kind not in MAIN_SCORE:
        raise ValueError(f"score_rows: kind must be one of {sorted(MAIN_SCORE)}, got {kind!r}")
    if not rows:
        raise ValueError("score_rows: no rows to score")
    q_items = [(to_input(r.qry_text, r.qry_image), r.qry_inst or query_prompt) for r in rows]
    q_u, q_idx = _encode_unique(embedder, q_items, batch_size)
    c_items, bounds = [], []
    for r in rows:
        start = len(c_items)
        c_items += [(to_input(t, i), r.tgt_inst) for t, i in zip(r.tgt_texts, r.tgt_images)]
        bounds.append((start, len(c_items)))
    c_u, c_idx = _encode_unique(embedder, c_items, batch_size)
    ranks = [gold_rank(c_u[c_idx[a:b]] @ q_u[q_idx[i]], 0, ties=ties) for i, (a, b) in enumerate(bounds)]
    res: dict[str, Any] = rank_metrics(ranks)
    res["main_score"] = res[MAIN_SCORE[kind]]
    res["main_score_name"] = MAIN_SCORE[kind]
    return res


def run_mmeb(embedder: Embedder, datasets: dict[str, tuple[Iterable[MMEBRow], str]], *, batch_size: int = 8,
             ties: TieMode = "pessimistic") -> dict[str, Any]:
    """Score several MMEB datasets ``{name: (rows, kind)}``; overall = mean main score (as MMEB reports it)."""
    from tqdm.auto import tqdm

    per: dict[str, Any] = {}
    for name, (rows, kind) in tqdm(list(datasets.items()), desc="MMEB datasets"):
        per[name] = score_rows(embedder, list(rows), kind=kind, batch_size=batch_size, ties=ties)
        per[name]["kind"] = kind
    overall = float(np.mean([v["main_score"] for v in per.values()])) if per else float("nan")
    by_kind: dict[str, float] = {}
    for kind in MAIN_SCORE:
        vals = [v["main_score"] for v in per.values() if v["kind"] == kind]
        if vals:
            by_kind[kind] = float(np.mean(vals))
    return {"datasets": per, "overall": overall, "by_kind": by_kind, "ties": ties}
