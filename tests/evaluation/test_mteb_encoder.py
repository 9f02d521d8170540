"""The mteb 2.x encoder wrapper, run end to end on every mock task mteb ships (no network).

Text/image mock tasks run wherever mteb is installed; audio/video ones need datasets' torchcodec decoding, i.e. the
complete venv built by training/evaluation/install_full_env.sh, and skip with that reason elsewhere.
"""

import importlib
import inspect
import math
import pkgutil

import numpy as np
import pytest

from training.evaluation.media import batch_to_inputs, to_audio_item, to_video_frames
from training.evaluation.reference import ReferenceEmbedder


class CheckingEmbedder(ReferenceEmbedder):
    """Reference features, plus assertions on what the wrapper hands the model."""

    def encode(self, inputs, *, prompt=None, batch_size=8):
        for x in inputs:
            if isinstance(x, dict):
                if "audio" in x:
                    a = x["audio"]
                    assert a["sampling_rate"] == 16000 and a["array"].ndim == 1 and a["array"].dtype == np.float32
                if "video" in x:
                    v = x["video"]
                    assert v.ndim == 4 and v.shape[-1] == 3 and v.dtype == np.uint8 and v.shape[0] <= 8
        return super().encode(inputs, prompt=prompt, batch_size=batch_size)


class FakeSamples:
    def __init__(self, data, sr):
        import torch

        self.data, self.sample_rate = torch.as_tensor(data), sr


class FakeAudioDecoder:
    """Mimics torchcodec's AudioDecoder as datasets 5 hands it to mteb."""

    def __init__(self, data, sr):
        self._s = FakeSamples(data, sr)

    def get_all_samples(self):
        return self._s


def test_audio_forms_are_resampled_to_16k_mono():
    t = np.arange(8000) / 8000.0
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    a = to_audio_item({"array": tone.tolist(), "sampling_rate": 8000})
    assert a["sampling_rate"] == 16000 and a["array"].shape == (16000,)
    # still a 440 Hz tone after resampling
    spec = np.abs(np.fft.rfft(a["array"]))
    assert abs(np.argmax(spec) * 16000 / 16000 - 440) <= 1
    stereo = np.stack([tone, tone])  # (channels, samples)
    b = to_audio_item(FakeAudioDecoder(stereo, 8000))
    np.testing.assert_allclose(b["array"], a["array"], atol=1e-5)
    with pytest.raises(TypeError, match="AudioDecoder"):
        to_audio_item(3.0)
    with pytest.raises(ValueError, match="sampling_rate"):
        to_audio_item({"array": [0.0], "sampling_rate": None})


def test_video_forms_and_batch_split():
    torch = pytest.importorskip("torch")
    frames = torch.zeros((20, 3, 6, 5), dtype=torch.uint8)
    v = to_video_frames(frames)
    assert v.shape == (8, 6, 5, 3)
    items = batch_to_inputs({"text": ["a", "b"], "video": [frames, frames], "query": ["a", "b"]})
    assert [sorted(i) for i in items] == [["text", "video"], ["text", "video"]]
    assert batch_to_inputs({"text": ["hello"]}) == ["hello"]
    with pytest.raises(ValueError, match="differ in length"):
        batch_to_inputs({"text": ["a"], "image": []})
    with pytest.raises(ValueError, match="none of"):
        batch_to_inputs({"title": ["x"]})


def _mock_tasks():
    mteb_mocks = pytest.importorskip("mteb.mocks.mock_tasks")
    from mteb.abstasks.abstask import AbsTask

    out = []
    for m in pkgutil.iter_modules(mteb_mocks.__path__):
        mod = importlib.import_module(f"mteb.mocks.mock_tasks.{m.name}")
        for name, obj in sorted(vars(mod).items()):
            if inspect.isclass(obj) and issubclass(obj, AbsTask) and name.startswith("Mock") \
                    and obj.__module__ == mod.__name__:
                out.append(obj)
    return out


def _has_torchcodec() -> bool:
    try:
        from torchcodec.decoders import AudioDecoder  # noqa: F401
        return True
    except Exception:  # ImportError, or OSError/RuntimeError when its CUDA/FFmpeg libraries are missing
        return False


try:
    MOCKS = _mock_tasks()
except pytest.skip.Exception:
    MOCKS = []


@pytest.mark.skipif(not MOCKS, reason="mteb is not installed (pip install mteb==2.26.24 torch==2.13.0)")
@pytest.mark.parametrize("task_cls", MOCKS, ids=lambda c: c.__name__)
def test_mock_task_end_to_end(task_cls):
    import mteb

    from training.evaluation.mteb_encoder import ConanMtebEncoder

    task = task_cls()
    if {"audio", "video"} & set(task.metadata.modalities) and not _has_torchcodec():
        pytest.skip("audio/video mock tasks need torchcodec (complete venv: training/evaluation/install_full_env.sh)")
    if "Multilingual" in task_cls.__name__ and not _has_torchcodec():
        pytest.skip("light venv: multilingual variants repeat the monolingual mock (all run in the complete venv)")
    enc = ConanMtebEncoder(CheckingEmbedder(), embed_dim=27)
    assert set(enc.mteb_model_meta.modalities) == {"text", "image", "audio", "video"}
    res = mteb.evaluate(enc, task, cache=None, show_progress_bar=False)
    score = res.task_results[0].get_score()
    # regression/STS/summarisation mocks can give NaN correlations on 2-4 items; everything else is a [0,1] score
    assert math.isnan(score) or -1.0 <= score <= 1.0


def test_prompts_per_task_type():
    pytest.importorskip("mteb")
    from mteb.mocks.mock_tasks.retrieval import MockRetrievalTask
    from mteb.mocks.mock_tasks.zeroshot_classification import MockZeroShotClassificationTask
    from mteb.types import PromptType

    from training.evaluation.mteb_encoder import ConanMtebEncoder

    enc = ConanMtebEncoder(ReferenceEmbedder(), prompts={"Retrieval-query": "Find the passage"})
    r = MockRetrievalTask().metadata
    assert enc.prompt_for(r, PromptType.query, ["q"]) == "Find the passage"
    assert enc.prompt_for(r, PromptType.document, ["d"]) is None
    z = MockZeroShotClassificationTask().metadata
    assert enc.prompt_for(z, None, ["a photo of a cat"]) is None  # label texts are candidates
    assert enc.prompt_for(z, None, [{"image": "x"}]) == "Represent the given image for classification"
