"""Generate Qwen2-VL-shaped bf16 sharded checkpoints for the fusion benchmark: a base + 4 specialists.

    .venv/bin/python bench/fusion/make_checkpoints.py --out "$CONAN_BENCH_DATA/fusion" --size 0.5b

Layout per model: `backbone.visual.*` (vision tower + merger), `backbone.language_model.*`, `audio_encoder.*`
(frozen everywhere), `audio_projector.*` (changed only by the audio specialist). Specialists: image, document
(everything but the audio parts changes), video (vision tower frozen), audio (also changes the projector and carries
extra union keys `audio_projector.fc3.*` in a shard of their own). Deltas ~ N(0, (2.5% of the base scale)²) with
15% of the entries exactly zero. `mergekit-inputs/` holds symlinked copies restricted to the key intersection,
because mergekit cannot take keys the base lacks. Never write these under the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

SIZES = {
    # hidden, text layers, intermediate, kv heads, vocab, vision depth, vision width, whisper d, whisper layers
    "0.5b": dict(hidden=1536, layers=8, inter=3072, kv=2, vocab=151936, vdepth=8, vwidth=1280, ad=512, alayers=6),
    "small": dict(hidden=256, layers=2, inter=512, kv=2, vocab=4096, vdepth=2, vwidth=128, ad=64, alayers=2),
}
SPECIALISTS = ("image", "video", "document", "audio")
BASE_SCALE, DELTA_REL, ZERO_FRAC = 0.02, 0.025, 0.15


def shapes(s: dict) -> dict[str, tuple[int, ...]]:
    """Qwen2-VL (transformers 5 names under `backbone.`) + Whisper encoder + MLP projector."""
    h, v, hd = s["hidden"], s["vwidth"], 128 if s["hidden"] >= 1024 else 32
    out: dict[str, tuple[int, ...]] = {"backbone.visual.patch_embed.proj.weight": (v, 3, 2, 14, 14)}
    for i in range(s["vdepth"]):
        p = f"backbone.visual.blocks.{i}."
        out.update({p + "norm1.weight": (v,), p + "norm1.bias": (v,), p + "norm2.weight": (v,), p + "norm2.bias": (v,),
                    p + "attn.qkv.weight": (3 * v, v), p + "attn.qkv.bias": (3 * v,), p + "attn.proj.weight": (v, v),
                    p + "attn.proj.bias": (v,), p + "mlp.fc1.weight": (4 * v, v), p + "mlp.fc1.bias": (4 * v,),
                    p + "mlp.fc2.weight": (v, 4 * v), p + "mlp.fc2.bias": (v,)})
    out.update({"backbone.visual.merger.ln_q.weight": (v,), "backbone.visual.merger.ln_q.bias": (v,),
                "backbone.visual.merger.mlp.0.weight": (4 * v, 4 * v), "backbone.visual.merger.mlp.0.bias": (4 * v,),
                "backbone.visual.merger.mlp.2.weight": (h, 4 * v), "backbone.visual.merger.mlp.2.bias": (h,),
                "backbone.language_model.embed_tokens.weight": (s["vocab"], h)})
    kvd = s["kv"] * hd
    for i in range(s["layers"]):
        p = f"backbone.language_model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
                    p + "self_attn.k_proj.weight": (kvd, h), p + "self_attn.k_proj.bias": (kvd,),
                    p + "self_attn.v_proj.weight": (kvd, h), p + "self_attn.v_proj.bias": (kvd,),
                    p + "self_attn.o_proj.weight": (h, h), p + "mlp.gate_proj.weight": (s["inter"], h),
                    p + "mlp.up_proj.weight": (s["inter"], h), p + "mlp.down_proj.weight": (h, s["inter"]),
                    p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    out["backbone.language_model.norm.weight"] = (h,)
    a = s["ad"]
    out.update({"audio_encoder.conv1.weight": (a, 80, 3), "audio_encoder.conv1.bias": (a,),
                "audio_encoder.conv2.weight": (a, a, 3), "audio_encoder.conv2.bias": (a,),
                "audio_encoder.embed_positions.weight": (1500, a)})
    for i in range(s["alayers"]):
        p = f"audio_encoder.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (a, a), p + "self_attn.k_proj.weight": (a, a),
                    p + "self_attn.v_proj.weight": (a, a), p + "self_attn.out_proj.weight": (a, a),
                    p + "fc1.weight": (4 * a, a), p + "fc2.weight": (a, 4 * a),
                    p + "self_attn_layer_norm.weight": (a,), p + "final_layer_norm.weight": (a,)})
    out.update({"audio_encoder.layer_norm.weight": (a,), "audio_projector.fc1.weight": (h, a),
                "audio_projector.fc1.bias": (h,), "audio_projector.fc2.weight": (h, h), "audio_projector.fc2.bias": (h,)})
    return out


def extra_audio_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    h = s["hidden"]
    return {"audio_projector.fc3.weight": (h, h), "audio_projector.fc3.bias": (h,)}


def changes(name: str, key: str) -> bool:
    if key.startswith("audio_encoder."):
        return False
    if key.startswith("audio_projector."):
        return name == "audio"
    if name == "video" and key.startswith("backbone.visual.") and ".merger." not in key:
        return False
    return True


def _config(s: dict) -> dict:
    """A real transformers Qwen2VLConfig (so mergekit's AutoConfig can read it) under an architecture name that
    has no mergekit JSON template, so mergekit infers the layout from the tensor names."""
    from transformers import Qwen2VLConfig

    hd = 128 if s["hidden"] >= 1024 else 32
    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=s["hidden"], num_hidden_layers=s["layers"], intermediate_size=s["inter"],
                         num_attention_heads=s["hidden"] // hd, num_key_value_heads=s["kv"], vocab_size=s["vocab"]),
        vision_config=dict(depth=s["vdepth"], embed_dim=s["vwidth"], hidden_size=s["hidden"], num_heads=16),
    ).to_dict()
    cfg["architectures"] = ["ConanModel"]
    cfg["torch_dtype"] = "bfloat16"
    return cfg


def generate(out: Path, size: str, seed: int = 0) -> None:
    """Write base + specialists in 2 shards each, shard by shard (peak RAM ≈ 5 shards)."""
    s = SIZES[size]
    spec = shapes(s)
    shard_bytes = sum(2 * torch.Size(v).numel() for v in spec.values()) // 2 + 1
    names = ["base", *SPECIALISTS]
    for n in names:
        (out / n).mkdir(parents=True, exist_ok=True)
        (out / n / "config.json").write_text(json.dumps(_config(s), indent=1))
        (out / n / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32768}))
    # shard plan by bytes, in key order
    shards, cur, cur_bytes = [], [], 0
    for k, shp in spec.items():
        nb = 2 * torch.Size(shp).numel()
        if cur and cur_bytes + nb > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(k)
        cur_bytes += nb
    shards.append(cur)
    n_sh = len(shards)
    wmaps: dict[str, dict[str, str]] = {n: {} for n in names}
    g = torch.Generator().manual_seed(seed)
    for i, keys in enumerate(tqdm(shards, desc=f"generate {size}")):
        fname = f"model-{i + 1:05d}-of-{n_sh:05d}.safetensors"
        dicts: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
        for k in keys:
            shp = spec[k]
            base = (torch.ones(shp) if k.endswith("norm.weight") or "layernorm" in k or "norm1.weight" in k
                    or "norm2.weight" in k or "ln_q.weight" in k else torch.randn(shp, generator=g) * BASE_SCALE)
            base = base.to(torch.bfloat16)
            dicts["base"][k] = base
            for n in SPECIALISTS:
                if not changes(n, k):
                    dicts[n][k] = base
                    continue
                d = torch.randn(shp, generator=g) * (BASE_SCALE * DELTA_REL)
                d[torch.rand(shp, generator=g) < ZERO_FRAC] = 0
                t = (base.float() + d).to(torch.bfloat16)
                dicts[n][k] = torch.where(d == 0, base, t)
        for n in names:
            save_file(dicts[n], out / n / fname, metadata={"format": "pt"})
            wmaps[n].update({k: fname for k in keys})
    # the audio specialist's union keys, in a shard of their own
    extra_name = "model-extra-audio.safetensors"
    extra = {k: (torch.randn(shp, generator=g) * BASE_SCALE).to(torch.bfloat16)
             for k, shp in extra_audio_shapes(s).items()}
    save_file(extra, out / "audio" / extra_name, metadata={"format": "pt"})
    for n in names:
        wm = dict(wmaps[n])
        if n == "audio":
            wm.update({k: extra_name for k in extra})
        (out / n / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    # mergekit inputs: the key intersection (symlinks, no copies)
    mk = out / "mergekit-inputs"
    shutil.rmtree(mk, ignore_errors=True)
    for n in names:
        (mk / n).mkdir(parents=True)
        for f in (out / n).iterdir():
            if f.name not in (extra_name, "model.safetensors.index.json"):
                os.symlink(f.resolve(), mk / n / f.name)
        (mk / n / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": wmaps[n]}))
    params = sum(torch.Size(v).numel() for v in spec.values())
    (out / "README.txt").write_text(f"size={size} params_per_model={params} extra_audio_params="
                                    f"{sum(torch.Size(v).numel() for v in extra_audio_shapes(s).values())}\n")
    print(f"wrote {out}: {params / 1e6:.1f}M params per model, {n_sh} shards")


def bench_data_root() -> Path:
    """Where generated benchmark data goes: `$CONAN_BENCH_DATA`, else `~/.cache/conan-bench` (never the repo)."""
    return Path(os.environ.get("CONAN_BENCH_DATA") or Path.home() / ".cache" / "conan-bench")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=bench_data_root() / "fusion",
                    help="output folder outside the repository (default: $CONAN_BENCH_DATA/fusion)")
    ap.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[2]
    if repo in args.out.resolve().parents or args.out.resolve() == repo:
        raise SystemExit(f"--out {args.out} is inside the repository; put generated checkpoints outside it")
    generate(args.out / args.size, args.size, args.seed)


if __name__ == "__main__":
    main()
