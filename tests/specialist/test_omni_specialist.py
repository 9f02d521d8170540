"""The specialist trainer with `loss.objective: omni_retriever` on (text, video, audio) tuples: finite loss, exact
resume (step 3 from the step-2 checkpoint equals the uninterrupted run), GradCache = plain gradient, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from training.common.config import ConfigError
from training.contrastive.data import ContrastiveBatch, load_jsonl
from training.contrastive.omni_objectives import BASELINE_WEIGHTS, OmniWeights
from training.contrastive.omni_training import OmniBatch, OmniTupleCollator, omni_train_step
from training.contrastive.trainer import collator_for, loss_settings_from
from training.specialist import decouple as specialist

def _config(tmp_path: Path, tiny_repo: Path, data: Path, name: str, loss: dict, **train) -> Path:
    cfg = {
        "name": name, "modality": "video", "base": str(tiny_repo), "output": str(tmp_path / name), "seed": 3,
        "train_audio_projector": True, "data": {"train": [str(data)], "check_media": False},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "v_proj"]},
        "loss": loss,
        "train": {"per_device_batch_size": 4, "chunk_size": 2, "max_steps": 3, "lr": 1e-3, "log_every": 1,
                  "save_every": 2, **train},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


OMNI = {"objective": "omni_retriever", "weights": [1.0, 1.0, 1.0], "temperature": 0.05}


def test_omni_objective_trains_and_resumes_exactly(tiny_repo, omni_tuple_file, tmp_path):
    straight = specialist.load_config(_config(tmp_path, tiny_repo, omni_tuple_file, "straight", OMNI))
    full = specialist.train(straight, resume="never")
    losses = [h["loss"] for h in full["history"]]
    assert full["steps"] == 3 and len(losses) == 3 and all(np.isfinite(losses))
    assert all({"loss_tuple_nce", "loss_teacher", "loss_pair"} <= set(h) for h in full["history"])
    assert len({round(h["loss_pair"], 6) for h in full["history"]}) == 3  # a different pair each step

    broken = specialist.load_config(_config(tmp_path, tiny_repo, omni_tuple_file, "broken", OMNI))
    first = specialist.train(broken, resume="never", stop_after=2)
    assert first["output"] is None and first["steps"] == 2
    second = specialist.train(broken, resume="auto")
    assert second["steps"] == 3
    assert [h["loss"] for h in first["history"] + second["history"]] == losses


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("weights", [OmniWeights(), BASELINE_WEIGHTS], ids=["omni", "baseline"])
def test_gradcache_omni_step_matches_plain_step(tiny_model_and_processor, omni_tuple_file, weights):
    model, processor = tiny_model_and_processor
    examples = load_jsonl(omni_tuple_file, check_media=False)[:4]
    encode = lambda chunk: model(**chunk).embeddings  # noqa: E731
    results = {}
    for gradcache in (False, True):
        batch = OmniTupleCollator(processor, chunk_size=2 if gradcache else 0)(examples)
        model.zero_grad(set_to_none=True)
        out = omni_train_step(encode, batch, step=1, weights=weights, temperature=0.05, seed=0, gradcache=gradcache)
        results[gradcache] = (out, _grads(model))
    (plain, g0), (cached, g1) = results[False], results[True]
    assert torch.allclose(plain.value, cached.value, atol=1e-5)
    assert g0 and g0.keys() == g1.keys()
    assert all(torch.allclose(g0[k], g1[k], atol=1e-5, rtol=1e-4) for k in g0)
    assert set(plain.parts) == ({"pair", "total"} if weights == BASELINE_WEIGHTS else
                                {"tuple_nce", "teacher", "pair", "total"})


def test_pair_rows_are_refused_or_left_to_info_nce(tiny_model_and_processor, omni_tuple_file, tmp_path):
    _, processor = tiny_model_and_processor
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"query": "a text", "positive": "another text", "source": "s"}) + "\n")
    pairs = load_jsonl(path, check_media=False)
    with pytest.raises(ValueError, match="tuple rows"):
        OmniTupleCollator(processor)(pairs)  # the specialist: a pair file under the omni objective is an error
    omni = loss_settings_from({"objective": "omni_retriever"})
    mixed = collator_for(omni, processor, pair_batches=True)  # rehearsal: pair sources keep info_nce
    assert isinstance(mixed(pairs), ContrastiveBatch)
    assert isinstance(mixed(load_jsonl(omni_tuple_file, check_media=False)[:2]), OmniBatch)
    with pytest.raises(ValueError, match="tuple rows"):  # one batch mixing both is an error
        mixed(pairs + load_jsonl(omni_tuple_file, check_media=False)[:1])


def test_loss_config_is_checked():
    assert loss_settings_from({}).objective == "info_nce"
    omni = loss_settings_from({"objective": "omni_retriever"}, seed=5)
    assert omni.weights == OmniWeights() and omni.temperature == 0.01 and omni.seed == 5
    assert loss_settings_from({"objective": "omni_retriever", "weights": [0, 0, 1]}).weights == BASELINE_WEIGHTS
    for bad, match in [({"objective": "triplet"}, "objective"), ({"objective": "omni_retriever", "weights": [1, 1]},
                       "weights"), ({"objective": "omni_retriever", "weights": [0, 0, 0]}, "weights"),
                       ({"objective": "omni_retriever", "num_negatives": 2}, "num_negatives"),
                       ({"weights": [1, 1, 1]}, "omni_retriever only"), ({"temp": 1}, "unknown")]:
        with pytest.raises(ConfigError, match=match):
            loss_settings_from(bad)
