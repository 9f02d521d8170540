"""GradCache (Gao et al. 2021): the exact large-batch contrastive gradient with memory bounded by one chunk.

1. Embed every chunk without grad, recording the RNG state before each chunk.
2. Compute the loss on the detached embeddings and backprop to them only: g = dL/de.
3. Re-embed each chunk with grad under its recorded RNG state (so dropout masks match step 1) and backprop the
   surrogate <e, g>; gradients sum to dL/dtheta. Every chunk but the last runs under `no_sync` (DDP / FSDP2), so
   one all-reduce serves the whole step.

Chunks are already-prepared model inputs (the collator splits by row), so packed pixel/audio tensors never need
slicing. `plain_step` is the same computation without caching, the baseline the tests and bench compare against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

Encode = Callable[[dict[str, torch.Tensor]], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], Any]  # (queries, targets) -> object with `.loss`


class RandContext:
    """The CPU and CUDA RNG state at construction; `with ctx:` replays it inside a forked RNG (global state kept)."""

    def __init__(self) -> None:
        self.cpu_state = torch.get_rng_state()
        self.cuda_devices: list[int] = []
        self.cuda_states: list[torch.Tensor] = []
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.cuda_devices = list(range(torch.cuda.device_count()))
            self.cuda_states = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]
        self._fork: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> RandContext:
        self._fork = torch.random.fork_rng(devices=self.cuda_devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        for device, state in zip(self.cuda_devices, self.cuda_states):
            torch.cuda.set_rng_state(state, device)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._fork is not None
        self._fork.__exit__(*exc)
        self._fork = None


def _no_sync_except_last(n: int, no_sync: Callable[[], contextlib.AbstractContextManager] | None
                         ) -> Iterator[contextlib.AbstractContextManager]:
    for i in range(n):
        yield no_sync() if (no_sync is not None and i < n - 1) else contextlib.nullcontext()


def cached_step(
    encode: Encode,
    query_chunks: Sequence[dict[str, torch.Tensor]],
    target_chunks: Sequence[dict[str, torch.Tensor]],
    loss_fn: LossFn,
    backward: Callable[[torch.Tensor], None] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    replay_rng: bool = True,
    extra_loss: Callable[[], torch.Tensor] | None = None,
) -> Any:
    """One GradCache forward/backward; returns `loss_fn`'s output (computed on detached embeddings).

    `backward` runs the surrogate backward (pass `accelerator.backward` for loss scaling); `no_sync` is a factory of
    the context that skips gradient sync (e.g. `lambda: accelerator.no_sync(model)`). `extra_loss` is added to the
    last chunk's surrogate (e.g. a zero-weighted touch of parameters the batch does not use, for DDP).
    `replay_rng=False` exists only to show in tests that without replay the gradient is wrong under dropout.
    """
    backward = backward or (lambda t: t.backward())
    chunks = list(query_chunks) + list(target_chunks)
    rand_states: list[RandContext] = []
    cached: list[torch.Tensor] = []
    with torch.no_grad():
        for chunk in chunks:
            rand_states.append(RandContext())
            cached.append(encode(chunk))
    leaves = [e.detach().requires_grad_() for e in cached]
    n_q = len(query_chunks)
    output = loss_fn(torch.cat(leaves[:n_q]), torch.cat(leaves[n_q:]))
    grads = torch.autograd.grad(output.loss, leaves)
    contexts = _no_sync_except_last(len(chunks), no_sync)
    for i, (chunk, rand, grad, sync_ctx) in enumerate(zip(chunks, rand_states, grads, contexts)):
        with sync_ctx:
            with rand if replay_rng else contextlib.nullcontext():
                embeddings = encode(chunk)
            surrogate = torch.dot(embeddings.flatten(), grad.flatten().to(embeddings.dtype))
            if extra_loss is not None and i == len(chunks) - 1:
                surrogate = surrogate + extra_loss()
            backward(surrogate)
    return output


def plain_step(
    encode: Encode,
    query_chunks: Sequence[dict[str, torch.Tensor]],
    target_chunks: Sequence[dict[str, torch.Tensor]],
    loss_fn: LossFn,
    backward: Callable[[torch.Tensor], None] | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
) -> Any:
    """The uncached step: every chunk embedded with grad, one loss, one backward (memory grows with the batch)."""
    backward = backward or (lambda t: t.backward())
    queries = torch.cat([encode(c) for c in query_chunks])
    targets = torch.cat([encode(c) for c in target_chunks])
    output = loss_fn(queries, targets)
    loss = output.loss if extra_loss is None else output.loss + extra_loss()
    backward(loss)
    return output


__all__ = ["RandContext", "cached_step", "plain_step"]
