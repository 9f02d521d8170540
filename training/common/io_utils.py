"""Atomic writes of model folders and files: a crash never leaves a half-written folder that loads."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_partials(out_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders `atomic_output_dir` left for `out_dir` in runs that were killed (their process
    is gone); returns what was removed. Folders of live processes are left alone."""
    out = Path(out_dir)
    removed = []
    for path in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(path.name.split(".partial-")[1].split("-")[0])
        except (ValueError, IndexError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def check_output_free(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise FileExistsError when `out_dir` exists and `overwrite` is False: what `atomic_output_dir` checks at the
    end, for a stage to call before its work, so a forgotten `--force` fails in seconds rather than after training."""
    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"Output folder {out_dir} already exists; pass overwrite=True (or --force) to replace it.")


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder `.NAME.partial-PID-*`; on success it is fsynced and replaces `out_dir` in
    one rename, on error it is removed. Partial folders of killed earlier runs are removed first. Raises
    FileExistsError when `out_dir` exists and `overwrite` is False."""
    out = Path(out_dir)
    check_output_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model folder is meant to be shared
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a unique temp path (`.NAME.*.tmp`, mode 0644) in `path`'s folder for the caller to write; on success it
    is renamed over `path`, on error removed. A killed run never leaves a half-written file under `path`, and
    concurrent writers of the same path (DDP ranks filling one feature cache) never share a temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON to a temp file in the same folder, fsync, then rename over `path` (`atomic_file`)."""
    with atomic_file(path) as tmp, open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through `atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def save_safetensors_atomic(path: str | os.PathLike, tensors: dict[str, Any],
                            metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` through `atomic_file` (a killed run never leaves a half-written cache that
    loads)."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def torch_save_atomic(path: str | os.PathLike, obj: Any) -> None:
    """`torch.save(obj)` through `atomic_file`."""
    import torch

    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
