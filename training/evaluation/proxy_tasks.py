"""The offline proxy suite: real local data scored with the protocol of the benchmark task each one mirrors.

**Offline proxy suite, not MMEB/MAEB.** Audio tasks run through mteb's own evaluators (custom tasks whose
``load_data`` builds the dataset in memory; audio kept as plain ``{"array", "sampling_rate"}`` columns so no
torchcodec is needed); image/document tasks use the MMEB (VLM2Vec) candidate-list protocol of :mod:`.mmeb`.
Each task returns its main score under the name the mirrored benchmark task uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .embedder import Embedder
from .mmeb import MMEBRow, score_rows
from training.common.shared_data import (CIFAR10_CLASSES, DIGIT_NAMES, FSDD_SPEAKERS, SourceMissing, cifar10_images, emoji_names,
                         espeak_clips, fsdd_clips, fsdd_split, pdf_pages, read_audio, render_emoji)


@dataclass
class Context:
    embedder: Embedder  # usually a CachedEmbedder
    limit: int | None
    shared: Path | None
    data_cache: Path
    batch_size: int = 8


@dataclass(frozen=True)
class ProxyTask:
    name: str
    modality: str
    mirrors: str
    main_score_name: str
    protocol: str  # "mteb" or "mmeb"
    fn: Callable[[Context], dict[str, Any]]
    synthetic: bool = False


def _cap(n_default: int, limit: int | None) -> int:
    return n_default if limit is None else max(1, min(n_default, limit))


# ---------------------------------------------------------------- mteb-backed audio tasks
def _meta(name: str, type_: str, main_score: str, modalities: list[str], category: str, desc: str) -> Any:
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(
        name=name, type=type_, main_score=main_score, description=desc + " (offline proxy, not MAEB)",
        reference="https://github.com/Jakobovski/free-spoken-digit-dataset", dataset={"path": f"local/{name}",
                                                                                       "revision": "local"},
        category=category, eval_splits=["test"], eval_langs=["eng-Latn"], date=("2018-01-01", "2018-12-31"),
        dialect=[], domains=["Spoken"], task_subtypes=[], license="cc-by-sa-4.0", annotations_creators="derived",
        modalities=modalities, sample_creation="found", bibtex_citation="")


def _require_mteb() -> None:
    try:
        import mteb  # noqa: F401
    except ImportError as e:
        raise SourceMissing("mteb is not installed: pip install mteb==2.26.24 torch==2.13.0") from e


@contextmanager
def _sklearn_single_thread() -> Iterator[None]:
    """Run scikit-learn's OpenMP loops on one thread (torch's pool untouched).

    Why: mteb's MiniBatchKMeans on a few hundred points spent ~20 s in OpenMP contention on a loaded 2-core
    machine vs ~1 s single-threaded; the model's own encoding keeps all threads.
    """
    from threadpoolctl import ThreadpoolController

    libs = [c for c in ThreadpoolController().lib_controllers if "scikit_learn" in str(c.filepath)]
    before = [c.num_threads for c in libs]
    for c in libs:
        c.set_num_threads(1)
    try:
        yield
    finally:
        for c, n in zip(libs, before):
            c.set_num_threads(n)


def _run_mteb(ctx: Context, task: Any) -> dict[str, Any]:
    import mteb
    import sklearn.cluster  # noqa: F401  (load sklearn's OpenMP runtime so it can be limited)

    from .mteb_encoder import ConanMtebEncoder

    enc = ConanMtebEncoder(ctx.embedder, batch_size=ctx.batch_size)
    with _sklearn_single_thread():
        res = mteb.evaluate(enc, task, cache=None, show_progress_bar=False,
                            encode_kwargs={"batch_size": ctx.batch_size})
    tr = res.task_results[0]
    scores = tr.scores["test"][0]
    main = float(tr.get_score())
    return {"main_score": main, "scores": {k: v for k, v in scores.items() if isinstance(v, (int, float))}}


def _audio_rows(clips: list) -> list[dict[str, Any]]:
    return [read_audio(c.path) for c in clips]


def fsdd_zeroshot(ctx: Context) -> dict[str, Any]:
    _require_mteb()
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.zeroshot_classification import AbsTaskZeroShotClassification

    test = fsdd_split(fsdd_clips(ctx.shared), "test")[: _cap(300, ctx.limit)]

    class Task(AbsTaskZeroShotClassification):
        metadata = _meta("ProxyFSDDZeroshot", "AudioZeroshotClassification", "accuracy", ["audio", "text"], "a2t",
                         "Spoken digit zero-shot classification on FSDD (labels 'Zero'..'Nine')")
        input_column_name = "audio"
        label_column_name = "label"

        def load_data(self, **kw: Any) -> None:
            self.dataset = DatasetDict({"test": Dataset.from_dict(
                {"audio": _audio_rows(test), "label": [c.digit for c in test]})})
            self.data_loaded = True

        def get_candidate_labels(self) -> list[str]:
            return list(DIGIT_NAMES)

    return {**_run_mteb(ctx, Task()), "n": len(test)}


def fsdd_linear_probe(ctx: Context) -> dict[str, Any]:
    _require_mteb()
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.classification import AbsTaskClassification

    clips = fsdd_clips(ctx.shared)
    test = fsdd_split(clips, "test")[: _cap(300, ctx.limit)]
    # a 24-per-digit training pool (takes 5.., all speakers); mteb draws 8 per label in each of 10 experiments
    train = fsdd_split(clips, "train")[: 240 if ctx.limit is None else 80]

    class Task(AbsTaskClassification):
        metadata = _meta("ProxyFSDDLinearProbe", "AudioClassification", "accuracy", ["audio"], "a2c",
                         "Spoken digit 8-shot logistic-regression probe on FSDD")
        input_column_name = "audio"
        label_column_name = "label"
        samples_per_label = 8
        n_experiments = 10

        def load_data(self, **kw: Any) -> None:
            self.dataset = DatasetDict({
                "train": Dataset.from_dict({"audio": _audio_rows(train), "label": [c.digit for c in train]}),
                "test": Dataset.from_dict({"audio": _audio_rows(test), "label": [c.digit for c in test]})})
            self.data_loaded = True

    return {**_run_mteb(ctx, Task()), "n": len(test), "n_train_pool": len(train)}


def fsdd_speaker_clustering(ctx: Context) -> dict[str, Any]:
    _require_mteb()
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.clustering import AbsTaskClustering

    n = 300 if ctx.limit is None else min(300, max(12, ctx.limit))  # >= 2 clips per speaker
    test = fsdd_split(fsdd_clips(ctx.shared), "test")[:n]

    class Task(AbsTaskClustering):
        metadata = _meta("ProxyFSDDSpeakerClustering", "AudioClustering", "v_measure", ["audio"], "a2c",
                         "Speaker clustering of FSDD recordings (6 speakers)")
        input_column_name = "audio"
        label_column_name = "labels"
        max_fraction_of_documents_to_embed = None
        max_document_to_embed = None

        def load_data(self, **kw: Any) -> None:
            self.dataset = DatasetDict({"test": Dataset.from_dict(
                {"audio": _audio_rows(test), "labels": [FSDD_SPEAKERS.index(c.speaker) for c in test]})})
            self.data_loaded = True

    return {**_run_mteb(ctx, Task()), "n": len(test)}


def tts_text_to_audio(ctx: Context) -> dict[str, Any]:
    _require_mteb()
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.retrieval import AbsTaskRetrieval

    names = [n for _, n in emoji_names(split="test")]
    names = [names[i] for i in _spread(len(names), _cap(300, ctx.limit))]
    audio = espeak_clips(names, ctx.data_cache / "espeak")

    class Task(AbsTaskRetrieval):
        metadata = _meta("ProxyTTSText2AudioRetrieval", "Any2AnyRetrieval", "hit_rate_at_5", ["audio", "text"],
                         "t2a", "Text -> spoken-phrase retrieval; speech synthesised with espeak-ng (SYNTHETIC)")

        def load_data(self, **kw: Any) -> None:
            ids = [f"d{i}" for i in range(len(names))]
            self.queries = DatasetDict({"test": Dataset.from_dict(
                {"id": [f"q{i}" for i in range(len(names))], "text": names, "modality": ["text"] * len(names)})})
            self.corpus = DatasetDict({"test": Dataset.from_dict(
                {"id": ids, "audio": audio, "modality": ["audio"] * len(names)})})
            self.relevant_docs = {"test": {f"q{i}": {ids[i]: 1} for i in range(len(names))}}
            self.data_loaded = True

    return {**_run_mteb(ctx, Task()), "n": len(names)}


# ---------------------------------------------------------------- MMEB-protocol image / document tasks
def _spread(total: int, n: int) -> list[int]:
    if n >= total:
        return list(range(total))
    step = total / n
    return [int(i * step) for i in range(n)]


def cifar10_zeroshot(ctx: Context) -> dict[str, Any]:
    from PIL import Image

    per_class = math.ceil(_cap(1000, ctx.limit) / 10)
    items = cifar10_images(ctx.shared, per_class=per_class, split="test")[: _cap(1000, ctx.limit)]
    rows = []
    for path, ci in items:
        with Image.open(path) as im:
            img = im.convert("RGB")
        order = [ci] + [j for j in range(10) if j != ci]
        rows.append(MMEBRow(qry_text=None, qry_image=img, tgt_texts=[CIFAR10_CLASSES[j] for j in order],
                            tgt_images=[None] * 10, qry_inst="Represent the given image for classification"))
    res = score_rows(ctx.embedder, rows, kind="image", batch_size=ctx.batch_size)
    return {"main_score": res["hit@1"], "scores": res, "n": len(rows)}


def _emoji_set(n: int) -> list[tuple[Any, str]]:
    """``n`` rendered emoji spread over the code space (emoji the font cannot draw are replaced by neighbours)."""
    names = emoji_names(split="test")
    out, used = [], set()
    for i in _spread(len(names), n):
        for j in list(range(i, len(names))) + list(range(i - 1, -1, -1)):
            if j in used:
                continue
            used.add(j)
            img = render_emoji(names[j][0])
            if img is not None:
                out.append((img, names[j][1]))
                break
    return out


def _retrieval_rows(queries: list[Any], cands: list[Any], *, query_is_text: bool, inst: str) -> list[MMEBRow]:
    rows = []
    for i, q in enumerate(queries):
        order = [i] + [j for j in range(len(cands)) if j != i]
        c = [cands[j] for j in order]
        if query_is_text:
            rows.append(MMEBRow(qry_text=q, qry_image=None, tgt_texts=[None] * len(c), tgt_images=c, qry_inst=inst))
        else:
            rows.append(MMEBRow(qry_text=None, qry_image=q, tgt_texts=c, tgt_images=[None] * len(c), qry_inst=inst))
    return rows


def emoji_image_to_name(ctx: Context) -> dict[str, Any]:
    data = _emoji_set(_cap(1000, ctx.limit))
    rows = _retrieval_rows([d[0] for d in data], [d[1] for d in data], query_is_text=False,
                           inst="Find the name of the emoji shown in the given image")
    res = score_rows(ctx.embedder, rows, kind="image", batch_size=ctx.batch_size)
    return {"main_score": res["hit@1"], "scores": res, "n": len(rows), "n_candidates": len(data)}


def emoji_name_to_image(ctx: Context) -> dict[str, Any]:
    data = _emoji_set(_cap(1000, ctx.limit))
    rows = _retrieval_rows([d[1] for d in data], [d[0] for d in data], query_is_text=True,
                           inst="Find me an emoji image that matches the given name")
    res = score_rows(ctx.embedder, rows, kind="image", batch_size=ctx.batch_size)
    return {"main_score": res["hit@1"], "scores": res, "n": len(rows), "n_candidates": len(data)}


def pdf_page_retrieval(ctx: Context) -> dict[str, Any]:
    pages = pdf_pages(n=_cap(1000, ctx.limit), split="test")
    rows = _retrieval_rows([q for _, q, _ in pages], [img for img, _, _ in pages], query_is_text=True,
                           inst="Find a document image that matches the given query")
    res = score_rows(ctx.embedder, rows, kind="visdoc", batch_size=ctx.batch_size)
    return {"main_score": res["ndcg@5"], "scores": res, "n": len(rows), "n_candidates": len(pages),
            "source": "Debian r-doc-pdf R-intro.pdf"}


TASKS: dict[str, ProxyTask] = {t.name: t for t in [
    ProxyTask("fsdd_zeroshot", "audio", "MAEB SpeechCommandsZeroshotv0.02 (AudioZeroshotClassification)",
              "accuracy", "mteb", fsdd_zeroshot),
    ProxyTask("fsdd_linear_probe", "audio", "MAEB AudioClassification (8-shot LogReg, 10 runs)", "accuracy", "mteb",
              fsdd_linear_probe),
    ProxyTask("fsdd_speaker_clustering", "audio", "MAEB VoxPopuliGenderClustering-style AudioClustering",
              "v_measure", "mteb", fsdd_speaker_clustering),
    ProxyTask("tts_text_to_audio", "audio", "MAEB T2A retrieval (e.g. CommonVoiceMini21T2ARetrieval)",
              "hit_rate_at_5", "mteb", tts_text_to_audio, synthetic=True),
    ProxyTask("cifar10_zeroshot", "image", "MMEB I-CLS (ImageNet-1K style)", "hit@1", "mmeb", cifar10_zeroshot),
    ProxyTask("emoji_image_to_name", "image", "MMEB I-RET i2t (MSCOCO_i2t style)", "hit@1", "mmeb",
              emoji_image_to_name),
    ProxyTask("emoji_name_to_image", "image", "MMEB I-RET t2i (MSCOCO_t2i style)", "hit@1", "mmeb",
              emoji_name_to_image),
    ProxyTask("pdf_page_retrieval", "document", "MMEB-V2 VisDoc (ViDoRe style)", "ndcg@5", "mmeb",
              pdf_page_retrieval),
]}
