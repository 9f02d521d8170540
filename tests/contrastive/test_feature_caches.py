"""`trainer.install_feature_caches`: which frozen towers get an output cache, and the refused combination."""

from __future__ import annotations

import pytest
import torch

from training.common import hub_code
from training.common.audio_cache import AudioFrameCache
from training.common.visual_cache import VisualTokenCache, vision_tower
from training.contrastive.trainer import apply_lora, install_feature_caches, unwrap_conan


def _lora_model(tiny_repo, scopes):
    model = hub_code.ConanModel.from_pretrained(tiny_repo, dtype=torch.float32)
    return apply_lora(model, 4, 8.0, 0.0, scopes=scopes)


def test_frozen_towers_get_both_caches_on_the_unwrapped_model(tiny_repo, tmp_path):
    model = _lora_model(tiny_repo, ("llm",))
    caches = install_feature_caches(model, ("llm",), tmp_path / "frames")
    conan = unwrap_conan(model)
    assert isinstance(caches["audio"], AudioFrameCache) and conan.audio_frames_hook is caches["audio"]
    assert isinstance(caches["visual"], VisualTokenCache)
    assert vision_tower(conan).forward.cache is caches["visual"]


def test_no_audio_cache_without_a_folder_and_no_visual_cache_on_a_trained_tower(tiny_repo, caplog):
    model = _lora_model(tiny_repo, ("llm", "vision"))
    with caplog.at_level("INFO", logger="training.contrastive.trainer"):
        caches = install_feature_caches(model, ("llm", "vision"))
    assert caches == {"audio": None, "visual": None}
    assert "visual token cache not installed: lora.scopes holds 'vision'" in caplog.text   # asked for, not given
    assert unwrap_conan(model).audio_frames_hook is None
    off = install_feature_caches(_lora_model(tiny_repo, ("llm",)), ("llm",), visual=False)
    assert off["visual"] is None


def test_an_audio_cache_is_refused_when_lora_trains_the_audio_encoder(tiny_repo, tmp_path):
    model = _lora_model(tiny_repo, ("llm", "audio_encoder"))
    with pytest.raises(ValueError, match="cannot be combined with LoRA on the audio encoder"):
        install_feature_caches(model, ("llm", "audio_encoder"), tmp_path / "frames")
