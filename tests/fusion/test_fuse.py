"""Fusion tool vs a deliberately naive float64 reference on small random checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from training.fusion.cli import main as cli_main
from training.fusion import CheckpointError, ConfigError, FusionConfig, PlanError, fuse
from training.fusion.st_io import ShardWriter, OutTensor

# ------------------------------------------------------------------------------------------------- fixtures
SHAPES = {
    "backbone.visual.patch_embed.proj.weight": (24, 12),
    "backbone.visual.blocks.0.attn.qkv.weight": (36, 12),
    "backbone.visual.blocks.0.attn.qkv.bias": (36,),
    "backbone.visual.merger.mlp.0.weight": (16, 48),
    "backbone.language_model.embed_tokens.weight": (64, 16),
    "backbone.language_model.layers.0.self_attn.q_proj.weight": (16, 16),
    "backbone.language_model.layers.0.mlp.up_proj.weight": (40, 16),
    "backbone.language_model.norm.weight": (16,),
    "audio_encoder.layers.0.fc1.weight": (20, 8),
    "audio_projector.fc1.weight": (16, 8),
}
BUFFER = "backbone.language_model.position_ids"
SPECIALISTS = ("image", "video", "document", "audio")


def _save(folder: Path, sd: dict[str, torch.Tensor], shards: int = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "conan", "name": folder.name}))
    (folder / "tokenizer.json").write_text(json.dumps({"vocab": folder.name}))
    (folder / "modeling_conan.py").write_text("# remote code\n")
    if shards == 1:
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        return
    keys = list(sd)
    parts = [keys[i::shards] for i in range(shards)]
    wm = {}
    for i, part in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in part}, folder / name, metadata={"format": "pt"})
        wm.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def _bf16_grid(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    """Base (2 shards) + 4 specialists: video freezes the vision tower, only audio changes the projector and adds
    a union key; a fraction of each delta is exactly zero; an int64 buffer everywhere."""
    root = tmp_path_factory.mktemp("ckpts")
    g = torch.Generator().manual_seed(0)
    base = {k: _bf16_grid(torch.randn(s, generator=g) * 0.05) for k, s in SHAPES.items()}
    base[BUFFER] = torch.arange(10, dtype=torch.int64).view(1, 10)
    _save(root / "base", base, shards=2)
    specs = {}
    for i, name in enumerate(SPECIALISTS):
        sd = {}
        for k, t in base.items():
            if not t.is_floating_point():
                sd[k] = t.clone()
                continue
            frozen = k.startswith("audio_encoder.") or (name == "video" and k.startswith("backbone.visual.")) or (
                k.startswith("audio_projector.") and name != "audio")
            if frozen:
                sd[k] = t.clone()
                continue
            d = torch.randn(t.shape, generator=g) * 0.01
            d[torch.rand(t.shape, generator=g) < 0.1] = 0
            sd[k] = _bf16_grid(t.float() + d)
        if name == "audio":
            sd["audio_projector.fc2.weight"] = _bf16_grid(torch.randn(16, 16, generator=g) * 0.05)
        _save(root / name, sd)
        specs[name] = sd
    return {"root": root, "base": base, "specs": specs}


def _cfg(ckpts, out: Path, **kw) -> FusionConfig:
    models = kw.pop("models", [{"name": n, "path": ckpts["root"] / n} for n in SPECIALISTS])
    kw.setdefault("progress", False)
    return FusionConfig(base=ckpts["root"] / "base", models=models, output=out, **kw)


def _load_out(out: Path) -> dict[str, torch.Tensor]:
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    sd = {}
    for shard in sorted(set(idx["weight_map"].values())):
        sd.update(load_file(out / shard))
    return sd


# ------------------------------------------------------------------------------------- naive fp64 reference
def _f64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def _kth_largest(a: np.ndarray, k: int) -> float:
    return float(np.sort(a.ravel())[::-1][k - 1]) if k > 0 else math.inf


def _topk_mask(tau: np.ndarray, density: float, exact: bool = False) -> np.ndarray:
    """paper: every |τ| >= the k-th largest; mergekit: exactly k, ties broken by lower flat index (stable sort)."""
    if density >= 1.0:
        return np.ones(tau.shape, bool)
    if exact:
        k = max(1, int(density * tau.size))
        mask = np.zeros(tau.size, bool)
        mask[np.argsort(-np.abs(tau).ravel(), kind="stable")[:k]] = True
        return mask.reshape(tau.shape) & (tau != 0)
    k = int(density * tau.size)
    return (np.abs(tau) >= _kth_largest(np.abs(tau), k)) & (tau != 0)


def _band_mask(tau: np.ndarray, density: float, gamma: float, rowwise: bool) -> np.ndarray:
    def band(a: np.ndarray) -> np.ndarray:
        n = a.size
        n_out, n_keep = int(gamma * n), int(density * n)
        keep = (a >= _kth_largest(a, n_out + n_keep)) & (a != 0)
        if n_out:
            keep &= a < _kth_largest(a, n_out)
        return keep

    a = np.abs(tau)
    if not rowwise:
        return band(a)
    rows = a.reshape(-1, a.shape[-1] if a.ndim else 1)
    return np.stack([band(r) for r in rows]).reshape(a.shape)


def reference(ckpts, key: str, method: str, semantics: str = "paper", lam: float = 1.0, weights=None,
              density: float = 1.0, gamma: float = 0.01) -> np.ndarray:
    """Textbook formulas, one tensor, float64, no streaming."""
    b = _f64(ckpts["base"][key])
    thetas = [_f64(ckpts["specs"][n][key]) for n in SPECIALISTS]
    w = weights or [1.0] * len(thetas)
    taus = [t - b for t in thetas]
    if method == "linear":
        return sum(wi * t for wi, t in zip(w, thetas)) / sum(w)
    if method == "task_arithmetic":
        return b + lam * sum(wi * t for wi, t in zip(w, taus))
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        sp = [t * _band_mask(t, density, gamma, rowwise=semantics == "paper") for t in taus]
    else:
        sp = [t * _topk_mask(t, density, exact=semantics == "mergekit") for t in taus]
    if method == "breadcrumbs":
        return b + lam * sum(wi * s for wi, s in zip(w, sp))
    # TIES election + disjoint merge
    merged = np.zeros_like(b)
    if semantics == "paper":
        total = sum(sp)
        sign = np.sign(total)
        majority = np.sign(sign.sum())
        sign[sign == 0] = majority
        count = np.zeros_like(b)
        for wi, s in zip(w, sp):
            agree = (np.sign(s) == sign) & (s != 0)
            merged += np.where(agree, wi * s, 0)
            count += agree
        merged /= np.maximum(count, 1)
    else:
        total = sum(wi * s for wi, s in zip(w, sp))
        sign = np.where(total >= 0, 1.0, -1.0)
        div = np.zeros_like(b)
        for wi, s in zip(w, sp):
            agree = np.sign(wi * s) == sign
            merged += np.where(agree, wi * s, 0)
            div += wi * agree
        if method == "ties":
            merged /= np.where(np.abs(div) < 1e-8, 1.0, div)
    return b + lam * merged


def _bf16(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16)


def _ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    """Max distance in bf16 units in the last place (sign-magnitude order)."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.view(torch.int16).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


