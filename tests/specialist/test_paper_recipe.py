"""The paper's combination (Qwen3-VL backbone + Qwen3-Omni audio encoder, tiny) through decouple -> fuse -> recover:
specialists with LoRA on every linear layer of the LLM / vision encoder / audio encoder / projector merged to dense,
task arithmetic with audio-only keys copied, the Projector Drift check, recovery touching only the projector, and the
mteb encoder. Also: the shipped real-scale configs of the paper's recipe parse with the paper's numbers."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, shared_path

CONFIGS = REPO_ROOT / "training" / "configs"
PAPER_SCALES = ("qwen3vl-8b", "qwen3vl-2b")


@pytest.mark.parametrize("scale", PAPER_SCALES)
def test_paper_recipe_configs_carry_the_papers_numbers(scale):
    from training.recovery import config as recover
    from training.rehearsal import rehearse
    from training.specialist import decouple as specialist
    from training.fusion.config import load_config as fusion_config

    for modality in ("image", "video", "document", "audio"):
        cfg = specialist.load_config(CONFIGS / f"specialist_{scale}_{modality}.yaml")
        assert cfg.loss["temperature"] == 0.02 and {"llm", "vision"} <= set(cfg.lora.scopes)
    audio = specialist.load_config(CONFIGS / f"specialist_{scale}_audio.yaml")
    assert set(audio.lora.scopes) == {"llm", "vision", "audio_encoder", "projector"}
    fusion = fusion_config(CONFIGS / "fusion" / f"paper_{scale}.yaml")
    assert fusion.method == "task_arithmetic" and fusion.lambda_ == 1.0
    assert {m.name: m.weight for m in fusion.models} == {"image": 0.3, "video": 0.3, "document": 0.3, "audio": 0.5}
    assert {r"^audio_projector\.", r"^audio_encoder\."} <= set(fusion.owner_copy)
    rec = recover.load_config(CONFIGS / f"recover_{scale}.yaml", {"model": "runs/fused"})
    assert rec.temperature == 0.02 and rec.symmetric
    reh = rehearse.load_config(CONFIGS / f"rehearse_{scale}.yaml")
    assert reh.train.lr == 1e-5 and reh.train.max_steps == 2000 and set(reh.lora.scopes) == {"llm", "vision"}
    text = (CONFIGS / f"specialist_{scale}_audio.yaml").read_text()
    assert "Qwen/Qwen3-Omni-30B-A3B-Instruct" in text and "(paper)" in text and "(ours)" in text


@pytest.fixture(scope="module")
def paper_base(tmp_path_factory) -> Path:
    from training.base.build_base import build_tiny_repo

    return build_tiny_repo(tmp_path_factory.mktemp("paper") / "base", backbone_family="qwen3_vl",
                           audio_family="qwen3_omni")


def test_lora_scopes_cover_every_linear_layer_and_merge_to_dense(paper_base):
    from training.common import hub_code
    from training.contrastive.trainer import apply_lora

    model = hub_code.ConanModel.from_pretrained(paper_base, dtype=torch.float32)
    keys = set(model.state_dict())
    peft_model = apply_lora(model, 2, 4, 0.0, scopes=["llm", "vision", "audio_encoder", "projector"])
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
    for prefix in ("backbone.language_model.layers.", "backbone.visual.blocks.", "backbone.visual.merger.",
                   "backbone.visual.deepstack_merger_list.", "audio_encoder.layers.", "audio_encoder.proj2",
                   "audio_projector.fc1"):
        assert any(prefix in name for name in wrapped), prefix
    assert set(peft_model.merge_and_unload().state_dict()) == keys
    with pytest.raises(ValueError, match="scopes.*unknown"):
        apply_lora(hub_code.ConanModel.from_pretrained(paper_base), 2, 4, 0.0, scopes=["llm", "talker"])


@pytest.fixture(scope="module")
def chain(paper_base, tmp_path_factory) -> dict[str, Path]:
    """Audio specialist (paper LoRA scopes) + a text specialist, fused by task arithmetic, then recovered."""
    shared_path("data", "fsdd", "recordings")
    from training.recovery import recover as R
    from training.recovery.config import RecoverConfig
    from training.specialist import decouple as specialist
    from training.fusion import FusionConfig, ModelSpec, fuse
    from training.data_sources.toy_data import fsdd_rows, text_rows, write_fsdd_pairs

    root = tmp_path_factory.mktemp("chain")
    (root / "audio.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fsdd_rows(root, "train", limit=16)))
    (root / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text_rows("train")[:32]))
    train = {"per_device_batch_size": 4, "chunk_size": 0, "max_steps": 2, "lr": 1e-2, "warmup_steps": 0,
             "log_every": 1}
    out = {}
    for name, modality, scopes, data in (
        ("audio", "audio", ["llm", "vision", "audio_encoder", "projector"], "audio.jsonl"),
        ("text", "text", ["llm", "vision"], "text.jsonl"),
    ):
        cfg = {"name": name, "modality": modality, "base": str(paper_base), "output": str(root / name), "seed": 0,
               "train_audio_projector": False, "data": {"train": [str(root / data)], "check_media": False},
               "lora": {"r": 2, "alpha": 4, "dropout": 0.0, "scopes": scopes},
               "loss": {"temperature": 0.02, "symmetric": True}, "train": train}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        specialist.train(specialist.load_config(root / f"{name}.yaml"), resume="never")
        out[name] = root / name
    fuse(FusionConfig(
        base=paper_base, output=root / "fused", method="task_arithmetic", lambda_=1.0,
        models=[ModelSpec(out["text"], name="text", weight=0.3), ModelSpec(out["audio"], name="audio", weight=0.5)],
        owner_copy=[r"^audio_projector\.", r"^audio_encoder\."], needs_recovery=[r"^audio_projector\."],
        memory_limit_gb=1, workers=1,
    ))
    out["fused"] = root / "fused"
    write_fsdd_pairs(shared_path("data", "fsdd", "recordings"), root / "pairs.jsonl", "train", takes=[10],
                       speakers=["george"])
    R.recover(RecoverConfig(model=str(out["fused"]), output=str(root / "recovered"),
                              train_data=str(root / "pairs.jsonl"), max_steps=3, batch_size=4, lr=1e-3,
                              eval_every=3, checkpoint_every=3, cpu=True, progress=False, seed=0))
    out["recovered"] = root / "recovered"
    return out


def test_specialists_merge_to_dense_and_fusion_copies_audio_only_keys(paper_base, chain):
    base = load_file(paper_base / "model.safetensors")
    audio, text, fused = (load_file(chain[n] / "model.safetensors") for n in ("audio", "text", "fused"))
    assert set(audio) == set(base) == set(fused)
    moved = {k.split(".")[0] for k in load_file(chain["audio"] / "task_vector.safetensors")}
    assert {"audio_encoder", "audio_projector", "backbone"} <= moved
    for key in base:
        if key.startswith(("audio_encoder.", "audio_projector.")):
            assert torch.equal(fused[key].float(), audio[key].float()), key  # copied, not scaled by 0.5
    key = "backbone.language_model.layers.0.self_attn.q_proj.weight"
    expected = base[key].float() + 0.3 * (text[key].float() - base[key].float()) + 0.5 * (
        audio[key].float() - base[key].float())
    assert torch.allclose(fused[key].float(), expected, atol=1e-2)  # bf16 specialists


def test_drift_is_detected_and_recovery_touches_only_the_projector(chain, caplog):
    from training.common import hub_code

    with caplog.at_level(logging.WARNING):
        hub_code.ConanModel.from_pretrained(chain["fused"])
    assert any("Projector Drift" in r.message for r in caplog.records)
    fused, recovered = load_file(chain["fused"] / "model.safetensors"), load_file(chain["recovered"] / "model.safetensors")
    changed = {k for k in fused if not torch.equal(fused[k], recovered[k])}
    assert changed and all(k.startswith("audio_projector.") for k in changed)


def test_mteb_encoder_runs_on_the_paper_model(chain):
    mteb = pytest.importorskip("mteb")
    from mteb.mocks.mock_tasks.retrieval import MockRetrievalTask

    from training.evaluation.embedder import SentenceTransformerEmbedder
    from training.evaluation.mteb_encoder import ConanMtebEncoder

    encoder = ConanMtebEncoder(SentenceTransformerEmbedder(chain["recovered"], device="cpu"))
    score = mteb.evaluate(encoder, MockRetrievalTask(), cache=None, show_progress_bar=False).task_results[0].get_score()
    assert 0.0 <= score <= 1.0 and not math.isnan(score)
