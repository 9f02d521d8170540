"""Balanced rehearsal (stage B): sampler proportions and coverage, the DDP projector guard, selection, resume."""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from safetensors.torch import load_file

from training.rehearsal import rehearse as B
from training.contrastive.sampling import BalancedModalitySampler, modality_of_pair, target_proportions

SIZES = {"photos": 10000, "charts": 2500, "speech": 400, "wiki": 900, "code": 100}
GROUPS = {"photos": "image", "charts": "image", "speech": "audio", "wiki": "text", "code": "text"}


def _sources() -> dict[str, list[int]]:
    out, offset = {}, 0
    for name, n in SIZES.items():
        out[name] = list(range(offset, offset + n))
        offset += n
    return out


def test_target_proportions_equal_per_group_sqrt_inside():
    p = target_proportions(SIZES, GROUPS)
    assert p["speech"] == pytest.approx(1 / 3)
    assert p["photos"] == pytest.approx(1 / 3 * 100 / 150) and p["charts"] == pytest.approx(1 / 3 * 50 / 150)
    assert p["wiki"] == pytest.approx(1 / 3 * 30 / 40) and p["code"] == pytest.approx(1 / 3 * 10 / 40)
    with pytest.raises(ValueError, match="no modality group"):
        target_proportions(SIZES, {"photos": "image"})


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_sampler_hits_target_proportions_within_2_percent(world_size):
    sampler = BalancedModalitySampler(_sources(), GROUPS, batch_size=4, world_size=world_size, seed=3)
    counts = collections.Counter()
    steps = 10_000 // world_size
    for step in range(steps):
        counts.update(sampler.names[s] for s in sampler.sources_at(step))
    total = steps * world_size
    for name, target in sampler.mixture.items():
        assert abs(counts[name] / total - target) <= 0.02, (name, counts[name] / total, target)


def test_every_step_covers_every_group_when_world_size_allows():
    sampler = BalancedModalitySampler(_sources(), GROUPS, batch_size=4, world_size=3, seed=0)
    for step in range(300):
        assert sorted(sampler.groups_at(step)) == ["audio", "image", "text"]
    single = BalancedModalitySampler(_sources(), GROUPS, batch_size=4, world_size=1, seed=0)
    for start in range(0, 300, 3):  # W=1: a shuffled round-robin, all groups in every 3 consecutive steps
        assert sorted(g for s in range(start, start + 3) for g in single.groups_at(s)) == ["audio", "image", "text"]


def test_micro_batches_are_single_source_and_ranks_never_share_rows():
    sources = _sources()
    owner = {i: name for name, rows in sources.items() for i in rows}
    ranks = [BalancedModalitySampler(sources, GROUPS, batch_size=4, rank=r, world_size=2, seed=1, max_steps=50)
             for r in range(2)]
    for batches in zip(*(list(s) for s in ranks)):
        assert all(len({owner[i] for i in b}) == 1 for b in batches)
        assert not set(batches[0]) & set(batches[1])
    resumed = BalancedModalitySampler(sources, GROUPS, batch_size=4, rank=1, world_size=2, seed=1, max_steps=50)
    resumed.load_state_dict({"step": 20, "seed": 1, "names": resumed.names, "groups": resumed.groups})
    assert list(resumed) == list(ranks[1])[20:]


