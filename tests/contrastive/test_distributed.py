"""A 2-process gloo run gives the 1-process loss and gradients on the same global batch (cross-device negatives,
GradCache with no_sync, DDP averaging x W, the zero-touch of the audio projector on text-only chunks), and so does
the model sharded with FSDP2 (`fully_shard` per transformer block, frozen towers and LoRA in the same units).

accelerate's FSDP plugin only runs on accelerators, so the FSDP2 case shards with torch's `fully_shard` on a CPU
mesh and keeps accelerate for the cross-device gathers; `training/accelerate/fsdp2.yaml` itself needs GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
GLOBAL_BATCH = 4


def _write_data(root: Path) -> Path:
    import numpy as np
    import soundfile as sf

    rows = []
    for i in range(GLOBAL_BATCH):
        sf.write(root / f"tone{i}.wav", np.sin(np.arange(6000) * (0.03 + 0.04 * i)).astype("float32"), 8000)
        rows.append({"query": {"audio": f"tone{i}.wav"}, "positive": f"tone number {i % 3}",
                     "negatives": [f"noise {i}"], "source": "tones"})
    (root / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "t.jsonl"


def _fsdp2_shard(model: torch.nn.Module) -> torch.nn.Module:
    """fully_shard every transformer block, then the root, on a CPU mesh over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),))
    for module in list(model.modules()):
        if type(module).__name__ in ("Qwen2VLDecoderLayer", "Qwen2VLVisionBlock", "WhisperEncoderLayer"):
            fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _full_grad(param: torch.Tensor) -> torch.Tensor:
    grad = param.grad
    return (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()


def compute(repo: str, data: str, out: str, shard: str = "ddp") -> None:
    """Gradients of one step on this rank's share of the global batch (world size from the environment)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from training.common import hub_code
    from training.contrastive.data import ContrastiveCollator, load_jsonl
    from training.contrastive.trainer import LossSettings, apply_lora, train_step

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = apply_lora(hub_code.ConanModel.from_pretrained(repo), r=4, alpha=8, dropout=0.0,
                       train_audio_projector=True)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    distributed = accelerator.num_processes > 1
    model = _fsdp2_shard(model) if shard == "fsdp2" and distributed else accelerator.prepare(model)
    model.train()
    processor = hub_code.ConanProcessor.from_pretrained(repo)
    per_rank = GLOBAL_BATCH // accelerator.num_processes
    rank = accelerator.process_index
    examples = load_jsonl(data)[rank * per_rank : (rank + 1) * per_rank]
    batch = ContrastiveCollator(processor, num_negatives=1, chunk_size=1)(examples)
    touch = []
    if accelerator.distributed_type == DistributedType.MULTI_CPU and shard == "ddp":
        touch = [p for n, p in model.named_parameters() if p.requires_grad and "audio_projector" in n]
    result = train_step(accelerator, model, batch, LossSettings(temperature=0.05), gradcache=True, touch=touch)
    # FSDP2 reduce-scatters the mean over ranks; DDP all-reduces the mean: both equal the 1-process gradient
    grads = {n.replace("module.", "", 1): _full_grad(p) for n, p in model.named_parameters() if p.requires_grad}
    if accelerator.is_main_process:
        sharded = any(hasattr(p, "full_tensor") for p in model.parameters())  # FSDP2 parameters are DTensors
        torch.save({"grads": grads, "loss": result.value, "candidates": result.num_candidates,
                    "world": accelerator.num_processes, "sharded": sharded}, out)
    accelerator.wait_for_everyone()


@pytest.mark.parametrize("shard", ["ddp", "fsdp2"])
def test_two_gloo_processes_match_one_process(tiny_repo, tmp_path, shard):
    data = _write_data(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    two = tmp_path / "two.pt"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", __file__, str(tiny_repo), str(data), str(two),
         shard],
        check=True, env=env, cwd=REPO_ROOT, timeout=300,
    )
    one = tmp_path / "one.pt"
    compute(str(tiny_repo), str(data), str(one))
    a, b = torch.load(one), torch.load(two)
    assert (a["world"], b["world"]) == (1, 2)
    assert (a["sharded"], b["sharded"]) == (False, shard == "fsdp2")
    assert a["candidates"] == b["candidates"] == 2 * GLOBAL_BATCH  # all positives + all negatives, gathered
    assert torch.allclose(a["loss"], b["loss"], atol=1e-5)
    assert a["grads"].keys() == b["grads"].keys() and any("audio_projector" in k for k in a["grads"])
    for name, grad in a["grads"].items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(b["grads"][name], grad, atol=1e-6, rtol=1e-4), name


if __name__ == "__main__":
    compute(*sys.argv[1:5])
