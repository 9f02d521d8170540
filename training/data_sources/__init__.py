"""Real-data builders for the end-to-end pipeline: train/dev/test pair files per modality in the project's JSONL
format (docs/ARCHITECTURE.md), from sources that install from package registries (see ``install.py``).

Entry point: :func:`training.data_sources.build.build_datasets` / ``python -m training.data_sources.build``.
Splits follow ``training/common/splits.py``, the rule the offline proxy evaluation uses, so training never sees its test
items.
"""
