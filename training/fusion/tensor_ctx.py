"""Per-tensor access for a merge operator: base rows, task-vector rows, and the output sink.

A merge operator never sees files: it asks for rows [r0, r1) of θ₀ and of each τ_t (None when that specialist's
bytes equal the base's there, so frozen modules cost a memcmp and no arithmetic) and emits output rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from .lora import LoraDelta
from .st_io import DTYPES, Reader, ShardWriter, TensorInfo


@dataclass
class Contributor:
    """One specialist's view of one tensor: a full tensor (TensorInfo) or a LoRA ΔW (LoraDelta)."""

    name: str
    weight: float
    source: TensorInfo | LoraDelta


@dataclass
class TensorContext:
    key: str
    base: TensorInfo
    contributors: list[Contributor]
    lam: float
    out_dtype: str
    compute: torch.dtype
    reader: Reader
    writer: ShardWriter
    chunk_elems: int
    seed: int
    reuse: bool = False  # keep loaded rows for the next pass (multi-pass methods on tensors that fit in memory)
    model_thresholds: list[float] | None = None  # TIES with trim_scope model: |τ_t| thresholds over all tensors
    elected_sum: float = 0.0  # TIES (paper, model scope): Σ elected signs of this tensor, for the model majority
    majority_redo: Callable[[float], None] | None = None  # rewrites this tensor's exact cancellations with a sign
    changed: set[str] = field(default_factory=set)
    tie_take: dict = field(default_factory=dict)  # (t, k) -> threshold ties inside an exactly-k top-k
    _loaded: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    @property
    def numel(self) -> int:
        return self.base.numel

    def chunks(self, whole: bool = False) -> Iterator[tuple[int, int]]:
        """Leading-dim row ranges of about `chunk_elems` elements (one range when `whole`)."""
        rows, per = self.base.rows, max(1, self.base.row_elems)
        step = rows if whole else max(1, self.chunk_elems // per)
        for r0 in range(0, max(rows, 1), max(step, 1)):
            yield r0, min(rows, r0 + step)

    def _elems(self, r0: int, r1: int) -> tuple[int, int]:
        per = self.base.row_elems
        return (r0 * per, r1 * per) if self.shape else (0, 1)

    def load(self, r0: int, r1: int) -> tuple[bytearray, torch.Tensor, list[torch.Tensor | None]]:
        """(base raw bytes, base rows in compute dtype, τ rows per contributor or None where identical).

        With `reuse`, a second pass gets the same tensors back without reading and converting again, so callers
        must not modify them in place.
        """
        if (r0, r1) in self._loaded:
            return self._loaded[(r0, r1)]
        e0, e1 = self._elems(r0, r1)
        raw = self.reader.read_bytes(self.base, e0, e1)
        base = torch.frombuffer(raw, dtype=DTYPES[self.base.dtype][0]).to(self.compute) if raw else \
            torch.empty(0, dtype=self.compute)
        taus: list[torch.Tensor | None] = []
        for c in self.contributors:
            if isinstance(c.source, LoraDelta):
                tau = c.source.rows(self.reader, r0, r1, self.compute)
                if torch.count_nonzero(tau) == 0:
                    tau = None
            else:
                other = self.reader.read_bytes(c.source, e0, e1)
                if c.source.dtype == self.base.dtype and other == raw:
                    tau = None
                else:
                    tau = torch.frombuffer(other, dtype=DTYPES[c.source.dtype][0]).to(self.compute).sub_(base)
            if tau is not None:
                self.changed.add(c.name)
            taus.append(tau)
        if self.reuse:
            self._loaded[(r0, r1)] = (raw, base, taus)
        return raw, base, taus

    def release(self) -> None:
        """Drop rows kept for reuse (the job is done; the context itself lives until the run ends)."""
        self._loaded.clear()

    def emit(self, r0: int, r1: int, values: torch.Tensor) -> None:
        """Round (nearest-even) to the output dtype and write rows [r0, r1)."""
        out = values.to(DTYPES[self.out_dtype][0])
        e0, _ = self._elems(r0, r1)
        self.writer.write(self.key, out, e0 * DTYPES[self.out_dtype][1])

    def emit_base(self, r0: int, r1: int, raw: bytearray, base: torch.Tensor) -> None:
        """Rows where no specialist changed anything: the base's own bytes when the dtype is kept."""
        if self.out_dtype == self.base.dtype:
            e0, _ = self._elems(r0, r1)
            self.writer.write(self.key, raw, e0 * self.base.itemsize)
        else:
            self.emit(r0, r1, base)

    def keep_mask(self, t: int, r0: int, n: int, density: float) -> torch.Tensor:
        """Bernoulli(density) draws for the `n` elements from row `r0` of contributor `t` (DARE), as a bool mask.

        Counter-based: one PCG64 stream per (seed, tensor, model), jumped ahead to the chunk's first element, so an
        element's draw depends on neither the chunk size nor thread order. With `reuse`, the next pass gets the
        same mask back without drawing again. P(keep) equals `density` to within 2^-32.
        """
        memo = ("mask", t, r0)
        if memo in self._loaded:
            return self._loaded[memo]
        e0, _ = self._elems(r0, r0 + 1)
        name = self.contributors[t].name
        digest = hashlib.blake2b(f"{self.seed}|{self.key}|{name}".encode(), digest_size=16).digest()
        bits = np.random.PCG64(int.from_bytes(digest, "little"))
        bits.advance(e0 // 2)  # one 64-bit draw = two 32-bit uniforms
        skip = e0 % 2
        draws = bits.random_raw((n + skip + 1) // 2).view(np.uint32)[skip : skip + n]
        mask = torch.from_numpy(draws < min(round(density * 2.0**32), 2**32 - 1)) if density < 1.0 else \
            torch.ones(n, dtype=torch.bool)
        if self.reuse:
            self._loaded[memo] = mask
        return mask
