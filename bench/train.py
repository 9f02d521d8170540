"""Contrastive train-step throughput: plain step vs GradCache step at the same effective batch, and peak memory.

    python bench/train.py                         # tiny + mid-size CPU configs, batch 16, GradCache chunk 4
    python bench/train.py --sizes mid --batch 32 --chunk 8 --steps 5

Each (size, mode) runs in its own subprocess so peak memory is its own: peak RSS growth over the loaded model on
CPU, `torch.cuda.max_memory_allocated` on GPU. Data: real text pairs (Python docstring -> signature,
training/data_sources/toy_data.py). Model: a random Conan repo built by training.build_base (tiny = hidden 64, mid = hidden 256),
LoRA r=16 on every LLM linear layer, dropout 0.05. The GradCache overhead is reported as plain/GradCache samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.procfs import status_kb  # noqa: E402

SIZES = {"tiny": 64, "mid": 256}


def build_repo(size: str, root: Path) -> Path:
    from training.base.build_base import TINY_PROCESSOR_LIMITS, assemble_base, write_tiny_upstream_checkpoints

    out = root / f"conan-{size}"
    if not out.exists():
        backbone, audio = write_tiny_upstream_checkpoints(root / f"upstream-{size}", hidden_size=SIZES[size])
        assemble_base(str(backbone), str(audio), out, processor_limits=TINY_PROCESSOR_LIMITS)
    return out


def _status_mb(field: str) -> float | None:
    kb = status_kb(field)
    return None if kb is None else kb / 1024.0


def reset_peak_rss() -> bool:
    """Linux: restart this process's VmHWM at its current RSS (clear_refs 5), so the peak covers only the steps."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """VmHWM of this process image; ru_maxrss elsewhere (it can include the parent's RSS inherited at exec)."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    now = _status_mb("VmRSS")
    return now if now is not None else peak_rss_mb()


def worker(repo: str, mode: str, batch: int, chunk: int, steps: int) -> dict:
    import torch
    from accelerate import Accelerator

    from training.common import hub_code
    from training.contrastive.data import ContrastiveCollator, parse_row
    from training.contrastive.trainer import LossSettings, apply_lora, build_optimizer, train_step
    from training.data_sources.toy_data import text_rows

    torch.manual_seed(0)
    accelerator = Accelerator()
    model = apply_lora(hub_code.ConanModel.from_pretrained(repo), r=16, alpha=32, dropout=0.05)
    optimizer = build_optimizer(model, 1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    processor = hub_code.ConanProcessor.from_pretrained(repo)
    rows = text_rows("train")
    examples = [parse_row(rows[i % len(rows)], REPO_ROOT, f"row{i}") for i in range(batch * (steps + 1))]
    collator = ContrastiveCollator(processor, chunk_size=chunk if mode == "gradcache" else 0)
    batches = [collator(examples[i * batch : (i + 1) * batch]).to(accelerator.device) for i in range(steps + 1)]
    settings = LossSettings(temperature=0.02)
    cuda = torch.cuda.is_available()

    def step(b):
        out = train_step(accelerator, model, b, settings, gradcache=(mode == "gradcache"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out

    base_rss = rss_mb()  # model, optimizer state and the tokenised batches are loaded
    reset = reset_peak_rss()
    step(batches[0])  # warm-up (allocator, kernels)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for b in batches[1:]:
        step(b)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {
        "mode": mode, "samples_per_s": batch * steps / seconds, "seconds": seconds,
        "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb() - base_rss,
        "peak_kind": "cuda max_memory_allocated" if cuda else
        ("peak RSS growth over the loaded model during the steps" if reset else "process max RSS"),
        "rss_before_steps_mb": base_rss, "device": str(accelerator.device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,mid")
    parser.add_argument("--batch", type=int, default=16, help="effective batch (queries) per step")
    parser.add_argument("--chunk", type=int, default=4, help="GradCache chunk (rows)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", help="folder for the random repos (default: a temp folder)")
    parser.add_argument("--worker", nargs=2, metavar=("REPO", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("BENCH_RESULT " + json.dumps(worker(args.worker[0], args.worker[1], args.batch, args.chunk, args.steps)))
        return

    import torch

    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"env: python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-train-"))
    results = []
    for size in args.sizes.split(","):
        repo = build_repo(size, work)
        row = {"size": size, "hidden": SIZES[size], "batch": args.batch, "chunk": args.chunk}
        for mode in ("plain", "gradcache"):
            cmd = [sys.executable, __file__, "--worker", str(repo), mode, "--batch", str(args.batch),
                   "--chunk", str(args.chunk), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO_ROOT,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
            lines = [x.split("BENCH_RESULT ", 1)[1] for x in out.stdout.splitlines() if "BENCH_RESULT " in x]
            if not lines:
                raise RuntimeError(f"benchmark worker printed no result:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
            row[mode] = json.loads(lines[-1])
        row["gradcache_time_ratio"] = row["plain"]["samples_per_s"] / row["gradcache"]["samples_per_s"]
        results.append(row)
    print(f"\n{'size':>5} {'batch':>5} {'chunk':>5} | {'plain s/s':>9} {'peak MB':>8} | {'GC s/s':>8} {'peak MB':>8} |"
          f" {'GC overhead (time x)':>20}")
    for r in results:
        p, g = r["plain"], r["gradcache"]
        print(f"{r['size']:>5} {r['batch']:>5} {r['chunk']:>5} | {p['samples_per_s']:9.2f} {p['peak_mb']:8.0f} | "
              f"{g['samples_per_s']:8.2f} {g['peak_mb']:8.0f} | {r['gradcache_time_ratio']:20.2f}")
    print(f"peak memory: {results[0]['plain']['peak_kind']}; device {results[0]['plain']['device']}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
