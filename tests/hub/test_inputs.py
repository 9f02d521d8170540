"""User inputs through the public APIs (issue 13): literal text, length limits, errors naming the caller's input,
mteb rows, non-finite fusion inputs and the dtype-independent drift check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

IMAGE = Image.fromarray(np.arange(64 * 48 * 3, dtype=np.uint8).reshape(48, 64, 3))


def _embed(model, processor, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**processor.prepare(inputs, **kwargs)).embeddings


# ------------------------------------------------------------------------------------------------ literal user text
@pytest.mark.parametrize("token", ["<|image_pad|>", "<|video_pad|>", "<|audio_pad|>", "<|im_end|>", "<|endoftext|>",
                                   "<|vision_start|>"])
def test_special_token_strings_in_user_text_stay_text(tiny_model_and_processor, token):
    model, processor = tiny_model_and_processor
    sentence = f"The tag {token} marks a placeholder."
    batch = processor.prepare([sentence, {"image": IMAGE, "text": sentence}], return_tensors="np")
    special_id = processor.tokenizer.convert_tokens_to_ids(token)
    plain = processor.prepare(["The tag marks a placeholder."], return_tensors="np")
    n_special = [(row[mask.astype(bool)] == special_id).sum() for row, mask in
                 zip(batch["input_ids"], batch["attention_mask"])]
    baseline = (plain["input_ids"][0] == special_id).sum()  # the template's own uses of the token
    image_tokens = int(batch["image_grid_thw"][0].prod()) // 4 if token == "<|image_pad|>" else 0
    image_marks = 1 if token == "<|vision_start|>" else 0
    assert n_special == [baseline, baseline + image_tokens + image_marks]
    decoded = processor.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].astype(bool)])
    assert sentence in decoded
    assert torch.isfinite(_embed(model, processor, [sentence])).all()


def test_instruction_is_literal_too(tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    batch = processor.prepare(["hello"], instruction="Ignore <|im_end|> here", return_tensors="np")
    plain = processor.prepare(["hello"], return_tensors="np")
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (batch["input_ids"][0] == im_end).sum() == (plain["input_ids"][0] == im_end).sum()


def test_hf_call_still_expands_caller_placeholders(tiny_model_and_processor):
    """`processor(text=..., images=...)`: the caller builds the template, so placeholders there are placeholders."""
    _, processor = tiny_model_and_processor
    batch = processor(text=["<|vision_start|><|image_pad|><|vision_end|>a cat"], images=[IMAGE], return_tensors="np")
    assert (batch["input_ids"][0] == processor.image_token_id).sum() == int(batch["image_grid_thw"][0].prod()) // 4


# ------------------------------------------------------------------------------------------------ length
LONG_TEXT = "alpha beta gamma delta " * 1500  # ~6000 words, past the tiny backbone's 4096 positions


def test_sentence_transformers_max_seq_length_defaults_and_truncates(tiny_st):
    module = tiny_st[0]
    limit = module.model.config.text_config.max_position_embeddings
    assert tiny_st.max_seq_length == limit
    features = module.preprocess([LONG_TEXT, "short"])
    assert features["input_ids"].shape[1] == limit
    try:
        tiny_st.max_seq_length = 64
        features = module.preprocess([LONG_TEXT, "short"])
        assert features["input_ids"].shape[1] == 64
        short = tiny_st.encode(["a b c " * 100])
    finally:
        tiny_st.max_seq_length = None
    assert tiny_st.max_seq_length == limit
    assert not np.allclose(short, tiny_st.encode(["a b c " * 100]))  # the setting takes effect in encode
    with pytest.raises(ValueError, match="positive int"):
        tiny_st.max_seq_length = 0


def test_truncation_cuts_text_only_and_keeps_the_template_end(tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    full = processor.prepare([{"image": IMAGE, "text": LONG_TEXT}], return_tensors="np")
    cut = processor.prepare([{"image": IMAGE, "text": LONG_TEXT}], return_tensors="np", max_length=300)
    ids, full_ids = cut["input_ids"][0], full["input_ids"][0]
    assert ids.shape[0] == 300
    n_image = int(cut["image_grid_thw"][0].prod()) // 4
    assert (ids == processor.image_token_id).sum() == n_image  # the placeholder run is whole
    suffix = processor.tokenizer("<|im_end|>\n<|im_start|>assistant\n<|endoftext|>", add_special_tokens=False)
    tail = suffix["input_ids"]
    assert ids[-len(tail):].tolist() == tail and ids[: 300 - len(tail)].tolist() == full_ids[: 300 - len(tail)].tolist()


def test_media_alone_past_max_length_fails_clearly(tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    with pytest.raises(ValueError, match=r"inputs\[1\]: its media and template tokens alone are \d+, more than "
                                         r"max_length=32"):
        processor.prepare(["fine", {"image": IMAGE.resize((640, 480)), "text": "a photo"}], max_length=32)


def test_model_warns_past_max_position_embeddings(tiny_model_and_processor, caplog):
    model, processor = tiny_model_and_processor
    batch = processor.prepare([LONG_TEXT], max_length=10**6)
    with caplog.at_level("WARNING"), torch.no_grad():
        model(**batch)
    assert "more than max_position_embeddings" in caplog.text


# ------------------------------------------------------------------------------------------------ errors name the input
def test_encode_error_quotes_the_callers_input_not_the_sorted_position(tiny_st):
    with pytest.raises(ValueError, match=r"input '' is an empty string") as raised:
        tiny_st.encode(["first", "", "third one is longer"])
    assert "inputs[" not in str(raised.value)
    with pytest.raises(ValueError, match=r"input \{'audio': \{'array': <ndarray int64 \(8,\)>, 'sampling_rate': 16000\}"
                                         r"\}\['audio'\]\['array'\] has dtype int64"):
        tiny_st.encode(["a much longer first sentence", {"audio": {"array": np.zeros(8, np.int64),
                                                                   "sampling_rate": 16000}}])


@pytest.mark.parametrize("size", [(500, 2), (2, 500)])
def test_extreme_aspect_ratio_is_named_up_front(tiny_model_and_processor, tiny_st, size):
    _, processor = tiny_model_and_processor
    image = Image.new("RGB", size, (10, 20, 30))
    with pytest.raises(ValueError, match=rf"inputs\[1\]\['image'\] is an image of {size[0]}x{size[1]} pixels, aspect "
                                         r"ratio 250.0; the vision encoder accepts at most 200:1"):
        processor.prepare(["fine", {"image": image, "text": "a strip"}])
    with pytest.raises(ValueError, match=r"input <PIL RGB image .*aspect ratio 250.0"):
        tiny_st.encode(["fine", image])
    with pytest.raises(ValueError, match=r"images\[0\] is an image of .*aspect ratio 250.0"):
        processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image])
    ok = Image.new("RGB", (400, 2), (10, 20, 30))  # 200:1 is still accepted
    assert processor.prepare([ok], return_tensors="np")["image_grid_thw"].shape == (1, 3)


def test_video_frame_aspect_ratio_is_named(tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    with pytest.raises(ValueError, match=r"inputs\[0\]\['video'\] frame 0 is an image of 300x1 pixels"):
        processor.prepare([{"video": np.zeros((2, 1, 300, 3), np.uint8)}])


# ------------------------------------------------------------------------------------------------ mteb rows
def test_mteb_encoder_keeps_empty_rows_with_a_defined_embedding(tiny_st, caplog):
    pytest.importorskip("mteb")
    from types import SimpleNamespace

    from training.evaluation.embedder import SentenceTransformerEmbedder
    from training.evaluation.mteb_encoder import ConanMtebEncoder

    encoder = ConanMtebEncoder(SentenceTransformerEmbedder("unused", model=tiny_st), batch_size=4)
    task = SimpleNamespace(name="MockEmptyRows", type="Clustering", prompt=None)
    tone = {"array": (0.3 * np.sin(np.arange(8000) / 5)).astype(np.float32), "sampling_rate": 16000}
    silence = {"array": np.zeros(0, np.float32), "sampling_rate": 16000}
    batches = [{"text": ["hello", "", "world"]}, {"text": ["  ", ""]},
               {"audio": [silence, tone], "text": [None, None]}, {"audio": [silence], "text": ["a caption"]}]
    with caplog.at_level("WARNING"):
        out = encoder.encode(batches, task_metadata=task, hf_split="test", hf_subset="default",
                             show_progress_bar=False)
    assert out.shape == (8, tiny_st.get_embedding_dimension()) and np.isfinite(out).all()
    empty = [1, 3, 4, 5]
    assert np.all(out[empty] == 0)
    assert np.allclose(np.linalg.norm(np.delete(out, empty, axis=0), axis=1), 1, atol=1e-5)
    assert "4 of 8 rows have no content" in caplog.text
    np.testing.assert_allclose(out[0], tiny_st.encode(["hello"], prompt=encoder.prompt_for(task, None, ["x"]))[0],
                               atol=1e-5)
    assert np.isfinite(np.asarray(encoder.similarity(out, out))).all()
    with pytest.raises(ValueError, match="all 2 rows are empty"):
        encoder.encode([{"text": ["", " "]}], task_metadata=task, hf_split="test", hf_subset="default",
                       show_progress_bar=False)


def test_mteb_adapter_scales_integer_audio():
    from training.evaluation.media import to_audio_item

    tone = 0.5 * np.sin(np.arange(1600) / 3)
    item = to_audio_item({"array": np.round(tone * 32767).astype(np.int16), "sampling_rate": 16000})
    np.testing.assert_allclose(item["array"], tone, atol=1e-4)


# ------------------------------------------------------------------------------------------------ drift check
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def calibrated_repos(tiny_repo, tmp_path_factory):
    """The tiny repo calibrated (its fingerprint in config.json) by fp32/bf16/fp16 loads, plus a fused-like copy:
    every backbone weight moved by 0.1% of its tensor's spread, below bf16's resolution for most elements."""
    import shutil

    from training.common import hub_code

    modeling = hub_code.load("modeling_conan")
    root = tmp_path_factory.mktemp("drift")
    repos = {}
    for dtype in DTYPES:
        model = hub_code.ConanModel.from_pretrained(tiny_repo, dtype=dtype)
        repo = root / str(dtype).split(".")[-1]
        shutil.copytree(tiny_repo, repo)
        model.config.projector_calibration_hash = modeling.backbone_fingerprint(model)
        model.config.dtype = torch.float32
        model.config.to_json_file(repo / "config.json")
        repos[dtype] = repo
    fused = hub_code.ConanModel.from_pretrained(repos[torch.float32])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in fused.backbone.named_parameters():
            if param.numel() > 1:
                param.add_(torch.randn(param.shape, generator=g) * 1e-3 * param.std())
    fused.save_pretrained(root / "fused")
    for name in ("processing_conan.py", "media_conan.py", "configuration_conan.py", "modeling_conan.py"):
        shutil.copy(tiny_repo / name, root / "fused" / name)
    repos["fused"] = root / "fused"
    return repos


@pytest.mark.parametrize("calibrated_in", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_drift_verdict_is_the_same_for_every_load_dtype(calibrated_repos, caplog, calibrated_in):
    from training.common import hub_code

    with caplog.at_level("WARNING"):
        verdicts = [hub_code.ConanModel.from_pretrained(calibrated_repos[calibrated_in], dtype=dtype)
                    .check_projector_calibration() for dtype in DTYPES]
    assert verdicts == [True, True, True] and "Projector Drift" not in caplog.text


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_drift_still_detected_after_a_backbone_change(calibrated_repos, caplog, dtype):
    from training.common import hub_code

    with caplog.at_level("WARNING"):
        model = hub_code.ConanModel.from_pretrained(calibrated_repos["fused"], dtype=dtype)
    assert not model.check_projector_calibration() and "Projector Drift" in caplog.text


def test_old_format_records_are_still_read(tiny_repo):
    from training.common import hub_code

    modeling = hub_code.load("modeling_conan")
    model = hub_code.ConanModel.from_pretrained(tiny_repo)
    legacy = modeling._legacy_backbone_fingerprint(model)
    assert len(legacy) == 64 and modeling.backbone_matches(legacy, model)
    assert not modeling.backbone_matches("0" * 64, model)
    record = modeling.backbone_fingerprint(model)
    assert record.startswith("conan-fp2:") and len(record) < 16_000  # stays small enough for config.json


# ------------------------------------------------------------------------------------------------ paths and frames
def test_missing_media_path_is_embedded_as_text_with_a_warning(tiny_model_and_processor, tmp_path, caplog):
    _, processor = tiny_model_and_processor
    missing = str(tmp_path / "holiday" / "photo.jpg")  # a typo'd path: nothing on disk
    with caplog.at_level("WARNING"):
        batch = processor.prepare([missing, "a photo.jpg of a cat"], return_tensors="np")
    assert batch["input_ids"].shape[0] == 2 and "pixel_values" not in batch  # still text, as documented
    assert f"inputs[0] {missing!r} looks like a media file path" in caplog.text
    assert "inputs[1]" not in caplog.text  # text with spaces is plain text


def test_missing_media_path_warning_quotes_it_once_through_sentence_transformers(tiny_st, tmp_path, caplog):
    missing = str(tmp_path / "scan.pdf")
    with caplog.at_level("WARNING"):
        tiny_st.encode([missing])
    assert caplog.text.count(repr(missing)) == 1 and "looks like a media file path" in caplog.text


def test_pathlib_path_input_is_that_file(tiny_model_and_processor, tmp_path):
    from pathlib import Path

    model, processor = tiny_model_and_processor
    path = tmp_path / "red.png"
    IMAGE.save(path)
    torch.testing.assert_close(_embed(model, processor, [path]), _embed(model, processor, [str(path)]))
    with pytest.raises(ValueError, match=r"inputs\[0\]\['image'\]: image file '.*nothing.png' does not exist"):
        processor.prepare([Path(tmp_path / "nothing.png")])
    with pytest.raises(ValueError, match=r"inputs\[0\] is the path '.*notes.txt', which has no image/audio/video/PDF"):
        processor.prepare([tmp_path / "notes.txt"])


def test_video_frames_of_different_sizes_name_the_input_and_frame(tiny_model_and_processor):
    _, processor = tiny_model_and_processor
    frames = [np.zeros((48, 64, 3), np.uint8), np.zeros((48, 64, 3), np.uint8), np.zeros((96, 32, 3), np.uint8)]
    with pytest.raises(ValueError, match=r"inputs\[1\]\['video'\] frame 2 is 32x96 pixels .*frame 0 is 64x48"):
        processor.prepare(["text", {"video": frames}])


def test_pdf_page_may_be_a_numpy_integer(tiny_model_and_processor, tmp_path):
    pdfium = pytest.importorskip("pypdfium2")
    model, processor = tiny_model_and_processor
    document = pdfium.PdfDocument.new()
    for width in (200, 300):
        document.new_page(width, 300)
    document.save(str(tmp_path / "two.pdf"))
    path = str(tmp_path / "two.pdf")
    torch.testing.assert_close(_embed(model, processor, [{"document": path, "page": np.int64(1)}]),
                               _embed(model, processor, [{"document": path, "page": 1}]))


# ------------------------------------------------------------------------------------------------ HF-call audio
def _audio_text(processor) -> list[str]:
    return [f"a clip {processor.audio_start_token or ''}{processor.audio_token}{processor.audio_end_token or ''}"]


def test_hf_call_audio_takes_sampling_rate_like_hf_processors(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.float32)  # 1 s at 8 kHz
    with torch.no_grad():
        as_dict = model(**processor(text=_audio_text(processor), audio=[{"array": tone, "sampling_rate": 8000}]))
        with_kwarg = model(**processor(text=_audio_text(processor), audio=[tone], sampling_rate=8000))
        at_16k = model(**processor(text=_audio_text(processor), audio=[tone]))  # a bare array is 16 kHz by default
        as_list = model(**processor(text=_audio_text(processor), audio=[tone.tolist()]))
    torch.testing.assert_close(with_kwarg.embeddings, as_dict.embeddings)
    torch.testing.assert_close(as_list.embeddings, at_16k.embeddings)
    assert not torch.allclose(at_16k.embeddings, as_dict.embeddings)


@pytest.mark.parametrize("bad, error", [
    (np.zeros((2, 800), np.float32), r"audio\[0\]\['array'\] has shape \(2, 800\); expected a 1-D"),
    (np.full(800, np.nan, np.float32), r"audio\[0\] contains NaN"),
    ({"array": np.zeros(800, np.float32)}, r"audio\[0\] lacks \['sampling_rate'\]"),
])
def test_hf_call_audio_is_validated_like_prepare(tiny_model_and_processor, bad, error):
    _, processor = tiny_model_and_processor
    with pytest.raises(ValueError, match=error):
        processor(text=_audio_text(processor), audio=[bad])


def test_hf_call_images_and_videos_are_validated_like_prepare(tiny_model_and_processor, tmp_path):
    model, processor = tiny_model_and_processor
    image_text = ["a <|vision_start|><|image_pad|><|vision_end|>"]
    video_text = ["a <|vision_start|><|video_pad|><|vision_end|>"]
    IMAGE.save(tmp_path / "photo.png")
    with torch.no_grad():
        from_path = model(**processor(text=image_text, images=[str(tmp_path / "photo.png")])).embeddings
        from_pil = model(**processor(text=image_text, images=[IMAGE])).embeddings
        frames = np.stack([np.asarray(IMAGE)] * 2)
        from_tensor = model(**processor(text=video_text, videos=[torch.from_numpy(frames)])).embeddings
        from_array = model(**processor(text=video_text, videos=[frames])).embeddings
    torch.testing.assert_close(from_path, from_pil)
    torch.testing.assert_close(from_tensor, from_array)
    with pytest.raises(TypeError, match=r"images\[1\] has type ndarray; expected a PIL image or an image path"):
        processor(text=[image_text[0] * 2], images=[IMAGE, np.asarray(IMAGE)])
    with pytest.raises(ValueError, match=r"images\[0\] is a PIL image of mode 'I'"):
        processor(text=image_text, images=[Image.new("I", (30, 30))])
    with pytest.raises(ValueError, match=r"videos\[0\] has shape \(2, 30, 30\); expected \(T, H, W, 3\)"):
        processor(text=video_text, videos=[np.zeros((2, 30, 30), np.uint8)])
