"""Training-free projector re-alignment: the cheap alternative to Projector Recovery (no labels, no SGD).

    python -m training.realign --specialist runs/specialist-audio --fused runs/fused --data audio.jsonl \
        --output runs/realigned [--dev-data dev.jsonl]

Goal: make the fused model's audio embeddings relate to the world as the audio specialist's did. No audio<->text
labels are used: the clips, and (for the default `relational` target) the *set* of texts found in `--data` as
unpaired anchors. Fusion moves the text side too, so the default target is not the specialist's audio vector itself
but, per clip, the closest vector in the fused space whose similarities to the fused anchor embeddings equal the
specialist's similarities to its own anchor embeddings (`relational_targets`); `--target embedding` reproduces the
specialist's vectors instead (measured worse: bench/recover.py).

Method: damped Gauss-Newton least squares on a low-dimensional correction of the projector's output layer,
    fc2.weight += U C V^T,   fc2.bias += U c
where U (H x r) spans the top-r principal directions of the projector's output tokens and V (H x r) those of fc2's
inputs, so only r^2 + r numbers are solved for. Each iteration measures the Jacobian of all clips' fused embeddings
with respect to those numbers by central finite differences (2(r^2 + r) inference passes, no backprop), solves the
ridge least-squares problem `min |J d - (e_spec - e_fused)|^2 + lambda |d|^2` in closed form for a few dampings
lambda (Levenberg-Marquardt style) and keeps the (lambda, step size) that best reproduces the specialist on held-out
clips; it stops when no candidate improves. Cost is reported as inference passes and seconds,
next to recovery (bench/recover.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import torch.nn.functional as F

from training.common.calibration import CALIBRATION_FILE, calibrate
from training.common.io_utils import atomic_output_dir, check_output_free, write_json_atomic
from training.common.repo import load_conan, save_conan_repo
from training.evaluation.embed import embed_keyed as embed_inputs
from training.evaluation.metrics import retrieval_scores
from training.recovery.clips import ClipCache, audio_pairs, cache_audio, embed_clips, read_pairs
from training.recovery.config import RecoverError


def _principal_directions(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-`rank` right singular vectors of centred rows of x: (dim, rank)."""
    x = x.double() - x.double().mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[:rank].T.contiguous()


@torch.no_grad()
def _fc2_inputs_and_outputs(model: torch.nn.Module, clips: ClipCache) -> tuple[torch.Tensor, torch.Tensor]:
    tokens_in, tokens_out = [], []
    projector = model.audio_projector
    for frames in clips.frames:
        weight = projector.fc1.weight
        hidden = projector.act(projector.fc1(frames.reshape(-1, frames.shape[-1]).to(weight.device, weight.dtype)))
        tokens_in.append(hidden.float().cpu())
        tokens_out.append(projector.fc2(hidden).float().cpu())
    return torch.cat(tokens_in), torch.cat(tokens_out)


class Fc2Correction:
    """fc2 <- fc2 + U C V^T (weight) and U c (bias), parameterised by one flat vector of r^2 + r numbers."""

    def __init__(self, model: torch.nn.Module, u: torch.Tensor, v: torch.Tensor):
        self.fc2 = model.audio_projector.fc2
        w = self.fc2.weight
        self.u, self.v = u.to(w.device, w.dtype), v.to(w.device, w.dtype)
        self.w0, self.b0 = self.fc2.weight.detach().clone(), self.fc2.bias.detach().clone()
        self.rank = u.shape[1]

    @property
    def size(self) -> int:
        return self.rank * self.rank + self.rank

    @torch.no_grad()
    def apply(self, delta: torch.Tensor) -> None:
        delta = delta.to(self.w0.device, self.w0.dtype)
        c = delta[: self.rank * self.rank].reshape(self.rank, self.rank)
        self.fc2.weight.copy_(self.w0 + self.u @ c @ self.v.T)
        self.fc2.bias.copy_(self.b0 + self.u @ delta[self.rank * self.rank :])


def relational_targets(spec_audio: torch.Tensor, spec_anchors: torch.Tensor, fused_anchors: torch.Tensor
                       ) -> torch.Tensor:
    """Targets in the *fused* space that relate to the fused anchors as the specialist's audio related to its own.

    Fusion moves the text side too, so reproducing the specialist's audio vectors is the wrong goal. For each clip
    the target y is the smallest change of the specialist embedding e with fused_anchors @ y = spec_anchors @ e
    (least squares, minimum norm), then renormalised. Anchors are unpaired texts: no audio<->text labels are used.
    """
    a_s, a_f, e = spec_anchors.double(), fused_anchors.double(), spec_audio.double()
    wanted = e @ a_s.T  # (n, K) the specialist's similarity profile of each clip
    correction = (wanted - e @ a_f.T) @ torch.linalg.pinv(a_f).T  # min-norm y - e solving a_f (y - e) = residual
    return F.normalize(e + correction, dim=-1).float()


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum(-1).mean())


