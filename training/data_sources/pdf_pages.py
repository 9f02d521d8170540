"""Real PDF manual pages (R and GNU Octave manuals): a sentence or section heading from the page's own text layer
-> the rendered page (``{"document": "<page>.png"}``).

Why not ``shared_data.pdf_pages``: it scans one whole manual and renders every usable page; here pages are scanned
from several manuals under a ``--max-pages`` cap, split by page identity, and only the chosen pages are rendered.
The query rule is the same idea (text that occurs on no other page of the manual, so one page is relevant).
Split: ``split_of("pdf:<file name>:<0-based page>")``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.common.splits import split_of

from .common import BuildContext, SourceInfo, SourceMissing, make_pair, pick_negatives
from .install import INSTALL

MANUALS = (
    Path("/usr/share/doc/r-doc-pdf/manual/R-intro.pdf"),
    Path("/usr/share/doc/r-doc-pdf/manual/R-data.pdf"),
    Path("/usr/share/doc/r-doc-pdf/manual/R-admin.pdf"),
    Path("/usr/share/doc/r-doc-pdf/manual/R-FAQ.pdf"),
    Path("/usr/share/doc/r-doc-pdf/manual/R-lang.pdf"),
    Path("/usr/share/doc/r-doc-pdf/manual/R-ints.pdf"),
    Path("/usr/share/doc/r-doc-pdf/manual/R-exts.pdf"),
    Path("/usr/share/doc/octave/octave.pdf"),
)
RENDER_DPI = 50
SKIP_FRONT = 3   # title, copyright and contents pages have no page-specific text
INFO = SourceInfo(
    name="manual-pdf-pages",
    modality="document",
    licence="R manuals GPL-2+ (Debian r-doc-pdf); GNU Octave manual GPL-3+ (Debian octave-doc)",
    obtained=f"pypdfium2 text layer (query) and greyscale page render at {RENDER_DPI} dpi (PNG) of evenly spaced "
             "pages, "
             "at most --max-pages per manual",
    split_rule='training.common.splits.split_of("pdf:<file name>:<0-based page>")',
    install=INSTALL["pdf"],
)
INSTRUCTION = "Find the manual page that contains this text."

_SENT = re.compile(r"[A-Z][^.!?]*[a-z][^.!?]*[.!?](?=\s|$)")
_WORDLIKE = re.compile(r"[(\"'‘“]?[A-Za-z][a-z'’-]*[)\"'’”,;:.!?]*")
_HEADING = re.compile(r"^\d+(?:\.\d+)+\s+([A-Z][A-Za-z ,'()-]{8,80})$")


@dataclass(frozen=True)
class Page:
    pdf: Path
    index: int
    queries: tuple[str, ...]   # candidate queries unique to this page within its manual

    @property
    def key(self) -> str:
        return f"pdf:{self.pdf.name}:{self.index}"


def _clean(text: str) -> str:
    """Undo pdfium's hyphenation marks (U+FFFE then a line break) and drop NULs."""
    return re.sub("\ufffe\\s*", "", text).replace("\x00", "")


def page_candidates(text: str) -> list[str]:
    """Section headings (without their number) and 6-30 word sentences of one page's text layer."""
    lines = [ln.strip() for ln in text.replace("\r", "").split("\n")][1:]  # line 0 is the running header
    heads = [m.group(1).strip() for ln in lines if (m := _HEADING.match(ln))]
    flat = " ".join(" ".join(ln for ln in lines if not _HEADING.match(ln)).split())
    sents = [s.strip() for s in _SENT.findall(flat) if 6 <= len(s.split()) <= 30 and _prose(s)]
    return heads + sents


def _prose(sentence: str) -> bool:
    """True for running text, False for code listings, symbol tables and index lines caught by the regex."""
    words = sentence.split()
    plain = sum(bool(_WORDLIKE.fullmatch(w)) for w in words)
    return (plain >= 0.8 * len(words) and not sentence.endswith(" .")
            and not re.search(r"\d{4,}|[{}<>=_\\]|\.\.\.", sentence))