FUSED = [k for k in SHAPES if not k.startswith(("audio_encoder.", "audio_projector."))]


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("method,kw", [
    ("task_arithmetic", {"lambda_": 0.7, "lambda_groups": {"vision": 0.3}}),
    ("linear", {}),
])
def test_ta_linear_bit_exact_vs_fp64_reference(ckpts, tmp_path, method, kw):
    weights = [1.0, 0.5, 2.0, 0.25]
    models = [{"name": n, "path": ckpts["root"] / n, "weight": w} for n, w in zip(SPECIALISTS, weights)]
    for reference_mode in (True, False):
        out = tmp_path / f"out{reference_mode}"
        fuse(_cfg(ckpts, out, method=method, models=models, reference=reference_mode, **kw))
        sd = _load_out(out)
        differ = total = 0
        for key in FUSED:
            lam = 0.3 if key.startswith("backbone.visual.") and "merger" not in key and kw else kw.get("lambda_", 1.0)
            ref = _bf16(reference(ckpts, key, method, lam=lam, weights=weights))
            assert sd[key].dtype == torch.bfloat16
            if reference_mode:  # fp64 compute: bit-exact after rounding to bf16
                assert torch.equal(sd[key].view(torch.int16), ref.view(torch.int16)), key
            else:  # fp32 accumulation: rounding may flip where the fp64 value is within ~2^-24 of a bf16 midpoint
                assert _ulp(sd[key], ref) <= 1, key
                differ += int((sd[key] != ref).sum())
                total += ref.numel()
        assert differ <= 1e-3 * max(total, 1)


