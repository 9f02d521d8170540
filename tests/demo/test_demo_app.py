"""demo/app.py without a browser: the gallery is indexed once through serving.index, every kind gets a preview, an
image or audio from the gallery comes back first, and a bad gallery folder is a clear error."""

from __future__ import annotations

import pytest
from PIL import Image

pytest.importorskip("faiss", reason="the demo's index needs faiss-cpu (requirements-serving.txt)")
pytest.importorskip("av", reason="the sample gallery's video needs PyAV")

from demo.app import GallerySearch, preview  # noqa: E402
from demo.sample_gallery import EXPECTED_IDS, make_gallery  # noqa: E402


def test_gallery_search(tiny_repo, tmp_path):
    gallery = make_gallery(tmp_path / "gallery")
    search = GallerySearch(str(tiny_repo), str(gallery), cache_dir=str(tmp_path / "cache"))
    assert "**Indexed 8 items**" in search.status() and "2 pdf" in search.status()
    assert (search.cache_dir / "merged" / "index.json").is_file() and search.cache_dir.is_relative_to(tmp_path)
    for name in ("red.png", "tone.wav", "clip.mp4"):
        previews, rows = search.search(str(gallery / name), 3, "document")
        assert rows[0][3] == name and rows[0][1] == pytest.approx(1.0, abs=1e-3)
        assert [r[0] for r in rows] == [1, 2, 3] and len(previews) == 3
    previews, rows = search.search("a red square", 20, "query")
    assert sorted(r[3] for r in rows) == sorted(EXPECTED_IDS)
    for (image, caption), row in zip(previews, rows):
        assert isinstance(image, Image.Image) and max(image.size) <= 256 and caption.endswith(row[3])
    for record in search.ensure_index().records:  # a real preview for every kind, not the error card
        assert preview(record).getpixel((2, 2)) != (254, 226, 226), record["id"]
    with pytest.raises(ValueError, match="does not exist or is not a folder"):
        search.set_gallery(str(tmp_path / "missing"))