def test_pair_modality():
    assert modality_of_pair({"audio": "a.wav"}, {"text": "x"}) == "audio"
    assert modality_of_pair({"text": "q"}, {"image": "p.png", "text": "t"}) == "image"
    assert modality_of_pair("q", {"text": "t"}) == "text"


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def rehearsal_data(tmp_path_factory) -> Path:
    """Tiny synthetic sources of three groups (labelled synthetic): colour images, tones, word definitions."""
    root = tmp_path_factory.mktemp("rehearse_data")
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    rows = {"colours": [], "tones": [], "words": []}
    for c in colours:
        Image.new("RGB", (56, 56), c).save(root / f"{c}.png")
        rows["colours"].append({"query": {"image": f"{c}.png"}, "positive": {"text": f"a plain {c} picture"},
                                "source": "colours"})
    for f in (220, 330, 440, 550, 660, 880):
        t = np.arange(int(0.3 * 16000)) / 16000
        sf.write(root / f"tone_{f}.wav", (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32), 16000)
        rows["tones"].append({"query": {"audio": f"tone_{f}.wav"}, "positive": {"text": f"a tone of {f} hertz"},
                              "source": "tones"})
    for w, d in [("cat", "a small feline"), ("dog", "a loyal canine"), ("sun", "the star of our system"),
                 ("sea", "a large body of salt water"), ("tree", "a tall woody plant"), ("rain", "water falling")]:
        rows["words"].append({"query": {"text": w}, "positive": {"text": d}, "source": "words"})
    for name, items in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
        (root / f"{name}_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items[:2]))
    return root


def _config(tiny_repo: Path, data: Path, out: Path) -> B.RehearsalConfig:
    return B.load_config(None, raw={
        "model": str(tiny_repo), "output": str(out), "seed": 0,
        "data": {"train": [str(data / f"{n}.jsonl") for n in ("colours", "tones", "words")],
                 "dev": {"image": str(data / "colours_dev.jsonl"), "audio": str(data / "tones_dev.jsonl"),
                         "text": str(data / "words_dev.jsonl")}},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "loss": {"temperature": 0.05, "symmetric": True},
        "train": {"per_device_batch_size": 3, "chunk_size": 0, "max_steps": 4, "lr": 1e-3, "save_every": 1,
                  "log_every": 1, "mixed_precision": "no"},
        "eval_every": 2, "specialists": {"audio": str(tiny_repo)}, "specialist_scores": {"image": 0.5, "text": 0.5},
    })


def test_rehearsal_resume_selection_and_output(tiny_repo, rehearsal_data, tmp_path):
    straight = B.rehearse(_config(tiny_repo, rehearsal_data, tmp_path / "straight"))
    assert straight["groups"] == {"colours": "image", "tones": "audio", "words": "text"}
    assert straight["config"]["train"]["lr_projector"] == pytest.approx(1e-4)  # 0.1 x the LoRA LR
    evals = straight["selection"]["evals"]
    assert set(evals) == {"0", "2", "4"}
    refs = straight["selection"]["references"]
    assert refs["origin"] == {"image": "given", "text": "given", "audio": str(tiny_repo)}
    best = straight["selection"]["best"]
    assert best["worst_retention"] == max(evals[s]["worst_retention"] for s in ("2", "4"))
    chance = straight["selection"]["chance"]
    assert {g: c["mean"] for g, c in chance.items()} == {"image": 0.5, "audio": 0.5, "text": 0.5}  # 2 positives
    judged = straight["selection"]["groups"]
    assert judged == B.selection_groups(refs["scores"], chance, "learned")
    for e in evals.values():
        assert e["worst_retention"] == min(e["retention"][g] for g in judged)
    assert straight["selected_step"] == best["step"]

    cfg = _config(tiny_repo, rehearsal_data, tmp_path / "resumed")
    partial = B.rehearse(cfg, stop_after=3)  # killed between two evaluations
    assert partial["output"] is None and partial["steps"] == 3
    resumed = B.rehearse(cfg)
    assert resumed["steps"] == 4 and resumed["selection"]["evals"].keys() == evals.keys()
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key

    base = load_file(tiny_repo / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], a[k])}
    assert any(k.startswith("backbone.language_model.layers.") for k in changed)
    assert not any(k.startswith(("audio_encoder.", "backbone.visual.")) for k in changed), "frozen towers moved"
    record = json.loads((tmp_path / "straight" / "projector_calibration.json").read_text())
    assert json.loads((tmp_path / "straight" / "config.json").read_text())["projector_calibration_hash"] == \
        record["backbone_fingerprint"]