@pytest.mark.parametrize("method,semantics,density", [
    ("ties", "paper", 0.2), ("ties", "mergekit", 0.2), ("ties", "paper", 1.0),
    ("breadcrumbs", "paper", 0.5), ("breadcrumbs", "mergekit", 0.5),
    ("breadcrumbs_ties", "mergekit", 0.5), ("breadcrumbs_ties", "paper", 0.5),
])
@pytest.mark.parametrize("reuse_limit_mb", [0.0, 256.0], ids=["stream", "reuse"])
def test_ties_breadcrumbs_masks_agree_with_reference(ckpts, tmp_path, method, semantics, density, reuse_limit_mb):
    """Both the streaming passes (re-read per pass) and the in-memory reuse path, over many small row chunks."""
    gamma = 0.1
    scope = {"trim_scope": "tensor"} if (method, semantics) == ("ties", "paper") else {}  # model scope: own test
    fuse(_cfg(ckpts, tmp_path / "o", method=method, semantics=semantics, density=density, gamma=gamma,
              reference=True, lambda_=1.3, chunk_elems=500, reuse_limit_mb=reuse_limit_mb, **scope))
    sd = _load_out(tmp_path / "o")
    for key in FUSED:
        ref = reference(ckpts, key, method, semantics, lam=1.3, density=density, gamma=gamma)
        got = sd[key]
        assert torch.equal(got.view(torch.int16), _bf16(ref).view(torch.int16)), key
        # the kept set itself: an entry moved off the base iff the reference moved it
        moved_ref = _bf16(ref) != ckpts["base"][key]
        moved = got != ckpts["base"][key]
        assert torch.equal(moved, moved_ref), key


def test_ties_fp32_close_to_reference(ckpts, tmp_path):
    fuse(_cfg(ckpts, tmp_path / "o", method="ties", density=0.2, trim_scope="tensor"))
    sd = _load_out(tmp_path / "o")
    for key in FUSED:
        assert _ulp(sd[key], _bf16(reference(ckpts, key, "ties", density=0.2))) <= 1, key


MODEL_KEYS = [k for k in SHAPES if not k.startswith("audio_projector.")]  # every fused tensor (frozen ones too)


def reference_model_ties(ckpts, lam: float, density: float) -> dict[str, np.ndarray]:
    """The original TIES (paper repo / FusionBench): each task vector flattened over the whole model, one kthvalue
    threshold per task, sign election with zero sums set to the model's majority sign, disjoint mean."""
    sizes = [int(np.prod(SHAPES[k])) for k in MODEL_KEYS]
    base = np.concatenate([_f64(ckpts["base"][k]).ravel() for k in MODEL_KEYS])
    taus = [np.concatenate([_f64(ckpts["specs"][n][k]).ravel() for k in MODEL_KEYS]) - base for n in SPECIALISTS]
    trimmed = [t * _topk_mask(t, density) for t in taus]
    sign = np.sign(sum(trimmed))
    sign[sign == 0] = np.sign(sign.sum())
    agree = [(np.sign(t) == sign) & (t != 0) for t in trimmed]
    merged = sum(np.where(a, t, 0.0) for a, t in zip(agree, trimmed)) / np.maximum(sum(agree), 1)
    flat = base + lam * merged
    return {k: part.reshape(SHAPES[k]) for k, part in zip(MODEL_KEYS, np.split(flat, np.cumsum(sizes)[:-1]))}


