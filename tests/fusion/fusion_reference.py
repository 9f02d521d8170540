"""Shared by the fusion tests: small random checkpoints in the Conan weight layout and a deliberately naive
float64 reference of every method (numpy, one whole tensor at a time), to compare the streaming engine with."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from training.fusion import FusionConfig, fuse


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


def save_folder(folder: Path, sd: dict[str, torch.Tensor], shards: int = 1) -> None:
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


def bf16_grid(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16)


def fusion_cfg(ckpts, out: Path, **kw) -> FusionConfig:
    models = kw.pop("models", [{"name": n, "path": ckpts["root"] / n} for n in SPECIALISTS])
    kw.setdefault("progress", False)
    return FusionConfig(base=ckpts["root"] / "base", models=models, output=out, **kw)


def load_output(out: Path) -> dict[str, torch.Tensor]:
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    sd = {}
    for shard in sorted(set(idx["weight_map"].values())):
        sd.update(load_file(out / shard))
    return sd


# ------------------------------------------------------------------------------------- naive fp64 reference
def f64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def kth_largest(a: np.ndarray, k: int) -> float:
    return float(np.sort(a.ravel())[::-1][k - 1]) if k > 0 else math.inf


def topk_mask(tau: np.ndarray, density: float, exact: bool = False) -> np.ndarray:
    """paper: every |τ| >= the k-th largest; mergekit: exactly k, ties broken by lower flat index (stable sort)."""
    if density >= 1.0:
        return np.ones(tau.shape, bool)
    if exact:
        k = max(1, int(density * tau.size))
        mask = np.zeros(tau.size, bool)
        mask[np.argsort(-np.abs(tau).ravel(), kind="stable")[:k]] = True
        return mask.reshape(tau.shape) & (tau != 0)
    k = int(density * tau.size)
    return (np.abs(tau) >= kth_largest(np.abs(tau), k)) & (tau != 0)


def band_mask(tau: np.ndarray, density: float, gamma: float, rowwise: bool) -> np.ndarray:
    def band(a: np.ndarray) -> np.ndarray:
        n = a.size
        n_out, n_keep = int(gamma * n), int(density * n)
        keep = (a >= kth_largest(a, n_out + n_keep)) & (a != 0)
        if n_out:
            keep &= a < kth_largest(a, n_out)
        return keep

    a = np.abs(tau)
    if not rowwise:
        return band(a)
    rows = a.reshape(-1, a.shape[-1] if a.ndim else 1)
    return np.stack([band(r) for r in rows]).reshape(a.shape)


def reference(ckpts, key: str, method: str, semantics: str = "paper", lam: float = 1.0, weights=None,
              density: float = 1.0, gamma: float = 0.01) -> np.ndarray:
    """Textbook formulas, one tensor, float64, no streaming."""
    b = f64(ckpts["base"][key])
    thetas = [f64(ckpts["specs"][n][key]) for n in SPECIALISTS]
    w = weights or [1.0] * len(thetas)
    taus = [t - b for t in thetas]
    if method == "linear":
        return sum(wi * t for wi, t in zip(w, thetas)) / sum(w)
    if method == "task_arithmetic":
        return b + lam * sum(wi * t for wi, t in zip(w, taus))
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        sp = [t * band_mask(t, density, gamma, rowwise=semantics == "paper") for t in taus]
    else:
        sp = [t * topk_mask(t, density, exact=semantics == "mergekit") for t in taus]
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


def to_bf16(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16)


def ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    """Max distance in bf16 units in the last place (sign-magnitude order)."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.view(torch.int16).to(torch.int64)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


FUSED = [k for k in SHAPES if not k.startswith(("audio_encoder.", "audio_projector."))]


# ------------------------------------------------------------------------------------------------ exactness

MODEL_KEYS = [k for k in SHAPES if not k.startswith("audio_projector.")]  # every fused tensor (frozen ones too)


def reference_model_ties(ckpts, lam: float, density: float) -> dict[str, np.ndarray]:
    """The original TIES (paper repo / FusionBench): each task vector flattened over the whole model, one kthvalue
    threshold per task, sign election with zero sums set to the model's majority sign, disjoint mean."""
    sizes = [int(np.prod(SHAPES[k])) for k in MODEL_KEYS]
    base = np.concatenate([f64(ckpts["base"][k]).ravel() for k in MODEL_KEYS])
    taus = [np.concatenate([f64(ckpts["specs"][n][k]).ravel() for k in MODEL_KEYS]) - base for n in SPECIALISTS]
    trimmed = [t * topk_mask(t, density) for t in taus]
    sign = np.sign(sum(trimmed))
    sign[sign == 0] = np.sign(sign.sum())
    agree = [(np.sign(t) == sign) & (t != 0) for t in trimmed]
    merged = sum(np.where(a, t, 0.0) for a, t in zip(agree, trimmed)) / np.maximum(sum(agree), 1)
    flat = base + lam * merged
    return {k: part.reshape(SHAPES[k]) for k, part in zip(MODEL_KEYS, np.split(flat, np.cumsum(sizes)[:-1]))}




def dare_run(dare_ckpts, out, seed, semantics="paper", density=0.3, **kw):
    kw.setdefault("chunk_elems", 3000)
    cfg = FusionConfig(base=dare_ckpts["root"] / "base", models=[{"name": "ft", "path": dare_ckpts["root"] / "ft"}],
                       output=out, method="dare_linear", semantics=semantics, density=density, seed=seed,
                       progress=False, **kw)
    fuse(cfg)
    key = next(iter(dare_ckpts["base"]))
    return (load_file(out / "model.safetensors")[key].double() - dare_ckpts["base"][key].double()), key
