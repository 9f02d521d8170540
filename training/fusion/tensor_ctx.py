"""Per-tensor access for a merge operator: base rows, task-vector rows, and the output sink.

A merge operator never sees files: it asks for rows [r0, r1) of θ₀ and of each τ_t (None when that specialist's
bytes equal the base's there, so frozen modules cost a memcmp and no arithmetic) and emits output rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterator

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
    changed: set[str] = field(default_factory=set)
    tie_take: dict = field(default_factory=dict)  # (t, k) -> threshold ties inside an exactly-k top-k

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
        """(base raw bytes, base rows in compute dtype, τ rows per contributor or None where identical)."""
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
        return raw, base, taus

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

    def generator(self, contributor: str, r0: int) -> torch.Generator:
        """Counter-based RNG: the stream depends on (seed, tensor, model, first row), never on thread order."""
        h = hashlib.blake2b(f"{self.seed}|{self.key}|{contributor}|{r0}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))
