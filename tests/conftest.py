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


COMPRESSION_K = 4  # compression tokens of the tiny compression_mean repo (CoMa uses 32; 4 keeps rows short)


@pytest.fixture(scope="session")
def tiny_compression_repo(tmp_path_factory) -> Path:
    """The tiny repo built with `compression_tokens=COMPRESSION_K` (embedding_pooling="compression_mean")."""
    from training.base.build_base import build_tiny_repo

    return build_tiny_repo(tmp_path_factory.mktemp("conan-coma") / "tiny", compression_tokens=COMPRESSION_K)


def assert_compression_mean_embeddings(model, processor, inputs: list, **prepare_kwargs):
    """Embed `inputs` and check that every row holds exactly the k compression tokens and that its embedding is the
    normalised mean of `last_hidden_state` over them (within 1e-6: same tensors, another reduction). Returns
    (output, batch)."""
    import torch
    import torch.nn.functional as F

    ids = model.config.compression_token_ids
    batch = processor.prepare(inputs, **prepare_kwargs)
    with torch.no_grad():
        output = model(**batch)
    where = torch.isin(batch["input_ids"], torch.tensor(ids)) & batch["attention_mask"].bool()
    assert where.sum(dim=1).tolist() == [len(ids)] * len(inputs)
    hand = torch.stack([hidden[w].mean(dim=0) for hidden, w in zip(output.last_hidden_state, where)])
    torch.testing.assert_close(output.embeddings, F.normalize(hand, dim=-1), atol=1e-6, rtol=0)
    return output, batch


@pytest.fixture(scope="session")
def tiny_compression_model_and_processor(tiny_compression_repo):
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(tiny_compression_repo, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tiny_compression_repo, trust_remote_code=True)
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


def write_fading_mp4(path: Path, n_frames: int = 8, step: int = 30) -> Path:
    """A small MPEG-4 clip (64x48, 4 fps) whose grey level rises by `step` per frame (PyAV)."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * step, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="session")
def omni_tuple_file(tmp_path_factory) -> Path:
    """8 hand-made (text, video, audio) tuple rows (docs/omni_tuples.md): a colour name, a 4-frame clip of that
    colour, a tone at a colour-specific pitch; the augmented copy differs in wording, noise and pitch."""
    import json

    import numpy as np

    from training.data_sources.common import MediaWriter

    root = tmp_path_factory.mktemp("tuples")
    media = MediaWriter(root)
    rng = np.random.default_rng(0)
    rows = []
    for i, word in enumerate(("red", "green", "blue", "cyan", "magenta", "yellow", "black", "white")):
        items = []
        for copy in range(2):
            noise = rng.integers(0, 20, (4, 32, 32, 3), dtype=np.uint8)
            frames = np.full((4, 32, 32, 3), 30 * i, dtype=np.uint8) + noise
            t = np.arange(8000) / 16000
            wave = 0.3 * np.sin(2 * np.pi * (200 + 80 * i + 5 * copy) * t)
            items.append({"text": f"{'the' if copy == 0 else 'a'} {word} tuple",
                          "video": media.video(frames, f"t/{word}-{copy}.mp4"),
                          "audio": media.audio(wave, 16000, f"t/{word}-{copy}.wav")})
        rows.append({"query": items[0], "positive": items[1], "source": "handmade-tuples"})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
