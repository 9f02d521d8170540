"""Fusion benchmark: our streaming tool vs mergekit 0.1.5 on identical inputs and settings, plus the I/O floor.

    .venv/bin/python bench/fusion/run_bench.py --data "$CONAN_BENCH_DATA/fusion/0.5b" --repeats 3 --write-readme

Needs checkpoints from `make_checkpoints.py` and mergekit in its own venv (`--setup-mergekit` creates it at
`--mergekit-venv`, default `$MERGEKIT_VENV` or `<bench data>/mergekit-venv`, with
`pip install torch==2.13.0 mergekit==0.1.5`). Folders default to `$CONAN_BENCH_DATA` (else `~/.cache/conan-bench`),
outside the repository. Both tools get the key intersection
(`mergekit-inputs/`: mergekit cannot take keys the base lacks), `dtype: float32` compute, bf16 output, weight 1,
lambda 1, seed 0; ours runs with `--semantics mergekit`. Per cell: wall time (perf_counter around the process),
peak RSS (VmHWM) and peak anonymous RSS (RssAnon), sampled every 50 ms from /proc/PID/status, output size, and the
max bf16 ULP distance between the two outputs over common keys. Warm page cache (the I/O floor pass reads every
input first) and `sync` before every timed run. Runs of the two tools alternate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from bench.fusion.make_checkpoints import bench_data_root  # noqa: E402
from bench.procfs import status_kb  # noqa: E402

MK_VENV = Path(os.environ.get("MERGEKIT_VENV") or bench_data_root() / "mergekit-venv")
SPECIALISTS = ("image", "video", "document", "audio")
METHODS = {  # name: (our flags, mergekit parameters)
    "task_arithmetic": (["--method", "task_arithmetic", "--normalize", "false"], {"normalize": False}),
    "ties": (["--method", "ties", "--density", "0.2", "--normalize", "true"], {"density": 0.2, "normalize": True}),
    "dare_ties": (["--method", "dare_ties", "--density", "0.2", "--normalize", "false"],
                  {"density": 0.2, "normalize": False}),
}


def setup_mergekit() -> None:
    """mergekit in its own venv, outside the repo (LGPL: used as an external peer only)."""
    if not (MK_VENV / "bin" / "mergekit-yaml").exists():
        subprocess.run([sys.executable, "-m", "venv", str(MK_VENV)], check=True)
        subprocess.run([str(MK_VENV / "bin" / "pip"), "install", "torch==2.13.0", "mergekit==0.1.5"], check=True)


# ------------------------------------------------------------------------------------------------- measuring
def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def measure(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run a command; wall seconds, peak RSS and peak anonymous RSS of its process tree (bytes)."""
    peak = {"rss": 0, "anon": 0}
    os.sync()  # no earlier run's dirty pages are flushed on this run's clock
    with open(log, "w") as lf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                pids = _tree(proc.pid)
                # VmHWM: the kernel's own peak RSS of each process image (reset at exec, so unlike wait4's
                # ru_maxrss it never inherits this benchmark process's RSS through fork)
                peak["rss"] = max(peak["rss"], sum(status_kb("VmHWM", p) or 0 for p in pids) * 1024)
                peak["anon"] = max(peak["anon"], sum(status_kb("RssAnon", p) or 0 for p in pids) * 1024)
                stop.wait(0.05)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        _, status, _ = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
    rc = os.waitstatus_to_exitcode(status)
    return {"wall": wall, "rss": peak["rss"], "anon": peak["anon"], "rc": rc}


def weight_files(folder: Path) -> list[Path]:
    return sorted(p.resolve() for p in folder.iterdir() if p.name.endswith(".safetensors"))


def io_floor(inputs: list[Path], out_bytes: int, scratch: Path) -> dict:
    """Read every input weight file once (16 MiB reads) and write + fsync one output-sized file."""
    buf = bytearray(16 << 20)
    t0 = time.perf_counter()
    total = 0
    for folder in inputs:
        for f in weight_files(folder):
            fd = os.open(f, os.O_RDONLY)
            while (n := os.readv(fd, [buf])) > 0:
                total += n
            os.close(fd)
    t_read = time.perf_counter() - t0
    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / "floor.bin"
    os.sync()
    t1 = time.perf_counter()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    left = out_bytes
    while left > 0:
        left -= os.write(fd, memoryview(buf)[: min(len(buf), left)])
    os.fsync(fd)
    os.close(fd)
    t_write = time.perf_counter() - t1
    target.unlink()
    return {"read_s": t_read, "write_s": t_write, "total_s": t_read + t_write, "read_bytes": total}