def scan_manual(pdf: Path, max_pages: int) -> list[Page]:
    """Up to ``max_pages`` evenly spaced pages of ``pdf`` that have a query found on no other scanned page."""
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument(str(pdf))
    try:
        n = len(doc)
        idx = sorted({int(i) for i in np.linspace(SKIP_FRONT, n - 1, min(max_pages, max(n - SKIP_FRONT, 0)))})
        texts = {i: _clean(doc[i].get_textpage().get_text_range()) for i in idx}
    finally:
        doc.close()
    flat = {i: " ".join(t.split()) for i, t in texts.items()}
    pages = []
    for i in idx:
        if texts[i].count(". . .") > 3:
            continue  # a table of contents or an index page: its lines are other pages' headings
        cands = [q for q in dict.fromkeys(page_candidates(texts[i]))
                 if not any(q in flat[j] for j in idx if j != i)]
        if cands:
            pages.append(Page(pdf, i, tuple(cands)))
    return pages


def available_manuals() -> list[Path]:
    """The installed manuals (raises SourceMissing if none or pypdfium2 is absent)."""
    try:
        import pypdfium2  # noqa: F401
    except ImportError as e:
        raise SourceMissing(f"pypdfium2 is not installed: {INSTALL['pdf']}") from e
    found = [p for p in MANUALS if p.exists()]
    if not found:
        raise SourceMissing(f"none of the manual PDFs {[str(p) for p in MANUALS]} is installed: {INSTALL['pdf']}")
    return found


def render_pages(pdf: Path, indices: list[int], dpi: int = RENDER_DPI) -> dict[int, object]:
    """Pages of one PDF as greyscale PIL images (the processor converts to RGB; greyscale PNGs are ~3x smaller),
    opening the document once (reopening an 1,100-page manual per page is what made this slow)."""
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument(str(pdf))
    try:
        return {i: doc[i].render(scale=dpi / 72, grayscale=True).to_pil().convert("L") for i in sorted(set(indices))}
    finally:
        doc.close()


def check(ctx: BuildContext) -> None:
    """Raise SourceMissing unless pypdfium2 and at least one manual are installed."""
    ctx.cached("pdf:manuals", available_manuals)


def build(split: str, cap: int, ctx: BuildContext) -> list[dict]:
    """Up to ``cap`` text->page pairs, round-robin over manuals; negatives are other pages of the same manual."""
    manuals = ctx.cached("pdf:manuals", available_manuals)
    rng = ctx.rng(INFO.name, split)
    per_manual = []
    for pdf in manuals:
        pages = ctx.cached(f"pdf:scan:{pdf}:{ctx.pdf_max_pages}", lambda pdf=pdf: scan_manual(pdf, ctx.pdf_max_pages))
        mine = [p for p in pages if split_of(p.key) == split]
        per_manual.append([mine[i] for i in rng.permutation(len(mine))])
    order = [m[d] for d in range(max(map(len, per_manual), default=0)) for m in per_manual if d < len(m)]
    chosen = order[:cap]
    negpool = order[:max(len(chosen), min(len(order), ctx.n_negatives + 1) if chosen else 0)]
    images: dict[tuple[Path, int], object] = {}
    for pdf in dict.fromkeys(p.pdf for p in negpool):
        for i, img in render_pages(pdf, [p.index for p in negpool if p.pdf == pdf]).items():
            images[(pdf, i)] = img
    rels = [ctx.media.image(images[(p.pdf, p.index)], f"pdf/{p.pdf.stem}-p{p.index:04d}.png") for p in negpool]
    pairs = []
    for k, p in enumerate(chosen):
        query = p.queries[int(rng.integers(len(p.queries)))]
        neg = pick_negatives(len(negpool), k, ctx.n_negatives, rng, prefer=lambda j: negpool[j].pdf == p.pdf)
        pairs.append(make_pair({"text": query}, {"document": rels[k]}, [{"document": rels[j]} for j in neg],
                               INFO.name, INSTRUCTION, key=p.key, negative_keys=[negpool[j].key for j in neg],
                               manual=p.pdf.name, page=p.index))
    return pairs
