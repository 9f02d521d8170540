"""The one interface every evaluator talks to: ``Embedder.encode(inputs, prompt=..., batch_size=...)``.

Why a protocol: the evaluators (MMEB runner, proxy suite, mteb wrapper) must not care whether embeddings come from
the SentenceTransformer-wrapped Conan model, a cached copy, or a deterministic fake in tests. Inputs follow the user
input format of docs/ARCHITECTURE.md (str, PIL image, or dicts with text/image/document/page/video/audio).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Embedder(Protocol):
    """Anything that maps a list of inputs to L2-normalised float32 rows."""

    def encode(self, inputs: list, *, prompt: str | None = None, batch_size: int = 8) -> np.ndarray: ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Row-normalise to unit length (rows of zeros stay zero) and cast to float32."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected embeddings of shape [N, D], got {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


class SentenceTransformerEmbedder:
    """Adapter from ``SentenceTransformer(path, trust_remote_code=True)`` to :class:`Embedder`."""

    def __init__(self, model_dir: str | Path, *, device: str | None = None, model: Any = None) -> None:
        self.model_dir = Path(model_dir)
        if model is None:
            if not self.model_dir.exists():
                raise FileNotFoundError(f"model directory {self.model_dir} does not exist")
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(self.model_dir), trust_remote_code=True, device=device)
        self.model = model

    @property
    def embed_dim(self) -> int | None:
        get = getattr(self.model, "get_sentence_embedding_dimension", None)
        return int(get()) if callable(get) and get() is not None else None

    def encode(self, inputs: list, *, prompt: str | None = None, batch_size: int = 8) -> np.ndarray:
        if len(inputs) == 0:
            raise ValueError("SentenceTransformerEmbedder.encode: got an empty input list")
        kwargs: dict[str, Any] = {"batch_size": batch_size, "convert_to_numpy": True, "show_progress_bar": False}
        if prompt:
            kwargs["prompt"] = prompt
        out = self.model.encode(list(inputs), **kwargs)
        return l2_normalise(np.asarray(out))
