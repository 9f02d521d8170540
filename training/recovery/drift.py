"""Projector Drift made visible: how differently the fused backbone treats audio than the audio specialist did.

    python -m training.diagnose_drift --specialist runs/specialist-audio --fused runs/fused --data dev.jsonl \
        [--recovered runs/recovered] [--out drift.json]

Label-free measures (only the audio clips of `--data` are needed):
- per layer: mean cosine between the specialist's and the fused backbone's hidden states at the audio positions, and
  linear CKA (Kornblith et al. 2019) over audio-token states and over per-clip mean states;
- pooled embeddings: mean/min cosine between the two models' embeddings of the same clip, CKA, and whether each
  clip's nearest neighbour among the clips stays the same;
- projector outputs against the backbone's text-token embedding table (norms, mean direction, a diagonal-Gaussian
  2-Wasserstein distance): the projector was calibrated to the specialist's token statistics.
With labels (pairs whose other side is text or another non-audio input): audio->partner R@1/R@5/MRR per model.
Zero drift (specialist == fused) gives cosine 1, CKA 1, agreement 1, identical retrieval.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.common.calibration import backbone_fingerprint, backbone_matches
from training.common.io_utils import write_json_atomic
from training.common.repo import load_conan
from training.evaluation.embed import embed_keyed as embed_inputs
from training.evaluation.metrics import retrieval_scores
from training.recovery.clips import AudioPairs, ClipCache, audio_pairs, cache_audio, collate_clips, read_pairs
from training.recovery.config import RecoverError


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two representations of the same n samples (rows); 1 = same up to rotation and scale."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs the same number of rows, got {x.shape[0]} and {y.shape[0]}.")
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (y.T @ x).norm() ** 2
    denom = (x.T @ x).norm() * (y.T @ y).norm()
    return float(cross / denom) if denom > 0 else float("nan")


@contextmanager
def capture_layers(model: torch.nn.Module):
    """Collect [input embeddings, output of every decoder layer] of the backbone's language model per forward."""
    layers = model.backbone.language_model.layers
    states: list[torch.Tensor] = []

    def pre(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        states.append(hidden.detach())

    def post(_module, _args, output):
        states.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [layers[0].register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [layer.register_forward_hook(post) for layer in layers]
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _run(model: torch.nn.Module, clips: ClipCache, pad_id: int, audio_token_id: int, batch_size: int) -> dict:
    """Per-layer audio-token states, per-clip mean states, embeddings and projector outputs of every clip."""
    n_layers = len(model.backbone.language_model.layers) + 2  # embeddings, each layer, final norm
    tokens: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    means: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    embeddings, projected = [], []
    for start in range(0, len(clips), batch_size):
        batch = collate_clips(clips, list(range(start, min(start + batch_size, len(clips)))), pad_id)
        batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
        with capture_layers(model) as states:
            out = model(**batch)
        states = states + [out.last_hidden_state]
        audio_mask = batch["input_ids"] == audio_token_id
        real = batch["attention_mask"].unsqueeze(-1).float()
        for i, hidden in enumerate(states):
            hidden = hidden.float()
            tokens[i].append(hidden[audio_mask].cpu())
            means[i].append(((hidden * real).sum(1) / real.sum(1)).cpu())
        embeddings.append(out.embeddings.float().cpu())
        projected.append(model.project_audio(batch["audio_frames"], batch["audio_feature_lengths"]).float().cpu())
    return {"tokens": [torch.cat(t) for t in tokens], "means": [torch.cat(m) for m in means],
            "embeddings": torch.cat(embeddings), "projected": torch.cat(projected)}


def token_statistics(audio_tokens: torch.Tensor, table: torch.Tensor) -> dict[str, float]:
    """Projector outputs vs the text-token embedding table: the scale and place the backbone expects inputs at."""
    a, t = audio_tokens.double(), table.double()
    mu_a, mu_t, sd_a, sd_t = a.mean(0), t.mean(0), a.std(0), t.std(0)
    w2 = ((mu_a - mu_t).pow(2).sum() + (sd_a - sd_t).pow(2).sum()).sqrt()
    return {
        "audio_norm_mean": float(a.norm(dim=1).mean()), "text_norm_mean": float(t.norm(dim=1).mean()),
        "norm_ratio": float(a.norm(dim=1).mean() / t.norm(dim=1).mean()),
        "mean_direction_cos": float(F.cosine_similarity(mu_a, mu_t, dim=0)),
        "w2_diag_over_text_scale": float(w2 / sd_t.pow(2).sum().sqrt()),
    }


def _nn_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape[0] < 2:
        return float("nan")
    sa, sb = a @ a.T, b @ b.T
    sa.fill_diagonal_(-2)
    sb.fill_diagonal_(-2)
    return float((sa.argmax(1) == sb.argmax(1)).float().mean())


def _retrieval(model: torch.nn.Module, processor: Any, pairs: AudioPairs, clips: ClipCache, embeddings: torch.Tensor,
               batch_size: int) -> dict[str, float]:
    bank, index = embed_inputs(model, processor, pairs.partner_inputs, batch_size, progress=False, desc="partners")
    seen: dict[int, int] = {}
    for a_key, p_key in zip(pairs.audio_keys, pairs.partner_keys):
        seen.setdefault(clips.index[a_key], index[p_key])
    rows = list(seen)
    return retrieval_scores(embeddings[rows], bank, [seen[r] for r in rows])


def drift_report(
    specialist: str | Path, fused: str | Path, data: str | Path, recovered: str | Path | None = None,
    max_pairs: int | None = None, batch_size: int = 16, feature_cache_dir: str | Path | None = None,
    progress: bool = True, device: str | None = None,
) -> dict[str, Any]:
    """All drift measures between `specialist` and `fused` on the audio of `data` (plus retrieval where labelled)."""
    spec_model, processor = load_conan(specialist)
    fused_model, fused_processor = load_conan(fused)
    if spec_model.config.audio_token_id != fused_model.config.audio_token_id or len(processor.tokenizer) != len(
            fused_processor.tokenizer):
        raise RecoverError(f"{specialist} and {fused} do not share a tokenizer; drift is only defined for one base.")
    pairs = audio_pairs(read_pairs(data, max_pairs))
    if len(pairs) == 0:
        raise RecoverError(f"{data}: no pair has audio on exactly one side; expected audio<->text pairs.")
    pad_id, audio_id = int(processor.tokenizer.pad_token_id), int(fused_model.config.audio_token_id)
    models = {"specialist": (spec_model, processor), "fused": (fused_model, fused_processor)}
    if recovered is not None:
        models["recovered"] = load_conan(recovered)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    for model, _ in models.values():
        model.to(device)
    runs, clip_caches = {}, {}
    for name, (model, proc) in models.items():
        clips = cache_audio(model, proc, pairs.audio_inputs, batch_size, progress, feature_cache_dir)
        clip_caches[name] = clips
        runs[name] = _run(model, clips, pad_id, audio_id, batch_size)

    s, f = runs["specialist"], runs["fused"]
    layer_names = ["embeddings"] + [f"layer_{i}" for i in range(len(s["tokens"]) - 2)] + ["final_norm"]
    layers = []
    for i, name in enumerate(layer_names):
        layers.append({
            "layer": name,
            "audio_token_cos": float(F.cosine_similarity(s["tokens"][i], f["tokens"][i], dim=-1).mean()),
            "audio_token_cka": linear_cka(s["tokens"][i], f["tokens"][i]),
            "clip_mean_cka": linear_cka(s["means"][i], f["means"][i]),
        })
    cos = (s["embeddings"] * f["embeddings"]).sum(-1)
    pooled = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
              "cka": linear_cka(s["embeddings"], f["embeddings"]),
              "nn_agreement": _nn_agreement(s["embeddings"], f["embeddings"])}
    tables = {name: m.get_input_embeddings().weight.detach().float().cpu() for name, (m, _) in models.items()}
    projector = {
        "specialist_projector_vs_specialist_table": token_statistics(s["projected"], tables["specialist"]),
        "fused_projector_vs_fused_table": token_statistics(f["projected"], tables["fused"]),
        "projector_output_cos": float(F.cosine_similarity(s["projected"], f["projected"], dim=-1).mean()),
        "text_table_changed": not torch.equal(tables["specialist"], tables["fused"]),
    }
    if "recovered" in runs:
        projector["recovered_projector_vs_fused_table"] = token_statistics(runs["recovered"]["projected"], tables["fused"])
    retrieval = {name: _retrieval(m, proc, pairs, clip_caches[name], runs[name]["embeddings"], batch_size)
                 for name, (m, proc) in models.items()}
    return {
        "specialist": str(specialist), "fused": str(fused), "recovered": None if recovered is None else str(recovered),
        "data": str(data), "clips": len(clip_caches["fused"]), "pairs": len(pairs), "skipped_pairs": pairs.skipped,
        "backbones_identical": backbone_matches(backbone_fingerprint(spec_model), fused_model),
        "layers": layers, "pooled": pooled, "projector": projector, "retrieval": retrieval,
        "drift": {"embedding": 1.0 - pooled["cos_mean"], "final_cka": 1.0 - layers[-1]["audio_token_cka"],
                  "retrieval_r1_drop": retrieval["specialist"]["r@1"] - retrieval["fused"]["r@1"]},
    }


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of the report (what the CLI prints)."""
    lines = [f"Projector Drift: specialist={report['specialist']}  fused={report['fused']}  "
             f"clips={report['clips']}  backbones identical={report['backbones_identical']}", "",
             f"{'layer':<12} {'audio-token cos':>16} {'audio-token CKA':>16} {'clip-mean CKA':>14}"]
    for row in report["layers"]:
        lines.append(f"{row['layer']:<12} {row['audio_token_cos']:>16.4f} {row['audio_token_cka']:>16.4f} "
                     f"{row['clip_mean_cka']:>14.4f}")
    p = report["pooled"]
    lines += ["", f"pooled embeddings: cos mean {p['cos_mean']:.4f}  min {p['cos_min']:.4f}  CKA {p['cka']:.4f}  "
                  f"nearest-neighbour agreement {p['nn_agreement']:.3f}", "",
              f"{'projector tokens vs text-token table':<44} {'norm ratio':>10} {'mean-dir cos':>12} {'W2/scale':>9}"]
    for name, st in report["projector"].items():
        if isinstance(st, dict):
            lines.append(f"{name:<44} {st['norm_ratio']:>10.3f} {st['mean_direction_cos']:>12.3f} "
                         f"{st['w2_diag_over_text_scale']:>9.3f}")
    lines += ["", f"{'audio->partner retrieval':<26} {'R@1':>7} {'R@5':>7} {'MRR':>7} {'n':>5}"]
    for name, r in report["retrieval"].items():
        lines.append(f"{name:<26} {r['r@1']:>7.3f} {r['r@5']:>7.3f} {r['mrr']:>7.3f} {r['n']:>5}")
    d = report["drift"]
    lines += ["", f"drift: 1-cos(embedding) {d['embedding']:.4f}  1-CKA(final) {d['final_cka']:.4f}  "
                  f"R@1 drop {d['retrieval_r1_drop']:+.3f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.diagnose_drift", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specialist", required=True, help="audio specialist folder (the projector's home backbone)")
    p.add_argument("--fused", required=True, help="fused model folder")
    p.add_argument("--data", required=True, help="JSONL pairs with audio (labels used for retrieval)")
    p.add_argument("--recovered", help="optional recovered/realigned model folder, reported next to the others")
    p.add_argument("--output", "--out", dest="out", type=Path, help="write the JSON report here (default: drift_report.json next to --fused)")
    p.add_argument("--max-pairs", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--feature-cache-dir", help="reuse cached Whisper frames across runs")
    p.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    args = p.parse_args(argv)
    try:
        report = drift_report(args.specialist, args.fused, args.data, args.recovered, args.max_pairs,
                              args.batch_size, args.feature_cache_dir, device=args.device)
    except (RecoverError, FileNotFoundError) as error:
        print(f"diagnose_drift: error: {error}", file=sys.stderr)
        return 2
    out = args.out or Path(args.fused) / "drift_report.json"
    write_json_atomic(out, report)
    print(format_table(report))
    print(f"\nJSON report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
