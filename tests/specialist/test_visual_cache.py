"""The frozen vision tower's token cache (training/common/visual_cache.py): same embeddings, each item encoded once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from training.common import hub_code
from training.common.visual_cache import VisualTokenCache, vision_tower
from training.evaluation.embed import embed_items


def _images(tmp_path, n: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (56 + 28 * i, 84, 3), dtype=np.uint8)).save(path)
        items.append({"image": str(path)})
    return items


def _frozen(tiny_repo):
    model = hub_code.ConanModel.from_pretrained(tiny_repo, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_cached_tower_gives_the_same_embeddings_and_encodes_each_item_once(tiny_repo, tmp_path):
    processor = hub_code.ConanProcessor.from_pretrained(tiny_repo)
    items = _images(tmp_path, 3)
    plain = embed_items(_frozen(tiny_repo), processor, items, None, 2)
    model = _frozen(tiny_repo)
    cache = VisualTokenCache.install(model)
    assert VisualTokenCache.install(model) is cache          # installing twice keeps one cache
    first = embed_items(model, processor, items, None, 2)
    assert (cache.misses, cache.hits) == (3, 0)
    again = embed_items(model, processor, [items[2], items[0]], None, 2)
    assert (cache.misses, cache.hits) == (3, 2)
    torch.testing.assert_close(first, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, plain[[2, 0]], atol=1e-5, rtol=1e-5)


def test_cached_tower_refuses_trainable_weights(tiny_repo):
    model = hub_code.ConanModel.from_pretrained(tiny_repo, dtype=torch.float32)
    with pytest.raises(ValueError, match="trainable"):
        VisualTokenCache.install(model)
    frozen = _frozen(tiny_repo)
    cache = VisualTokenCache.install(frozen)
    next(vision_tower(frozen).parameters()).requires_grad_(True)
    grid = torch.tensor([[1, 2, 2]])
    with pytest.raises(RuntimeError, match="trainable"):
        cache(torch.zeros(4, 1176), grid)
    with torch.no_grad(), pytest.raises(ValueError, match="grid_thw covers 4 patches"):
        cache(torch.zeros(5, 1176), grid)