@torch.no_grad()
def realign(
    fused: torch.nn.Module, clips: ClipCache, targets: torch.Tensor, pad_id: int, rank: int = 6,
    iterations: int = 3, dampings: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0), epsilon: float = 1e-2,
    holdout: float = 0.25, step_sizes: tuple[float, ...] = (0.5, 1.0), batch_size: int = 32, progress: bool = True,
) -> dict[str, Any]:
    """Fit the fc2 correction in place on `fused`; `targets` are the specialist's embeddings of `clips` (rows)."""
    from tqdm.auto import tqdm

    n = len(clips)
    if n < 4:
        raise RecoverError(f"realign needs at least 4 audio clips, got {n}.")
    n_hold = max(1, int(round(holdout * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    fit_rows, hold_rows = perm[n_hold:], perm[:n_hold]
    fc2_in, fc2_out = _fc2_inputs_and_outputs(fused, clips)
    rank = min(rank, fc2_in.shape[1], fc2_out.shape[1], fc2_in.shape[0])
    correction = Fc2Correction(fused, _principal_directions(fc2_out, rank), _principal_directions(fc2_in, rank))
    scale = float(fused.audio_projector.fc2.weight.norm() / (rank ** 0.5))  # keeps probes comparable across models
    delta = torch.zeros(correction.size, dtype=torch.float64)
    passes = 0

    def embed(rows: list[int], d: torch.Tensor) -> torch.Tensor:
        nonlocal passes
        correction.apply(d)
        passes += 1
        return embed_clips(fused, clips, rows, pad_id, batch_size).double().cpu()

    history = []
    start = {"fit": _agreement(embed(fit_rows, delta), targets[fit_rows].double()),
             "holdout": _agreement(embed(hold_rows, delta), targets[hold_rows].double())}
    for it in range(iterations):
        current = embed(fit_rows, delta)
        residual = (targets[fit_rows].double() - current).reshape(-1)
        columns = []
        for k in tqdm(range(correction.size), desc=f"realign Jacobian {it + 1}/{iterations}", disable=not progress,
                      leave=False):
            probe = torch.zeros_like(delta)
            probe[k] = epsilon * scale
            plus, minus = embed(fit_rows, delta + probe), embed(fit_rows, delta - probe)
            columns.append(((plus - minus) / (2 * epsilon * scale)).reshape(-1))
        jac = torch.stack(columns, dim=1)  # (n_fit * H, size)
        gram, rhs = jac.T @ jac, jac.T @ residual
        eye = float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=gram.dtype)
        # Levenberg-Marquardt style: the linearisation is only trusted locally, so several dampings x step sizes
        # are tried on held-out clips (one cheap solve and one held-out pass each; the Jacobian is shared).
        best = (_agreement(embed(hold_rows, delta), targets[hold_rows].double()), 0.0, 0.0, delta)
        for lam in dampings:
            step = torch.linalg.solve(gram + lam * eye, rhs)
            for alpha in step_sizes:
                score = _agreement(embed(hold_rows, delta + alpha * step), targets[hold_rows].double())
                if score > best[0]:
                    best = (score, alpha, lam, delta + alpha * step)
        delta = best[3]
        history.append({"iteration": it + 1, "holdout_agreement": best[0], "step_size": best[1], "damping": best[2]})
        if best[1] == 0.0:
            break
    correction.apply(delta)
    end = {"fit": _agreement(embed(fit_rows, delta), targets[fit_rows].double()),
           "holdout": _agreement(embed(hold_rows, delta), targets[hold_rows].double())}
    return {"rank": rank, "parameters": correction.size, "inference_passes": passes, "clips_fit": len(fit_rows),
            "clips_holdout": len(hold_rows), "agreement_before": start, "agreement_after": end, "history": history}


def run(
    specialist: str | Path, fused: str | Path, data: str | Path, output: str | Path | None = None,
    dev_data: str | Path | None = None, rank: int = 6, iterations: int = 3, max_pairs: int | None = None,
    feature_cache_dir: str | Path | None = None, overwrite: bool = False, progress: bool = True,
    device: str | None = None, target: str = "relational",
) -> dict[str, Any]:
    """Realign `fused`'s projector to reproduce `specialist` on the audio of `data`; optionally write the model
    (FileExistsError, before any work, when `output` exists and `overwrite` is False)."""
    if output is not None:
        check_output_free(output, overwrite)
    t0 = time.perf_counter()
    spec_model, processor = load_conan(specialist)
    fused_model, fused_processor = load_conan(fused)
    for p in fused_model.parameters():
        p.requires_grad_(False)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec_model.to(device)
    fused_model.to(device)
    pairs = audio_pairs(read_pairs(data, max_pairs))
    if len(pairs) == 0:
        raise RecoverError(f"{data}: no rows with audio on exactly one side.")
    pad_id = int(processor.tokenizer.pad_token_id)
    clips = cache_audio(fused_model, fused_processor, pairs.audio_inputs, progress=progress,
                        cache_dir=feature_cache_dir)
    spec_clips = cache_audio(spec_model, processor, pairs.audio_inputs, progress=progress, cache_dir=feature_cache_dir)
    with torch.no_grad():
        targets = embed_clips(spec_model, spec_clips, list(range(len(spec_clips))), pad_id).cpu()
    anchors = len(pairs.partner_inputs) if target == "relational" else 0
    if target == "relational":
        # The set of non-audio sides (texts) as anchors; which text belongs to which clip is never used.
        spec_anchors, _ = embed_inputs(spec_model, processor, pairs.partner_inputs, progress=False)
        fused_anchors, _ = embed_inputs(fused_model, fused_processor, pairs.partner_inputs, progress=False)
        targets = relational_targets(targets, spec_anchors, fused_anchors)
    elif target != "embedding":
        raise RecoverError(f"target must be 'relational' or 'embedding', got {target!r}.")

    def dev_r1(model: torch.nn.Module) -> dict[str, float] | None:
        if dev_data is None:
            return None
        dev = audio_pairs(read_pairs(dev_data))
        dev_clips = cache_audio(model, fused_processor, dev.audio_inputs, progress=False, cache_dir=feature_cache_dir)
        bank, index = embed_inputs(model, fused_processor, dev.partner_inputs, progress=False)
        seen: dict[int, int] = {}
        for a, p in zip(dev.audio_keys, dev.partner_keys):
            seen.setdefault(dev_clips.index[a], index[p])
        with torch.no_grad():
            emb = embed_clips(model, dev_clips, list(seen), pad_id).cpu()
        return retrieval_scores(emb, bank, list(seen.values()))

    dev_before = dev_r1(fused_model)
    setup_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = realign(fused_model, clips, targets, pad_id, rank=rank, iterations=iterations, progress=progress)
    fit_seconds = time.perf_counter() - t1
    report = {"specialist": str(specialist), "fused": str(fused), "data": str(data), "clips": len(clips),
              "target": target, "anchors": anchors,
              **result, "setup_seconds": round(setup_seconds, 3), "fit_seconds": round(fit_seconds, 3),
              "dev_before": dev_before, "dev_after": dev_r1(fused_model), "dev_specialist": dev_r1(spec_model)}
    if output is not None:
        fused_model.to("cpu")
        record = calibrate(fused_model, fused, "realign (training-free Gauss-Newton on fc2)")
        with atomic_output_dir(output, overwrite=overwrite) as tmp:
            save_conan_repo(fused_model, fused_processor, tmp)
            write_json_atomic(tmp / CALIBRATION_FILE, record)
            write_json_atomic(tmp / "realign_report.json", report)
        report["output"] = str(output)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.realign", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specialist", required=True, help="audio specialist folder (whose embeddings are the target)")
    p.add_argument("--fused", required=True, help="fused model folder (its projector is corrected)")
    p.add_argument("--data", required=True, help="JSONL with audio items (labels are not used)")
    p.add_argument("--output", help="write the realigned model here")
    p.add_argument("--dev-data", help="optional labelled JSONL: audio->partner R@1 before/after")
    p.add_argument("--rank", type=int, default=6, help="subspace rank r (solves r^2 + r numbers)")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--max-pairs", type=int)
    p.add_argument("--target", choices=("relational", "embedding"), default="relational",
                   help="relational: match the specialist's similarity to the (unpaired) text anchors in the fused "
                        "space; embedding: reproduce the specialist's audio embeddings themselves")
    p.add_argument("--feature-cache-dir")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    try:
        report = run(args.specialist, args.fused, args.data, args.output, args.dev_data, args.rank, args.iterations,
                     args.max_pairs, args.feature_cache_dir, args.force, target=args.target)
    except (RecoverError, FileNotFoundError, FileExistsError) as error:
        print(f"realign: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
