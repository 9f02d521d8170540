"""Run a fusion plan: a memory-bounded thread pool over tensors, streaming shard writers, atomic publish.

The output folder appears only by `rename` of a fully written, fsynced temporary folder (`common.io_utils.
atomic_output_dir`, the one every stage writes through); a killed run leaves at most a hidden `.NAME.partial-PID-*`
folder whose shards have zeroed headers (no loader accepts them), removed by the next run. The tensors stream into
that folder shard by shard (`st_io.ShardWriter`) instead of going through `common.repo.save_conan_repo`, which needs
the whole model in memory; the processor, remote-code and sentence-transformers files are copied from the base (or
`files_from`), which `save_conan_repo` wrote.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from training.common.io_utils import atomic_output_dir

from .config import FusionConfig
from .methods import Recipe, fuse_tensor, majority_sign, memory_cost, model_trim_thresholds, recipe, reuses_rows
from .plan import FusionPlan, PlanError, build_plan, check_inputs_exist
from .st_io import DTYPES, FLOAT_CODES, OutTensor, Reader, ShardWriter, TensorInfo
from .tensor_ctx import Contributor, TensorContext

WEIGHT_FILES = ("adapter_config.json", "fusion_manifest.json")


class _Budget:
    """Bytes of working memory in flight; a job larger than the limit runs alone."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used, self.cv = limit, 0, threading.Condition()

    def acquire(self, n: int) -> None:
        with self.cv:
            while self.used > 0 and self.used + n > self.limit:
                self.cv.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self.cv:
            self.used -= n
            self.cv.notify_all()


class NonFiniteError(PlanError):
    """A fused or copied tensor holds NaN or inf; the message names the tensor and the inputs that hold them."""


def _count_nonfinite(values: torch.Tensor) -> int:
    return 0 if values.numel() == 0 else int(values.numel() - torch.isfinite(values).sum())


class _FiniteCheckingWriter(ShardWriter):
    """A ShardWriter that refuses NaN/inf in floating tensors as their chunks stream through `write`, so a bad
    specialist (or an overflow to inf in fp16/bf16) fails the run instead of publishing a model that embeds NaN."""

    def __init__(self, path: Path, tensors: list[OutTensor]) -> None:
        super().__init__(path, tensors)
        self.float_dtypes = {t.name: DTYPES[t.dtype][0] for t in tensors if t.dtype in FLOAT_CODES}

    def write(self, name: str, data, elem_offset_bytes: int = 0) -> None:
        dtype = self.float_dtypes.get(name)
        if dtype is not None:
            values = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=dtype)
            n_bad = _count_nonfinite(values)
            if n_bad:
                raise NonFiniteError(f"tensor {name!r}: {n_bad} NaN/inf values in the fused output")
        super().write(name, data, elem_offset_bytes)

    def check_region(self, name: str, numel: int, chunk_elems: int) -> None:
        """Read back a tensor written outside `write` (a byte copy) and refuse NaN/inf in it."""
        dtype = self.float_dtypes.get(name)
        if dtype is None:
            return
        itemsize = torch.empty(0, dtype=dtype).element_size()
        for start in range(0, numel, chunk_elems):
            n = min(chunk_elems, numel - start)
            raw = os.pread(self.fd, n * itemsize, self.offset_of(name) + start * itemsize)
            n_bad = _count_nonfinite(torch.frombuffer(bytearray(raw), dtype=dtype))
            if n_bad:
                raise NonFiniteError(f"tensor {name!r}: NaN/inf values in the copied bytes")


def _nonfinite_inputs(plan: FusionPlan, key: str, reader: Reader, chunk_elems: int) -> list[str]:
    """Names of the inputs (base, specialists) whose stored tensor `key` holds NaN/inf (read only after a failure)."""
    sources: list[tuple[str, TensorInfo]] = []
    if key in plan.base.tensors:
        sources.append(("base", plan.base.tensors[key]))
    for spec in plan.specialists:
        src = spec.source(key)
        if isinstance(src, TensorInfo):
            sources.append((spec.name, src))
        elif src is not None:  # a LoRA delta: its A and B factors
            sources.extend((f"{spec.name} (LoRA {part})", getattr(src, part)) for part in ("a", "b"))
    bad = []
    for name, info in sources:
        if info.is_float and any(_count_nonfinite(reader.read(info, start, min(start + chunk_elems, info.numel)))
                                 for start in range(0, info.numel, chunk_elems)):
            bad.append(name)
    return bad


