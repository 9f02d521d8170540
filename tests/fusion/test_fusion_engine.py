"""The fusion engine's output: key policies and the manifest, byte-identical copies, shard layout, clear errors
before writing, and no half-written output after a failure or a kill."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.fusion.fusion_reference import BUFFER, fusion_cfg, load_output, save_folder
from training.fusion import CheckpointError, PlanError, fuse
from training.fusion.st_io import OutTensor, ShardWriter


def test_key_policy_manifest_union_frozen_buffers_and_layout(ckpts, tmp_path):
    out = tmp_path / "o"
    man = fuse(fusion_cfg(ckpts, out, method="task_arithmetic"))
    sd = load_output(out)
    disk = json.loads((out / "fusion_manifest.json").read_text())
    assert disk["tensors"] == man["tensors"]
    every = set(ckpts["base"]) | set(ckpts["specs"]["audio"])
    assert set(sd) == every == set(man["tensors"]), "every input key is accounted for and written"
    t = man["tensors"]
    # union key: only the audio specialist has it -> copied byte-for-byte from its owner, flagged for recovery
    assert t["audio_projector.fc2.weight"]["policy"] == "copy_owner"
    assert t["audio_projector.fc2.weight"]["owners"] == ["audio"]
    assert t["audio_projector.fc2.weight"]["needs_recovery"] is True
    assert torch.equal(sd["audio_projector.fc2.weight"], ckpts["specs"]["audio"]["audio_projector.fc2.weight"])
    # in the base too, but changed by exactly one specialist -> copied from its owner, needs recovery
    assert t["audio_projector.fc1.weight"]["policy"] == "copy_owner"
    assert t["audio_projector.fc1.weight"]["owners"] == ["audio"]
    assert torch.equal(sd["audio_projector.fc1.weight"], ckpts["specs"]["audio"]["audio_projector.fc1.weight"])
    assert man["summary"]["needs_recovery"] == ["audio_projector.fc1.weight", "audio_projector.fc2.weight"]
    # frozen everywhere (audio encoder) -> the base's bytes
    assert t["audio_encoder.layers.0.fc1.weight"]["policy"] == "copy_base"
    assert torch.equal(sd["audio_encoder.layers.0.fc1.weight"], ckpts["base"]["audio_encoder.layers.0.fc1.weight"])
    # vision frozen in one specialist: fused from the others only
    qkv = t["backbone.visual.blocks.0.attn.qkv.weight"]
    assert qkv["policy"] == "fuse" and qkv["changed_by"] == ["audio", "document", "image"]
    # int64 buffer identical everywhere -> copied
    assert t[BUFFER]["policy"] == "copy_base" and torch.equal(sd[BUFFER], ckpts["base"][BUFFER])
    # groups
    assert t["backbone.visual.merger.mlp.0.weight"]["group"] == "projector"
    assert t["backbone.language_model.embed_tokens.weight"]["group"] == "embeddings"
    # shard layout: the base's shard files, union keys appended to the last shard
    base_idx = json.loads((ckpts["root"] / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    out_idx = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert {k: v for k, v in out_idx.items() if k in base_idx} == base_idx
    assert out_idx["audio_projector.fc2.weight"] == sorted(set(base_idx.values()))[-1]
    # side files from the base
    assert json.loads((out / "config.json").read_text())["name"] == "base"
    assert (out / "tokenizer.json").is_file() and (out / "modeling_conan.py").is_file()
    assert not list(tmp_path.glob(".o.*"))


def test_passthrough_is_byte_identical_on_disk(ckpts, tmp_path):
    out = tmp_path / "o"
    fuse(fusion_cfg(ckpts, out, method="ties", density=0.2))
    key = "audio_encoder.layers.0.fc1.weight"
    raw = {}
    for folder in (out, ckpts["root"] / "base"):
        idx = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(folder / idx[key], "pt") as f:
            raw[folder] = f.get_tensor(key).view(torch.int16)
    assert torch.equal(raw[out], raw[ckpts["root"] / "base"])


def test_mismatched_shape_is_a_clear_error_before_writing(ckpts, tmp_path):
    bad = dict(ckpts["specs"]["image"])
    bad["backbone.language_model.norm.weight"] = torch.zeros(17, dtype=torch.bfloat16)
    save_folder(tmp_path / "bad", bad)
    models = [{"name": "bad", "path": tmp_path / "bad"}]
    with pytest.raises(PlanError, match=r"backbone\.language_model\.norm\.weight.*\(17,\).*'bad'"):
        fuse(fusion_cfg(ckpts, tmp_path / "o", models=models))
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_missing_files_are_clear_errors(ckpts, tmp_path):
    with pytest.raises(CheckpointError, match="folder not found"):
        fuse(fusion_cfg(ckpts, tmp_path / "o", models=[{"name": "x", "path": tmp_path / "nope"}]))
    # an index that names a shard that is not there
    broken = tmp_path / "broken"
    save_folder(broken, ckpts["base"], shards=2)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*does not exist"):
        fuse(fusion_cfg(ckpts, tmp_path / "o", models=[{"name": "b", "path": broken}]))
    # a key in the base that a full specialist lacks
    partial = {k: v for k, v in ckpts["specs"]["image"].items() if "norm" not in k}
    save_folder(tmp_path / "partial", partial)
    with pytest.raises(PlanError, match="missing from model"):
        fuse(fusion_cfg(ckpts, tmp_path / "o", models=[{"name": "p", "path": tmp_path / "partial"}]))
    man = fuse(fusion_cfg(ckpts, tmp_path / "o", models=[{"name": "p", "path": tmp_path / "partial"}],
                    missing_in_specialist="zero"))
    assert man["tensors"]["backbone.language_model.norm.weight"]["policy"] == "copy_base"


def test_differing_int_buffer_is_an_error(ckpts, tmp_path):
    sd = dict(ckpts["specs"]["image"])
    sd[BUFFER] = sd[BUFFER] + 1
    save_folder(tmp_path / "buf", sd)
    with pytest.raises(PlanError, match="non-float tensor .*position_ids"):
        fuse(fusion_cfg(ckpts, tmp_path / "o", models=[{"name": "buf", "path": tmp_path / "buf"}]))


def test_failed_run_leaves_no_output_and_unfinished_shard_does_not_load(ckpts, tmp_path):
    calls = []

    def boom(key):
        calls.append(key)
        raise KeyboardInterrupt  # like Ctrl-C in the middle of the run

    cfg = fusion_cfg(ckpts, tmp_path / "o", workers=1)
    from training.fusion.engine import fuse as engine_fuse

    with pytest.raises((KeyboardInterrupt, RuntimeError)):
        engine_fuse(cfg, on_tensor=boom)
    assert calls and not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
    # a shard whose run was killed before `finish` has a zero header: no loader accepts it
    w = ShardWriter(tmp_path / "half.safetensors", [OutTensor("a", "F32", (4,))])
    w.write("a", torch.ones(4))
    w.abort()
    with pytest.raises(Exception):
        load_file(tmp_path / "half.safetensors")


def test_a_killed_runs_partial_folder_is_removed_by_the_next_run(ckpts, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".o.partial-{int(dead.stdout)}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 64)
    fuse(fusion_cfg(ckpts, tmp_path / "o"))
    assert (tmp_path / "o" / "fusion_manifest.json").is_file() and not stale.exists()
