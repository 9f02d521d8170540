# Copyright 2026 The Conan-embedding-v3 authors. Licensed under the Apache License, Version 2.0.
"""sentence-transformers input module for Conan-embedding-v3.

The stock `Transformer` module converts every input into chat messages and cannot read video/PDF files without
torchvision/torchcodec; this module hands raw inputs to `ConanProcessor.prepare` instead, so
`SentenceTransformer(path, trust_remote_code=True).encode(...)` accepts exactly the inputs the processor documents.
The model already returns L2-normalised pooled embeddings (`config.embedding_pooling`: the last token, or the mean over
the compression tokens the processor appends), so no Pooling/Normalize modules follow.
"""

from __future__ import annotations

from typing import Any

import torch
from sentence_transformers.base.modules import InputModule
from transformers import AutoModel, AutoProcessor

from .processing_conan import describe_input


class ConanEmbedder(InputModule):
    """Wraps `ConanModel` + `ConanProcessor`; `prompt` (e.g. from `encode_query`) becomes the system instruction."""

    config_keys: list[str] = ["padding_side", "max_seq_length"]
    config_file_name: str = "sentence_conan_config.json"
    save_in_root: bool = True

    def __init__(
        self, model: torch.nn.Module, processor: Any, padding_side: str = "right", max_seq_length: int | None = None
    ):
        super().__init__()
        check_pooling_matches(model.config, processor)
        self.model = model
        self.processor = processor
        self.padding_side = padding_side
        self.max_seq_length = max_seq_length

    @property
    def max_seq_length(self) -> int | None:
        """Tokens per input (sentence-transformers' convention): the value set here, else the processor's
        `max_length`, else the backbone's `max_position_embeddings`. Longer text is truncated (media never is)."""
        if self._max_seq_length is not None:
            return self._max_seq_length
        limit = self.processor.effective_max_length()
        return limit if limit is not None else getattr(self.model.config.text_config, "max_position_embeddings", None)

    @max_seq_length.setter
    def max_seq_length(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"max_seq_length must be a positive int or None, got {value!r}.")
        self._max_seq_length = value

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def modalities(self) -> list:
        # "message" tells sentence-transformers that one batch may mix modalities (and combined dict inputs);
        # the processor handles any mixture, but rejects chat-style role/content dicts with a clear error.
        return ["text", "image", "audio", "video", "message"]

    def preprocess(self, inputs: list[Any], prompt: str | None = None, **kwargs) -> dict[str, Any]:
        inputs = list(inputs)
        # SentenceTransformer.encode sorts inputs by length, so batch positions are not the caller's: errors quote
        # the offending input instead of naming an index.
        names = [describe_input(raw) for raw in inputs]
        return dict(self.processor.prepare(
            inputs, instruction=prompt, padding_side=self.padding_side, max_length=self.max_seq_length,
            input_names=names,
        ))

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        model_inputs = {k: v for k, v in features.items() if k in self.processor.model_input_names}
        output = self.model(**model_inputs)
        features["sentence_embedding"] = output.embeddings
        features["token_embeddings"] = output.last_hidden_state
        return features

    def get_embedding_dimension(self) -> int:
        return self.model.config.text_config.hidden_size

    def get_sentence_embedding_dimension(self) -> int:  # older sentence-transformers name
        return self.get_embedding_dimension()

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.model.save_pretrained(output_path, safe_serialization=safe_serialization)
        self.processor.save_pretrained(output_path)
        self.save_config(output_path)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ) -> "ConanEmbedder":
        hub_kwargs = {
            "subfolder": subfolder, "token": token, "cache_dir": cache_folder, "revision": revision,
            "local_files_only": local_files_only, "trust_remote_code": trust_remote_code,
        }
        config = cls.load_config(
            model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder, revision=revision,
            local_files_only=local_files_only,
        )
        model = AutoModel.from_pretrained(model_name_or_path, **hub_kwargs, **(model_kwargs or {}))
        processor = AutoProcessor.from_pretrained(model_name_or_path, **hub_kwargs, **(processor_kwargs or {}))
        return cls(model=model, processor=processor, **config)


def check_pooling_matches(config: Any, processor: Any) -> None:
    """Raise ValueError when the processor does not append the compression tokens the config pools over (or appends
    tokens a `last_token` config would pool the last of): the two files of a repo disagree."""
    expected = list(config.compression_token_ids or []) if config.embedding_pooling == "compression_mean" else []
    appended = list(getattr(processor, "compression_token_ids", None) or [])
    if appended != expected:
        raise ValueError(
            f"The processor appends compression tokens {appended} but the model config (embedding_pooling="
            f"{config.embedding_pooling!r}) expects {expected}; processor_config.json's `compression_tokens` and "
            "config.json's `compression_token_ids` must name the same tokens."
        )


__all__ = ["ConanEmbedder", "check_pooling_matches"]
