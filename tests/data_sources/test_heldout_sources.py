"""The held-out sources (training/data_sources/heldout.py): dictd/GCIDE parsing and the Twemoji folder on tiny
synthetic fixtures, the builder's skips, and the real installed sources (skipped with the install command where
absent)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.common.splits import split_of
from training.data_sources import heldout as H
from training.data_sources.common import SourceMissing
from training.data_sources.install import INSTALL


def _b64(n: int) -> str:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = digits[n % 64] + out
        n //= 64
        if not n:
            return out


def write_dictd(folder: Path, entries: list[tuple[str, str]], zipped: bool = True) -> Path:
    """A dictd database (gcide.index + gcide.dict[.dz]) holding `entries` (headword, text) in order."""
    folder.mkdir(parents=True, exist_ok=True)
    data, index = b"", []
    for word, text in entries:
        raw = text.encode("utf-8")
        index.append(f"{word}\t{_b64(len(data))}\t{_b64(len(raw))}")
        data += raw
    (folder / "gcide.index").write_text("\n".join(index) + "\n", encoding="utf-8")
    if zipped:
        with gzip.open(folder / "gcide.dict.dz", "wb") as fh:
            fh.write(data)
    else:
        (folder / "gcide.dict").write_bytes(data)
    return folder


DOG = """Dog \\Dog\\ (d[add]g), n. [AS. docga; akin to D. dog
   mastiff.]
   1. (Zool.) A quadruped of the genus {Canis}, the faithful
      companion of man; as, a good dog.
      [1913 Webster]

   2. A mean, worthless fellow; a wretch.
      [1913 Webster]
"""
RIVER_HOMOGRAPH = """River \\Riv"er\\, n.
   One who rives or splits.
   [1913 Webster]
"""
RIVER = """River \\Riv"er\\, n. [F. riv[`e]re a river, LL. riparia river.
   Cf. {Arrive}.]
   1. A large stream of water flowing in a bed or channel and
      emptying into the ocean.
      [1913 Webster]

   2. Fig.: A large stream; copious flow; abundance.
      [1913 Webster]
"""
RUN_VERB = """Run \\Run\\, v. i. [imp. {Ran}.]
   1. To move with quickness; to go at a rapid pace.
      [1913 Webster]
"""
CAT_WORDNET = """Cat \\Cat\\, n.
   1. A feline mammal usually having thick soft fur.
      [WordNet 1.5]
"""
FARM_OBSOLETE = """Farm \\Farm\\, n. [OE. ferme rent.]
   1. The rent of land, -- originally paid by reservation of
      part of its products. [Obs.]
      [1913 Webster]
"""
SHIP_SELF = """Ship \\Ship\\, n.
   1. Any large seagoing vessel; a ship.
      [1913 Webster]
