"""Embedding cache keyed by (model hash, prompt, input content) so reruns of an evaluation are fast.

Why content keys: the same FSDD clip or emoji image is encoded by several tasks and by every rerun; hashing the
input itself (text, pixels, samples, file path) needs no bookkeeping of ids and cannot go stale when a loader
changes order. The model hash covers the weight and config files, so a retrained model never reads old vectors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from training.common.io_utils import atomic_file

from .embedder import Embedder, l2_normalise

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CONFIG_NAMES = ("config.json", "config_sentence_transformers.json", "modules.json", "preprocessor_config.json")


def model_hash(model_dir: str | Path) -> str:
    """SHA-256 (first 16 hex digits) over the names and bytes of a model's weight and config files."""
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"model_hash: {root} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and (p.suffix in WEIGHT_SUFFIXES or p.name in CONFIG_NAMES))
    if not files:
        raise ValueError(f"model_hash: {root} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _feed(h: Any, x: Any) -> None:
    """Feed a canonical byte form of one user input (recursively) into hash ``h``."""
    from PIL import Image

    if x is None:
        h.update(b"N")
    elif isinstance(x, str):
        h.update(b"S" + x.encode("utf-8") + b"\0")
    elif isinstance(x, (bool, int, float)):
        h.update(b"F" + repr(x).encode() + b"\0")
    elif isinstance(x, Path):
        h.update(b"P" + str(x).encode() + b"\0")
    elif isinstance(x, Image.Image):
        h.update(b"I" + f"{x.mode}{x.size}".encode())
        h.update(x.tobytes())
    elif isinstance(x, np.ndarray):
        h.update(b"A" + f"{x.dtype}{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    elif isinstance(x, dict):
        h.update(b"D")
        for k in sorted(x):
            h.update(str(k).encode() + b"=")
            _feed(h, x[k])
        h.update(b"}")
    elif isinstance(x, (list, tuple)):
        h.update(b"L")
        for v in x:
            _feed(h, v)
        h.update(b"]")
    else:
        raise TypeError(f"input_key: cannot hash an input of type {type(x).__name__}; expected str, PIL image, "
                        "numpy array, dict or list (docs/ARCHITECTURE.md 'User input format')")


def input_key(x: Any) -> str:
    """Stable content hash of one input."""
    h = hashlib.blake2b(digest_size=16)
    _feed(h, x)
    return h.hexdigest()


class EmbeddingCache:
    """On-disk store: one ``.npz`` (keys + float32 matrix) per (model hash, prompt)."""

    def __init__(self, cache_dir: str | Path, model_id: str) -> None:
        self.dir = Path(cache_dir) / model_id
        self._mem: dict[str, dict[str, np.ndarray]] = {}

    def _file(self, prompt: str | None) -> Path:
        tag = hashlib.blake2b((prompt or "").encode(), digest_size=8).hexdigest()
        return self.dir / f"prompt-{tag}.npz"

    def _table(self, prompt: str | None) -> dict[str, np.ndarray]:
        f = self._file(prompt)
        key = f.name
        if key not in self._mem:
            table: dict[str, np.ndarray] = {}
            if f.exists():
                with np.load(f, allow_pickle=False) as z:
                    for k, v in zip(z["keys"].tolist(), z["emb"]):
                        table[k] = v
            self._mem[key] = table
        return self._mem[key]

    def get(self, prompt: str | None, keys: list[str]) -> dict[str, np.ndarray]:
        table = self._table(prompt)
        return {k: table[k] for k in keys if k in table}

    def put(self, prompt: str | None, keys: list[str], emb: np.ndarray) -> None:
        table = self._table(prompt)
        for k, v in zip(keys, emb):
            table[k] = v
        self.dir.mkdir(parents=True, exist_ok=True)
        f = self._file(prompt)
        with atomic_file(f) as tmp, open(tmp, "wb") as out:  # a crash never leaves a half-written cache file
            np.savez(out, keys=np.array(list(table), dtype=str), emb=np.stack(list(table.values())))
        meta = self.dir / "prompts.json"
        known = json.loads(meta.read_text()) if meta.exists() else {}
        known[f.name] = prompt
        meta.write_text(json.dumps(known, indent=1))


class CachedEmbedder:
    """Wrap an :class:`Embedder`: deduplicate inputs, read cached rows, encode the rest with a progress bar."""

    def __init__(self, inner: Embedder, cache: EmbeddingCache | None, *, chunk: int = 64, desc: str = "encode") -> None:
        self.inner = inner
        self.cache = cache
        self.chunk = chunk
        self.desc = desc
        self.n_encoded = 0  # inputs actually sent to the model (tests use it to prove cache hits)

    def encode(self, inputs: list, *, prompt: str | None = None, batch_size: int = 8) -> np.ndarray:
        if len(inputs) == 0:
            raise ValueError("CachedEmbedder.encode: got an empty input list")
        keys = [input_key(x) for x in inputs]
        found = self.cache.get(prompt, keys) if self.cache is not None else {}
        todo: dict[str, Any] = {}
        for k, x in zip(keys, inputs):
            if k not in found and k not in todo:
                todo[k] = x
        if todo:
            todo_keys = list(todo)
            parts = []
            bar = tqdm(total=len(todo_keys), desc=self.desc, unit="item", leave=False)
            for s in range(0, len(todo_keys), self.chunk):
                ks = todo_keys[s:s + self.chunk]
                emb = np.asarray(self.inner.encode([todo[k] for k in ks], prompt=prompt, batch_size=batch_size))
                if emb.ndim != 2 or emb.shape[0] != len(ks):
                    raise ValueError(f"embedder returned shape {emb.shape} for {len(ks)} inputs")
                parts.append(emb.astype(np.float32))
                bar.update(len(ks))
            bar.close()
            new = np.concatenate(parts)
            self.n_encoded += len(todo_keys)
            if self.cache is not None:
                self.cache.put(prompt, todo_keys, new)
            found.update(zip(todo_keys, new))
        return l2_normalise(np.stack([found[k] for k in keys]))
