"""Batch samplers of the training loop, each a pure function of (seed, step) so a checkpoint stores the step alone.

`SourceMixtureSampler` (specialists): per-step homogeneous batches from weighted sources. `BalancedModalitySampler`
(rehearsal, stage B):

Mass is split equally across modality groups (image / video / document / audio / text), then inside a group each
source gets p ∝ n^alpha (alpha = 0.5 by default), so large image sets cannot starve audio. Every device micro-batch
holds one source (homogeneous batches). Group assignment is stratified over the stream of (step, rank) slots:

- world size W >= G groups: every step's W slots start with a fresh random permutation of all groups (then another,
  truncated), so every optimizer step covers every group (Conan's Cross-GPU Batch Balance);
- W < G: consecutive slots walk through random permutations of the groups, i.e. a shuffled round-robin across
  steps: every ceil(G/W) steps cover every group.

Each group's marginal frequency is exactly 1/G per slot position, so proportions converge fast. The sampler is a
pure function of (seed, step): resuming needs only `step` (`state_dict`), like `SourceMixtureSampler`, whose interface it
shares (usable as a DataLoader `batch_sampler` and by `training.contrastive.trainer.run_loop`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from training.common.modalities import MODALITY_GROUPS


# ------------------------------------------------------------------------------------------------------- sampler
def is_batch_size(value: Any) -> bool:
    """Whether `value` can be a batch size: a positive integer, Python or numpy, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


