"""`omni_train_step` across 2 gloo processes: positives gathered, hard negatives local (issue 17's definition).

Each rank runs the real train step (tuple groups, per-step hard negatives drawn inside its own half of the batch,
plain and GradCache) on a tiny linear encoder; the DDP-averaged gradients and the logged loss parts must equal the
objective written out by hand on the global batch of 4 tuples: Obj1 = mean_i CE over [fused_i . aug_j for every j of
the global batch] + [fused_i . hard_k for the hard negatives of i's own rank]; Obj2 / Obj3 symmetric InfoNCE over the
global batch; L = Obj1 + Obj2 + Obj3. Three steps cover the three pairs and hard-negative kinds. No model is loaded,
so the run (two `torch.distributed.run` workers) takes seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from training.contrastive.omni_objectives import OmniWeights, derangement, hard_negative_modality, modality_pair
from training.contrastive.omni_training import OmniBatch, omni_train_step

GLOBAL_BATCH, WORLD, DIM, HIDDEN = 4, 2, 5, 4
TAU, SEED, STEPS = 0.1, 3, 3
MODS = ("text", "video", "audio")


@dataclass
class Parsed:
    """Stands in for the processor's ParsedInput: one feature vector per present modality, None when absent."""

    text: Any = None
    video: Any = None
    audio: Any = None


def features() -> tuple[list[Parsed], list[Parsed]]:
    """The global batch: anchor tuples and their augmented copies (fixed random features)."""
    g = torch.Generator().manual_seed(11)
    anchors = [Parsed(*torch.randn(3, DIM, generator=g)) for _ in range(GLOBAL_BATCH)]
    augmented = [Parsed(*(f + 0.3 * torch.randn(DIM, generator=g) for f in (p.text, p.video, p.audio)))
                 for p in anchors]
    return anchors, augmented


def as_input(p: Parsed) -> torch.Tensor:
    return torch.cat([torch.zeros(DIM) if getattr(p, m) is None else getattr(p, m) for m in MODS])


def make_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3 * DIM, HIDDEN)


def prepare(parsed: list[Parsed], instructions: list, chunk_size: int) -> list[dict[str, torch.Tensor]]:
    rows = torch.stack([as_input(p) for p in parsed])
    return [{"x": c} for c in (rows.split(chunk_size) if chunk_size else [rows])]


def run_rank(gradcache: bool) -> dict:
    """Loss parts and DDP-averaged gradients of STEPS omni steps on this rank's share of the global batch."""
    import torch.distributed as dist

    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    encoder = make_encoder()
    anchors, augmented = features()
    share = GLOBAL_BATCH // world
    mine = slice(rank * share, (rank + 1) * share)
    batch = OmniBatch(anchors=anchors[mine], augmented=augmented[mine], instructions=[None] * share,
                      prepare=lambda parsed, instr: prepare(parsed, instr, 1 if gradcache else 0),
                      sources=["tuples"] * share)

    def encode(chunk):
        return F.normalize(encoder(chunk["x"]), dim=-1)

    result = {"parts": [], "grads": [], "world": world}
    for step in range(STEPS):
        encoder.zero_grad()
        out_step = omni_train_step(encode, batch, step, OmniWeights(), TAU, seed=SEED, gradcache=gradcache)
        grads = []
        for p in encoder.parameters():
            g = p.grad.clone()
            if distributed:  # what DDP does
                dist.all_reduce(g)
                g /= world
            grads.append(g)
        result["parts"].append(dict(out_step.parts))
        result["grads"].append(grads)
    return result


def ce(logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log softmax(row)[row index], written out."""
    return (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()


def sym(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (ce(x @ y.T / TAU) + ce(y @ x.T / TAU))


def reference(world: int = WORLD, local_hard_negatives: bool = True) -> dict:
    """The issue's objective on the global batch, by hand; hard negatives drawn within each of `world` ranks' share."""
    encoder = make_encoder()
    anchors, augmented = features()
    share = GLOBAL_BATCH // world

    def embed(parsed):
        return F.normalize(encoder(torch.stack([as_input(p) for p in parsed])), dim=-1)

    result = {"parts": [], "grads": []}
    for step in range(STEPS):
        encoder.zero_grad()
        swap = hard_negative_modality(step)
        hard_rows, owner = [], []
        for r in range(world):
            local = anchors[r * share:(r + 1) * share]
            donors = derangement(share, SEED, step)
            hard_rows += [Parsed(**{m: getattr(local[donors[i] if m == swap else i], m) for m in MODS})
                          for i in range(share)]
            owner += [r] * share
        with torch.no_grad():
            hard = embed(hard_rows)
        fused, aug = embed(anchors), embed(augmented)
        owner_t = torch.tensor(owner)
        neg = fused @ hard.T / TAU
        if local_hard_negatives:
            neg = neg.masked_fill(owner_t[:, None] != owner_t[None, :], float("-inf"))
        obj1 = ce(torch.cat([fused @ aug.T / TAU, neg], dim=1))
        a, b = modality_pair(step)
        z_a, z_b = (embed([Parsed(**{m: getattr(p, m)}) for p in anchors]) for m in (a, b))
        obj2 = 0.5 * (sym(fused.detach(), z_a) + sym(fused.detach(), z_b))
        obj3 = sym(z_a, z_b)
        total = obj1 + obj2 + obj3
        total.backward()
        result["parts"].append({"tuple_nce": obj1.detach(), "teacher": obj2.detach(), "pair": obj3.detach(),
                                "total": total.detach()})
        result["grads"].append([p.grad.clone() for p in encoder.parameters()])
    return result


def check(got: dict, want: dict) -> None:
    for step in range(STEPS):
        assert got["parts"][step].keys() == want["parts"][step].keys()
        for name, value in want["parts"][step].items():
            assert torch.allclose(got["parts"][step][name], value, atol=1e-5), (step, name)
        for g_got, g_ref in zip(got["grads"][step], want["grads"][step]):
            assert g_ref.abs().max() > 0
            assert torch.allclose(g_got, g_ref, atol=1e-6, rtol=1e-4), step


def test_two_gloo_processes_give_the_global_objective_with_local_hard_negatives(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    two = tmp_path / "two.pt"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port", "0",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", __file__, str(two)],
        check=True, env=env, timeout=120,
    )
    got, want, gathered = torch.load(two), reference(), reference(local_hard_negatives=False)
    for mode in ("plain", "gradcache"):
        assert got[mode]["world"] == WORLD
        check(got[mode], want)
        for step in range(STEPS):  # the hard negatives really are local: with every rank's, Obj1 would differ
            assert not torch.allclose(gathered["parts"][step]["tuple_nce"], got[mode]["parts"][step]["tuple_nce"],
                                      atol=1e-4), (mode, step)


@pytest.mark.parametrize("gradcache", [False, True], ids=["plain", "gradcache"])
def test_one_process_step_is_the_definition_on_its_batch(gradcache):
    got = run_rank(gradcache)
    assert got["world"] == 1
    check(got, reference(world=1))


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        results = {"plain": run_rank(False), "gradcache": run_rank(True)}
        if dist.get_rank() == 0:
            torch.save(results, sys.argv[1])
    finally:
        dist.destroy_process_group()
