"""Every backbone family x audio family, each built by `python -m training.build_base --tiny` from tiny upstream
checkpoints, through the same battery: every modality and a mixture, batch == single, left == right padding, bf16,
and the save/load round trip through AutoModel / AutoProcessor / SentenceTransformer. Family-specific checks follow:
outputs equal to the upstream backbone's own forward, DeepStack, timestamps, second_per_grid_ts, Omni token counts,
the long-audio policy, and repos written in the old layout."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO_ROOT
from tests.hub.test_model_package import AUDIO, IMAGE, VIDEO

BACKBONES = ("qwen3_vl", "qwen2_5_vl", "qwen2_vl")
AUDIOS = ("qwen3_omni", "whisper")
COMBOS = [(b, a) for b in BACKBONES for a in AUDIOS]
RNG = np.random.default_rng(1)
MIXED = [
    "a cat on a mat",
    IMAGE,
    {"video": VIDEO},
    {"audio": AUDIO},
    {"document": IMAGE},
    {"text": "what is in the picture?", "image": IMAGE},
    {"video": VIDEO, "audio": AUDIO, "text": "a clip"},
    {"image": IMAGE, "video": VIDEO, "audio": AUDIO},
]
FIXTURE_LEGACY = REPO_ROOT / "tests" / "fixtures" / "legacy_repo_d51a093"


@pytest.fixture(scope="module", params=COMBOS, ids=[f"{b}+{a}" for b, a in COMBOS])
def family_repo(request, tmp_path_factory):
    """(backbone family, audio family, repo dir, model, processor), built once per combination."""
    from transformers import AutoModel, AutoProcessor

    from training.base.build_base import main

    backbone, audio = request.param
    out = tmp_path_factory.mktemp("families") / f"{backbone}-{audio}"
    main(["--tiny", "--backbone-family", backbone, "--audio-family", audio, "--out", str(out)])
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    return backbone, audio, out, model, processor


def _embed(model, processor, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**processor.prepare(inputs, **kwargs)).embeddings


def test_built_repo_is_the_requested_family(family_repo):
    backbone, audio, out, model, processor = family_repo
    config = json.loads((out / "config.json").read_text())
    assert config["backbone_config"]["model_type"] == backbone
    assert config["audio_config"]["model_type"] == {"qwen3_omni": "qwen3_omni_moe_audio_encoder"}.get(audio, audio)
    classes = {"qwen3_vl": "Qwen3VLModel", "qwen2_5_vl": "Qwen2_5_VLModel", "qwen2_vl": "Qwen2VLModel"}
    assert type(model.backbone).__name__ == classes[backbone]
    assert type(model.audio_encoder).__name__ == {"qwen3_omni": "Qwen3OmniMoeAudioEncoder"}.get(audio, "WhisperEncoder")
    assert (processor.backbone_family, processor.audio_family) == (backbone, audio)
    assert processor.image_processor.patch_size == (16 if backbone == "qwen3_vl" else 14)
    # projector: audio_dim -> 3/4 hidden -> hidden
    hidden = model.config.text_config.hidden_size
    assert model.audio_projector.fc1.weight.shape == (3 * hidden // 4, model.config.audio_dim)
    assert model.audio_projector.fc2.weight.shape == (hidden, 3 * hidden // 4)


def test_every_modality_batch_equals_single_and_padding_sides_agree(family_repo):
    _, _, _, model, processor = family_repo
    batched = _embed(model, processor, MIXED)
    single = torch.cat([_embed(model, processor, [item]) for item in MIXED])
    left = _embed(model, processor, MIXED, padding_side="left")
    assert batched.shape == (len(MIXED), model.config.text_config.hidden_size)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(MIXED)), atol=1e-5)
    assert (batched - single).abs().max() <= 1e-5
    assert (batched - left).abs().max() <= 1e-5
    similarity = batched @ batched.T
    off_diagonal = similarity[~torch.eye(len(MIXED), dtype=torch.bool)]
    assert off_diagonal.max() < 0.99999, "two different inputs gave the same embedding"


def test_bf16_runs(family_repo):
    from transformers import AutoModel

    _, _, out, model, processor = family_repo
    bf16 = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16).eval()
    assert bf16.audio_encoder.dtype == torch.bfloat16 and bf16.backbone.dtype == torch.bfloat16
    low = _embed(bf16, processor, MIXED)
    full = _embed(model, processor, MIXED)
    assert torch.isfinite(low).all()
    assert torch.nn.functional.cosine_similarity(low, full).min() > 0.95


def test_save_load_round_trip_through_sentence_transformers(family_repo, tmp_path):
    from sentence_transformers import SentenceTransformer

    _, _, out, model, processor = family_repo
    st = SentenceTransformer(str(out), trust_remote_code=True, device="cpu")
    expected = _embed(model, processor, MIXED).numpy()
    assert np.abs(st.encode(MIXED, convert_to_numpy=True) - expected).max() <= 1e-5
    st.save(str(tmp_path / "again"))
    again = SentenceTransformer(str(tmp_path / "again"), trust_remote_code=True, device="cpu")
    assert np.abs(again.encode(MIXED, convert_to_numpy=True) - expected).max() <= 1e-5


def test_audio_placeholders_follow_the_paper_layout(family_repo):
    _, audio, _, model, processor = family_repo
    ids = processor.prepare([{"audio": AUDIO}], return_tensors="np")["input_ids"][0].tolist()
    tok = processor.tokenizer
    start, token, end = (tok.convert_tokens_to_ids(t) for t in ("<|audio_start|>", "<|AUDIO|>", "<|audio_end|>"))
    assert token == model.config.audio_token_id and processor.audio_token == "<|AUDIO|>"
    first, count = ids.index(token), ids.count(token)
    assert ids[first - 1] == start and ids[first + count] == end
    assert ids[first : first + count] == [token] * count
    seconds = 3.0
    per_second = {"qwen3_omni": 13, "whisper": 25}[audio]  # Omni: 13 tokens per 100 frames; Whisper 50 Hz / 2
    assert count == per_second * seconds


def test_conan_equals_the_upstream_backbone_forward(family_repo):
    """Without audio, Conan's hidden states are the upstream model's own forward on input_ids (native M-RoPE,
    DeepStack, window attention, timestamps): nothing of the family is lost by injecting through inputs_embeds."""
    backbone, _, _, model, processor = family_repo
    inputs = processor.prepare([{"text": "two views", "image": IMAGE, "video": VIDEO}, "plain text"])
    with torch.no_grad():
        ours = model(**inputs).last_hidden_state
        upstream_kwargs = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                                  "pixel_values_videos", "video_grid_thw", "mm_token_type_ids")}
        if backbone == "qwen2_5_vl":
            upstream_kwargs["second_per_grid_ts"] = inputs["second_per_grid_ts"]
        model.backbone.rope_deltas = None
        upstream = model.backbone(**upstream_kwargs, use_cache=False).last_hidden_state
        model.backbone.rope_deltas = None
    mask = inputs["attention_mask"].bool()
    assert (ours[mask] - upstream[mask]).abs().max() <= 1e-5


def test_custom_4d_mask_gives_the_2d_path(family_repo):
    """A 4-D causal + padding mask with padding_mask: the family's own M-RoPE positions (Qwen3-VL timestamps and
    DeepStack, Qwen2.5-VL second_per_grid_ts) and the same embeddings as the 2-D mask."""
    from tests.hub.test_custom_attention_mask import assert_4d_mask_matches_2d

    backbone, audio, out, model, processor = family_repo
    assert_4d_mask_matches_2d(model, processor, "left", "bool", MIXED)


def test_qwen3_vl_deepstack_and_timestamps(family_repo, monkeypatch):
    backbone, _, _, model, processor = family_repo
    if backbone != "qwen3_vl":
        pytest.skip("Qwen3-VL only")
    language_model = model.backbone.language_model
    calls = []
    original = language_model._deepstack_process
    monkeypatch.setattr(language_model, "_deepstack_process",
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    inputs = processor.prepare([{"video": VIDEO}, IMAGE])
    with torch.no_grad():
        model(**inputs)
    assert calls, "DeepStack visual features were not added to the LLM hidden states"
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    grid_t = int(inputs["video_grid_thw"][0, 0])  # 5 frames -> 3 temporal patches
    assert [f"<{(2 * t + 0.5) / processor.video_fps:.1f} seconds>" in text for t in range(grid_t)] == [True] * grid_t
    assert text.count("<|vision_start|>") == grid_t


def test_qwen2_5_vl_second_per_grid_ts_is_used(family_repo):
    backbone, _, _, model, processor = family_repo
    if backbone != "qwen2_5_vl":
        pytest.skip("Qwen2.5-VL only")
    inputs = processor.prepare([{"video": VIDEO, "text": "clip"}])
    assert inputs["second_per_grid_ts"].tolist() == [2 / processor.video_fps]
    assert model.backbone.visual.fullatt_block_indexes and model.config.vision_config.window_size == 56
    with torch.no_grad():
        base = model(**inputs).embeddings
        slower = model(**{**inputs, "second_per_grid_ts": inputs["second_per_grid_ts"] * 4}).embeddings
    assert (base - slower).abs().max() > 1e-4, "second_per_grid_ts did not change the temporal positions"


def test_omni_token_counts_match_upstream():
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    from training.common.hub_code import load

    omni_tokens = load("configuration_conan").omni_audio_tokens_for_frames
    frames = torch.arange(1, 3001)
    upstream = _get_feat_extract_output_lengths(frames, 50)
    assert [omni_tokens(int(n), 50) for n in frames] == upstream.tolist()


def test_omni_long_audio_policy(family_repo, caplog):
    """Qwen3-Omni embeds a whole clip (no 30 s cut) up to audio_max_windows x 30 s, then cuts with a warning."""
    _, audio, _, model, processor = family_repo
    if audio != "qwen3_omni":
        pytest.skip("Qwen3-Omni only")
    long_clip = {"array": (RNG.standard_normal(16000 * 70) * 0.1).astype(np.float32), "sampling_rate": 16000}
    saved = processor.audio_max_windows
    try:
        processor.audio_max_windows = 3
        with caplog.at_level(logging.WARNING):
            whole = processor.prepare([{"audio": long_clip}])
        assert not [r for r in caplog.records if "longer than audio_max_windows" in r.message]
        assert int(whole["audio_feature_lengths"][0]) == 7000
        assert int((whole["input_ids"] == model.config.audio_token_id).sum()) == 70 * 13
        processor.audio_max_windows = 2
        with caplog.at_level(logging.WARNING):
            cut = processor.prepare([{"audio": long_clip}])
        assert [r for r in caplog.records if "longer than audio_max_windows" in r.message]
        assert int(cut["audio_feature_lengths"][0]) == 6000
    finally:
        processor.audio_max_windows = saved
    with torch.no_grad():
        assert torch.isfinite(model(**whole).embeddings).all()


def test_tiny_upstream_checkpoints_are_sharded_with_real_prefixes(tmp_path):
    from safetensors import safe_open

    from training.base import families
    from training.base.build_base import build_tiny_tokenizer

    omni = families.write_tiny_qwen3_omni(tmp_path / "omni")
    index = json.loads((omni / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    audio_keys = [k for k in index if k.startswith("thinker.audio_tower.")]
    assert audio_keys and any(k.startswith("thinker.model.") for k in index)
    config, state = families.read_omni_audio_tower(str(omni))
    assert sorted(state) == sorted(k[len("thinker.audio_tower."):] for k in audio_keys)
    with safe_open(omni / index[audio_keys[0]], "pt") as handle:
        assert torch.equal(handle.get_tensor(audio_keys[0]), state[audio_keys[0][len("thinker.audio_tower."):]])
    assert config.num_mel_bins == 128
    backbone = families.write_tiny_backbone("qwen3_vl", tmp_path / "vl", build_tiny_tokenizer())
    keys = json.loads((backbone / "model.safetensors.index.json").read_text())["weight_map"]
    assert {k.split(".")[0] for k in keys} == {"model", "lm_head"}


def test_builder_cli_names_the_bad_flag_value(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "training.build_base", "--tiny", "--backbone-family", "qwen3_vl_moe", "--out",
         str(tmp_path / "x")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "--backbone-family" in result.stderr and "qwen3_vl" in result.stderr


def test_repo_in_the_old_layout_still_loads_and_reproduces_its_embeddings(tmp_path):
    """A tiny repo written by the builder at d51a093 (ConanConfig then subclassed Qwen2VLConfig; `<|audio_pad|>`
    placeholder) with today's remote code: config, weights and processor load, and the embeddings its own code
    produced then come out again."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoConfig

    from training.common.repo import copy_remote_code

    repo = tmp_path / "legacy"
    shutil.copytree(FIXTURE_LEGACY, repo)
    copy_remote_code(repo)
    config = AutoConfig.from_pretrained(repo, trust_remote_code=True)
    assert config.backbone_model_type == "qwen2_vl" and config.audio_family == "whisper"
    assert config.text_config.hidden_size == 64 and config.image_token_id == 12
    rng = np.random.default_rng(0)  # the inputs the reference embeddings were computed on
    image = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    video = rng.integers(0, 255, (5, 30, 40, 3), dtype=np.uint8)
    audio = {"array": (rng.standard_normal(8000 * 3) * 0.1).astype(np.float32), "sampling_rate": 8000}
    inputs = ["a cat on a mat", image, {"video": video}, {"audio": audio},
              {"text": "what is in the picture?", "image": image}, {"video": video, "audio": audio}]
    st = SentenceTransformer(str(repo), trust_remote_code=True, device="cpu")
    reference = np.load(repo / "reference_embeddings.npy")
    assert np.abs(st.encode(inputs, convert_to_numpy=True) - reference).max() <= 1e-5
    assert st[0].processor.audio_token == "<|audio_pad|>" and st[0].processor.audio_start_token is None


def test_sub_models_follow_the_requested_dtype_not_their_upstream_configs():
    """Real upstream configs carry `dtype: bfloat16` (Qwen3-VL); the built model must still be uniformly fp32 (and
    bf16 when asked), otherwise the projector and the backbone would disagree."""
    from training.common import hub_code

    config = hub_code.ConanConfig.from_dict(json.loads((FIXTURE_LEGACY / "config.json").read_text()))
    config.backbone_config.dtype = config.audio_config.dtype = torch.bfloat16
    assert {p.dtype for p in hub_code.ConanModel(config).parameters()} == {torch.float32}
    half = hub_code.ConanModel._from_config(config, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