class StepResumableSampler:
    """Batch samplers that are a pure function of (seed, step): a checkpoint stores the step alone.

    Subclasses set `names`, `seed`, `max_steps`, `step` and implement `iter_from(start_step)`.
    """

    names: list[str]
    seed: int
    max_steps: int | None
    step: int

    def iter_from(self, start_step: int) -> Iterator[list[int]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        return self.iter_from(self.step)

    def __len__(self) -> int:
        if self.max_steps is None:
            raise TypeError(f"an unbounded {type(self).__name__} has no length")
        return max(self.max_steps - self.step, 0)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "names": self.names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("names") != self.names or state.get("seed") != self.seed:
            raise ValueError(
                f"checkpoint sampler was built for sources {state.get('names')} seed {state.get('seed')}, but the "
                f"current data has {self.names} seed {self.seed}; resume with the same data and seed"
            )
        self.step = int(state["step"])


class SourceMixtureSampler(StepResumableSampler):
    """Per-step homogeneous batches drawn from weighted sources; a pure function of (seed, step).

    mode "global": one source per step for all ranks (each rank takes its slice of `size * world_size`
    consecutive rows, `size` the drawn source's batch size); mode "device": each rank draws its own source each step
    (Conan CBB-style mixing). Each source is walked in a fresh permutation per epoch; an epoch's incomplete tail is
    dropped so every rank gets exactly the step's batch size (all-gather needs equal shapes). Use as a DataLoader
    `batch_sampler`.
    `source_batch_sizes` gives named sources a batch size of their own (mode "global" only, where every rank takes
    the same source each step, so shapes still agree); others draw `batch_size`. E.g. the pipeline's text-replay
    steps draw 64 text pairs where the specialist's own batches hold 16, since a text batch's in-batch negatives are
    what its InfoNCE learns from. The sizes are part of `state_dict`: a checkpoint resumes only with the same sizes.
    Raises ValueError for unknown sources or weights, a size that is not a positive integer, a source too small for
    one draw, or in mode "device" a size other than `batch_size`.
    """

    def __init__(
        self,
        sources: dict[str, Sequence[int]],
        weights: dict[str, float] | None,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        mode: Literal["global", "device"] = "global",
        max_steps: int | None = None,
        source_batch_sizes: dict[str, int] | None = None,
    ):
        if not sources:
            raise ValueError("SourceMixtureSampler needs at least one source")
        if mode not in ("global", "device"):
            raise ValueError(f"mode must be 'global' or 'device', got {mode!r}")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(sources))
        if unknown:
            raise ValueError(f"weights name source(s) {unknown} that the data lacks; sources are {sorted(sources)}")
        self.names = sorted(sources)
        self.indices = [np.asarray(sources[n], dtype=np.int64) for n in self.names]
        w = np.array([float(weights.get(n, 1.0)) for n in self.names])
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"source weights must be >= 0 with a positive sum, got {dict(zip(self.names, w))}")
        self.probs = w / w.sum()
        sizes = dict(source_batch_sizes or {})
        unknown = sorted(set(sizes) - set(sources))
        if unknown:
            raise ValueError(f"source_batch_sizes name source(s) {unknown} that the data lacks; sources are "
                             f"{sorted(sources)}")
        if not all(is_batch_size(n) for n in sizes.values()):
            raise ValueError(f"source_batch_sizes must be positive integers, got {sizes}")
        if mode == "device" and any(n != batch_size for n in sizes.values()):
            raise ValueError(f"source_batch_sizes {sizes} differ from batch_size {batch_size}, which mode 'device' "
                             f"cannot do (each rank draws its own source and all-gather needs equal shapes); use "
                             f"mode 'global'")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.batch_sizes = [int(sizes.get(n, batch_size)) for n in self.names]
        self.seed, self.mode, self.max_steps = seed, mode, max_steps
        for name, idx, p, size in zip(self.names, self.indices, self.probs, self.batch_sizes):
            need = size * (world_size if mode == "global" else 1)
            if p > 0 and len(idx) < need:
                raise ValueError(
                    f"source {name!r} has {len(idx)} rows but one draw takes {need} (batch size {size} x "
                    f"{'world_size ' + str(world_size) if mode == 'global' else '1'}); lower the batch or drop the source"
                )
        self.step = 0  # steps consumed by training; what a checkpoint stores

    @property
    def mixture(self) -> dict[str, float]:
        return {n: float(p) for n, p in zip(self.names, self.probs)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "batch_sizes": dict(zip(self.names, self.batch_sizes))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """As the base class, and refuses a checkpoint drawn with other batch sizes (checkpoints from before sizes
        were stored carry none and load as before)."""
        ours = dict(zip(self.names, self.batch_sizes))
        if "batch_sizes" in state and state["batch_sizes"] != ours:
            theirs = state["batch_sizes"]
            changed = {n: f"{theirs.get(n)} -> {ours.get(n)}" for n in sorted(set(theirs) | set(ours))
                       if theirs.get(n) != ours.get(n)}
            raise ValueError(f"checkpoint sampler drew other batch sizes than the current config (source: checkpoint "
                             f"-> now) {changed}; resume with the same batch sizes, or start a fresh run (a new "
                             f"checkpoint_dir, or resume 'never')")
        super().load_state_dict(state)

    def _draws(self, step: int) -> list[int]:
        rng = np.random.default_rng([self.seed, step])
        n = 1 if self.mode == "global" else self.world_size
        return [int(s) for s in rng.choice(len(self.names), size=n, p=self.probs)]

    def _take(self, cursors: list[list[int]], source: int, count: int) -> np.ndarray:
        epoch, cursor = cursors[source]
        n = len(self.indices[source])
        if cursor + count > n:
            epoch, cursor = epoch + 1, 0
        order = np.random.default_rng([self.seed, 1 + source, epoch]).permutation(n)
        cursors[source] = [epoch, cursor + count]
        return self.indices[source][order[cursor : cursor + count]]

    def iter_from(self, start_step: int) -> Iterator[list[int]]:
        """This rank's batches from `start_step` on (earlier steps are replayed as bookkeeping only)."""
        cursors = [[0, 0] for _ in self.names]
        step = 0
        while self.max_steps is None or step < self.max_steps:
            draws = self._draws(step)
            if self.mode == "global":
                size = self.batch_sizes[draws[0]]
                rows = self._take(cursors, draws[0], size * self.world_size)
                mine = rows[self.rank * size : (self.rank + 1) * size]
            else:
                per_rank = [self._take(cursors, s, self.batch_size) for s in draws]
                mine = per_rank[self.rank]
            if step >= start_step:
                yield [int(i) for i in mine]
            step += 1


def modality_of_item(item: Any) -> str:
    """The modality group an input belongs to (audio > video > document > image > text for mixtures)."""
    if isinstance(item, str):
        return "text"
    if not isinstance(item, dict):
        raise TypeError(f"expected a str or dict input, got {type(item).__name__}")
    for key in ("audio", "video", "document", "image"):
        if item.get(key) is not None:
            return key
    return "text"


def modality_of_pair(query: Any, positive: Any) -> str:
    """A pair's group: its most specific modality on either side (an audio<->text pair rehearses audio)."""
    order = ("audio", "video", "document", "image", "text")
    found = {modality_of_item(query), modality_of_item(positive)}
    return next(m for m in order if m in found)


def target_proportions(
    source_sizes: dict[str, int], source_groups: dict[str, str], alpha: float = 0.5,
) -> dict[str, float]:
    """Per-source probability: 1/G per group, inside a group ∝ n^alpha."""
    missing = sorted(set(source_sizes) - set(source_groups))
    if missing:
        raise ValueError(f"sources {missing} have no modality group; give them one (groups: {{source: group}}).")
    groups: dict[str, list[str]] = {}
    for name in sorted(source_sizes):
        if source_sizes[name] <= 0:
            raise ValueError(f"source {name!r} is empty; drop it from the rehearsal data.")
        groups.setdefault(source_groups[name], []).append(name)
    out = {}
    for members in groups.values():
        mass = np.array([source_sizes[m] ** alpha for m in members], dtype=np.float64)
        for m, p in zip(members, mass / mass.sum()):
            out[m] = float(p) / len(groups)
    return out


class BalancedModalitySampler(StepResumableSampler):
    """Per-(step, rank) source choice with equal group mass and stratified group coverage; yields row indices."""

    def __init__(
        self,
        sources: dict[str, Sequence[int]],
        source_groups: dict[str, str],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        alpha: float = 0.5,
        max_steps: int | None = None,
    ):
        if not sources:
            raise ValueError("BalancedModalitySampler needs at least one source")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.names = sorted(sources)
        self.indices = [np.asarray(sources[n], dtype=np.int64) for n in self.names]
        for name, idx in zip(self.names, self.indices):
            if len(idx) < batch_size:
                raise ValueError(f"source {name!r} has {len(idx)} rows but a micro-batch takes {batch_size}; lower "
                                 "per_device_batch_size or drop the source")
        self.proportions = target_proportions({n: len(i) for n, i in zip(self.names, self.indices)},
                                              source_groups, alpha)
        self.groups = sorted({source_groups[n] for n in self.names})
        self.members = {g: [i for i, n in enumerate(self.names) if source_groups[n] == g] for g in self.groups}
        self.within = {g: np.array([self.proportions[self.names[i]] for i in m]) * len(self.groups)
                       for g, m in self.members.items()}
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.alpha, self.max_steps = seed, alpha, max_steps
        self.step = 0

    @property
    def mixture(self) -> dict[str, float]:
        return dict(self.proportions)

    def groups_at(self, step: int) -> list[str]:
        """The group of each rank at `step` (see the module doc for the stratification)."""
        g, w = len(self.groups), self.world_size
        if w >= g:
            rng = np.random.default_rng([self.seed, 7, step])
            order = np.concatenate([rng.permutation(g) for _ in range(-(-w // g))])[:w]
            return [self.groups[i] for i in order]
        out = []
        for slot in range(step * w, step * w + w):
            block, pos = divmod(slot, g)
            out.append(self.groups[np.random.default_rng([self.seed, 11, block]).permutation(g)[pos]])
        return out

    def sources_at(self, step: int) -> list[int]:
        """Source index of each rank at `step`: the rank's group, then p ∝ n^alpha inside it."""
        picks = []
        for rank, group in enumerate(self.groups_at(step)):
            rng = np.random.default_rng([self.seed, 13, step, rank])
            picks.append(int(rng.choice(self.members[group], p=self.within[group])))
        return picks

    def _take(self, cursors: list[list[int]], source: int) -> np.ndarray:
        epoch, cursor = cursors[source]
        n = len(self.indices[source])
        if cursor + self.batch_size > n:
            epoch, cursor = epoch + 1, 0
        order = np.random.default_rng([self.seed, 17, source, epoch]).permutation(n)
        cursors[source] = [epoch, cursor + self.batch_size]
        return self.indices[source][order[cursor : cursor + self.batch_size]]

    def iter_from(self, start_step: int) -> Iterator[list[int]]:
        """This rank's micro-batches from `start_step` on; earlier steps only advance the per-source cursors."""
        cursors = [[0, 0] for _ in self.names]
        step = 0
        while self.max_steps is None or step < self.max_steps:
            per_rank = [self._take(cursors, s) for s in self.sources_at(step)]  # ranks never share rows
            if step >= start_step:
                yield [int(i) for i in per_rank[self.rank]]
            step += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "groups": self.groups}


__all__ = ["BalancedModalitySampler", "MODALITY_GROUPS", "SourceMixtureSampler", "StepResumableSampler", "modality_of_item", "modality_of_pair", "target_proportions"]