def test_dummy_pass_gives_the_projector_a_gradient_on_text_only_batches(tiny_repo):
    """The DDP guard: a text-only micro-batch still touches every trainable projector parameter (with 0)."""
    from training.contrastive.trainer import apply_lora, zero_touch
    from training.common import hub_code

    model = apply_lora(hub_code.ConanModel.from_pretrained(tiny_repo, dtype=torch.float32), 4, 8, 0.0,
                       train_audio_projector=True)
    processor = hub_code.ConanProcessor.from_pretrained(tiny_repo, trust_remote_code=True)
    projector = [p for n, p in model.named_parameters() if p.requires_grad and "audio_projector" in n]
    assert projector
    loss = model(**processor.prepare(["only text here", "and more text"])).embeddings.sum()
    (loss + zero_touch(projector)()).backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in projector)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown modality group"):
        B.load_config(None, raw={"model": "m", "output": "o", "data": {"train": ["x"], "dev": {"speech": "d"}}})
    with pytest.raises(ValueError, match="missing required key 'data'"):
        B.load_config(None, raw={"model": "m", "output": "o"})
    with pytest.raises(ValueError, match="selection_metric must be one of"):
        B.load_config(None, raw={"model": "m", "output": "o", "data": {"train": ["x"]}, "selection_metric": "ndcg"})
    with pytest.raises(ValueError, match="selection_groups must be one of"):
        B.load_config(None, raw={"model": "m", "output": "o", "data": {"train": ["x"]}, "selection_groups": "best"})


def test_dev_scores_follow_the_selection_metric(tiny_repo, rehearsal_data, tmp_path):
    from training.common import hub_code

    cfg = _config(tiny_repo, rehearsal_data, tmp_path / "unused")
    model = hub_code.ConanModel.from_pretrained(tiny_repo, dtype=torch.float32)
    processor = hub_code.ConanProcessor.from_pretrained(tiny_repo)
    r1 = B.dev_scores(model, processor, cfg)
    mrr = B.dev_scores(model, processor, dataclasses.replace(cfg, selection_metric="mrr"))
    assert r1.keys() == mrr.keys() == {"image", "audio", "text"}
    for group in r1:  # 2 dev pairs a group: R@1 in {0, .5, 1}, MRR in [.5, 1] and never below R@1
        assert 0.5 <= mrr[group] <= 1.0 and mrr[group] >= r1[group]
    assert mrr != r1, "an untrained model ranks some dev positive second: MRR and R@1 must differ somewhere"


def test_shipped_rehearsal_configs_parse():
    from training.common import hub_code

    for path in sorted((hub_code.REPO_ROOT / "training" / "configs").glob("rehearse_*.yaml")):
        cfg = B.load_config(path)
        assert cfg.train.lr_projector == pytest.approx(cfg.projector_lr_scale * cfg.train.lr), path
        assert set(cfg.data.dev) <= set(cfg.specialists) | set(cfg.specialist_scores), path


def test_rehearsal_with_the_omni_objective_mixes_tuple_and_pair_batches(tiny_repo, rehearsal_data, omni_tuple_file,
                                                                        tmp_path):
    """`loss.objective: omni_retriever` in rehearsal: tuple batches get the omni step, pair batches keep info_nce."""
    cfg = B.load_config(None, raw={
        "model": str(tiny_repo), "output": str(tmp_path / "omni"), "seed": 0,
        "data": {"train": [str(omni_tuple_file), str(rehearsal_data / "words.jsonl")], "check_media": False},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "loss": {"objective": "omni_retriever", "weights": [1.0, 1.0, 1.0], "temperature": 0.05},
        "train": {"per_device_batch_size": 3, "chunk_size": 0, "max_steps": 4, "lr": 1e-3, "log_every": 1,
                  "mixed_precision": "no"},
    })
    report = B.rehearse(cfg, stop_after=4)
    history = report["history"]
    assert len(history) == 4 and all(np.isfinite(h["loss"]) for h in history)
    omni_steps = [h for h in history if "loss_tuple_nce" in h]
    assert 0 < len(omni_steps) < 4  # both kinds of batch were drawn (2 groups: audio tuples, text pairs)
    assert all(h["loss"] == pytest.approx(h["loss_total"]) for h in omni_steps)