@pytest.mark.parametrize("reference_mode", [True, False], ids=["fp64", "fp32"])
def test_ties_model_trim_scope_matches_flattened_reference(ckpts, tmp_path, reference_mode):
    """paper TIES trims over the whole model by default: one threshold per specialist across all fused tensors.
    Streaming over small chunks and two workers, it equals the flattened fp64 reference (bit-exact in fp64 mode)."""
    man = fuse(_cfg(ckpts, tmp_path / "o", method="ties", semantics="paper", density=0.2, lambda_=1.3,
                    reference=reference_mode, chunk_elems=500, workers=2))
    assert man["summary"]["trim_scope"] == "model"
    assert set(man["summary"]["model_thresholds"]) == set(SPECIALISTS)
    sd, ref = _load_out(tmp_path / "o"), reference_model_ties(ckpts, lam=1.3, density=0.2)
    per_tensor = reference(ckpts, MODEL_KEYS[0], "ties", "paper", lam=1.3, density=0.2)
    assert not np.array_equal(_bf16(per_tensor), _bf16(ref[MODEL_KEYS[0]])), "scopes must differ on this data"
    for key in MODEL_KEYS:
        if reference_mode:
            assert torch.equal(sd[key].view(torch.int16), _bf16(ref[key]).view(torch.int16)), key
        else:
            assert _ulp(sd[key], _bf16(ref[key])) <= 1, key


def test_model_trim_majority_sign_spans_tensors(tmp_path):
    """An exact cancellation (τ_a = -τ_b) takes the majority elected sign of the whole model, which here comes from
    another tensor entirely; per tensor it would be 0 (its own elected signs sum to 0)."""
    root = tmp_path / "ckpts"
    base = {"backbone.a.weight": torch.zeros(4, dtype=torch.float32), "backbone.b.weight": torch.zeros(4)}
    _save(root / "base", base)
    _save(root / "x", {"backbone.a.weight": torch.tensor([1.0, 0, 0, 0]), "backbone.b.weight": torch.ones(4)})
    _save(root / "y", {"backbone.a.weight": torch.tensor([-1.0, 0, 0, 0]), "backbone.b.weight": torch.ones(4)})
    models = [{"name": "x", "path": root / "x"}, {"name": "y", "path": root / "y"}]
    outs = {}
    for scope in ("model", "tensor"):
        fuse(FusionConfig(base=root / "base", models=models, output=tmp_path / scope, method="ties",
                          density=0.99, trim_scope=scope, progress=False))
        outs[scope] = load_file(tmp_path / scope / "model.safetensors")
    # model: Σ elected signs = 0 (a) + 4 (b) > 0 -> + : the cancelled entry keeps x's +1; tensor: a's own sum is 0
    assert outs["model"]["backbone.a.weight"].tolist() == [1.0, 0, 0, 0]
    assert outs["tensor"]["backbone.a.weight"].tolist() == [0.0, 0, 0, 0]
    assert outs["model"]["backbone.b.weight"].tolist() == [1.0] * 4


def test_trim_scope_model_needs_paper_ties(ckpts, tmp_path):
    with pytest.raises(ConfigError, match="trim_scope: model"):
        _cfg(ckpts, tmp_path / "o", method="ties", semantics="mergekit", trim_scope="model")
    with pytest.raises(ConfigError, match="trim_scope: model"):
        _cfg(ckpts, tmp_path / "o", method="dare_ties", trim_scope="model")


# ------------------------------------------------------------------------------------------------------ DARE
@pytest.fixture(scope="module")
def dare_ckpts(tmp_path_factory) -> dict:
    """fp32 base + one fp32 specialist with a dense delta, so kept entries are visible exactly in the output."""
    root = tmp_path_factory.mktemp("dare")
    g = torch.Generator().manual_seed(1)
    base = {"backbone.language_model.layers.0.mlp.up_proj.weight": torch.randn(100, 201, generator=g)}  # odd rows
    tau = {k: torch.randn(v.shape, generator=g) * 0.1 + 0.05 for k, v in base.items()}
    _save(root / "base", base)
    _save(root / "ft", {k: base[k] + tau[k] for k in base})
    return {"root": root, "base": base, "tau": {k: load_file(root / "ft" / "model.safetensors")[k] - base[k]
                                                 for k in base}}


