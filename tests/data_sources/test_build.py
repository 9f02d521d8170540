"""Real-data builders (training/data_sources): format, split safety, determinism, skip reasons. Fast: tiny caps."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from training.data_sources import build as B
from training.data_sources import instruments, pdf_pages, wordnet
from training.data_sources.common import BuildContext, balanced_take, pick_negatives
from training.data_sources.install import APT_PACKAGES, NPM_PACKAGES, NPM_PREFIX, PIP_PACKAGES
from training.common.splits import cifar_split, fsdd_split, split_of

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
TINY = B.Preset("tiny", {"train": 6, "dev": 3, "test": 3}, n_negatives=2, pdf_max_pages=8)
ITEM_KEYS = {"text", "image", "document", "page", "video", "audio"}
MEDIA_SUFFIX = {"image": (".png", ".jpg"), "document": (".png",), "audio": (".wav",), "video": (".mp4",)}


def expected_split(key: str) -> str:
    """The split ``training/common/splits.py`` assigns to an item identity written in ``meta.key``."""
    if key.startswith("fsdd:"):
        return fsdd_split(int(key.rsplit("_", 1)[1]))
    if m := re.fullmatch(r"cifar10:[a-z]+/(\d{4})", key):
        return cifar_split(int(m.group(1)))
    return split_of(key)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    if not SHARED.is_dir():
        pytest.skip(reason=f"{SHARED} (the project's shared real data) is absent")
    out = tmp_path_factory.mktemp("ds") / "data"
    return out, B.build_datasets(out, TINY, seed=0)


# ---------------------------------------------------------------- no data needed


def test_install_script_lists_what_install_py_lists():
    script = (Path(B.__file__).parent / "install_sources.sh").read_text()
    apt = re.search(r'^APT_PACKAGES="([^"]*)"', script, re.M).group(1).split()
    pip = re.search(r'^PIP_PACKAGES="([^"]*)"', script, re.M).group(1).split()
    npm = re.search(r'^NPM_PACKAGES="([^"]*)"', script, re.M).group(1).split()
    assert apt == list(APT_PACKAGES)
    assert pip == [p for p in PIP_PACKAGES if "==" in p]
    assert npm == list(NPM_PACKAGES) and all("@" in p for p in npm)   # pinned
    assert re.search(r'^NPM_PREFIX="([^"]*)"', script, re.M).group(1) == NPM_PREFIX


def test_balanced_take_round_robins_over_labels():
    rng = np.random.default_rng(0)
    items = [(lab, i) for lab in "abc" for i in range(5)] + [("d", 0)]
    got = balanced_take(items, lambda t: t[0], 9, rng)
    labels = [t[0] for t in got]
    assert len(got) == 9 and len(set(got)) == 9
    assert sorted(labels[:4]) == ["a", "b", "c", "d"]          # first round covers every label
    assert labels.count("d") == 1 and all(labels.count(x) >= 2 for x in "abc")
    assert balanced_take(items, lambda t: t[0], 0, rng) == []


def test_pick_negatives_excludes_self_and_prefers_hard():
    rng = np.random.default_rng(1)
    neg = pick_negatives(10, 3, 4, rng, ok=lambda j: j != 7, prefer=lambda j: j % 2 == 1)
    assert len(neg) == 4 and 3 not in neg and 7 not in neg
    assert sorted(neg[:3]) == [1, 5, 9] and neg[3] % 2 == 0   # the 3 allowed hard ones first, then an easy one
    neg = pick_negatives(10, 3, 3, rng, prefer=lambda j: j % 2 == 1)
    assert len(neg) == 3 and all(j % 2 == 1 for j in neg)


def test_midi_file_is_a_valid_format0_file():
    data = instruments.midi_file([(40, 60), (0, 72)])
    assert data[:4] == b"MThd" and int.from_bytes(data[8:10], "big") == 0 and data[14:18] == b"MTrk"
    assert int.from_bytes(data[18:22], "big") == len(data) - 22
    assert data.count(bytes([0xC0, 40])) == 1 and data.count(bytes([0x90, 72, 100])) == 1
    assert data.endswith(b"\xff\x2f\x00")


def test_captions():
    assert instruments.caption(40, 72) == "a violin playing a high note"
    assert instruments.caption(56, 48) == "a trumpet playing a low note"
    assert instruments.caption(125, 60) == "the sound of a helicopter"
    assert instruments.caption(126, 60) == "the sound of applause"


def test_pdf_query_candidates_keep_prose_and_headings_only():
    text = ("Chapter 7: Reading data 35\r\n7.3.1 Loading data from other R packages\r\n"
            "To access data from a particular package, use the package argument for it.\r\n"
            "T _spline_basis 0000000000001ec0 T _spline_value This indicates two entry points.\r\n"
            "Data frames and lists . . . . . . . 12 .\r\n")
    cands = pdf_pages.page_candidates(text)
    assert "Loading data from other R packages" in cands
    assert "To access data from a particular package, use the package argument for it." in cands
    assert not any("spline" in c or "Chapter" in c or ". ." in c for c in cands)


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        B.build_datasets(tmp_path / "x", "huge")
    with pytest.raises(ValueError, match="smell"):
        B.build_datasets(tmp_path / "x", TINY, modalities=["smell"])
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="refusing"):
        B.build_datasets(keep, TINY, modalities=["text"])
    assert (keep / "notes.txt").read_text() == "user data"


# ---------------------------------------------------------------- on real data


def test_every_modality_built_with_counts_and_manifest(built):
    out, res = built
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["preset"]["caps"] == TINY.caps
    assert set(res["modalities"]) | set(res["skipped_modalities"]) == set(B.MODALITIES)
    for m in ("audio", "image"):   # FSDD and CIFAR-10 come from ../shared, always there when this runs
        assert m in manifest["modalities"], res["skipped_modalities"].get(m)
    for m, entry in manifest["modalities"].items():
        for split, cap in TINY.caps.items():
            lines = read_jsonl(out / entry["files"][split])
            assert len(lines) == entry["counts"][split] <= cap
            assert sum(s["counts"][split] for s in entry["sources"].values()) == len(lines)
        assert entry["counts"]["train"] == TINY.caps["train"], f"{m}: caps should be filled by its sources"
        for name, src in entry["sources"].items():
            assert src["licence"] and src["obtained"] and src["split_rule"], name


def test_pairs_follow_the_jsonl_format_and_media_exist(built):
    out, res = built
    for m, entry in res["modalities"].items():
        for split, rel in entry["files"].items():
            jsonl = out / rel
            for rec in read_jsonl(jsonl):
                assert set(rec) <= {"query", "positive", "negatives", "source", "instruction", "meta"}
                assert isinstance(rec["source"], str) and rec["source"] in entry["sources"]
                items = [rec["query"], rec["positive"], *rec["negatives"]]
                assert len(rec["negatives"]) >= 1
                for item in items:
                    assert item and set(item) <= ITEM_KEYS, item
                    for kind, suffixes in MEDIA_SUFFIX.items():
                        if kind in item:
                            path = jsonl.parent / item[kind]
                            assert not Path(item[kind]).is_absolute() and path.is_file(), path
                            assert path.suffix in suffixes
                modal = {k for it in (rec["query"], rec["positive"]) for k in it if k != "text"}
                assert modal == ({m} if m != "text" else set()), (m, rec)
                if m == "video" or "synthetic" in rec["meta"] and rec["meta"]["synthetic"]:
                    assert "synthetic" in rec["source"]


def test_no_pair_crosses_splits(built):
    """Every item (query/positive and item negatives) of a split file belongs to that split by training/common/splits.py:
    training never sees an evaluation test item."""
    out, res = built
    seen: dict[str, set[str]] = {"train": set(), "dev": set(), "test": set()}
    for entry in res["modalities"].values():
        for split, rel in entry["files"].items():
            for rec in read_jsonl(out / rel):
                keys = [rec["meta"]["key"], *rec["meta"]["negative_keys"]]
                for key in keys:
                    assert expected_split(key) == split, f"{key} is {expected_split(key)} but in {rel}"
                seen[split].update(keys)
    assert not (seen["train"] & seen["test"]) and not (seen["dev"] & seen["test"])
    assert any(k.startswith("fsdd:") for k in seen["train"])


def test_media_decode(built):
    out, res = built
    import soundfile as sf
    from PIL import Image

    from media_conan import load_video_file

    checked = set()
    for m, entry in res["modalities"].items():
        rec = read_jsonl(out / entry["files"]["train"])[0]
        base = out / m
        for item in (rec["query"], rec["positive"]):
            if "audio" in item:
                data, sr = sf.read(base / item["audio"])
                assert sr >= 8000 and data.size > sr // 10 and np.abs(data).max() > 0.01
            if "image" in item or "document" in item:
                img = Image.open(base / item.get("image", item.get("document")))
                assert min(img.size) >= 32
            if "video" in item:
                frames = load_video_file(str(base / item["video"]), 2.0, 64)
                assert len(frames) == 8 and frames[0].shape == (64, 64, 3)
                assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 2  # it moves
            checked |= set(item) - {"text"}
    assert {"audio", "image"} <= checked


def test_deterministic_for_a_seed_and_different_for_another(built, tmp_path):
    out, _ = built
    again = tmp_path / "again"
    B.build_datasets(again, TINY, seed=0)
    assert tree_digest(again) == tree_digest(out)
    other = B.build_datasets(tmp_path / "other", TINY, modalities=["image"], seed=1)
    assert (tmp_path / "other/image/train.jsonl").read_text() != (out / "image/train.jsonl").read_text()
    assert other["modalities"]["image"]["counts"]["train"] == TINY.caps["train"]
    # rebuilding into an earlier output replaces it atomically
    B.build_datasets(again, TINY, modalities=["text"], seed=0)
    assert sorted(p.name for p in again.iterdir()) in (["manifest.json", "text"], ["manifest.json"])


def test_missing_sources_are_skipped_with_reasons(tmp_path, monkeypatch):
    if not SHARED.is_dir():
        pytest.skip(reason=f"{SHARED} is absent")
    monkeypatch.setattr(wordnet, "WORDNET_DIR", tmp_path / "no-wordnet")
    monkeypatch.setattr(pdf_pages, "MANUALS", (tmp_path / "no-manual.pdf",))
    monkeypatch.setattr(instruments, "SOUNDFONT", tmp_path / "no.sf2")
    res = B.build_datasets(tmp_path / "out", TINY, modalities=["audio", "text", "document"], seed=0)
    assert set(res["skipped_modalities"]) == {"text", "document"}
    assert "apt-get install" in res["skipped_modalities"]["text"]["wordnet-definitions"]
    assert "r-doc-pdf" in res["skipped_modalities"]["document"]["manual-pdf-pages"]
    audio = res["modalities"]["audio"]
    assert set(audio["sources"]) == {"fsdd-spoken-digits"}
    assert "fluid-soundfont-gm" in audio["skipped"]["fluid-soundfont-gm-instruments"]
    assert "wordnet" in audio["skipped"]["espeak-ng-wordnet-synthetic-speech"].lower()
    assert audio["counts"] == TINY.caps                       # FSDD fills the shares of the skipped sources
    assert not (tmp_path / "out/text").exists()


def test_missing_shared_data_is_a_skip_not_a_crash(tmp_path):
    res = B.build_datasets(tmp_path / "out", TINY, modalities=["image"], seed=0, shared=tmp_path / "nowhere")
    reasons = {**res["modalities"].get("image", {}).get("skipped", {}), **res["skipped_modalities"].get("image", {})}
    assert "cifar10-photos" in reasons and "cifar10-test" in reasons["cifar10-photos"]


def test_build_context_rng_depends_only_on_seed_source_split(tmp_path):
    a = BuildContext(root=tmp_path, seed=3).rng("src", "train").integers(0, 1 << 30, 4)
    b = BuildContext(root=tmp_path, seed=3).rng("src", "train").integers(0, 1 << 30, 4)
    c = BuildContext(root=tmp_path, seed=3).rng("src", "dev").integers(0, 1 << 30, 4)
    assert (a == b).all() and not (a == c).all()


def test_train_caps_replace_the_train_cap_of_one_modality_only():
    preset = B.Preset("p", {"train": 30, "dev": 4, "test": 8}, train_caps={"image": 500})
    assert B.resolve_preset(preset) is preset
    assert preset.cap("image", "train") == 500 and preset.cap("image", "test") == 8
    assert preset.cap("text", "train") == 30
    with pytest.raises(ValueError, match="train_caps"):
        B.resolve_preset(B.Preset("p", {"train": 30, "dev": 4, "test": 8}, train_caps={"imgae": 5}))


def test_test_caps_replace_the_test_cap_of_one_modality_only():
    preset = B.Preset("p", {"train": 30, "dev": 4, "test": 8}, train_caps={"image": 500}, test_caps={"audio": 2})
    assert B.resolve_preset(preset) is preset
    assert preset.cap("audio", "test") == 2 and preset.cap("audio", "train") == 30 and preset.cap("audio", "dev") == 4
    assert preset.cap("image", "test") == 8 and preset.cap("image", "train") == 500
    with pytest.raises(ValueError, match="test_caps"):
        B.resolve_preset(B.Preset("p", {"train": 30, "dev": 4, "test": 8}, test_caps={"audio": -1}))


def test_cifar10_listing_keeps_every_file_when_classes_differ_in_size(tmp_path):
    """The listing interleaves the classes; one class with fewer files must not cut the others short."""
    from training.common.shared_data import CIFAR10_CLASSES, cifar10_images

    root = tmp_path / "data" / "cifar10-test"
    for ci, cls in enumerate(CIFAR10_CLASSES):
        (root / cls).mkdir(parents=True)
        for i in range(3 if ci == 0 else 5):
            (root / cls / f"{i:04d}.jpg").write_bytes(b"")
    listed = cifar10_images(tmp_path)
    assert len(listed) == 3 + 9 * 5
    assert [c for _, c in listed[:10]] == list(range(10))          # one of each class in turn
    assert [c for _, c in listed[30:]] == list(range(1, 10)) * 2   # class 0 ran out after three rounds


def test_installed_since_names_the_skipped_sources_whose_check_passes_now(monkeypatch):
    def missing(ctx):
        raise B.SourceMissing("not here")

    info = lambda name: B.SourceInfo(name=name, modality="image", licence="", obtained="", split_rule="", install="")
    monkeypatch.setattr(B, "SOURCES", {"image": [(info("a"), lambda ctx: None, None), (info("b"), missing, None)],
                                       "audio": [(info("c"), lambda ctx: None, None)]})
    assert B.installed_since({"image": {"a": "was missing", "b": "was missing"}}) == ["a"]
    assert B.installed_since({"image": {"a": "was missing"}, "audio": {"c": "was missing"}}) == ["a", "c"]
    assert B.installed_since({}) == []


def test_installed_since_ignores_a_modality_that_produced_no_pairs_with_its_sources_installed(monkeypatch, tmp_path):
    """`build_datasets` records {"all": "no pairs produced"} only where every source passed its check: nothing was
    missing, so nothing is installed since (else every rerun would redo the data stage, to record the same again)."""
    info = B.SourceInfo(name="empty", modality="audio", licence="", obtained="", split_rule="", install="")
    monkeypatch.setattr(B, "SOURCES", {**B.SOURCES, "audio": [(info, lambda ctx: None, lambda split, cap, ctx: [])]})
    manifest = B.build_datasets(tmp_path / "out", preset="smoke", modalities=["audio"])
    from training.pipeline.runner import data_sources_summary

    skipped = data_sources_summary(manifest)["skipped"]
    assert skipped == {"audio": {"all": "no pairs produced"}}
    assert B.installed_since(skipped) == []
