"""Held-out tasks from real sources the pipeline never trains on: one per kind of generalisation issue 15 asks for.

| task                    | query -> candidates            | source (never read by any training step)                  |
|-------------------------|--------------------------------|-----------------------------------------------------------|
| gcide-definitions       | definition text -> word        | GCIDE (Webster 1913 based; Debian dict-gcide, dictd files)|
| twemoji-name-to-image   | CLDR name -> emoji image       | Twemoji artwork (npm emoji-datasource-twitter@16.0.0)     |
| twemoji-image-to-name   | emoji image -> CLDR name       | the same                                                  |
| flite-spoken-words      | spoken word -> word text       | flite (Debian flite; training speech is espeak-ng)        |
| gnuplot-manual-pages    | page text -> page image        | gnuplot manual (Debian gnuplot-doc; training: R, Octave)  |

The *items* are held out too where they could overlap training: GCIDE and flite words are nouns of WordNet's **test**
split (`wordnet.load_synsets`, key ``wordnet:n<offset>``), which the text distillation and every text pair leave out;
the emoji are those whose CLDR name is in the **test** split of the emoji rule (``split_of("emoji:<name>")``), so
neither the name nor the artwork style was seen. gnuplot pages are all unseen (no gnuplot page is ever rendered).

:func:`build_heldout_tasks` writes ``OUT/<task>/test.jsonl`` in the training pair format (ARCHITECTURE.md; media
under ``OUT/media/<source>/``, paths relative to the JSONL) and ``OUT/tasks.json`` (tasks, sizes, licences, the
sources skipped and why). Scoring lives in ``training/evaluation/heldout.py``; ``python -m training.heldout`` does
both. Every draw is seeded; a rebuild with the same ``cap`` and ``seed`` writes the same rows.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from training.common.io_utils import write_json_atomic
from training.common.shared_data import emoji_names
from training.common.splits import split_of

from . import emoji_images, pdf_pages, wordnet
from .common import BuildContext, SourceInfo, SourceMissing, make_pair, stable_int
from .install import INSTALL

GCIDE_DIR = Path("/usr/share/dictd")
GNUPLOT_PDF = Path("/usr/share/doc/gnuplot/gnuplot.pdf")
TWEMOJI_PACKAGE = "emoji-datasource-twitter"
TWEMOJI_ENV = "CONAN_TWEMOJI_DIR"      # the npm package folder itself (holds emoji.json and img/)
DATA_HOME_ENV = "CONAN_DATA_HOME"      # default ~/.cache/conan-embedding; npm installs under <it>/npm
FLITE_VOICES = ("slt", "rms", "awb", "kal16")   # `flite -lv`; awb_time only speaks times, kal is the 8 kHz kal16
SPOKEN_INSTRUCTION = "Identify the word spoken in the recording."
EMOJI_IMAGE_INSTRUCTION = "Identify the emoji in the image."
WORD_POOL = 1000   # GCIDE / flite words come from this many most frequent WordNet test nouns (known words)

SOURCES: dict[str, SourceInfo] = {
    "gcide": SourceInfo("gcide", "text", "GCIDE GPL-3+ (Webster's 1913 public domain + additions)",
                        "Debian dict-gcide: /usr/share/dictd/gcide.index + gcide.dict.dz (dictd format); the "
                        "first noun sense of a WordNet test-split noun, WordNet-derived senses excluded",
                        'words: WordNet test split, split_of("wordnet:n<offset>") == "test"', INSTALL["gcide"]),
    "twemoji": SourceInfo("twemoji", "image", "Twemoji graphics CC-BY-4.0 (Twitter, Inc.); emoji-data MIT",
                          f"npm {TWEMOJI_PACKAGE}@16.0.0 img/twitter/64/<unified>.png on white, 72 px; CLDR names "
                          "from PyPI emoji", 'split_of("emoji:<name>") == "test"', INSTALL["twemoji"]),
    "flite": SourceInfo("flite", "audio", "flite BSD-like (CMU); the generated audio is ours",
                        f"Debian flite, voices {', '.join(FLITE_VOICES)} rotating (seeded), one word a clip",
                        'words: WordNet test split, split_of("wordnet:n<offset>") == "test"', INSTALL["flite"]),
    "gnuplot": SourceInfo("gnuplot", "document", "gnuplot manual: gnuplot licence (Debian gnuplot-doc)",
                          f"{GNUPLOT_PDF}: query text and page render by training/data_sources/pdf_pages.py "
                          f"({pdf_pages.RENDER_DPI} dpi greyscale)", "every page is unseen (never rendered in "
                          "training)", INSTALL["gnuplot"]),
}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    source: str
    kind: str            # "definition -> word", ...
    instruction: str


TASKS = (
    TaskSpec("gcide-definitions", "gcide", "text definition -> word", wordnet.INSTRUCTION),
    TaskSpec("twemoji-name-to-image", "twemoji", "name -> image", emoji_images.INSTRUCTION),
    TaskSpec("twemoji-image-to-name", "twemoji", "image -> name", EMOJI_IMAGE_INSTRUCTION),
    TaskSpec("flite-spoken-words", "flite", "spoken word -> text", SPOKEN_INSTRUCTION),
    TaskSpec("gnuplot-manual-pages", "gnuplot", "page text -> page image", pdf_pages.INSTRUCTION),
)


# ----------------------------------------------------------------------------------------------------- GCIDE
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
_SOURCE_TAG = re.compile(r"^\s*\[[^\]]*(Webster|PJC|WordNet|Century|Dict\.|RHD|Johnson)[^\]]*\]\s*$")
_NOUN = re.compile(r"^\s*(?:\([^)]*\)\s*)?,?\s*n\.(?!\s*pl\.\s*\(?sing)")
_DOMAIN = re.compile(r"^\((?:[A-Z][A-Za-z. &]*\.?)\)\s*")
_SENSE = re.compile(r"^\s*(?:1\.|\(a\))\s*")


def dictd_number(text: str) -> int:
    """An offset or length of a dictd ``.index`` line (base64 digits, most significant first)."""
    try:
        return sum(_B64[c] * 64 ** i for i, c in enumerate(reversed(text)))
    except KeyError:
        raise ValueError(f"dictd_number: {text!r} is not a dictd base64 number") from None


def read_dictd(index_path: str | Path, dict_path: str | Path) -> dict[str, list[str]]:
    """{headword as in the index: [entry text, ...]} of a dictd database (``.dict`` or dictzip ``.dict.dz``).

    Why by hand: the format is three tab-separated fields a line (word, base64 offset, base64 length into the
    uncompressed dictionary); dictzip is gzip-compatible, so the whole file (40 MB for GCIDE, 0.3 s) is read with
    :mod:`gzip`. Raises SourceMissing when a file is absent, ValueError on a malformed index line.
    """
    index_path, dict_path = Path(index_path), Path(dict_path)
    for path in (index_path, dict_path):
        if not path.exists():
            raise SourceMissing(f"dictd file {path} is missing: {INSTALL['gcide']}")
    opener = gzip.open if dict_path.suffix == ".dz" else open
    with opener(dict_path, "rb") as fh:
        data = fh.read()
    out: dict[str, list[str]] = {}
    for n, line in enumerate(index_path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) < 3:
            raise ValueError(f"{index_path}:{n}: expected 'word<TAB>offset<TAB>length', got {line!r}")
        start, length = dictd_number(fields[1]), dictd_number(fields[2])
        out.setdefault(fields[0], []).append(data[start:start + length].decode("utf-8", errors="replace"))
    return out


def _strip_brackets(text: str) -> str:
    """``text`` without a leading balanced ``[...]`` group (GCIDE etymologies nest accent codes such as ``[=e]``)."""
    if not text.startswith("["):
        return text
    depth = 0
    for i, c in enumerate(text):
        depth += (c == "[") - (c == "]")
        if depth == 0:
            return text[i + 1:]
    return ""


def gcide_noun_definition(entry: str, word: str) -> str | None:
    """The first sense of ``entry`` (one GCIDE entry's text) when it is a noun entry of ``word``, cleaned of markup.

    None when the entry is of another word or part of speech, its first sense comes from WordNet (GCIDE merges some
    ``[WordNet 1.5]`` senses: the same source as training) or the cleaned definition is not 3-30 plain words or
    names ``word`` itself. Cleaning: ``{braces}`` and domain labels such as ``(Zool.)`` removed, ``-- called also``
    tails and ``; as, <example>`` usages cut (examples name the word), a gloss over 30 words cut to its first
    ``;`` clause; senses marked obsolete, rare, archaic, colloquial or cant, and definitions still holding accent
    codes (``[=e]``), are refused rather than guessed.
    """
    lines = entry.splitlines()
    head = re.match(r"^\s*([^\\]+?)\s*\\[^\\]*\\(.*)$", lines[0]) if lines else None
    if head is None or head.group(1).strip().lower() != word.lower():
        return None
    block, tag = [head.group(2)], None
    for line in lines[1:]:
        if _SOURCE_TAG.match(line):
            tag = line.strip()
            break
        if not line.strip():
            break
        block.append(line.strip())
    rest = " ".join(" ".join(block).split())
    if tag is None or "WordNet" in tag or not _NOUN.match(rest):
        return None
    rest = rest[_NOUN.match(rest).end():].strip()
    rest = re.sub(r"^;?\s*pl\.\s*(?:[A-Z]\.\s*)?\{[^}]*\}(?:,\s*(?:[A-Z]\.\s*)?\{[^}]*\})*\.?\s*", "", rest)
    rest = _strip_brackets(rest.strip()).strip()
    rest = _SENSE.sub("", rest)
    while _DOMAIN.match(rest):
        rest = _DOMAIN.sub("", rest, count=1)
    rest = re.split(r"\s(?:2\.|\(b\))\s", rest)[0]
    if re.search(r"\[(?:Obs|R|Archaic|Colloq|Prov\. Eng|Cant)\.?\]", rest):
        return None
    rest = re.split(r"\s*--\s*|[;,]\s+as,\s", rest)[0].replace("{", "").replace("}", "").strip()
    if len(rest.split()) > 30:  # Webster strings glosses with ";": keep the first one
        rest = rest.split(";")[0]
    rest = rest.strip().rstrip(";,:.").strip() + "."
    words = rest.split()
    if not 3 <= len(words) <= 30 or "[" in rest or "\\" in rest or "(?)" in rest or not rest[0].isalpha():
        return None
    if re.search(rf"\b{re.escape(word.lower())}", rest.lower()):
        return None
    return rest[0].upper() + rest[1:]


def gcide_definitions(words: list[str], gcide_dir: str | Path | None = None) -> dict[str, str]:
    """{word: its first GCIDE noun sense} for the ``words`` that have a usable one (:func:`gcide_noun_definition`),
    looking each word up as written and capitalised (Webster capitalises headwords). Where several noun entries
    qualify (homographs), the one with the longest entry text (the most senses: the word's main entry) wins."""
    gcide_dir = Path(gcide_dir or GCIDE_DIR)
    entries = read_dictd(gcide_dir / "gcide.index", gcide_dir / "gcide.dict.dz")
    out = {}
    for word in words:
        found = [(len(text), d) for text in entries.get(word.capitalize(), []) + entries.get(word, [])
                 if (d := gcide_noun_definition(text, word))]
        if found:  # homographs (Letter "one who lets" beside letter "a character"): the longest entry is the main one
            out[word] = max(found, key=lambda t: t[0])[1]
    return out


# ---------------------------------------------------------------------------------------------------- Twemoji
def twemoji_dir() -> Path:
    """The installed ``emoji-datasource-twitter`` folder: ``$CONAN_TWEMOJI_DIR`` if set, else
    ``${CONAN_DATA_HOME:-~/.cache/conan-embedding}/npm/node_modules/emoji-datasource-twitter`` (where
    ``install_sources.sh`` puts it). Raises SourceMissing when it holds no ``emoji.json``."""
    if os.environ.get(TWEMOJI_ENV):
        root = Path(os.environ[TWEMOJI_ENV]).expanduser()
    else:
        home = Path(os.environ.get(DATA_HOME_ENV) or Path.home() / ".cache" / "conan-embedding").expanduser()
        root = home / "npm" / "node_modules" / TWEMOJI_PACKAGE
    if not (root / "emoji.json").exists():
        raise SourceMissing(f"Twemoji artwork not found at {root} (no emoji.json; set ${TWEMOJI_ENV} to the package "
                            f"folder): {INSTALL['twemoji']}")
    return root


def twemoji_images(emoji: list[tuple[str, str]], root: str | Path) -> list[tuple[str, str, Path]]:
    """(emoji, name, 64 px PNG) for each of ``emoji`` ((character, name) pairs) that the package draws, in order.

    Matched on the code points without the variation selector U+FE0F, against both ``unified`` and
    ``non_qualified`` of emoji.json.
    """
    root = Path(root)
    table = json.loads((root / "emoji.json").read_text(encoding="utf-8"))
    by_code: dict[str, Path] = {}
    for row in table:
        if not row.get("has_img_twitter") or not row.get("image"):
            continue
        for code in (row.get("unified"), row.get("non_qualified")):
            if code:
                by_code.setdefault("-".join(c for c in code.lower().split("-") if c != "fe0f"),
                                   root / "img" / "twitter" / "64" / row["image"])
    out = []
    for ch, name in emoji:
        path = by_code.get(emoji_images.file_stem(ch))
        if path is not None and path.exists():
            out.append((ch, name, path))
    return out


def on_white(path: Path, size: int = emoji_images.IMAGE_SIZE) -> Any:
    """The RGBA artwork composited on white and resized to ``size`` px: the training emoji's framing (Noto glyphs
    are drawn on white at 72 px), so only the artwork style differs."""
    from PIL import Image

    with Image.open(path) as img:
        rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, "white")
    return Image.alpha_composite(canvas, rgba).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


# ------------------------------------------------------------------------------------------------------ flite
def flite_synthesize(text: str, voice: str, out: Path) -> None:
    """Speak ``text`` with flite's ``voice`` into a WAV at ``out`` (16 kHz mono). Raises SourceMissing without flite,
    RuntimeError when flite fails or writes nothing."""
    exe = shutil.which("flite")
    if exe is None:
        raise SourceMissing(f"flite not found on PATH: {INSTALL['flite']}")
    res = subprocess.run([exe, "-voice", voice, "-t", text, "-o", str(out)], capture_output=True)
    if res.returncode != 0 or not out.exists() or out.stat().st_size <= 44:
        raise RuntimeError(f"flite failed for voice {voice!r} on {text!r}: {res.stderr.decode(errors='replace')}")


# ------------------------------------------------------------------------------------------------ the builder
def test_nouns(wordnet_dir: str | Path | None = None, pool: int = WORD_POOL) -> tuple[str, ...]:
    """The ``pool`` most frequent usable WordNet nouns of the **test** split (first senses, wordnet.load_synsets).

    Cached per folder: the GCIDE and flite tasks both draw from it, and reading WordNet takes about a second."""
    return _test_nouns(Path(wordnet_dir or wordnet.WORDNET_DIR), pool)


@functools.lru_cache(maxsize=4)
def _test_nouns(wordnet_dir: Path, pool: int) -> tuple[str, ...]:
    return tuple(s.lemma for s in wordnet.load_synsets(wordnet_dir) if split_of(s.key) == "test")[:pool]


def _rng(seed: int, task: str) -> np.random.Generator:
    return np.random.default_rng([seed, stable_int("heldout", task)])


def _sample(items: list | tuple, cap: int, rng: np.random.Generator) -> list:
    """Up to `cap` of `items`, drawn by `rng`, in the drawn (random) order, not the source's: the scorer cuts a task
    into candidate pools in file order (`stage_eval.candidate_pools`), and a file in source order (GCIDE words
    alphabetically, emoji by code point, manual pages by number) would pool neighbours, a harder task than a random
    draw of the same size (measured on the v11 final model: GCIDE 42 vs 51 hits of 160)."""
    return [items[i] for i in rng.permutation(len(items))[:cap]]


def _gcide(ctx: BuildContext, cap: int) -> dict[str, list[dict]]:
    definitions = gcide_definitions(test_nouns())
    spec = TASKS[0]
    chosen = _sample(sorted(definitions), cap, _rng(ctx.seed, spec.name))
    return {spec.name: [make_pair({"text": definitions[w]}, {"text": w}, [], "gcide", spec.instruction,
                                  key=f"gcide:{w}", label=w) for w in chosen]}


def _twemoji(ctx: BuildContext, cap: int) -> dict[str, list[dict]]:
    root = twemoji_dir()
    drawn = twemoji_images(emoji_names(split="test"), root)
    to_image, to_name = TASKS[1], TASKS[2]
    chosen = _sample(drawn, cap, _rng(ctx.seed, "twemoji"))
    rows: dict[str, list[dict]] = {to_image.name: [], to_name.name: []}
    for ch, name, path in chosen:
        rel = ctx.media.image(on_white(path), f"twemoji/{emoji_images.file_stem(ch)}.png")
        key = emoji_images.key_of(name)
        rows[to_image.name].append(make_pair({"text": name}, {"image": rel}, [], "twemoji", to_image.instruction,
                                             key=key, label=name, emoji=ch))
        rows[to_name.name].append(make_pair({"image": rel}, {"text": name}, [], "twemoji", to_name.instruction,
                                            key=key, label=name, emoji=ch))
    return rows


def _flite(ctx: BuildContext, cap: int) -> dict[str, list[dict]]:
    if shutil.which("flite") is None:
        raise SourceMissing(f"flite not found on PATH: {INSTALL['flite']}")
    spec = TASKS[3]
    rng = _rng(ctx.seed, spec.name)
    chosen = _sample(test_nouns(), cap, rng)
    voices = [FLITE_VOICES[i] for i in rng.integers(0, len(FLITE_VOICES), len(chosen))]
    rows = []
    for word, voice in zip(chosen, voices):
        rel = ctx.media.write(f"flite/{word}-{voice}.wav", lambda tmp, w=word, v=voice: flite_synthesize(w, v, tmp))
        rows.append(make_pair({"audio": rel}, {"text": word}, [], "flite", spec.instruction, key=f"flite:{word}",
                              label=word, voice=voice, synthetic=True))
    return {spec.name: rows}


def _gnuplot(ctx: BuildContext, cap: int) -> dict[str, list[dict]]:
    try:
        import pypdfium2
    except ImportError as e:
        raise SourceMissing(f"pypdfium2 is not installed: {INSTALL['gnuplot']}") from e
    if not GNUPLOT_PDF.exists():
        raise SourceMissing(f"{GNUPLOT_PDF} is missing: {INSTALL['gnuplot']}")
    spec = TASKS[4]
    doc = pypdfium2.PdfDocument(str(GNUPLOT_PDF))
    n_pages = len(doc)
    doc.close()
    rng = _rng(ctx.seed, spec.name)
    # scan 10 pages a query (all ~330 at cap 80; a query's text is unique among the scanned pages, its candidates)
    chosen = _sample(pdf_pages.scan_manual(GNUPLOT_PDF, min(n_pages, 10 * cap)), cap, rng)
    images = pdf_pages.render_pages(GNUPLOT_PDF, [p.index for p in chosen])
    rows = []
    for page in chosen:
        rel = ctx.media.image(images[page.index], f"gnuplot/p{page.index:04d}.png")
        query = page.queries[int(rng.integers(len(page.queries)))]
        rows.append(make_pair({"text": query}, {"document": rel}, [], "gnuplot", spec.instruction, key=page.key,
                              page=page.index))
    return {spec.name: rows}


BUILDERS: dict[str, Callable[[BuildContext, int], dict[str, list[dict]]]] = {
    "gcide": _gcide, "twemoji": _twemoji, "flite": _flite, "gnuplot": _gnuplot}


def build_heldout_tasks(out_dir: str | Path, cap: int = 80, seed: int = 0,
                        sources: list[str] | None = None) -> dict[str, Any]:
    """Write the held-out tasks of ``sources`` (default all of :data:`SOURCES`) under ``out_dir``; return the manifest.

    Each task gets ``out_dir/<task>/test.jsonl``: up to ``cap`` rows ``{"query", "positive", "negatives": [],
    "source", "instruction", "meta"}`` (a query's candidates are all positives of its task; media under
    ``out_dir/media/<source>/``). A source that is not installed is skipped and listed with the reason and the
    install command. The manifest (also written to ``out_dir/tasks.json``) is ``{"cap", "seed", "tasks": {task:
    {"source", "kind", "instruction", "n_queries", "licence", "obtained", "held_out"}}, "skipped": {source:
    reason}}``. Raises ValueError for ``cap < 2`` (one candidate is no retrieval task) or an unknown source.
    """
    if cap < 2:
        raise ValueError(f"build_heldout_tasks: cap must be >= 2 (queries per task), got {cap}")
    unknown = sorted(set(sources or ()) - set(SOURCES))
    if unknown:
        raise ValueError(f"build_heldout_tasks: unknown sources {unknown}; expected some of {sorted(SOURCES)}")
    out_dir = Path(out_dir)
    manifest: dict[str, Any] = {"cap": cap, "seed": seed, "tasks": {}, "skipped": {}}
    specs = {t.name: t for t in TASKS}
    for source in sources or list(SOURCES):
        try:
            built = BUILDERS[source](BuildContext(root=out_dir, seed=seed), cap)
        except SourceMissing as err:
            manifest["skipped"][source] = str(err)
            continue
        for task, rows in built.items():
            if len(rows) < 2:
                manifest["skipped"][task] = f"only {len(rows)} usable item(s) in {source}"
                continue
            folder = out_dir / task
            folder.mkdir(parents=True, exist_ok=True)
            for row in rows:  # media were written under out_dir/media/<source>/: relative to the task's file
                for item in (row["query"], row["positive"]):
                    for k in ("image", "audio", "document"):
                        if k in item:
                            item[k] = f"../{item[k]}"
            (folder / "test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                               encoding="utf-8")
            info = SOURCES[source]
            manifest["tasks"][task] = {"source": source, "kind": specs[task].kind,
                                       "instruction": specs[task].instruction, "n_queries": len(rows),
                                       "licence": info.licence, "obtained": info.obtained, "held_out": info.split_rule}
    write_json_atomic(out_dir / "tasks.json", manifest)
    return manifest


def ensure_tasks(tasks_dir: str | Path, cap: int = 80, seed: int = 0) -> dict[str, Any]:
    """The manifest of the held-out tasks in ``tasks_dir``, building them first unless its tasks.json has the same
    ``cap`` and ``seed`` and skipped no source (a build is deterministic, so reusing one is exact; a source installed
    since the last build gets its tasks)."""
    manifest = Path(tasks_dir) / "tasks.json"
    if manifest.exists():
        found = json.loads(manifest.read_text())
        if found.get("cap") == cap and found.get("seed") == seed and not found.get("skipped"):
            return found
    return build_heldout_tasks(tasks_dir, cap=cap, seed=seed)
