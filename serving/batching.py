"""Dynamic batching of embedding jobs from concurrent requests onto one model worker thread.

Why our own ~100 lines instead of a serving library's batcher: LitServe and Ray Serve batch *requests* in separate
worker processes; here one request may hold many items with different prompts (query/document/instruction), the
queue must be bounded in *items* (503 when full) and a timed-out request must drop its queued items. A thread-safe
`queue.Queue` + `concurrent.futures.Future` per item does exactly that, and the model stays in the server process so
it encodes through `SentenceTransformer.encode` itself.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

logger = logging.getLogger(__name__)


class Encoded(NamedTuple):
    """One job's result: its `(dim,)` float32 vector and `input_tokens`, the length of the model's input for it
    (the processor's `input_ids` without padding: instruction, chat template, media placeholders, compression
    tokens included)."""

    vector: np.ndarray
    input_tokens: int


EncodeFn = Callable[[list[Any], "str | None"], "tuple[np.ndarray, Sequence[int]]"]


class QueueFullError(RuntimeError):
    """The bounded queue cannot take the request's items (the HTTP layer answers 503)."""


@dataclass
class Job:
    """One input to embed: `item` goes to `encode` with `prompt`; its `Encoded` (vector, input tokens) lands in
    `future`."""

    item: Any
    prompt: str | None
    future: Future = field(default_factory=Future)


class DynamicBatcher:
    """Collects jobs for up to `max_wait_s` (or until `max_batch_size`) and encodes them together.

    Args:
        encode: `(items, prompt) -> (vectors, input_tokens)`: a `(len(items), dim)` float32 array and each item's
            model input length in tokens (see `Encoded`), called on the worker thread only.
        max_batch_size: most jobs per batch (1 disables batching).
        max_wait_s: how long the first job of a batch waits for company, in seconds.
        max_queue: most queued jobs; `submit` raises `QueueFullError` beyond it.
        on_batch: called with the batch size (after dropping cancelled jobs) before each encode, e.g. for metrics.

    Jobs in one batch that share a prompt go through one `encode` call; different prompts make separate calls.
    """

    def __init__(
        self,
        encode: EncodeFn,
        max_batch_size: int = 32,
        max_wait_s: float = 0.005,
        max_queue: int = 1024,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(
                f"max_batch_size={max_batch_size} and max_queue={max_queue} must be >= 1 and "
                f"max_wait_s={max_wait_s} >= 0."
            )
        self.encode = encode
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name="conan-model-worker", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Jobs submitted and not yet taken into a batch."""
        return self._pending

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, items: Sequence[Any], prompt: str | None) -> list[Future]:
        """Queue all of `items` (all or none); raises `QueueFullError` when the queue cannot take them."""
        with self._lock:
            if self._pending + len(items) > self.max_queue:
                raise QueueFullError(
                    f"the server queue holds {self._pending} of at most {self.max_queue} inputs and cannot take "
                    f"{len(items)} more; retry later."
                )
            self._pending += len(items)
        jobs = [Job(item, prompt) for item in items]
        for job in jobs:
            self._queue.put(job)
        return [job.future for job in jobs]

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _take(self, block_s: float | None) -> Job | None:
        job = self._queue.get(timeout=block_s) if block_s is None or block_s > 0 else self._queue.get_nowait()
        if job is not None:
            with self._lock:
                self._pending -= 1
        return job

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                job = self._take(deadline - time.monotonic())
            except queue.Empty:
                break
            if job is None:
                stop = True
                break
            batch.append(job)
        return batch, stop

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._take(None)
            if first is None:
                return
            batch, stop = self._collect(first)
            # A request that timed out cancelled its futures: skip their work.
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            groups: dict[str | None, list[Job]] = {}
            for job in batch:
                groups.setdefault(job.prompt, []).append(job)
            for prompt, jobs in groups.items():
                try:
                    vectors, input_tokens = self.encode([job.item for job in jobs], prompt)
                    if len(vectors) != len(jobs) or len(input_tokens) != len(jobs):
                        raise RuntimeError(f"encode returned {len(vectors)} vectors and {len(input_tokens)} token "
                                           f"counts for {len(jobs)} inputs")
                except Exception as error:  # one failing batch must not stop the worker
                    logger.exception("encoding a batch of %d inputs failed", len(jobs))
                    for job in jobs:
                        job.future.set_exception(error)
                    continue
                for job, vector, tokens in zip(jobs, vectors, input_tokens):
                    job.future.set_result(Encoded(vector, int(tokens)))
