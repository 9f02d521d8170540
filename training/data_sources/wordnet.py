"""WordNet 3.0 (Debian ``wordnet-base``): definition -> the word it defines (the text anchor for rehearsal).

Reads the Princeton database files directly (``/usr/share/wordnet/index.noun`` + ``data.noun``): no NLTK, no
download. Only the first sense of common single-word nouns (SemCor-tagged) is used, ranked by SemCor frequency
(``cntlist.rev``), so the pairs are about words a small model can know. Split: ``split_of("wordnet:n<offset>")``;
the espeak builder uses the same key, so a gloss is in the same split for text and for synthetic speech.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from training.common.splits import split_of

from .common import BuildContext, SourceInfo, SourceMissing, make_pair, pick_negatives, take_with_pool
from .install import INSTALL

WORDNET_DIR = Path("/usr/share/wordnet")
INFO = SourceInfo(
    name="wordnet-definitions",
    modality="text",
    licence="WordNet 3.0 licence (Princeton; permissive, keep the copyright notice)",
    obtained="Debian wordnet-base: /usr/share/wordnet/index.noun + data.noun",
    split_rule='training.common.splits.split_of("wordnet:n<synset offset>")',
    install=INSTALL["wordnet"],
)
INSTRUCTION = "Given a definition, retrieve the word it defines."


@dataclass(frozen=True)
class Synset:
    key: str       # "wordnet:n02084071"
    lemma: str     # "dog"
    gloss: str     # definition without the examples
    lexname: int   # lexicographer file number (e.g. 5 = noun.animal): hard negatives share it
    tag_count: int  # SemCor frequency of this sense of the lemma (cntlist.rev)


_WORD = re.compile(r"[a-z]+")


def load_synsets(wordnet_dir: Path | None = None) -> list[Synset]:
    """First senses of tagged single-word nouns with a 3-30 word definition, most frequent first (ties by lemma)."""
    wordnet_dir = Path(wordnet_dir or WORDNET_DIR)
    index, data = wordnet_dir / "index.noun", wordnet_dir / "data.noun"
    if not index.exists() or not data.exists():
        raise SourceMissing(f"WordNet not found at {wordnet_dir}: {INSTALL['wordnet']}")
    first_sense: dict[str, tuple[str, int]] = {}
    for line in index.read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        f = line.split()
        lemma, p_cnt = f[0], int(f[3])
        tagsense_cnt = int(f[5 + p_cnt])
        offsets = f[6 + p_cnt:]
        if tagsense_cnt >= 1 and _WORD.fullmatch(lemma) and len(lemma) > 2 and offsets:
            first_sense.setdefault(offsets[0], (lemma, tagsense_cnt))
    freq: dict[str, int] = {}
    cnt_path = wordnet_dir / "cntlist.rev"
    if cnt_path.exists():
        for line in cnt_path.read_text(encoding="latin-1").splitlines():
            f = line.split()
            if len(f) == 3 and "%1:" in f[0]:
                freq[f[0]] = int(f[2])
    out = []
    with data.open(encoding="latin-1") as fh:
        for line in fh:
            if line.startswith(" ") or line[:8] not in first_sense:
                continue
            head, _, gloss = line.partition(" | ")
            definition = gloss.split('; "')[0].strip().rstrip(";").strip()
            if not 3 <= len(definition.split()) <= 30:
                continue
            lemma, _ = first_sense[line[:8]]
            f = head.split()
            lex, n_words = int(f[1]), int(f[3], 16)
            words = {f[4 + 2 * k].lower(): int(f[5 + 2 * k], 16) for k in range(n_words)}
            cnt = freq.get(f"{lemma}%1:{lex:02d}:{words.get(lemma, 0):02d}::", 0)
            out.append(Synset(f"wordnet:n{line[:8]}", lemma, definition, lex, cnt))
    if not out:
        raise SourceMissing(f"no usable noun synsets parsed from {data}")
    out.sort(key=lambda s: (-s.tag_count, s.lemma))
    return out


def synsets(ctx: BuildContext, split: str) -> list[Synset]:
    """The usable synsets of ``split`` (shared with the espeak builder)."""
    return [s for s in ctx.cached("wordnet:synsets", load_synsets) if split_of(s.key) == split]


def check(ctx: BuildContext) -> None:
    """Raise SourceMissing unless WordNet is installed."""
    ctx.cached("wordnet:synsets", load_synsets)


def build(split: str, cap: int, ctx: BuildContext) -> list[dict]:
    """Up to ``cap`` definition->word pairs, drawn from the 3,000 most frequent senses of the split when possible;
    negatives are other words of the same split, same lexicographer file first (e.g. other animals)."""
    rng = ctx.rng(INFO.name, split)
    pool = synsets(ctx, split)
    chosen, negpool = take_with_pool(pool[: max(cap, min(len(pool), 3000))], cap, ctx.n_negatives, rng)
    pairs = []
    for i, s in enumerate(chosen):
        neg = pick_negatives(len(negpool), i, ctx.n_negatives, rng, prefer=lambda j: negpool[j].lexname == s.lexname)
        pairs.append(make_pair({"text": s.gloss}, {"text": s.lemma}, [{"text": negpool[j].lemma} for j in neg],
                               INFO.name, INSTRUCTION, key=s.key, negative_keys=[negpool[j].key for j in neg],
                               label=s.lemma, lexname=s.lexname))
    return pairs


# ------------------------------------------------------------------------------------- distillation text corpus
POS_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}
_MARKER = re.compile(r"\([a-z]+\)$")  # adjective syntactic markers: "galore(ip)"


@dataclass(frozen=True)
class GlossedSynset:
    """One synset of any part of speech, as the distillation corpus reads it."""

    key: str                    # "wordnet:n02084071" / "wordnet:v00001740" (nouns: the key `build` splits on)
    lemmas: tuple[str, ...]     # "take a breath" (underscores as spaces, adjective markers dropped)
    gloss: str                  # the definition without the examples
    examples: tuple[str, ...]   # the quoted example sentences of the gloss


def read_glossed_synsets(pos: str, wordnet_dir: Path | None = None) -> list[GlossedSynset]:
    """Every synset of `pos` ("n", "v", "a", "r") in `data.<pos>`, in file order. Raises SourceMissing if absent."""
    if pos not in POS_FILES:
        raise ValueError(f"read_glossed_synsets: pos={pos!r}; expected one of {sorted(POS_FILES)}")
    path = Path(wordnet_dir or WORDNET_DIR) / POS_FILES[pos]
    if not path.exists():
        raise SourceMissing(f"WordNet not found at {path.parent}: {INSTALL['wordnet']}")
    out = []
    with path.open(encoding="latin-1") as fh:
        for line in fh:
            if line.startswith(" "):
                continue
            head, _, gloss = line.partition(" | ")
            f = head.split()
            lemmas = tuple(dict.fromkeys(_MARKER.sub("", f[4 + 2 * k]).replace("_", " ")
                                         for k in range(int(f[3], 16))))
            parts = [p.strip().strip(";").strip() for p in gloss.strip().split('; "')]
            examples = tuple(p.strip('"').strip() for p in parts[1:] if p.strip('"').strip())
            out.append(GlossedSynset(f"wordnet:{pos}{line[:8]}", lemmas, parts[0], examples))
    return out


def distillation_synsets(wordnet_dir: Path | None = None) -> list[GlossedSynset]:
    """The WordNet synsets a text distillation may train on without touching the held-out noun pairs.

    Verbs, adjectives and adverbs: all (the definition->word pairs of `build` are nouns only). Nouns: only those whose
    key is in the *train* split (`split_of("wordnet:n<offset>")`, the key `build` uses) and none of whose lemmas is a
    word that a dev/test pair of `build` asks for (so another sense of a test word does not teach it either). Any
    synset whose definition is word for word a dev/test definition (WordNet repeats some) is left out too.
    """
    held_out = [s for s in load_synsets(wordnet_dir) if split_of(s.key) != "train"]
    held_words, held_glosses = {s.lemma for s in held_out}, {s.gloss for s in held_out}
    out = []
    for pos in POS_FILES:
        for s in read_glossed_synsets(pos, wordnet_dir):
            if s.gloss in held_glosses or pos == "n" and (
                    split_of(s.key) != "train" or held_words.intersection(w.lower() for w in s.lemmas)):
                continue
            out.append(s)
    return out


def dev_definition_pairs(wordnet_dir: Path | None = None, limit: int = 300) -> list[tuple[str, str]]:
    """(definition, word) of the `limit` most frequent usable *dev*-split nouns: a held-out check during distillation
    that is disjoint from both the distillation corpus and the test pairs."""
    return [(s.gloss, s.lemma) for s in load_synsets(wordnet_dir) if split_of(s.key) == "dev"][:limit]
