"""Projector Recovery (stage R): only the projector changes, text/image embeddings stay bit-identical, resume works."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.conftest import shared_path
from training.common.calibration import full_hash
from training.common.config import ConfigError
from training.common.repo import load_conan
from training.contrastive.loop import checkpoint_dirs
from training.data_sources.toy_data import DIGITS, write_fsdd_pairs
from training.recovery import recover as R


def make_fused(src: Path, dst: Path, scale: float = 0.5, seed: int = 1) -> Path:
    """A stand-in for a fused model: the tiny repo with its LLM layers perturbed and a fusion manifest."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for key, value in weights.items():
        if key.startswith("backbone.language_model.layers."):
            weights[key] = value + scale * value.std() * torch.randn(value.shape, generator=gen)
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    flagged = sorted(k for k in weights if k.startswith("audio_projector."))
    manifest = {"format": "conan-fusion-manifest/1", "summary": {"needs_recovery": flagged},
                "tensors": {k: {"policy": "copy_owner", "needs_recovery": k in flagged} for k in weights}}
    (dst / "fusion_manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.fixture(scope="module")
def fused_repo(tiny_repo, tmp_path_factory) -> Path:
    return make_fused(tiny_repo, tmp_path_factory.mktemp("fused") / "fused")


@pytest.fixture(scope="module")
def fsdd_data(tmp_path_factory) -> dict[str, Path]:
    """Real FSDD speech: 20 train clips, 10 dev clips; the Whisper frames are cached once for the module."""
    recordings = shared_path("data", "fsdd", "recordings")
    root = tmp_path_factory.mktemp("fsdd")
    write_fsdd_pairs(recordings, root / "train.jsonl", "train", takes=[10], speakers=["george", "jackson"])
    write_fsdd_pairs(recordings, root / "dev.jsonl", "dev", takes=[5], speakers=["george"])
    return {"train": root / "train.jsonl", "dev": root / "dev.jsonl", "features": root / "features"}


def _cfg(fused_repo: Path, data: dict[str, Path], out: Path, **kw) -> R.RecoverConfig:
    base = dict(model=str(fused_repo), output=str(out), train_data=str(data["train"]), max_steps=6, batch_size=8,
                lr=1e-3, eval_every=3, checkpoint_every=2, cpu=True, progress=False, seed=0,
                feature_cache_dir=str(data["features"]))
    base.update(kw)
    return R.RecoverConfig(**base)


def test_fsdd_pairs_follow_the_split_rule(fsdd_data):
    rows = [json.loads(line) for line in fsdd_data["train"].read_text().splitlines()]
    assert len(rows) == 20
    assert all(Path(r["query"]["audio"]).stem.endswith("_10") for r in rows)
    assert {r["positive"]["text"] for r in rows} == {f"the spoken digit {w}" for w in DIGITS}


@pytest.fixture(scope="module")
def recovered(fused_repo, fsdd_data, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted 6-step recovery (no dev split, so the last step is kept), shared by several tests."""
    out = tmp_path_factory.mktemp("recovered") / "straight"
    return out, R.recover(_cfg(fused_repo, fsdd_data, out))


def test_recovery_changes_only_the_projector(fused_repo, recovered):
    out, report = recovered
    assert report["trainable"] == ["audio_projector.fc1.bias", "audio_projector.fc1.weight",
                                   "audio_projector.fc2.bias", "audio_projector.fc2.weight"]
    before, after = load_file(fused_repo / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after)
    changed = []
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        if key.startswith("audio_projector."):
            changed.append(not torch.equal(before[key], after[key]))
        else:
            assert torch.equal(before[key], after[key]), f"{key} changed during Projector Recovery"
    assert all(changed), "every projector tensor should have been trained"
    record = json.loads((out / R.CALIBRATION_FILE).read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["projector_calibration_hash"] == record["backbone_fingerprint"]
    model, _ = load_conan(out)
    assert R.backbone_fingerprint(model) == record["backbone_fingerprint"]
    assert full_hash(model) == record["backbone_sha256"]
    assert not Path(f"{out}.recover-ckpt").exists(), "the resume checkpoint is removed after success"
    assert (out / "fusion_manifest.json").is_file()
    assert report["steps"] == 6 and report["history"][0]["loss"] > 0


def test_text_and_image_embeddings_identical_after_recovery(fused_repo, recovered):
    out, _ = recovered
    inputs = ["a red square", Image.new("RGB", (56, 56), "red"), {"image": Image.new("RGB", (56, 84), "blue"),
                                                                   "text": "what colour?"}]
    audio = {"audio": {"array": torch.randn(8000).numpy(), "sampling_rate": 16000}}
    embeddings = {}
    for name, path in (("fused", fused_repo), ("recovered", out)):
        model, processor = load_conan(path)
        with torch.no_grad():
            embeddings[name] = model(**processor.prepare(inputs)).embeddings
            embeddings[name + "_audio"] = model(**processor.prepare([audio])).embeddings
    assert torch.equal(embeddings["fused"], embeddings["recovered"])
    assert not torch.allclose(embeddings["fused_audio"], embeddings["recovered_audio"])


class _Killed(RuntimeError):
    pass


def test_resume_after_a_kill_matches_an_uninterrupted_run(fused_repo, fsdd_data, recovered, tmp_path):
    straight_dir, straight = recovered

    def kill_at_4(step, logs):
        if step == 4:
            raise _Killed()

    cfg = _cfg(fused_repo, fsdd_data, tmp_path / "resumed")
    with pytest.raises(_Killed):
        R.recover(cfg, on_step=kill_at_4)
    assert not (tmp_path / "resumed").exists(), "a killed run leaves no output folder"
    kept = checkpoint_dirs(tmp_path / "resumed.recover-ckpt")
    assert [p.name for p in kept] == ["step_00000004"] and (kept[0] / "state.safetensors").is_file()
    resumed = R.recover(cfg)
    assert resumed["steps_this_run"] == 2 and resumed["steps"] == 6
    a, b = load_file(straight_dir / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [h["loss"] for h in straight["history"]] == [h["loss"] for h in resumed["history"]]


def test_resume_with_dev_selection_matches_and_refuses_another_backbone(fused_repo, fsdd_data, tmp_path):
    """The shared loop's checkpoint carries the dev-best projector, the warm-up position and the patience counter."""
    kw = dict(dev_data=str(fsdd_data["dev"]), eval_every=2, checkpoint_every=2, warmup_ratio=0.5, max_steps=6,
              keep_checkpoint=True)
    straight = R.recover(_cfg(fused_repo, fsdd_data, tmp_path / "straight", **kw))
    lrs = [h["lr"] for h in straight["history"] if "lr" in h]
    assert lrs[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])  # linear warm-up from lr 0 over 3 steps, then cosine
    assert lrs[3] < 1e-3

    def kill_at_3(step, logs):
        if step == 3:
            raise _Killed()

    cfg = _cfg(fused_repo, fsdd_data, tmp_path / "resumed", **kw)
    with pytest.raises(_Killed):
        R.recover(cfg, on_step=kill_at_3)
    resumed = R.recover(cfg)
    assert resumed["steps_this_run"] == 4  # from the step-2 checkpoint
    for key in ("history", "best_step", "best_dev", "initial_dev", "stopped_early"):
        assert resumed[key] == straight[key], key
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    other = make_fused(fused_repo, tmp_path / "other", seed=2)
    shutil.rmtree(tmp_path / "resumed")
    with pytest.raises(R.RecoverError, match="different backbone"):
        R.recover(_cfg(other, fsdd_data, tmp_path / "resumed", **kw))


def test_early_stopping_without_dev_improvement(fused_repo, fsdd_data, tmp_path):
    report = R.recover(_cfg(fused_repo, fsdd_data, tmp_path / "out", dev_data=str(fsdd_data["dev"]), lr=0.0,
                            max_steps=20, eval_every=1, patience=2))
    assert report["stopped_early"] and report["steps"] == 2
    assert report["best_step"] == 0 and report["initial_dev"]["n"] == 10


def test_relational_distillation_runs_against_the_specialist(tiny_repo, fused_repo, fsdd_data, tmp_path):
    report = R.recover(_cfg(fused_repo, fsdd_data, tmp_path / "out", specialist=str(tiny_repo), kd_weight=1.0,
                            max_steps=2))
    assert all("loss_kd" in h and h["loss_kd"] >= 0 for h in report["history"])


def test_manifest_decides_what_trains(fused_repo, tiny_repo, tmp_path):
    model, _ = load_conan(fused_repo)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "fusion_manifest.json").write_text(json.dumps({"summary": {"needs_recovery": ["backbone.visual.merger.mlp.0.weight"]}}))
    with pytest.raises(R.RecoverError, match="trains only audio_projector"):
        R.trainable_names(model, bad)
    (bad / "fusion_manifest.json").write_text(json.dumps({"summary": {"needs_recovery": []}}))
    with pytest.raises(R.RecoverError, match="flags no tensor"):
        R.trainable_names(model, bad)
    assert R.trainable_names(model, bad, prefix="audio_projector.fc2.") == ["audio_projector.fc2.bias",
                                                                           "audio_projector.fc2.weight"]
    assert R.trainable_names(model, tiny_repo)[0] == "audio_projector.fc1.bias"  # no manifest: the projector