def out_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in weight_files(folder))


def _ordered(t: torch.Tensor) -> torch.Tensor:
    i = t.view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -(i & 0x7FFF), i)


def ulp_diff(a: Path, b: Path) -> dict:
    """Max bf16 ULP distance and count of differing elements over keys both outputs have."""
    def index(folder: Path) -> dict[str, Path]:
        idx = folder / "model.safetensors.index.json"
        if idx.exists():
            return {k: folder / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
        with safe_open(folder / "model.safetensors", "pt") as f:
            return {k: folder / "model.safetensors" for k in f.keys()}

    ia, ib = index(a), index(b)
    common = sorted(set(ia) & set(ib))
    worst, differ, total = 0, 0, 0
    for k in common:
        with safe_open(ia[k], "pt") as fa, safe_open(ib[k], "pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
        if x.dtype != torch.bfloat16 or y.dtype != torch.bfloat16:
            x, y = x.to(torch.bfloat16), y.to(torch.bfloat16)
        d = (_ordered(x) - _ordered(y)).abs()
        worst = max(worst, int(d.max()) if d.numel() else 0)
        differ += int((d != 0).sum())
        total += d.numel()
    return {"max_ulp": worst, "differ_frac": differ / max(total, 1), "common_keys": len(common),
            "only_a": len(set(ia) - set(ib)), "only_b": len(set(ib) - set(ia))}


# ------------------------------------------------------------------------------------------------- the tools
def ours_cmd(inputs: Path, out: Path, flags: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "training.fuse", "--base", str(inputs / "base"), "--output", str(out),
           "--semantics", "mergekit", "--lambda", "1", "--seed", "0", "--no-progress", "--overwrite"]
    for n in SPECIALISTS:
        cmd += ["--model", f"{n}={inputs / n}"]
    return cmd + flags


def mergekit_cmd(inputs: Path, out: Path, method: str, params: dict, work: Path) -> list[str]:
    lines = [f"merge_method: {method}", f"base_model: {inputs / 'base'}", "dtype: float32", "out_dtype: bfloat16",
             "parameters:", "  lambda: 1.0", f"  normalize: {str(params['normalize']).lower()}", "models:"]
    for n in SPECIALISTS:
        lines += [f"  - model: {inputs / n}", "    parameters:", "      weight: 1.0"]
        if "density" in params:
            lines.append(f"      density: {params['density']}")
    cfg = work / f"mergekit-{method}.yml"
    cfg.write_text("\n".join(lines) + "\n")
    return [str(MK_VENV / "bin" / "mergekit-yaml"), str(cfg), str(out), "--random-seed", "0", "--no-copy-tokenizer"]


def main() -> None:
    global MK_VENV
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="folder made by make_checkpoints.py (…/0.5b)")
    ap.add_argument("--work", type=Path, default=bench_data_root() / "fusion-out", help="scratch and results folder")
    ap.add_argument("--mergekit-venv", type=Path, default=None, help=f"mergekit's own venv (default {MK_VENV})")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per tool and method")
    ap.add_argument("--mergekit-repeats", type=int, default=None, help="override repeats for mergekit (slow)")
    ap.add_argument("--setup-mergekit", action="store_true")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    MK_VENV = args.mergekit_venv or MK_VENV
    if args.setup_mergekit:
        setup_mergekit()
    if not (MK_VENV / "bin" / "mergekit-yaml").exists():
        raise SystemExit(f"mergekit not found in {MK_VENV}; run with --setup-mergekit")
    inputs = args.data / "mergekit-inputs"
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    mk_repeats = args.mergekit_repeats or args.repeats

    # I/O floor on the same disk (also warms the page cache for every input)
    probe = args.work / "probe-ours"
    r = measure(ours_cmd(inputs, probe, METHODS["task_arithmetic"][0]), args.work / "probe.log", env)
    if r["rc"] != 0:
        raise SystemExit(f"our tool failed, see {args.work / 'probe.log'}")
    floor = io_floor([inputs / n for n in ("base", *SPECIALISTS)], out_size(probe), args.work)
    print(f"I/O floor: read {floor['read_bytes'] / 1e9:.2f} GB in {floor['read_s']:.2f} s, "
          f"write {out_size(probe) / 1e9:.2f} GB in {floor['write_s']:.2f} s")

    rows = []
    for method in args.methods:
        flags, params = METHODS[method]
        res: dict[str, list[dict]] = {"ours": [], "mergekit": []}
        outs = {"ours": args.work / f"ours-{method}", "mergekit": args.work / f"mergekit-{method}"}
        for i in range(max(args.repeats, mk_repeats)):
            for tool in (("ours", "mergekit") if i % 2 == 0 else ("mergekit", "ours")):
                if len(res[tool]) >= (args.repeats if tool == "ours" else mk_repeats):
                    continue
                shutil.rmtree(outs[tool], ignore_errors=True)
                cmd = ours_cmd(inputs, outs[tool], flags) if tool == "ours" else \
                    mergekit_cmd(inputs, outs[tool], method, params, args.work)
                m = measure(cmd, args.work / f"{tool}-{method}-{i}.log", env)
                print(f"{method:16s} {tool:9s} run {i}: {m['wall']:.1f} s, RSS {m['rss'] / 2**30:.2f} GiB, "
                      f"anon {m['anon'] / 2**30:.2f} GiB, rc {m['rc']}", flush=True)
                if m["rc"] != 0:
                    raise SystemExit(f"{tool} failed on {method}; see {args.work / f'{tool}-{method}-{i}.log'}")
                res[tool].append(m)
        diff = ulp_diff(outs["ours"], outs["mergekit"])
        row = {"method": method, "diff": diff}
        for tool, runs in res.items():
            row[tool] = {"median": statistics.median(x["wall"] for x in runs), "min": min(x["wall"] for x in runs),
                         "rss": max(x["rss"] for x in runs), "anon": max(x["anon"] for x in runs),
                         "n": len(runs), "size": out_size(outs[tool])}
        rows.append(row)
    table = render(rows, floor, args)
    print(table)
    (args.work / "results.json").write_text(json.dumps({"rows": rows, "floor": floor}, indent=1))
    if args.write_readme:
        readme = HERE / "README.md"
        text = readme.read_text() if readme.exists() else ""
        start, end = "<!-- results:start -->", "<!-- results:end -->"
        block = f"{start}\n{table}\n{end}"
        text = text.split(start)[0] + block + text.split(end)[1] if start in text else text + "\n" + block + "\n"
        readme.write_text(text)


def render(rows: list[dict], floor: dict, args) -> str:
    gib = 2 ** 30
    cmd = " ".join(["python", "bench/fusion/run_bench.py", "--data", str(args.data), "--repeats", str(args.repeats)]
                   + (["--mergekit-repeats", str(args.mergekit_repeats)] if args.mergekit_repeats else [])
                   + ["--methods", *args.methods])
    lines = [
        f"Command: `{cmd}`  ",
        f"Machine: {os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / gib:.0f} GiB "
        f"RAM; warm page cache; {time.strftime('%Y-%m-%d')}  ",
        f"I/O floor (read all {floor['read_bytes'] / 1e9:.2f} GB of inputs + write and fsync one output): "
        f"{floor['total_s']:.2f} s (read {floor['read_s']:.2f} s, write {floor['write_s']:.2f} s)",
        "",
        "| method | tool | runs | wall median (min), s | peak RSS, GiB | peak anon, GiB | output, GB | "
        "speed-up vs mergekit | RSS vs mergekit | vs I/O floor | max ULP ours↔mergekit (differing) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, m, d = r["ours"], r["mergekit"], r["diff"]
        for tool, x in (("ours", o), ("mergekit 0.1.5", m)):
            mine = x is o
            lines.append(" | ".join([
                f"| {r['method']}", tool, str(x["n"]), f"{x['median']:.1f} ({x['min']:.1f})",
                f"{x['rss'] / gib:.2f}", f"{x['anon'] / gib:.2f}", f"{x['size'] / 1e9:.3f}",
                f"{m['median'] / o['median']:.1f}x" if mine else "1.0x",
                f"{o['rss'] / m['rss']:.2f}" if mine else "1.00",
                f"{x['median'] / floor['total_s']:.1f}x",
                f"{d['max_ulp']} ({100 * d['differ_frac']:.4f}%) |" if mine else "— |",
            ]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
