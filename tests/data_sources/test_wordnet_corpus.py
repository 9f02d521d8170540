"""WordNet's text-distillation corpus: every part of speech, train-split nouns only, nothing of the held-out pairs."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.common.splits import split_of
from training.data_sources import wordnet


def _real_wordnet() -> Path:
    if not (wordnet.WORDNET_DIR / "data.noun").exists():
        pytest.skip(f"{wordnet.WORDNET_DIR} is absent (Debian wordnet-base: {wordnet.INSTALL['wordnet']})")
    return wordnet.WORDNET_DIR


def test_reader_parses_lemmas_markers_and_examples(tmp_path):
    (tmp_path / "data.adj").write_text(
        "  1 licence header line\n"
        "00001740 00 a 02 able 0 well_able(p) 0 000 | having the means to do something; \"able to swim\"; "
        "\"she was able to program\"  \n")
    (s,) = wordnet.read_glossed_synsets("a", tmp_path)
    assert s.key == "wordnet:a00001740"
    assert s.lemmas == ("able", "well able")
    assert s.gloss == "having the means to do something"
    assert s.examples == ("able to swim", "she was able to program")
    with pytest.raises(ValueError, match="pos='x'"):
        wordnet.read_glossed_synsets("x", tmp_path)
    with pytest.raises(wordnet.SourceMissing):
        wordnet.read_glossed_synsets("n", tmp_path)


def test_corpus_holds_no_dev_or_test_noun_and_no_held_out_word():
    wordnet_dir = _real_wordnet()
    corpus = wordnet.distillation_synsets(wordnet_dir)
    by_pos = {p: [s for s in corpus if s.key[len("wordnet:")] == p] for p in "nvar"}
    assert all(len(v) > 1000 for v in by_pos.values()), {p: len(v) for p, v in by_pos.items()}
    assert all(split_of(s.key) == "train" for s in by_pos["n"])
    held_out = [s for s in wordnet.load_synsets(wordnet_dir) if split_of(s.key) != "train"]
    held_keys = {s.key for s in held_out}
    held_words = {s.lemma for s in held_out}
    assert not held_keys & {s.key for s in corpus}
    assert not held_words & {w.lower() for s in by_pos["n"] for w in s.lemmas}
    assert not {s.gloss for s in held_out} & {s.gloss for s in corpus}  # WordNet repeats some definitions
    # Verbs / adjectives / adverbs are kept whole: their keys are not noun keys, so they never collide.
    assert all(not s.key.startswith("wordnet:n") for p in "var" for s in by_pos[p])


def test_dev_pairs_are_dev_nouns():
    wordnet_dir = _real_wordnet()
    pairs = wordnet.dev_definition_pairs(wordnet_dir, limit=50)
    assert len(pairs) == 50
    dev = {(s.gloss, s.lemma) for s in wordnet.load_synsets(wordnet_dir) if split_of(s.key) == "dev"}
    assert set(pairs) <= dev