def test_frozen_tower_caches_leave_rehearsal_unchanged(tiny_repo, rehearsal_data, tmp_path):
    """Cached Whisper frames and vision tokens (the pipeline's setting) train what the plain towers train."""
    runs = {}
    for name, audio_cache, visual in (("plain", None, False), ("cached", tmp_path / "audio-cache", True)):
        cfg = _config(tiny_repo, rehearsal_data, tmp_path / name)
        cfg.audio_cache_dir, cfg.visual_token_cache, cfg.data.dev = audio_cache and str(audio_cache), visual, {}
        runs[name] = B.rehearse(cfg)
    cached_clips = len(list((tmp_path / "audio-cache").glob("*/*.pt")))  # one file per distinct clip the steps drew
    assert 0 < cached_clips <= 6
    plain, cached = ([h["loss"] for h in runs[n]["history"]] for n in ("plain", "cached"))
    assert len(plain) == 4
    np.testing.assert_allclose(cached, plain, rtol=1e-5, atol=1e-5)
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "cached" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_resume_refuses_a_different_selection_metric(tiny_repo, rehearsal_data, tmp_path):
    cfg = _config(tiny_repo, rehearsal_data, tmp_path / "run")
    assert B.rehearse(cfg, stop_after=1)["output"] is None  # the step-0 retentions are saved, scored by R@1
    with pytest.raises(ValueError, match="scored by 'r@1' over 'learned' groups, but this run asks for 'mrr'"):
        B.rehearse(dataclasses.replace(cfg, selection_metric="mrr"))
    with pytest.raises(ValueError, match="over 'learned' groups, but this run asks for 'r@1' over 'all'"):
        B.rehearse(dataclasses.replace(cfg, selection_groups="all"))


def test_selection_leaves_out_groups_whose_specialist_is_at_chance():
    refs = {"image": 0.30, "document": 0.09, "audio": 0.45}
    chance = {g: {"mean": 0.062, "bound": 0.091} for g in refs}   # document: above the mean, within noise
    assert B.selection_groups(refs, chance, "learned") == ["audio", "image"]
    assert B.selection_groups(refs, chance, "all") == ["audio", "document", "image"]
    assert B.selection_groups({"image": 0.05}, {"image": {"mean": 0.08, "bound": 0.1}}, "learned") == ["image"]
    with pytest.raises(ValueError, match="selection_groups must be one of"):
        B.selection_groups(refs, chance, "best")


def test_dev_chance_is_a_random_rankings_score_and_its_noise(rehearsal_data, tmp_path):
    cfg = B.load_config(None, raw={"model": "m", "output": str(tmp_path / "o"),
                                   "data": {"train": ["x"], "dev": {"text": str(rehearsal_data / "words.jsonl")}}})
    r1 = B.dev_chance(cfg)["text"]   # 6 queries, 6 positives
    assert r1["mean"] == pytest.approx(1 / 6)
    assert r1["bound"] == pytest.approx(1 / 6 + 2 * np.sqrt(1 / 6 * 5 / 6 / 6))
    mrr = B.dev_chance(dataclasses.replace(cfg, selection_metric="mrr"))["text"]
    reciprocal = 1 / np.arange(1, 7)   # each rank of 6 equally likely
    assert mrr["mean"] == pytest.approx(reciprocal.mean())
    assert mrr["bound"] == pytest.approx(reciprocal.mean() + 2 * reciprocal.std() / np.sqrt(6))


def test_reference_scores_are_the_same_with_the_frozen_tower_caches(tiny_repo, rehearsal_data, tmp_path):
    """The specialists rehearsal scores on dev get the caches too (the pipeline's setting): same references."""
    from training.common import hub_code, visual_cache

    processor = hub_code.ConanProcessor.from_pretrained(tiny_repo)
    visual_cache._STORES.clear()
    refs = {}
    for name, audio_cache, visual in (("plain", None, False), ("cached", tmp_path / "audio-cache", True)):
        cfg = _config(tiny_repo, rehearsal_data, tmp_path / name)
        cfg.specialists, cfg.specialist_scores = {"audio": str(tiny_repo), "image": str(tiny_repo)}, {}
        cfg.audio_cache_dir, cfg.visual_token_cache = audio_cache and str(audio_cache), visual
        refs[name] = B.reference_scores(cfg, {"text": 0.25}, processor)
    assert refs["cached"]["origin"] == refs["plain"]["origin"] == {"image": str(tiny_repo), "audio": str(tiny_repo),
                                                                   "text": "start (no specialist given)"}
    assert refs["cached"]["scores"] == pytest.approx(refs["plain"]["scores"], abs=1e-6)
    assert list((tmp_path / "audio-cache").glob("*/*.pt")), "the audio specialist's dev clips were not cached"
    assert sum(map(len, visual_cache._STORES.values())) > 0, "the image specialist's dev images were not cached"