def _dare_run(dare_ckpts, out, seed, semantics="paper", density=0.3, **kw):
    kw.setdefault("chunk_elems", 3000)
    cfg = FusionConfig(base=dare_ckpts["root"] / "base", models=[{"name": "ft", "path": dare_ckpts["root"] / "ft"}],
                       output=out, method="dare_linear", semantics=semantics, density=density, seed=seed,
                       progress=False, **kw)
    fuse(cfg)
    key = next(iter(dare_ckpts["base"]))
    return (load_file(out / "model.safetensors")[key].double() - dare_ckpts["base"][key].double()), key


def test_dare_keep_rate_binomial_ci_and_unbiased(dare_ckpts, tmp_path):
    p, runs = 0.3, []
    for seed in range(20):
        delta, key = _dare_run(dare_ckpts, tmp_path / f"s{seed}", seed)
        runs.append(delta)
        kept = int((delta != 0).sum())
        n = delta.numel()
        half = 3.29 * math.sqrt(n * p * (1 - p))  # 99.9% normal CI of a binomial count
        assert abs(kept - n * p) < half, (seed, kept, n * p)
    tau = dare_ckpts["tau"][key].double()
    assert not torch.equal(runs[0], runs[1]), "different seeds must give different masks"
    mean = torch.stack(runs).mean(0)
    # E[m τ / p] = τ: the per-entry standard error over 20 runs is |τ| sqrt((1-p)/p / 20)
    se = tau.abs() * math.sqrt((1 - p) / p / 20)
    z = ((mean - tau) / se.clamp(min=1e-12)).flatten()
    assert abs(float(z.mean())) < 0.05 and 0.8 < float(z.std()) < 1.2
    again, _ = _dare_run(dare_ckpts, tmp_path / "again", 0)
    assert torch.equal(again, runs[0]), "same seed must reproduce the same output"


@pytest.mark.parametrize("semantics", ["paper", "mergekit"])
def test_dare_mask_does_not_depend_on_chunking_or_reuse(dare_ckpts, tmp_path, semantics):
    """Each element's draw comes from a counter-based stream, so chunk size (odd row offsets included), thread
    order and the in-memory reuse of a second pass leave the output unchanged."""
    whole, _ = _dare_run(dare_ckpts, tmp_path / "whole", 5, semantics, chunk_elems=1 << 20)
    for i, kw in enumerate([{"chunk_elems": 3 * 201}, {"chunk_elems": 7 * 201, "reuse_limit_mb": 0.0}]):
        chunked, _ = _dare_run(dare_ckpts, tmp_path / f"c{i}", 5, semantics, **kw)
        assert torch.equal(chunked, whole), kw


def test_dare_mergekit_l1_rescale(dare_ckpts, tmp_path):
    delta, key = _dare_run(dare_ckpts, tmp_path / "mk", 3, semantics="mergekit")
    tau = dare_ckpts["tau"][key].double()
    assert float(delta.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-5)
    kept = delta != 0
    ratio = (delta[kept] / tau[kept])
    assert float(ratio.std() / ratio.mean()) < 1e-4  # one scale factor (fp32 output rounding aside)
    assert float(ratio.mean()) > 1 / 0.3 * 0.9


# ------------------------------------------------------------------------------------------------ key policy
def test_key_policy_manifest_union_frozen_buffers_and_layout(ckpts, tmp_path):
    out = tmp_path / "o"
    man = fuse(_cfg(ckpts, out, method="task_arithmetic"))
    sd = _load_out(out)
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
    fuse(_cfg(ckpts, out, method="ties", density=0.2))
    key = "audio_encoder.layers.0.fc1.weight"
    raw = {}
    for folder in (out, ckpts["root"] / "base"):
        idx = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(folder / idx[key], "pt") as f:
            raw[folder] = f.get_tensor(key).view(torch.int16)
    assert torch.equal(raw[out], raw[ckpts["root"] / "base"])


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties", "dare_ties", "breadcrumbs", "iso_c", "tsv_m"])
def test_all_zero_deltas_give_the_base_exactly(ckpts, tmp_path, method):
    models = [{"name": f"m{i}", "path": ckpts["root"] / "base"} for i in range(2)]
    man = fuse(_cfg(ckpts, tmp_path / "o", method=method, models=models, density=0.5))
    sd = _load_out(tmp_path / "o")
    for k, v in ckpts["base"].items():
        assert torch.equal(sd[k], v), k
    assert set(e["policy"] for e in man["tensors"].values()) == {"copy_base"}


