"""Every fusion method against the naive float64 reference (tests/fusion/fusion_reference.py): bit-exact where
the arithmetic allows, mask agreement for TIES / Breadcrumbs / DARE, the statistics of DARE's random masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.fusion.fusion_reference import (
    FUSED, MODEL_KEYS, SPECIALISTS, dare_run, f64, fusion_cfg, load_output, reference, reference_model_ties, save_folder,
    to_bf16, ulp,
)
from training.fusion import ConfigError, FusionConfig, fuse


@pytest.mark.parametrize("method,kw", [
    ("task_arithmetic", {"lambda_": 0.7, "lambda_groups": {"vision": 0.3}}),
    ("linear", {}),
])
def test_ta_linear_bit_exact_vs_fp64_reference(ckpts, tmp_path, method, kw):
    weights = [1.0, 0.5, 2.0, 0.25]
    models = [{"name": n, "path": ckpts["root"] / n, "weight": w} for n, w in zip(SPECIALISTS, weights)]
    for reference_mode in (True, False):
        out = tmp_path / f"out{reference_mode}"
        fuse(fusion_cfg(ckpts, out, method=method, models=models, reference=reference_mode, **kw))
        sd = load_output(out)
        differ = total = 0
        for key in FUSED:
            lam = 0.3 if key.startswith("backbone.visual.") and "merger" not in key and kw else kw.get("lambda_", 1.0)
            ref = to_bf16(reference(ckpts, key, method, lam=lam, weights=weights))
            assert sd[key].dtype == torch.bfloat16
            if reference_mode:  # fp64 compute: bit-exact after rounding to bf16
                assert torch.equal(sd[key].view(torch.int16), ref.view(torch.int16)), key
            else:  # fp32 accumulation: rounding may flip where the fp64 value is within ~2^-24 of a bf16 midpoint
                assert ulp(sd[key], ref) <= 1, key
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
    fuse(fusion_cfg(ckpts, tmp_path / "o", method=method, semantics=semantics, density=density, gamma=gamma,
              reference=True, lambda_=1.3, chunk_elems=500, reuse_limit_mb=reuse_limit_mb, **scope))
    sd = load_output(tmp_path / "o")
    for key in FUSED:
        ref = reference(ckpts, key, method, semantics, lam=1.3, density=density, gamma=gamma)
        got = sd[key]
        assert torch.equal(got.view(torch.int16), to_bf16(ref).view(torch.int16)), key
        # the kept set itself: an entry moved off the base iff the reference moved it
        moved_ref = to_bf16(ref) != ckpts["base"][key]
        moved = got != ckpts["base"][key]
        assert torch.equal(moved, moved_ref), key


def test_ties_fp32_close_to_reference(ckpts, tmp_path):
    fuse(fusion_cfg(ckpts, tmp_path / "o", method="ties", density=0.2, trim_scope="tensor"))
    sd = load_output(tmp_path / "o")
    for key in FUSED:
        assert ulp(sd[key], to_bf16(reference(ckpts, key, "ties", density=0.2))) <= 1, key


@pytest.mark.parametrize("reference_mode", [True, False], ids=["fp64", "fp32"])
def test_ties_model_trim_scope_matches_flattened_reference(ckpts, tmp_path, reference_mode):
    """paper TIES trims over the whole model by default: one threshold per specialist across all fused tensors.
    Streaming over small chunks and two workers, it equals the flattened fp64 reference (bit-exact in fp64 mode)."""
    man = fuse(fusion_cfg(ckpts, tmp_path / "o", method="ties", semantics="paper", density=0.2, lambda_=1.3,
                    reference=reference_mode, chunk_elems=500, workers=2))
    assert man["summary"]["trim_scope"] == "model"
    assert set(man["summary"]["model_thresholds"]) == set(SPECIALISTS)
    sd, ref = load_output(tmp_path / "o"), reference_model_ties(ckpts, lam=1.3, density=0.2)
    per_tensor = reference(ckpts, MODEL_KEYS[0], "ties", "paper", lam=1.3, density=0.2)
    assert not np.array_equal(to_bf16(per_tensor), to_bf16(ref[MODEL_KEYS[0]])), "scopes must differ on this data"
    for key in MODEL_KEYS:
        if reference_mode:
            assert torch.equal(sd[key].view(torch.int16), to_bf16(ref[key]).view(torch.int16)), key
        else:
            assert ulp(sd[key], to_bf16(ref[key])) <= 1, key


def test_model_trim_majority_sign_spans_tensors(tmp_path):
    """An exact cancellation (τ_a = -τ_b) takes the majority elected sign of the whole model, which here comes from
    another tensor entirely; per tensor it would be 0 (its own elected signs sum to 0)."""
    root = tmp_path / "ckpts"
    base = {"backbone.a.weight": torch.zeros(4, dtype=torch.float32), "backbone.b.weight": torch.zeros(4)}
    save_folder(root / "base", base)
    save_folder(root / "x", {"backbone.a.weight": torch.tensor([1.0, 0, 0, 0]), "backbone.b.weight": torch.ones(4)})
    save_folder(root / "y", {"backbone.a.weight": torch.tensor([-1.0, 0, 0, 0]), "backbone.b.weight": torch.ones(4)})
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
        fusion_cfg(ckpts, tmp_path / "o", method="ties", semantics="mergekit", trim_scope="model")
    with pytest.raises(ConfigError, match="trim_scope: model"):
        fusion_cfg(ckpts, tmp_path / "o", method="dare_ties", trim_scope="model")




# ------------------------------------------------------------------------------------------------------ DARE
def test_dare_keep_rate_binomial_ci_and_unbiased(dare_ckpts, tmp_path):
    p, runs = 0.3, []
    for seed in range(20):
        delta, key = dare_run(dare_ckpts, tmp_path / f"s{seed}", seed)
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
    again, _ = dare_run(dare_ckpts, tmp_path / "again", 0)
    assert torch.equal(again, runs[0]), "same seed must reproduce the same output"


@pytest.mark.parametrize("semantics", ["paper", "mergekit"])
def test_dare_mask_does_not_depend_on_chunking_or_reuse(dare_ckpts, tmp_path, semantics):
    """Each element's draw comes from a counter-based stream, so chunk size (odd row offsets included), thread
    order and the in-memory reuse of a second pass leave the output unchanged."""
    whole, _ = dare_run(dare_ckpts, tmp_path / "whole", 5, semantics, chunk_elems=1 << 20)
    for i, kw in enumerate([{"chunk_elems": 3 * 201}, {"chunk_elems": 7 * 201, "reuse_limit_mb": 0.0}]):
        chunked, _ = dare_run(dare_ckpts, tmp_path / f"c{i}", 5, semantics, **kw)
        assert torch.equal(chunked, whole), kw


def test_dare_mergekit_l1_rescale(dare_ckpts, tmp_path):
    delta, key = dare_run(dare_ckpts, tmp_path / "mk", 3, semantics="mergekit")
    tau = dare_ckpts["tau"][key].double()
    assert float(delta.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-5)
    kept = delta != 0
    ratio = (delta[kept] / tau[kept])
    assert float(ratio.std() / ratio.mean()) < 1e-4  # one scale factor (fp32 output rounding aside)
    assert float(ratio.mean()) > 1 / 0.3 * 0.9


# ------------------------------------------------------------------------------------------------ key policy
@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties", "dare_ties", "breadcrumbs", "iso_c", "tsv_m"])
def test_all_zero_deltas_give_the_base_exactly(ckpts, tmp_path, method):
    models = [{"name": f"m{i}", "path": ckpts["root"] / "base"} for i in range(2)]
    man = fuse(fusion_cfg(ckpts, tmp_path / "o", method=method, models=models, density=0.5))
    sd = load_output(tmp_path / "o")
    for k, v in ckpts["base"].items():
        assert torch.equal(sd[k], v), k
    assert set(e["policy"] for e in man["tensors"].values()) == {"copy_base"}


def test_svd_methods_match_naive_reference(ckpts, tmp_path):
    key = "backbone.language_model.layers.0.mlp.up_proj.weight"
    b = f64(ckpts["base"][key])
    taus = [f64(ckpts["specs"][n][key]) - b for n in SPECIALISTS]
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
        fuse(fusion_cfg(ckpts, out, method=method, lambda_=0.8, reference=True, out_dtype="float64"))
        got = load_output(out)[key].numpy()
        np.testing.assert_allclose(got, ref, atol=1e-10)
        norm_key = "backbone.language_model.norm.weight"  # 1-D: mean task vector
        nb = f64(ckpts["base"][norm_key])
        mean = sum(f64(ckpts["specs"][n][norm_key]) - nb for n in SPECIALISTS) / 4
        np.testing.assert_allclose(load_output(out)[norm_key].numpy(), nb + 0.8 * mean, atol=1e-12)
    with pytest.raises(ConfigError, match="no mergekit equivalent"):
        fuse(fusion_cfg(ckpts, tmp_path / "x", method="iso_c", semantics="mergekit"))


# --------------------------------------------------------------------------------------------------- errors
