"""`text_replay_mix`: the text-pair steps mixed into a non-text specialist (training/pipeline/runner.py)."""

from __future__ import annotations

import json

import pytest

from training.contrastive.data import load_sources
from training.contrastive.sampling import SourceMixtureSampler
from training.pipeline.runner import text_replay_mix


def _pairs(path, sources: dict[str, int]):
    rows = [{"query": {"text": f"{s} q{i}"}, "positive": {"text": f"{s} p{i}"}, "source": s}
            for s, n in sources.items() for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_steps_take_the_share_and_the_modality_keeps_its_steps(tmp_path):
    own = _pairs(tmp_path / "image.jsonl", {"cifar10-photos": 40, "noto-emoji-cldr-names": 10})
    text = _pairs(tmp_path / "text.jsonl", {"wordnet-definitions": 30})
    files, weights, steps, batch_sizes = text_replay_mix(own, text, 0.25, 300, batch_size=4)
    assert files == [own, text] and steps == 400 and batch_sizes == {}
    # the modality's sources weigh 1 each, as without replay (so their split is unchanged)
    assert weights["cifar10-photos"] == weights["noto-emoji-cldr-names"] == 1.0
    mixture = _sampler(files, weights, 4).mixture
    assert mixture["wordnet-definitions"] == pytest.approx(0.25)
    assert mixture["cifar10-photos"] == pytest.approx(mixture["noto-emoji-cldr-names"])
    assert steps * (1 - mixture["wordnet-definitions"]) == pytest.approx(300)  # own-modality steps kept


def test_several_text_sources_share_the_text_weight(tmp_path):
    own = _pairs(tmp_path / "audio.jsonl", {"a": 5, "b": 5, "c": 5})
    text = _pairs(tmp_path / "text.jsonl", {"t1": 5, "t2": 5})
    _, weights, steps, _ = text_replay_mix(own, text, 0.5, 150, batch_size=4)
    assert steps == 300 and weights["t1"] == weights["t2"] == pytest.approx(1.5)
    assert (weights["t1"] + weights["t2"]) / sum(weights.values()) == pytest.approx(0.5)


def test_no_replay_without_a_share_or_text_pairs(tmp_path):
    own = _pairs(tmp_path / "video.jsonl", {"v": 5})
    text = _pairs(tmp_path / "text.jsonl", {"t": 5})
    assert text_replay_mix(own, text, 0.0, 150, batch_size=4) == ([own], {}, 150, {})
    assert text_replay_mix(own, tmp_path / "absent.jsonl", 0.25, 150, batch_size=4) == ([own], {}, 150, {})
    (tmp_path / "empty.jsonl").write_text("")
    assert text_replay_mix(own, tmp_path / "empty.jsonl", 0.25, 150, batch_size=4) == ([own], {}, 150, {})


@pytest.mark.parametrize("share", [-0.1, 1.0, 1.5])
def test_a_share_outside_zero_to_one_is_refused(tmp_path, share):
    own = _pairs(tmp_path / "video.jsonl", {"v": 5})
    with pytest.raises(ValueError, match=r"share must be in \[0, 1\)"):
        text_replay_mix(own, own, share, 150, batch_size=4)


def _sampler(files, weights, batch_size):
    """The sampler `decouple.train` builds from the same files (the pipeline loads with on_error="skip")."""
    dataset = load_sources(files, on_error="skip", check_media=False)
    return SourceMixtureSampler(dataset.by_source(), weights, batch_size=batch_size)


def test_rows_the_loader_skips_are_not_counted(tmp_path):
    """Rows without a usable `source` and lines that are not JSON are dropped by the loader (`parse_row`), so the
    mix must neither fail on them nor weigh a source that only they name."""
    own = _pairs(tmp_path / "image.jsonl", {"cifar10-photos": 8})
    text = _pairs(tmp_path / "text.jsonl", {"wordnet-definitions": 8})
    with text.open("a") as handle:
        handle.write('{"query": {"text": "q"}, "positive": {"text": "p"}}\n')                 # no source
        handle.write('{"query": {"text": "q"}, "positive": {"text": "p"}, "source": ""}\n')   # empty source
        handle.write('{"query": {"text": "q"}, "positive": {"text": "p"}, "source": null}\n')
        handle.write('{"query": {"text": "q"}, "source": "only-bad-rows"}\n')                # no positive
        handle.write("not json\n")
    with own.open("a") as handle:
        handle.write('{"query": {"text": "q"}, "positive": {"text": "p"}, "source": 3}\n')
    files, weights, _, _ = text_replay_mix(own, text, 0.25, 30, batch_size=4)
    assert set(weights) == {"cifar10-photos", "wordnet-definitions"}
    assert _sampler(files, weights, 4).mixture["wordnet-definitions"] == pytest.approx(0.25)


def test_a_text_source_smaller_than_a_batch_is_refused_naming_it(tmp_path):
    own = _pairs(tmp_path / "image.jsonl", {"cifar10-photos": 40})
    text = _pairs(tmp_path / "text.jsonl", {"wordnet-definitions": 40, "tiny": 3})
    with pytest.raises(ValueError, match=r"text\.jsonl.*'tiny' has 3 .*batch size 16"):
        text_replay_mix(own, text, 0.25, 30, batch_size=16)
    with pytest.raises(ValueError, match=r"'tiny' has 3 .*batch size 4"):   # the text step's own batch counts
        text_replay_mix(own, text, 0.25, 30, batch_size=2, text_batch_size=4)
    files, weights, _, _ = text_replay_mix(own, text, 0.25, 30, batch_size=3)
    assert _sampler(files, weights, 3).mixture["tiny"] > 0


def test_text_steps_draw_their_own_batch_size(tmp_path):
    """`text_batch_size`: every text step of the sampler built from the mix holds that many text pairs, the
    modality's steps keep theirs, and the text share of steps is unchanged."""
    own = _pairs(tmp_path / "audio.jsonl", {"fsdd": 20, "instruments": 20})
    text = _pairs(tmp_path / "text.jsonl", {"wordnet-definitions": 50})
    files, weights, steps, batch_sizes = text_replay_mix(own, text, 0.25, 60, batch_size=4, text_batch_size=16)
    assert batch_sizes == {"wordnet-definitions": 16}
    dataset = load_sources(files, on_error="skip", check_media=False)
    sampler = SourceMixtureSampler(dataset.by_source(), weights, batch_size=4, source_batch_sizes=batch_sizes,
                                   max_steps=steps)
    source_of = {i: row for row, indices in dataset.by_source().items() for i in indices}
    batches = [[source_of[i] for i in batch] for batch in sampler]
    assert len(batches) == steps == 80
    text_steps = [b for b in batches if b[0] == "wordnet-definitions"]
    assert text_steps and all(len(b) == 16 and set(b) == {"wordnet-definitions"} for b in text_steps)
    assert all(len(b) == 4 and len(set(b)) == 1 for b in batches if b[0] != "wordnet-definitions")
    assert 0.1 < len(text_steps) / steps < 0.4
    assert text_replay_mix(own, text, 0.25, 60, batch_size=4, text_batch_size=4).batch_sizes == {}
    for bad, share in ((0, 0.25), (0, 0.0), (16.0, 0.25), (True, 0.25)):   # refused with or without replay
        with pytest.raises(ValueError, match=f"text_batch_size must be a positive integer or None, got {bad!r}"):
            text_replay_mix(own, text, share, 60, batch_size=4, text_batch_size=bad)


def test_a_source_in_both_files_is_refused(tmp_path):
    """Rows of one source name are pooled by the loader, so the text share could not be kept apart."""
    own = _pairs(tmp_path / "image.jsonl", {"cifar10-photos": 8, "wordnet-definitions": 8})
    text = _pairs(tmp_path / "text.jsonl", {"wordnet-definitions": 8})
    with pytest.raises(ValueError, match=r"image\.jsonl.*text\.jsonl.*'wordnet-definitions'"):
        text_replay_mix(own, text, 0.25, 30, batch_size=4)