def _is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or name.endswith(".safetensors.index.json") or name in WEIGHT_FILES \
        or name.startswith("adapter_model")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer/processor/remote-code/sentence-transformers files (all but weights); config.json last."""
    copied = []
    entries = sorted(p for p in Path(src).iterdir() if not p.name.startswith(".") and not _is_weight_file(p.name))
    for p in sorted(entries, key=lambda p: p.name == "config.json"):
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


def fuse(cfg: FusionConfig, on_tensor: Callable[[str], None] | None = None) -> dict:
    """Fuse `cfg.models` into `cfg.base` and write `cfg.output`; returns the manifest (also written to disk)."""
    t_start = time.perf_counter()
    check_inputs_exist(cfg)
    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"output folder already exists: {out} (set overwrite: true to replace it)")
    reader = Reader()
    plan = build_plan(cfg, reader)  # every error about inputs is raised here, before any arithmetic
    rc = recipe(cfg)
    writers: dict[str, ShardWriter] = {}
    threads_before = torch.get_num_threads()
    try:
        with atomic_output_dir(out, overwrite=cfg.overwrite) as tmp:
            for shard, keys in plan.shard_keys.items():
                tensors = [OutTensor(k, plan.tensors[k].dtype, plan.tensors[k].shape) for k in keys]
                writers[shard] = _FiniteCheckingWriter(tmp / shard, tensors)
            changed = _execute(cfg, plan, rc, reader, writers, on_tensor)
            for w in writers.values():
                w.finish()
            if plan.base.sharded:
                index = {
                    "metadata": {"total_size": sum(w.data_size for w in writers.values())},
                    "weight_map": {k: s for s, keys in plan.shard_keys.items() for k in keys},
                }
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            manifest = _manifest(cfg, rc, plan, changed, time.perf_counter() - t_start)
            (tmp / "fusion_manifest.json").write_text(json.dumps(manifest, indent=1))
            src = cfg.base if cfg.files_from == "base" else next(m.path for m in cfg.models if m.name == cfg.files_from)
            manifest["files_copied"] = copy_side_files(Path(src), tmp)
            _carry_projector_calibration(cfg, manifest, tmp / "config.json")
        return manifest
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        reader.close()
        torch.set_num_threads(threads_before)


def _carry_projector_calibration(cfg: FusionConfig, manifest: dict, config_path: Path) -> None:
    """Tensors copied from one owner keep that owner's `projector_calibration_hash`, so loading the fused model
    warns about Projector Drift until stage R recalibrates the projector on the fused backbone."""
    owners = {o for e in manifest["tensors"].values() if e["needs_recovery"] for o in e.get("owners") or []}
    hashes = set()
    for model in cfg.models:
        owner_config = model.path / "config.json"
        if model.name in owners and owner_config.is_file():
            value = json.loads(owner_config.read_text()).get("projector_calibration_hash")
            if value:
                hashes.add(value)
    if len(hashes) == 1 and config_path.is_file():
        config = json.loads(config_path.read_text())
        config["projector_calibration_hash"] = hashes.pop()
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _execute(cfg: FusionConfig, plan: FusionPlan, rc: Recipe, reader: Reader, writers: dict[str, ShardWriter],
             on_tensor: Callable[[str], None] | None) -> dict[str, set[str]]:
    """Run every tensor job; returns, per fused key, the specialists whose bytes differed from the base."""
    workers = cfg.workers or os.cpu_count() or 1
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    compute = torch.float64 if cfg.reference else torch.float32
    changed: dict[str, set[str]] = {}
    fused: list[TensorContext] = []
    jobs: list[tuple[int, int, Callable[[], None], str]] = []
    for key, tp in plan.tensors.items():
        if tp.policy == "drop":
            continue
        w = writers[tp.shard]
        nbytes = _out(tp).nbytes
        if tp.policy in ("copy_base", "copy_owner"):
            jobs.append((0, nbytes, (lambda src=tp.source, w=w, k=key: reader.copy_to(src, w.fd, w.offset_of(k))), key))
            continue
        base = plan.base.tensors[key]
        contributors = [Contributor(s.name, s.weight, s.source(key) or base) for s in plan.specialists]
        reuse = reuses_rows(base.numel, len(contributors), cfg, rc)
        ctx = TensorContext(key, base, contributors, tp.lam, tp.dtype, compute, reader, w, cfg.chunk_elems, cfg.seed,
                            reuse)
        changed[key] = ctx.changed
        fused.append(ctx)
        cost = memory_cost(base.numel, base.row_elems, len(contributors), cfg, reuse)
        jobs.append((cost, nbytes, (lambda ctx=ctx: fuse_tensor(ctx, cfg, rc)), key))
    jobs.sort(key=lambda j: -j[0])
    budget = _Budget(int(cfg.memory_limit_gb * (1 << 30)))
    bar = tqdm(total=sum(j[1] for j in jobs), unit="B", unit_scale=True, desc=f"fuse[{cfg.method}]",
               disable=not cfg.progress)
    lock = threading.Lock()
    futures: list[Future] = []

    def run(cost: int, nbytes: int, fn: Callable[[], None], key: str) -> None:
        try:
            fn()
            if plan.tensors[key].policy != "fuse":
                writers[plan.tensors[key].shard].check_region(key, math.prod(plan.tensors[key].shape), cfg.chunk_elems)
        except NonFiniteError as e:
            holders = _nonfinite_inputs(plan, key, reader, cfg.chunk_elems)
            where = f"NaN/inf stored in: {', '.join(holders)}" if holders else "no input holds NaN/inf: the " \
                "arithmetic overflowed the output dtype (lower lambda/weights or set out_dtype: float32)"
            raise NonFiniteError(f"{e}; {where}. No output was written.") from None
        except Exception as e:
            raise RuntimeError(f"fusing tensor {key!r} failed: {e}") from e
        finally:
            budget.release(cost)
        with lock:
            bar.update(nbytes)
        if on_tensor is not None:
            on_tensor(key)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fuse") as pool:
        if rc.model_trim and fused:
            _set_model_thresholds(fused, cfg, pool, plan)
        for cost, nbytes, fn, key in jobs:
            if any(f.done() and f.exception() for f in futures):
                break
            budget.acquire(cost)
            futures.append(pool.submit(run, cost, nbytes, fn, key))
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            if f.done() and f.exception():
                for g in futures:
                    g.cancel()
                bar.close()
                raise f.exception()
    bar.close()
    if rc.model_trim:  # exact cancellations take the majority elected sign of the whole model
        total = sum(ctx.elected_sum for ctx in fused)
        if total <= 0:
            for ctx in fused:
                if ctx.majority_redo is not None:
                    ctx.majority_redo(majority_sign(total))
    return changed


def _set_model_thresholds(fused: list[TensorContext], cfg: FusionConfig, pool: ThreadPoolExecutor,
                          plan: FusionPlan) -> None:
    """TIES over the whole model: two streaming radix passes over every fused tensor find each specialist's
    threshold before the merge pass writes anything."""
    bar = tqdm(total=2 if fused[0].compute == torch.float32 else 4, unit="pass", desc="trim thresholds (model)",
               disable=not cfg.progress)
    thresholds = model_trim_thresholds(fused, cfg, map_fn=pool.map, on_pass=lambda: bar.update(1))
    bar.close()
    plan.model_thresholds = dict(zip((s.name for s in plan.specialists), thresholds))
    for ctx in fused:
        ctx.model_thresholds = thresholds


def _out(tp) -> OutTensor:
    return OutTensor(tp.key, tp.dtype, tp.shape)


def _manifest(cfg: FusionConfig, rc: Recipe, plan: FusionPlan, changed: dict[str, set[str]], seconds: float) -> dict:
    """Per-tensor account: policy, method, owners, needs_recovery (`needs_recovery`: the tensors stage R retrains, docs/ARCHITECTURE.md)."""
    tensors = {}
    for key, tp in plan.tensors.items():
        entry = {
            "policy": tp.policy, "method": None, "owners": tp.owners, "needs_recovery": tp.needs_recovery,
            "group": tp.group, "shard": tp.shard, "dtype": tp.dtype, "shape": list(tp.shape), "reason": tp.reason,
        }
        if tp.policy == "fuse":
            ch = sorted(changed.get(key, ()))
            entry["changed_by"] = ch
            if ch:
                entry.update(method=f"{cfg.method}/{cfg.semantics}", **{"lambda": tp.lam})
            else:
                entry.update(policy="copy_base", reason="unchanged (byte-identical to the base) in every specialist")
        tensors[key] = entry
    counts: dict[str, int] = {}
    for e in tensors.values():
        counts[e["policy"]] = counts.get(e["policy"], 0) + 1
    return {
        "format": "conan-fusion-manifest/1",
        "config": json.loads(json.dumps(cfg.to_dict(), default=str)),
        "summary": {
            "counts": counts,
            "needs_recovery": sorted(k for k, e in tensors.items() if e["needs_recovery"]),
            "copied_from_owner": sorted(k for k, e in tensors.items() if e["policy"] == "copy_owner"),
            "dropped": sorted(k for k, e in tensors.items() if e["policy"] == "drop"),
            "seconds": round(seconds, 3),
            "trim_scope": ("model" if rc.model_trim else "tensor") if cfg.method == "ties" else None,
            "model_thresholds": plan.model_thresholds,
        },
        "tensors": tensors,
    }
