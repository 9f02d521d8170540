"""sentence_conan.ConanEmbedder: the caller's trust_remote_code reaches transformers; no silently ignored kwargs."""

from __future__ import annotations

import pytest


def test_load_passes_the_callers_trust_remote_code(tiny_repo):
    from training.common import hub_code

    embedder_cls = hub_code.load("sentence_conan").ConanEmbedder
    with pytest.raises(ValueError, match="trust_remote_code"):
        embedder_cls.load(str(tiny_repo), trust_remote_code=False)
    assert embedder_cls.load(str(tiny_repo), trust_remote_code=True).model is not None


def test_forward_takes_no_task_kwarg():
    """encode(task=...) is sentence-transformers' Router feature; the Conan module must not claim to read it."""
    from training.common import hub_code

    assert "task" not in hub_code.load("sentence_conan").ConanEmbedder.forward_kwargs