def test_loss_masks_duplicate_partners_and_kd_is_zero_for_equal_matrices():
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    audio = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    positives = torch.tensor([1, 1, 3, 4])
    loss = R.recovery_loss(audio, bank, positives, torch.arange(5), 0.05)
    assert torch.isfinite(loss)
    # a perfect match of audio to its partner gives a lower loss than a random one
    assert R.recovery_loss(bank[positives], bank, positives, torch.arange(5), 0.05) < loss
    sims = torch.randn(3, 6)
    assert R.relational_kd(sims, sims, 0.05).abs() < 1e-6
    assert R.relational_kd(sims, torch.randn(3, 6), 0.05) > 0


def _bank_infonce_reference(audio, bank, positives, candidates, temperature, symmetric):
    """Recovery's former hand-written loss: audio -> unique candidates (+ partner -> audio, same partner masked)."""
    logits = audio @ bank[candidates].T / temperature
    where = {int(c): i for i, c in enumerate(candidates.tolist())}
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([where[int(p)] for p in positives.tolist()]))
    if symmetric:
        t2a = bank[positives] @ audio.T / temperature
        same = positives.unsqueeze(0) == positives.unsqueeze(1)
        same.fill_diagonal_(False)
        back = torch.nn.functional.cross_entropy(t2a.masked_fill(same, float("-inf")), torch.arange(len(positives)))
        loss = 0.5 * (loss + back)
    return loss


