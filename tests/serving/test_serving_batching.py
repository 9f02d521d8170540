"""serving.batching.DynamicBatcher in-process: batch formation, prompt grouping, bounded queue, cancellation."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serving.batching import DynamicBatcher, QueueFullError


class RecordingEncoder:
    """Returns item i as the vector [i, len(prompt)] with i + 100 input tokens and records each call; `gate` can
    hold the worker; `short` drops the last token count (a broken encoder)."""

    def __init__(self):
        self.calls: list[tuple[list, str | None]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.short = False

    def __call__(self, items, prompt):
        self.gate.wait(10)
        self.calls.append((list(items), prompt))
        if any(item == "boom" for item in items):
            raise RuntimeError("encoder failed")
        tokens = [item + 100 for item in items]
        return np.array([[item, len(prompt or "")] for item in items], dtype=np.float32), tokens[:-1 if self.short else None]


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
    assert [r.vector[0] for r in results] == list(range(10))
    assert [r.vector[1] for r in results] == [0, 1, 1, 1, 0, 0, 3, 3, 3, 3]
    assert [r.input_tokens for r in results] == [i + 100 for i in range(10)]  # each job gets its own count
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
        assert [f.result(5).vector[0] for f in (held[0], queued[0], queued[2])] == [0, 1, 3]
        assert queued[1].cancelled()
        assert [items for items, _ in encoder.calls] == [[0], [1], [3]]
        boom = batcher.submit(["boom"], None)[0]
        with pytest.raises(RuntimeError, match="encoder failed"):
            boom.result(5)
        assert batcher.submit([5], None)[0].result(5).vector[0] == 5 and batcher.is_alive()
        encoder.short = True
        with pytest.raises(RuntimeError, match="1 vectors and 0 token counts for 1 inputs"):
            batcher.submit([6], None)[0].result(5)
        encoder.short = False
        assert batcher.submit([8], None)[0].result(5).input_tokens == 108
    finally:
        batcher.close()


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_batch_size=0"):
        DynamicBatcher(RecordingEncoder(), max_batch_size=0)
