"""Embedding server throughput and latency against concurrency, dynamic batching vs batch size 1, in one run.

    python bench/serve.py [--model DIR ...] [--concurrency 1 4 16 64] [--requests 128] [--workload text|mixed]

For each model (default: the tiny test repo, built in a temporary folder, plus the main pipeline's
`runs/pipeline-small/final-model` when it exists) and each batching mode (`dynamic`: `--max-batch-size 32
--max-wait-ms 5`; `batch1`: `--max-batch-size 1`) it starts `python -m serving.server` on a free loopback port and,
at each concurrency level, sends `--requests` POST /v1/embeddings requests (one input each) from that many concurrent
clients (httpx, asyncio). Reported: requests/s (requests / wall time), p50/p95 latency in ms, and the mean model batch
size (from the server's /metrics batch-size histogram). `/health req/s` is the same client hammering GET /health at
that concurrency on the dynamic server: the HTTP stack + client ceiling with no model work. The client runs on the
same machine as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.launch import REPO_ROOT, running_server  # noqa: E402

MAIN_MODEL = REPO_ROOT / "runs" / "pipeline-small" / "final-model"
MODES = {"dynamic": ["--max-batch-size", "32", "--max-wait-ms", "5"], "batch1": ["--max-batch-size", "1"]}


def workload(kind: str, n: int, rng: np.random.Generator) -> list[dict]:
    """`n` request bodies of one input each: text only, or a text/image/audio mix (data URIs)."""
    from PIL import Image

    words = "the quick brown fox jumps over a lazy dog while music plays in the park".split()
    bodies = [{"input": [" ".join(rng.choice(words, size=16))]} for _ in range(n)]
    if kind == "text":
        return bodies
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, (rng.standard_normal(16000 * 2) * 0.1).astype(np.float32), 16000, format="WAV")
    audio = "data:audio/wav;base64," + base64.b64encode(buffer.getvalue()).decode()
    for i, body in enumerate(bodies):
        if i % 3 == 1:
            body["input"] = [image]
        elif i % 3 == 2:
            body["input"] = [audio]
    return bodies


def batch_stats(metrics: str) -> tuple[float, float]:
    """(number of model batches, inputs batched) from the Prometheus text of /metrics."""
    count = re.search(r"^conan_batch_size_count ([0-9.e+]+)$", metrics, re.M)
    total = re.search(r"^conan_batch_size_sum ([0-9.e+]+)$", metrics, re.M)
    return float(count.group(1)), float(total.group(1))


async def load(base: str, bodies: list[dict | None], concurrency: int) -> tuple[float, list[float]]:
    """Sends all `bodies` (POST /v1/embeddings; None = GET /health) with `concurrency` requests in flight;
    returns (wall seconds, per-request latencies in seconds)."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                start = time.perf_counter()
                if body is None:
                    response = await client.get("/health")
                else:
                    response = await client.post("/v1/embeddings", json=body)
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies


def bench_model(name: str, model: Path, args: argparse.Namespace, bodies: list[dict]) -> list[tuple]:
    import httpx

    rows = []
    for mode, flags in MODES.items():
        with running_server(model, [*flags, "--log-level", "warning"], threads=args.threads) as base:
            asyncio.run(load(base, bodies[: max(args.concurrency)], max(args.concurrency)))  # warm-up
            for concurrency in args.concurrency:
                before = batch_stats(httpx.get(f"{base}/metrics").text)
                wall, latencies = asyncio.run(load(base, bodies, concurrency))
                after = batch_stats(httpx.get(f"{base}/metrics").text)
                batches, inputs = after[0] - before[0], after[1] - before[1]
                p50, p95 = np.percentile(np.array(latencies) * 1000, [50, 95])
                floor = 0.0
                if mode == "dynamic":  # the HTTP stack + client ceiling: GET /health, no model work
                    health_wall, _ = asyncio.run(load(base, [None] * len(bodies), concurrency))
                    floor = len(bodies) / health_wall
                rows.append((name, mode, concurrency, len(bodies) / wall, p50, p95, inputs / max(batches, 1), floor))
                print(f"  {name} {mode} c={concurrency}: {len(bodies) / wall:.1f} req/s", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="a Conan repo (repeatable); default: tiny + main")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=128, help="requests per concurrency level")
    parser.add_argument("--workload", choices=["text", "mixed"], default="text")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for the server (default: inherited from this process)")
    args = parser.parse_args(argv)
    print("$ python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    import torch

    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"workload {args.workload}, {args.requests} requests per level, server OMP_NUM_THREADS "
          f"{args.threads or os.environ.get('OMP_NUM_THREADS', 'unset')}")
    bodies = workload(args.workload, args.requests, np.random.default_rng(0))
    rows = []
    with tempfile.TemporaryDirectory(prefix="conan-bench-serve-") as scratch:
        models = [(Path(m).name, Path(m)) for m in args.model]
        if not models:
            from training.base.build_base import build_tiny_repo

            models = [("tiny", build_tiny_repo(Path(scratch) / "tiny"))]
            if MAIN_MODEL.exists():
                models.append(("pipeline-small", MAIN_MODEL))
            else:
                print(f"# {MAIN_MODEL} is absent: only the tiny model is measured", file=sys.stderr)
        for name, path in models:
            rows += bench_model(name, path, args, bodies)
    print(f"{'model':>16} {'mode':>8} {'conc':>5} | {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'mean batch':>10} | "
          f"{'/health req/s':>13}")
    for name, mode, concurrency, rps, p50, p95, mean_batch, floor in rows:
        floor_text = f"{floor:>13.1f}" if floor else ""
        print(f"{name:>16} {mode:>8} {concurrency:>5} | {rps:>8.1f} {p50:>8.1f} {p95:>8.1f} {mean_batch:>10.2f} | "
              f"{floor_text}")

if __name__ == "__main__":
    main()