@pytest.mark.parametrize("symmetric", [True, False])
def test_recovery_loss_is_the_bank_infonce(symmetric):
    gen = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(9, 8, generator=gen), dim=-1)
    audio = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    positives, candidates = torch.tensor([1, 1, 3, 4, 7]), torch.tensor([0, 1, 2, 3, 4, 6, 7])
    expected = _bank_infonce_reference(audio, bank, positives, candidates, 0.05, symmetric)
    got = R.recovery_loss(audio, bank, positives, candidates, 0.05, symmetric)
    assert torch.allclose(got, expected, atol=1e-6)


def test_config_errors_are_clear(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: a\noutput: b\ntrain_data: c\nbatchsize: 3\n")
    with pytest.raises(ConfigError, match="unknown key"):
        R.load_config(cfg_file)
    with pytest.raises(ConfigError, match="kd_weight > 0 needs"):
        R.load_config(None, dict(model="a", output="b", train_data="c", kd_weight=1.0))
    with pytest.raises(R.RecoverError, match="does not exist"):
        R.read_pairs(tmp_path / "missing.jsonl")


def test_shipped_recovery_configs_parse():
    from training.common import hub_code

    paths = sorted((hub_code.REPO_ROOT / "training" / "configs").glob("recover_*.yaml"))
    assert paths
    for path in paths:
        cfg = R.load_config(path, {"model": "runs/fused"})
        assert cfg.output and cfg.train_data and cfg.dev_data, path


def test_frozen_backbone_checkpointing_gives_the_same_projector_gradient(fused_repo):
    model, processor = load_conan(fused_repo)
    params = R.freeze_all_but(model, R.trainable_names(model, fused_repo))
    gen = torch.Generator().manual_seed(0)
    inputs = {f"clip{i}": ({"audio": {"array": torch.randn(4000 + 800 * i, generator=gen).numpy(),
                                      "sampling_rate": 16000}}, None) for i in range(3)}
    clips = R.cache_audio(model, processor, inputs, progress=False)
    batch = R.collate_clips(clips, [0, 1, 2], processor.tokenizer.pad_token_id)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            R._enable_frozen_checkpointing(model)
        for p in params:
            p.grad = None
        (model(**batch).embeddings * torch.arange(64.0)).sum().backward()
        grads.append([p.grad.clone() for p in params])
    assert model.backbone.language_model.layers[0].gradient_checkpointing
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert all(float(g.abs().sum()) > 0 for g in grads[0])
