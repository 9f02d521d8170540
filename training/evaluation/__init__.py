"""Evaluation: MMEB runner, mteb encoder wrapper (MAEB and any mteb task), and the offline proxy suite.

mteb is imported lazily (only ``mteb_encoder`` and the mteb-backed proxy tasks need it), so the light venv can use
the MMEB runner and the metrics without it.
"""
