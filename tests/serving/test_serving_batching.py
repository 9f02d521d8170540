"""serving.batching.DynamicBatcher in-process: batch formation, prompt grouping, bounded queue, cancellation."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serving.batching import DynamicBatcher, QueueFullError


class RecordingEncoder:
    """Returns item i as the vector [i, len(prompt)] and records each call; `gate` can hold the worker."""

    def __init__(self):
        self.calls: list[tuple[list, str | None]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items, prompt):
        self.gate.wait(10)
        self.calls.append((list(items), prompt))
        if any(item == "boom" for item in items):
            raise RuntimeError("encoder failed")
        return np.array([[item, len(prompt or "")] for item in items], dtype=np.float32)


def test_concurrent_jobs_share_batches_grouped_by_prompt():
    encoder, sizes = RecordingEncoder(), []
    batcher = DynamicBatcher(encoder, max_batch_size=8, max_wait_s=0.2, on_batch=sizes.append)
    try:
        first = batcher.submit([0], None)
        time.sleep(0.05)
        futures = batcher.submit([1, 2, 3], "q") + batcher.submit([4, 5], None) + batcher.submit([6, 7, 8, 9], "doc")
        encoder.gate.set()
        results = [f.result(5) for f in first + futures]
    finally:
        batcher.close()
    assert [r[0] for r in results] == list(range(10))
    assert [r[1] for r in results] == [0, 1, 1, 1, 0, 0, 3, 3, 3, 3]
    assert sum(sizes) == 10 and max(sizes) == 8  # capped at max_batch_size
    assert len(encoder.calls) > len(sizes)  # one batch held several prompts -> several encode calls


def test_queue_bound_cancellation_and_failure_isolation():
    encoder = RecordingEncoder()
    batcher = DynamicBatcher(encoder, max_batch_size=1, max_wait_s=0.0, max_queue=3)
    try:
        encoder.gate.clear()
        held = batcher.submit([0], None)  # taken by the worker, which now waits on the gate
        time.sleep(0.1)
        queued = batcher.submit([1, 2, 3], None)
        with pytest.raises(QueueFullError, match="at most 3"):
            batcher.submit([4], None)
        assert batcher.queued == 3
        queued[1].cancel()  # a timed-out request drops its items
        encoder.gate.set()
        assert held[0].result(5)[0] == 0 and queued[0].result(5)[0] == 1 and queued[2].result(5)[0] == 3
        assert queued[1].cancelled()
        assert [items for items, _ in encoder.calls] == [[0], [1], [3]]
        boom = batcher.submit(["boom"], None)[0]
        with pytest.raises(RuntimeError, match="encoder failed"):
            boom.result(5)
        assert batcher.submit([5], None)[0].result(5)[0] == 5 and batcher.is_alive()
    finally:
        batcher.close()


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_batch_size=0"):
        DynamicBatcher(RecordingEncoder(), max_batch_size=0)