"""


def test_dictd_numbers_are_base64_most_significant_first():
    assert H.dictd_number("A") == 0 and H.dictd_number("B") == 1 and H.dictd_number("BA") == 64
    assert H.dictd_number(_b64(40_000_000)) == 40_000_000
    with pytest.raises(ValueError, match="not a dictd base64 number"):
        H.dictd_number("a-b")


@pytest.mark.parametrize("zipped", [True, False])
def test_read_dictd_returns_every_entry_of_a_headword(tmp_path, zipped):
    folder = write_dictd(tmp_path / "d", [("Dog", DOG), ("River", RIVER_HOMOGRAPH), ("River", RIVER)], zipped)
    entries = H.read_dictd(folder / "gcide.index", folder / ("gcide.dict.dz" if zipped else "gcide.dict"))
    assert entries["Dog"] == [DOG] and entries["River"] == [RIVER_HOMOGRAPH, RIVER]
    (folder / "gcide.index").write_text("broken line\n")
    with pytest.raises(ValueError, match="gcide.index:1: expected"):
        H.read_dictd(folder / "gcide.index", folder / ("gcide.dict.dz" if zipped else "gcide.dict"))
    with pytest.raises(SourceMissing, match="dict-gcide"):
        H.read_dictd(tmp_path / "none.index", tmp_path / "none.dict.dz")


def test_gcide_noun_definition_cleans_the_first_sense():
    assert H.gcide_noun_definition(RIVER, "river") == ("A large stream of water flowing in a bed or channel and "
                                                       "emptying into the ocean.")
    # domain label and braces removed, the "; as, <example>" usage (which names the word) cut
    assert H.gcide_noun_definition(DOG, "dog") == "A quadruped of the genus Canis, the faithful companion of man."
    assert H.gcide_noun_definition(DOG, "cat") is None            # another headword
    assert H.gcide_noun_definition(RUN_VERB, "run") is None       # a verb
    assert H.gcide_noun_definition(CAT_WORDNET, "cat") is None    # a sense GCIDE took from WordNet
    assert H.gcide_noun_definition(FARM_OBSOLETE, "farm") is None  # obsolete
    assert H.gcide_noun_definition(SHIP_SELF, "ship") is None      # names the word itself


def test_gcide_definitions_prefer_the_main_homograph(tmp_path):
    folder = write_dictd(tmp_path / "d", [("Dog", DOG), ("River", RIVER_HOMOGRAPH), ("River", RIVER),
                                          ("Run", RUN_VERB), ("Ship", SHIP_SELF)])
    found = H.gcide_definitions(["river", "dog", "run", "ship", "absent"], folder)
    assert sorted(found) == ["dog", "river"] and found["river"].startswith("A large stream of water")


def write_twemoji(root: Path) -> Path:
    """A fake emoji-datasource-twitter folder: emoji.json + four 64 px PNGs (one flagged as not drawn)."""
    (root / "img" / "twitter" / "64").mkdir(parents=True)
    rows = [{"unified": "2764-FE0F", "non_qualified": "2764", "image": "2764-fe0f.png", "has_img_twitter": True},
            {"unified": "1F600", "non_qualified": None, "image": "1f600.png", "has_img_twitter": True},
            {"unified": "1F431", "non_qualified": None, "image": "1f431.png", "has_img_twitter": False},
            {"unified": "1F680", "non_qualified": None, "image": "1f680.png", "has_img_twitter": True}]
    (root / "emoji.json").write_text(json.dumps(rows))
    for name, colour in (("2764-fe0f.png", (255, 0, 0, 255)), ("1f600.png", (255, 200, 0, 128)),
                         ("1f431.png", (0, 0, 0, 255)), ("1f680.png", (0, 0, 255, 255))):
        img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        img.paste(colour, (16, 16, 48, 48))
        img.save(root / "img" / "twitter" / "64" / name)
    return root


def test_twemoji_images_match_code_points_without_the_variation_selector(tmp_path):
    root = write_twemoji(tmp_path / "emoji-datasource-twitter")
    found = H.twemoji_images([("\u2764\ufe0f", "red heart"), ("\U0001F600", "grinning face"),
                              ("\U0001F431", "cat face"), ("\U0001F680", "rocket"), ("\U0001F98A", "fox")], root)
    assert [(ch, name, p.name) for ch, name, p in found] == [("\u2764\ufe0f", "red heart", "2764-fe0f.png"),
                                                              ("\U0001F600", "grinning face", "1f600.png"),
                                                              ("\U0001F680", "rocket", "1f680.png")]
    img = H.on_white(found[1][2])
    assert img.mode == "RGB" and img.size == (72, 72)
    assert img.getpixel((1, 1)) == (255, 255, 255)                  # transparent -> white, not black
    r, g, b = img.getpixel((36, 36))
    assert r == 255 and 220 <= g <= 232 and 120 <= b <= 135         # half-transparent yellow over white


def test_twemoji_dir_env_var_and_missing_folder(tmp_path, monkeypatch):
    root = write_twemoji(tmp_path / "pkg")
    monkeypatch.setenv(H.TWEMOJI_ENV, str(root))
    assert H.twemoji_dir() == root
    monkeypatch.delenv(H.TWEMOJI_ENV)
    monkeypatch.setenv(H.DATA_HOME_ENV, str(tmp_path / "home"))
    with pytest.raises(SourceMissing, match="npm install"):
        H.twemoji_dir()
    shutil.copytree(root, tmp_path / "home" / "npm" / "node_modules" / H.TWEMOJI_PACKAGE)
    assert H.twemoji_dir() == tmp_path / "home" / "npm" / "node_modules" / H.TWEMOJI_PACKAGE


def test_build_skips_missing_sources_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(H, "GCIDE_DIR", tmp_path / "no-dictd")
    monkeypatch.setattr(H, "GNUPLOT_PDF", tmp_path / "no-gnuplot.pdf")
    monkeypatch.setenv(H.TWEMOJI_ENV, str(tmp_path / "no-twemoji"))
    manifest = H.build_heldout_tasks(tmp_path / "tasks", cap=3, sources=["gcide", "twemoji", "gnuplot"])
    assert manifest["tasks"] == {} and set(manifest["skipped"]) == {"gcide", "twemoji", "gnuplot"}
    assert INSTALL["gcide"] in manifest["skipped"]["gcide"] and INSTALL["twemoji"] in manifest["skipped"]["twemoji"]
    assert "gnuplot-doc" in manifest["skipped"]["gnuplot"]
    assert json.loads((tmp_path / "tasks" / "tasks.json").read_text())["skipped"] == manifest["skipped"]
    with pytest.raises(ValueError, match="cap must be >= 2"):
        H.build_heldout_tasks(tmp_path / "t2", cap=1)
    with pytest.raises(ValueError, match="unknown sources"):
        H.build_heldout_tasks(tmp_path / "t2", sources=["mnist"])


def test_build_twemoji_tasks_from_a_fake_package(tmp_path, monkeypatch):
    """Names in the emoji test split only; name -> image and image -> name share the images; reruns are equal."""
    root = write_twemoji(tmp_path / "pkg")
    monkeypatch.setenv(H.TWEMOJI_ENV, str(root))
    # split_of("emoji:<name>"): "red heart symbol" and "grinning face" are test, "rocket" is train
    names = [("\u2764\ufe0f", "red heart symbol"), ("\U0001F600", "grinning face"), ("\U0001F680", "rocket")]
    monkeypatch.setattr(H, "emoji_names", lambda split=None: [x for x in names if split_of(f"emoji:{x[1]}") == split])
    manifest = H.build_heldout_tasks(tmp_path / "a", cap=5, sources=["twemoji"])
    assert manifest["skipped"] == {} and manifest["tasks"]["twemoji-image-to-name"]["n_queries"] == 2
    to_image, to_name = (_rows(tmp_path / "a", t) for t in ("twemoji-name-to-image", "twemoji-image-to-name"))
    assert sorted(r["query"]["text"] for r in to_image) == ["grinning face", "red heart symbol"]
    assert [r["positive"]["image"] for r in to_image] == [r["query"]["image"] for r in to_name]
    assert [r["instruction"] for r in to_image] == ["Retrieve the emoji that this name describes."] * 2
    assert all((tmp_path / "a" / "twemoji-name-to-image" / r["positive"]["image"]).exists() for r in to_image)
    H.build_heldout_tasks(tmp_path / "b", cap=5, sources=["twemoji"])
    for task in ("twemoji-name-to-image", "twemoji-image-to-name"):
        assert (tmp_path / "a" / task / "test.jsonl").read_text() == (tmp_path / "b" / task / "test.jsonl").read_text()


# ------------------------------------------------------------------------------------- the real installed sources
def _rows(manifest_dir: Path, task: str) -> list[dict]:
    return [json.loads(x) for x in (manifest_dir / task / "test.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def real_tasks(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout")
    return out, H.build_heldout_tasks(out, cap=6, seed=0)


@pytest.mark.parametrize("source, tasks", [("gcide", ["gcide-definitions"]),
                                           ("twemoji", ["twemoji-name-to-image", "twemoji-image-to-name"]),
                                           ("flite", ["flite-spoken-words"]),
                                           ("gnuplot", ["gnuplot-manual-pages"])])
def test_real_source_builds_its_tasks(real_tasks, source, tasks):
    out, manifest = real_tasks
    if source in manifest["skipped"]:
        pytest.skip(reason=f"{source} not installed here: {manifest['skipped'][source]}")
    for task in tasks:
        rows = _rows(out, task)
        assert len(rows) == 6 and manifest["tasks"][task]["n_queries"] == 6
        assert len({json.dumps(r["positive"], sort_keys=True) for r in rows}) == 6   # 6 distinct candidates
        for r in rows:
            for item in (r["query"], r["positive"]):
                for kind in ("image", "audio", "document"):
                    if kind in item:
                        assert (out / task / item[kind]).stat().st_size > 100
    if source == "gcide":
        test_words = set(H.test_nouns())
        for r in _rows(out, "gcide-definitions"):
            word = r["positive"]["text"]
            assert word in test_words and word not in r["query"]["text"].lower()
    if source == "twemoji":
        assert all(split_of(f"emoji:{r['query']['text']}") == "test" for r in _rows(out, "twemoji-name-to-image"))
    if source == "flite":
        from training.common.shared_data import read_audio

        clip = read_audio(out / "flite-spoken-words" / _rows(out, "flite-spoken-words")[0]["query"]["audio"])
        assert clip["sampling_rate"] in (8000, 16000) and 0.1 < len(clip["array"]) / clip["sampling_rate"] < 5


def test_real_build_is_deterministic(real_tasks, tmp_path):
    out, manifest = real_tasks
    if not manifest["tasks"]:
        pytest.skip(reason=f"no held-out source installed: {manifest['skipped']}")
    sources = sorted({t["source"] for t in manifest["tasks"].values()})
    again = H.build_heldout_tasks(tmp_path, cap=6, seed=0, sources=sources)
    for task in manifest["tasks"]:
        assert (tmp_path / task / "test.jsonl").read_text() == (out / task / "test.jsonl").read_text(), task
    assert again["tasks"] == manifest["tasks"]


def test_sample_draws_in_random_order_so_candidate_pools_mix_the_source():
    """Rows keep the drawn order (not the source's), so pools cut in file order are random draws; the same seed
    draws the same rows in the same order."""
    from training.data_sources.heldout import _sample

    items = list(range(200))
    drawn = _sample(items, 160, np.random.default_rng(0))
    assert len(drawn) == len(set(drawn)) == 160 and drawn != sorted(drawn)
    assert drawn == _sample(items, 160, np.random.default_rng(0))
    assert sorted(_sample(items, 500, np.random.default_rng(1))) == items