def test_svd_methods_match_naive_reference(ckpts, tmp_path):
    key = "backbone.language_model.layers.0.mlp.up_proj.weight"
    b = _f64(ckpts["base"][key])
    taus = [_f64(ckpts["specs"][n][key]) - b for n in SPECIALISTS]
    # Iso-C: mean singular value times U V^T of the summed task vector
    u, s, vh = np.linalg.svd(sum(taus), full_matrices=False)
    iso = b + 0.8 * s.mean() * (u @ vh)
    # TSV-M: top r/T triplets per task, Procrustes-whitened
    k = min(b.shape) // len(taus)
    us, ss, vs = zip(*[(lambda u, s, vh: (u[:, :k], s[:k], vh[:k].T))(*np.linalg.svd(t, full_matrices=False))
                       for t in taus])
    U, S, V = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 1)
    pu, _, qu = np.linalg.svd(U, full_matrices=False)
    pv, _, qv = np.linalg.svd(V, full_matrices=False)
    tsv = b + 0.8 * (pu @ qu) @ np.diag(S) @ (pv @ qv).T
    for method, ref in (("iso_c", iso), ("tsv_m", tsv)):
        out = tmp_path / method
        fuse(_cfg(ckpts, out, method=method, lambda_=0.8, reference=True, out_dtype="float64"))
        got = _load_out(out)[key].numpy()
        np.testing.assert_allclose(got, ref, atol=1e-10)
        norm_key = "backbone.language_model.norm.weight"  # 1-D: mean task vector
        nb = _f64(ckpts["base"][norm_key])
        mean = sum(_f64(ckpts["specs"][n][norm_key]) - nb for n in SPECIALISTS) / 4
        np.testing.assert_allclose(_load_out(out)[norm_key].numpy(), nb + 0.8 * mean, atol=1e-12)
    with pytest.raises(ConfigError, match="no mergekit equivalent"):
        fuse(_cfg(ckpts, tmp_path / "x", method="iso_c", semantics="mergekit"))


# --------------------------------------------------------------------------------------------------- errors
def test_mismatched_shape_is_a_clear_error_before_writing(ckpts, tmp_path):
    bad = dict(ckpts["specs"]["image"])
    bad["backbone.language_model.norm.weight"] = torch.zeros(17, dtype=torch.bfloat16)
    _save(tmp_path / "bad", bad)
    models = [{"name": "bad", "path": tmp_path / "bad"}]
    with pytest.raises(PlanError, match=r"backbone\.language_model\.norm\.weight.*\(17,\).*'bad'"):
        fuse(_cfg(ckpts, tmp_path / "o", models=models))
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_missing_files_are_clear_errors(ckpts, tmp_path):
    with pytest.raises(CheckpointError, match="folder not found"):
        fuse(_cfg(ckpts, tmp_path / "o", models=[{"name": "x", "path": tmp_path / "nope"}]))
    # an index that names a shard that is not there
    broken = tmp_path / "broken"
    _save(broken, ckpts["base"], shards=2)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*does not exist"):
        fuse(_cfg(ckpts, tmp_path / "o", models=[{"name": "b", "path": broken}]))
    # a key in the base that a full specialist lacks
    partial = {k: v for k, v in ckpts["specs"]["image"].items() if "norm" not in k}
    _save(tmp_path / "partial", partial)
    with pytest.raises(PlanError, match="missing from model"):
        fuse(_cfg(ckpts, tmp_path / "o", models=[{"name": "p", "path": tmp_path / "partial"}]))
    man = fuse(_cfg(ckpts, tmp_path / "o", models=[{"name": "p", "path": tmp_path / "partial"}],
                    missing_in_specialist="zero"))
    assert man["tensors"]["backbone.language_model.norm.weight"]["policy"] == "copy_base"


