"""The mteb encoder on a compression_mean (CoMa) repo equals AutoModel + AutoProcessor (tolerance 1e-5: fp32 CPU,
sentence-transformers batches rows in another order and padding than one-by-one)."""

from __future__ import annotations

import pytest
import torch


def test_mteb_encoder_equals_automodel_on_a_compression_repo(tiny_compression_repo,
                                                             tiny_compression_model_and_processor):
    pytest.importorskip("mteb")
    from mteb.mocks.mock_tasks.retrieval import MockRetrievalTask
    from mteb.types import PromptType

    from training.evaluation.embedder import SentenceTransformerEmbedder
    from training.evaluation.mteb_encoder import ConanMtebEncoder

    model, processor = tiny_compression_model_and_processor
    encoder = ConanMtebEncoder(SentenceTransformerEmbedder(tiny_compression_repo, device="cpu"))
    metadata = MockRetrievalTask().metadata
    texts = ["a cat on a mat", "the quarterly report of a company", "dogs"]
    for prompt_type in (PromptType.query, PromptType.document):
        got = encoder.encode([{"text": texts[:2]}, {"text": texts[2:]}], task_metadata=metadata, hf_split="test",
                             hf_subset="default", prompt_type=prompt_type, show_progress_bar=False)
        instruction = encoder.prompt_for(metadata, prompt_type, texts)
        with torch.no_grad():
            want = torch.cat([model(**processor.prepare([t], instruction=instruction)).embeddings for t in texts])
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=0)
