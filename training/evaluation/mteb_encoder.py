"""The Conan model as an mteb 2.x encoder (``AbsEncoder`` + ``ModelMeta``).

Imports mteb at module level: import this module lazily (``training.evaluate`` does), so the rest of the evaluation
package works without mteb. Batches arrive as mteb builds them (``{"text": [...], "image": [...], "audio": [...],
"video": [...]}``, with extra query/instruction/title keys); each row becomes one user input (docs/ARCHITECTURE.md),
audio resampled to 16 kHz, video subsampled to a few frames. Prompts: the instruction for the task type goes on
queries and on symmetric tasks; retrieval documents and zero-shot label texts get none.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta
from mteb.types import PromptType
from tqdm.auto import tqdm

from .embedder import Embedder, l2_normalise
from .media import DEFAULT_FRAMES, batch_to_inputs

MODALITIES = ["text", "image", "audio", "video"]
logger = logging.getLogger(__name__)

# Default instruction per mteb task type (used when neither the caller nor the task metadata gives one).
TASK_TYPE_PROMPTS: dict[str, str] = {
    "Classification": "Classify the given text",
    "MultilabelClassification": "Classify the given text into all matching categories",
    "Clustering": "Identify the topic or theme of the given text",
    "PairClassification": "Retrieve semantically similar text",
    "STS": "Retrieve semantically similar text",
    "Retrieval": "Given a query, retrieve relevant documents that answer the query",
    "Reranking": "Given a query, retrieve relevant documents that answer the query",
    "InstructionRetrieval": "Given a query, retrieve relevant documents that answer the query",
    "InstructionReranking": "Given a query, retrieve relevant documents that answer the query",
    "BitextMining": "Retrieve parallel sentences",
    "Summarization": "Retrieve semantically similar summaries",
    "Any2AnyRetrieval": "Retrieve the item that matches the given query",
    "Any2AnyMultilingualRetrieval": "Retrieve the item that matches the given query",
    "Any2AnyReranking": "Retrieve the item that matches the given query",
    "ImageClassification": "Represent the given image for classification",
    "ImageClustering": "Represent the given image for clustering",
    "ZeroShotClassification": "Represent the given image for classification",
    "VisualSTS(eng)": "Retrieve semantically similar text",
    "VisualSTS(multi)": "Retrieve semantically similar text",
    "DocumentUnderstanding": "Find a document image that matches the given query",
    "VisionCentricQA": "Represent the given image with the question for answer selection",
    "Compositionality": "Retrieve the caption that matches the given image",
    "AudioClassification": "Represent the given audio for classification",
    "AudioMultilabelClassification": "Represent the given audio for classifying all sound events in it",
    "AudioClustering": "Represent the given audio for clustering",
    "AudioPairClassification": "Represent the given audio for comparison",
    "AudioReranking": "Retrieve audio similar to the given audio",
    "AudioZeroshotClassification": "Represent the given audio for classification",
    "VideoClassification": "Represent the given video for classification",
    "VideoClustering": "Represent the given video for clustering",
    "VideoMultilabelClassification": "Represent the given video for classification",
    "VideoPairClassification": "Represent the given video for comparison",
    "VideoZeroshotClassification": "Represent the given video for classification",
    "VideoCentricQA": "Represent the given video with the question for answer selection",
}
ASYMMETRIC_TYPES = {"Retrieval", "Reranking", "InstructionRetrieval", "InstructionReranking", "Any2AnyRetrieval",
                    "Any2AnyMultilingualRetrieval", "Any2AnyReranking", "AudioReranking", "DocumentUnderstanding",
                    "VisionCentricQA", "VideoCentricQA"}


class ConanMtebEncoder(AbsEncoder):
    """mteb encoder around any :class:`Embedder` (the SentenceTransformer-loaded Conan model in practice)."""

    def __init__(self, embedder: Embedder, *, model_name: str = "conan-embedding-v3-local", revision: str = "local",
                 embed_dim: int | None = None, prompts: dict[str, str] | None = None, batch_size: int = 8,
                 num_frames: int = DEFAULT_FRAMES, n_parameters: int | None = None) -> None:
        self.model = embedder
        self.prompts_dict = prompts or {}
        self.batch_size = batch_size
        self.num_frames = num_frames
        self.mteb_model_meta = ModelMeta(
            loader=None, name=model_name if "/" in model_name else f"local/{model_name}", revision=revision,
            release_date=None, languages=None, n_parameters=n_parameters, memory_usage_mb=None, max_tokens=None,
            embed_dim=embed_dim, license=None, open_weights=True, public_training_code=None,
            public_training_data=None, framework=["PyTorch", "Sentence Transformers"], similarity_fn_name="cosine",
            use_instructions=True, training_datasets=None, modalities=list(MODALITIES), model_type=["dense"],
        )

    def prompt_for(self, task_metadata: Any, prompt_type: PromptType | None, inputs: list[Any]) -> str | None:
        """Instruction for this encode call: caller prompts > task metadata prompt > task-type default."""
        ttype = str(task_metadata.type)
        pt = prompt_type.value if isinstance(prompt_type, PromptType) else prompt_type
        if pt == "document":
            return self.prompts_dict.get(f"{task_metadata.name}-document") or self.prompts_dict.get(
                f"{ttype}-document")
        if ttype.lower().endswith("zeroshotclassification") and all(isinstance(x, str) for x in inputs):
            return None  # the candidate label texts are documents
        for key in (f"{task_metadata.name}-{pt}" if pt else None, task_metadata.name,
                    f"{ttype}-{pt}" if pt else None, ttype):
            if key and key in self.prompts_dict:
                return self.prompts_dict[key]
        meta_prompt = getattr(task_metadata, "prompt", None)
        if isinstance(meta_prompt, str) and meta_prompt:
            return meta_prompt
        if isinstance(meta_prompt, dict) and meta_prompt.get(pt or "query"):
            return meta_prompt[pt or "query"]
        if ttype in ASYMMETRIC_TYPES and pt is None:
            return None
        return TASK_TYPE_PROMPTS.get(ttype)

    def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        """One L2-normalised row per input row, in order. Rows without content (blank text, 0-sample audio, nothing
        else) get the zero vector, the defined empty-row embedding (cosine similarity 0 to everything), and their
        count is logged; a task whose rows are all empty raises a ValueError."""
        batch_size = int(kwargs.get("batch_size") or self.batch_size)
        rows: list[tuple[list[bool], np.ndarray | None]] = []  # (which rows have content, their embeddings)
        n_rows = n_empty = 0
        for batch in tqdm(inputs, desc=f"mteb {task_metadata.name}", leave=False,
                          disable=not kwargs.get("show_progress_bar", True)):
            items = batch_to_inputs(batch, num_frames=self.num_frames)
            content = [x for x in items if x is not None]
            n_rows, n_empty = n_rows + len(items), n_empty + len(items) - len(content)
            emb = None
            if content:
                emb = np.asarray(self.model.encode(content, prompt=self.prompt_for(task_metadata, prompt_type, content),
                                                   batch_size=batch_size), dtype=np.float32)
                if emb.shape[0] != len(content):
                    raise ValueError(f"embedder returned {emb.shape[0]} rows for {len(content)} inputs")
            rows.append(([x is not None for x in items], emb))
        if not rows:
            raise ValueError(f"mteb gave an empty dataloader for {task_metadata.name} ({hf_subset}/{hf_split})")
        dims = {emb.shape[1] for _, emb in rows if emb is not None}
        if not dims:
            raise ValueError(f"{task_metadata.name} ({hf_subset}/{hf_split}): all {n_rows} rows are empty (blank text "
                             "or 0-sample audio); nothing to embed")
        dim = dims.pop()
        out = np.zeros((n_rows, dim), dtype=np.float32)
        start = 0
        for has_content, emb in rows:
            keep = [start + i for i, flag in enumerate(has_content) if flag]
            if keep:
                out[keep] = emb
            start += len(has_content)
        if n_empty:
            logger.warning("%s (%s/%s): %d of %d rows have no content (blank text or 0-sample audio); they get the "
                           "zero embedding", task_metadata.name, hf_subset, hf_split, n_empty, n_rows)
        return l2_normalise(out)

