"""OmniRetriever-Bench's six directions and AVG-all on a hand-made 3-tuple case."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluation.omni_bench import COLUMNS, markdown_table, omni_bench_scores, tuple_items


def test_avg_all_on_three_hand_made_tuples():
    e = np.eye(3)
    scores = omni_bench_scores({
        "T": e[[0, 1, 2]],
        "V": e[[0, 1, 2]],   # T->V all right
        "A": e[[1, 0, 2]],   # tuples 0 and 1 swapped: only tuple 2 found from T, V and back
        "VA": e[[0, 2, 1]],  # tuples 1 and 2 swapped: only tuple 0 found either way
    })
    third = 1 / 3
    assert scores == pytest.approx({"T->V": 1.0, "T->A": third, "V->A": third, "A->V": third, "T->VA": third,
                                    "VA->T": third, "AVG-all": (1 + 5 * third) / 6})
    assert scores["AVG-all"] == pytest.approx(4 / 9)


def test_ties_count_against_the_query_and_bad_input_is_named():
    same = np.ones((3, 2)) / np.sqrt(2)
    assert omni_bench_scores({s: same for s in ("T", "V", "A", "VA")})["AVG-all"] == 0.0
    with pytest.raises(ValueError, match="lack sides"):
        omni_bench_scores({"T": same})
    with pytest.raises(ValueError, match="same"):
        omni_bench_scores({"T": same, "V": same, "A": same, "VA": same[:2]})


def test_sides_come_from_the_anchor_tuple_and_table_has_every_column():
    rows = [{"query": {"text": "t", "video": "v.mp4", "audio": "a.wav"}, "positive": {}}]
    items = tuple_items(rows)
    assert items == {"T": [{"text": "t"}], "V": [{"video": "v.mp4"}], "A": [{"audio": "a.wav"}],
                     "VA": [{"video": "v.mp4", "audio": "a.wav"}]}
    table = markdown_table({"m": dict.fromkeys(COLUMNS, 0.5)})
    assert table.splitlines()[0].count("|") == len(COLUMNS) + 2 and "50.0" in table
