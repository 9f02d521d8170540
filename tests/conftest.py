"""Shared fixtures: the tiny Conan repo (built once per session by the real builder) and ../shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    from training.base.build_base import build_tiny_repo

    return build_tiny_repo(tmp_path_factory.mktemp("conan") / "tiny")


@pytest.fixture(scope="session")
def tiny_model_and_processor(tiny_repo):
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(tiny_repo, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tiny_repo, trust_remote_code=True)
    return model, processor


@pytest.fixture(scope="session")
def tiny_st(tiny_repo):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_repo), trust_remote_code=True, device="cpu")


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or a clean skip where the folder is absent (e.g. a user's fresh clone)."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (real data lives in ../shared next to the repo)")
    return path
