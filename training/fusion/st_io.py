"""Header-level safetensors I/O: plan from headers, read byte ranges, write shards at precomputed offsets.

Why not `safe_open` for the hot path: an mmap of every input keeps every touched page in the process's RSS until
the file is closed, so a streaming merge of five 1 GB checkpoints would show ~5 GB RSS. Positional reads
(`os.preadv`) into a small reusable buffer go through the same page cache without that cost, and the header gives
every tensor's byte range, so a row range of a tensor is one contiguous read.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype code -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
TORCH_TO_CODE = {v[0]: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing, malformed, or inconsistent."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives on disk and what it is."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES

    @property
    def row_elems(self) -> int:
        """Elements per leading-dim row (the unit of a chunk)."""
        return self.numel // self.shape[0] if self.shape and self.shape[0] else 1

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


def read_header(path: Path) -> dict:
    """Parse a safetensors header (8-byte little-endian length + JSON) without touching tensor data."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"safetensors file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        size = path.stat().st_size
        if n == 0 or n > size - 8:
            raise CheckpointError(f"{path}: invalid safetensors header length {n} (file size {size})")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from e
    header["__header_len__"] = n
    return header


def index_file(path: Path) -> dict[str, TensorInfo]:
    """Map tensor name -> TensorInfo for one safetensors file, validating offsets against the file size."""
    header = read_header(path)
    data_start = 8 + header.pop("__header_len__")
    header.pop("__metadata__", None)
    size = Path(path).stat().st_size
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        dtype = meta.get("dtype")
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        begin, end = meta["data_offsets"]
        shape = tuple(int(s) for s in meta["shape"])
        info = TensorInfo(Path(path), dtype, shape, data_start + begin, end - begin)
        if info.numel * info.itemsize != info.nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} byte size {info.nbytes} != shape {shape} x {dtype}")
        if data_start + end > size:
            raise CheckpointError(f"{path}: tensor {name!r} extends past end of file (truncated download?)")
        out[name] = info
    return out


@dataclass
class CheckpointLayout:
    """All tensors of a HF folder (single file or sharded) plus its shard names in order."""

    folder: Path
    tensors: dict[str, TensorInfo]
    shards: list[str]  # file names, in order
    sharded: bool


def open_checkpoint(folder: Path, stem: str = "model") -> CheckpointLayout:
    """Index `folder/model.safetensors` or `folder/model.safetensors.index.json` from headers only."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    index = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            if not (folder / shard).is_file():
                raise CheckpointError(f"{index} names shard {shard!r}, but {folder / shard} does not exist")
            for name, info in index_file(folder / shard).items():
                if weight_map.get(name) != shard:
                    raise CheckpointError(f"{folder / shard}: tensor {name!r} is not mapped to this shard in {index}")
                tensors[name] = info
        missing = set(weight_map) - set(tensors)
        if missing:
            raise CheckpointError(f"{index} lists tensors absent from the shards: {sorted(missing)[:5]}")
        return CheckpointLayout(folder, tensors, shards, True)
    if single.is_file():
        return CheckpointLayout(folder, index_file(single), [single.name], False)
    raise CheckpointError(
        f"{folder}: expected {stem}.safetensors or {stem}.safetensors.index.json (found: "
        f"{sorted(p.name for p in folder.iterdir())[:10]})"
    )


class Reader:
    """Positional reads of tensor byte ranges; one fd per file, safe to share across threads (pread is atomic)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds.setdefault(path, fd)
            if self._fds[path] != fd:
                os.close(fd)
                fd = self._fds[path]
        return fd

    def read_bytes(self, info: TensorInfo, start_elem: int = 0, stop_elem: int | None = None) -> bytearray:
        """Raw bytes of elements [start, stop) of a tensor."""
        stop_elem = info.numel if stop_elem is None else stop_elem
        n = (stop_elem - start_elem) * info.itemsize
        buf = bytearray(n)
        got = os.preadv(self._fd(info.file), [buf], info.offset + start_elem * info.itemsize)
        if got != n:
            raise CheckpointError(f"{info.file}: short read ({got} of {n} bytes)")
        return buf

    def read(self, info: TensorInfo, start_elem: int = 0, stop_elem: int | None = None) -> torch.Tensor:
        """Elements [start, stop) as a flat torch tensor of the stored dtype (owns its memory)."""
        buf = self.read_bytes(info, start_elem, stop_elem)
        if not buf:
            return torch.empty(0, dtype=DTYPES[info.dtype][0])
        return torch.frombuffer(buf, dtype=DTYPES[info.dtype][0])

    def copy_to(self, info: TensorInfo, out_fd: int, out_offset: int) -> None:
        """Byte-for-byte copy of a whole tensor into an output file (kernel-side where possible)."""
        src, off, left, dst = self._fd(info.file), info.offset, info.nbytes, out_offset
        while left:
            try:
                n = os.copy_file_range(src, out_fd, min(left, 1 << 30), off, dst)
            except OSError:
                n = 0
            if n <= 0:  # not supported across these files: fall back to pread/pwrite
                step = min(left, 64 << 20)
                data = os.pread(src, step, off)
                n = os.pwrite(out_fd, data, dst)
            off, dst, left = off + n, dst + n, left - n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for s in self.shape:
            n *= s
        return n


class ShardWriter:
    """One output safetensors file whose layout is fixed up front; tensors are pwritten at their offsets.

    The header is written last (`finish`): until then the first 8 bytes are zero, so a killed run leaves a file
    that no safetensors loader accepts.
    """

    def __init__(self, path: Path, tensors: list[OutTensor]) -> None:
        self.path = Path(path)
        header: dict = {"__metadata__": {"format": "pt"}}
        self.offsets: dict[str, int] = {}
        pos = 0
        for t in tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
            self.offsets[t.name] = pos
            pos += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._header = struct.pack("<Q", len(raw)) + raw
        self.data_start = len(self._header)
        self.data_size = pos
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, self.data_start + pos)

    def offset_of(self, name: str) -> int:
        return self.data_start + self.offsets[name]

    def write(self, name: str, data: torch.Tensor | bytes | bytearray | memoryview, elem_offset_bytes: int = 0) -> None:
        """Write bytes (or a contiguous tensor's bytes) at tensor `name` + `elem_offset_bytes`."""
        if isinstance(data, torch.Tensor):
            data = memoryview(data.contiguous().view(torch.uint8).numpy())
        view = memoryview(data)
        pos = self.offset_of(name) + elem_offset_bytes
        while view.nbytes:
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n

    def finish(self) -> None:
        os.pwrite(self.fd, self._header, 0)
        os.fsync(self.fd)
        os.close(self.fd)

    def abort(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
