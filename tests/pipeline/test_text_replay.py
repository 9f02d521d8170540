"""`text_replay_mix`: the text-pair steps mixed into a non-text specialist (training/pipeline/runner.py)."""

from __future__ import annotations

import json

import pytest

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
    files, weights, steps = text_replay_mix(own, text, 0.25, 300)
    assert files == [own, text] and steps == 400
    # the modality's sources weigh 1 each, as without replay (so their split is unchanged)
    assert weights["cifar10-photos"] == weights["noto-emoji-cldr-names"] == 1.0
    sampler = SourceMixtureSampler({"cifar10-photos": range(40), "noto-emoji-cldr-names": range(10),
                                    "wordnet-definitions": range(30)}, weights, batch_size=4)
    mixture = sampler.mixture
    assert mixture["wordnet-definitions"] == pytest.approx(0.25)
    assert mixture["cifar10-photos"] == pytest.approx(mixture["noto-emoji-cldr-names"])
    assert steps * (1 - mixture["wordnet-definitions"]) == pytest.approx(300)  # own-modality steps kept


def test_several_text_sources_share_the_text_weight(tmp_path):
    own = _pairs(tmp_path / "audio.jsonl", {"a": 5, "b": 5, "c": 5})
    text = _pairs(tmp_path / "text.jsonl", {"t1": 5, "t2": 5})
    _, weights, steps = text_replay_mix(own, text, 0.5, 150)
    assert steps == 300 and weights["t1"] == weights["t2"] == pytest.approx(1.5)
    assert (weights["t1"] + weights["t2"]) / sum(weights.values()) == pytest.approx(0.5)


def test_no_replay_without_a_share_or_text_pairs(tmp_path):
    own = _pairs(tmp_path / "video.jsonl", {"v": 5})
    text = _pairs(tmp_path / "text.jsonl", {"t": 5})
    assert text_replay_mix(own, text, 0.0, 150) == ([own], {}, 150)
    assert text_replay_mix(own, tmp_path / "absent.jsonl", 0.25, 150) == ([own], {}, 150)
    (tmp_path / "empty.jsonl").write_text("")
    assert text_replay_mix(own, tmp_path / "empty.jsonl", 0.25, 150) == ([own], {}, 150)


@pytest.mark.parametrize("share", [-0.1, 1.0, 1.5])
def test_a_share_outside_zero_to_one_is_refused(tmp_path, share):
    own = _pairs(tmp_path / "video.jsonl", {"v": 5})
    with pytest.raises(ValueError, match=r"share must be in \[0, 1\)"):
        text_replay_mix(own, own, share, 150)