def test_differing_int_buffer_is_an_error(ckpts, tmp_path):
    sd = dict(ckpts["specs"]["image"])
    sd[BUFFER] = sd[BUFFER] + 1
    _save(tmp_path / "buf", sd)
    with pytest.raises(PlanError, match="non-float tensor .*position_ids"):
        fuse(_cfg(ckpts, tmp_path / "o", models=[{"name": "buf", "path": tmp_path / "buf"}]))


def test_failed_run_leaves_no_output_and_unfinished_shard_does_not_load(ckpts, tmp_path):
    calls = []

    def boom(key):
        calls.append(key)
        raise KeyboardInterrupt  # like Ctrl-C in the middle of the run

    cfg = _cfg(ckpts, tmp_path / "o", workers=1)
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


def test_output_exists_and_bad_config_errors(ckpts, tmp_path):
    (tmp_path / "o").mkdir()
    with pytest.raises(FileExistsError):
        fuse(_cfg(ckpts, tmp_path / "o"))
    with pytest.raises(ConfigError, match="method must be one of"):
        _cfg(ckpts, tmp_path / "o", method="slerpy")
    with pytest.raises(ConfigError, match="lambda_groups names unknown groups"):
        _cfg(ckpts, tmp_path / "o", lambda_groups={"visoin": 1.0})


def test_cli_flags_and_yaml(ckpts, tmp_path, capsys):
    args = ["--base", str(ckpts["root"] / "base"), "--output", str(tmp_path / "o"), "--method", "ties",
            "--density", "0.3", "--lambda-group", "llm=0.5", "--trim-scope", "tensor", "--no-progress"]
    for n in SPECIALISTS:
        args += ["--model", f"{n}={ckpts['root'] / n}:1.0"]
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["needs_recovery"] == ["audio_projector.fc1.weight", "audio_projector.fc2.weight"]
    assert summary["trim_scope"] == "tensor"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base: {ckpts['root'] / 'base'}\noutput: {tmp_path / 'y'}\nmethod: linear\nprogress: false\n"
                   f"models:\n  - {{name: a, path: {ckpts['root'] / 'image'}}}\n")
    assert cli_main(["--config", str(cfg)]) == 0
    assert cli_main(["--config", str(cfg)]) == 2  # output exists -> clear error, exit 2
    assert "already exists" in capsys.readouterr().err


def test_example_config_parses():
    import yaml

    from training.fusion.config import load_config

    path = Path(__file__).resolve().parents[2] / "training" / "configs" / "fusion" / "example.yaml"
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    assert cfg.method == raw["method"] and cfg.lambda_for("backbone.visual.blocks.0.mlp.fc1.weight") == 0.5


def test_config_loader_is_the_common_one(tmp_path, monkeypatch):
    from training.common.config import ConfigError as CommonConfigError
    from training.fusion.config import load_config

    assert ConfigError is CommonConfigError
    cfg_path = tmp_path / "f.yaml"
    cfg_path.write_text("base: b\noutput: out\nlambda: 0.5\nmodels:\n  - {name: a, path: a}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cfg_path)
    assert cfg.base == tmp_path / "b" and cfg.output == tmp_path / "out" and cfg.models[0].path == tmp_path / "a"
    assert cfg.lambda_ == 0.5
    cfg_path.write_text("base: b\noutput: out\nmodels:\n  - {name: a, path: a, wieght: 2}\n")
    with pytest.raises(ConfigError, match=r"models\[0\]: unknown key\(s\) \['wieght'\]"):
        load_config(cfg_path)
    with pytest.raises(ConfigError, match="missing required key 'models'"):
        load_config(None, base="b", output="o")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_a_killed_runs_partial_folder_is_removed_by_the_next_run(ckpts, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".o.partial-{int(dead.stdout)}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 64)
    fuse(_cfg(ckpts, tmp_path / "o"))
    assert (tmp_path / "o" / "fusion_manifest.json").is_file() and not stale.exists()
