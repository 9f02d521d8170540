"""serving.index: a folder/JSONL corpus of every modality -> shards + FAISS; vectors equal SentenceTransformer's,
resume after a crash, changed files re-embedded, 2 gloo processes == 1 process, clear errors."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from demo.sample_gallery import EXPECTED_IDS, colour_image, make_gallery

pytest.importorskip("faiss", reason="serving.index needs faiss-cpu (requirements-serving.txt)")
pytest.importorskip("av", reason="the test gallery's video needs PyAV")

from serving import index as serving_index  # noqa: E402
from serving.index import CorpusIndex, build_index, encode_queries, main  # noqa: E402


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    return make_gallery(tmp_path_factory.mktemp("gallery"), decoys=True)


@pytest.fixture(scope="module")
def built(tiny_repo, tiny_st, gallery, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "idx"
    build_index(tiny_repo, gallery, out, batch_size=3, shard_size=3, encoder=tiny_st, show_progress=False)
    return out


def test_build_records_vectors_and_layout(built, tiny_st, gallery):
    index = CorpusIndex.load(built)
    assert [r["id"] for r in index.records] == EXPECTED_IDS
    kinds = {r["id"]: r["kind"] for r in index.records}
    assert kinds["pages.pdf#page=1"] == "pdf" and kinds["tone.wav"] == "audio" and kinds["clip.mp4"] == "video"
    assert index.manifest["count"] == 8 and index.manifest["shards"] == 3 and index.manifest["errors"] == 0
    assert sorted(p.name for p in (built / "shards").iterdir()) == [
        f"0000{i}.{ext}" for i in range(3) for ext in ("jsonl", "safetensors")]
    reference = tiny_st.encode_document([r["input"] for r in index.records], batch_size=1)
    stored = index.embeddings()
    assert stored.shape == reference.shape and stored.dtype == np.float32
    np.testing.assert_allclose(stored, reference, atol=1e-5)
    assert np.abs(stored[3] - stored[4]).max() > 1e-4  # the two PDF pages are two different vectors


def test_search_exact_match_and_cli(built, tiny_st, gallery, capsys):
    index = CorpusIndex.load(built)
    for name, record_id in (("red.png", "red.png"), ("sub/blue.png", "sub/blue.png"), ("tone.wav", "tone.wav")):
        hits = index.search(encode_queries(tiny_st, [str(gallery / name)], "document"), k=3)[0]
        assert hits[0].id == record_id and hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert [h.rank for h in hits] == [1, 2, 3] and hits[0].score >= hits[1].score >= hits[2].score
    text_hits = index.search(encode_queries(tiny_st, ["red squares"]), k=100)[0]
    assert sorted(h.id for h in text_hits) == sorted(EXPECTED_IDS)  # k larger than the corpus: every item once
    main(["search", "--index", str(built), "--query", str(gallery / "green.png"), "--k", "2",
          "--prompt-name", "document", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["rank"] for line in lines] == [1, 2] and lines[0]["id"] == "green.png"
    main(["search", "--index", str(built), "--query", "a red square", "--k", "3"])
    assert "query: a red square" in capsys.readouterr().out
    assert main(["search", "--index", str(built), "--query", "x", "--k", "0"]) == 2
    assert "error: k must be >= 1, got 0" in capsys.readouterr().err
    assert main(["build", "--model", "m", "--inputs", str(gallery / "none"), "--output", str(built.parent / "x")]) == 2
    assert "must be an existing folder or a .jsonl file" in capsys.readouterr().err


def test_resume_after_crash_and_changed_files(tiny_repo, tiny_st, gallery, tmp_path, monkeypatch):
    corpus = make_gallery(tmp_path / "g", video=False, decoys=True)
    out = tmp_path / "idx"
    calls = []
    real = serving_index._encode_records

    def crash_on_third(model, records, skip_errors):
        calls.append([r["id"] for r in records])
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(model, records, skip_errors)

    monkeypatch.setattr(serving_index, "_encode_records", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_index(tiny_repo, corpus, out, batch_size=2, shard_size=2, encoder=tiny_st, show_progress=False)
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "00000.jsonl", "00000.safetensors", "00001.jsonl", "00001.safetensors"]  # one shard per batch here
    assert not (out / "merged").exists()
    (out / "shards" / "00002.safetensors").write_bytes(b"half a file")  # a torn write from the killed process
    calls.clear()
    monkeypatch.setattr(serving_index, "_encode_records", lambda m, r, s: (calls.append([x["id"] for x in r]),
                                                                           real(m, r, s))[1])
    build_index(tiny_repo, corpus, out, batch_size=2, shard_size=2, encoder=tiny_st, show_progress=False)
    ids = [r["id"] for r in CorpusIndex.load(out).records]
    assert ids == [i for i in EXPECTED_IDS if i != "clip.mp4"]
    assert [i for batch in calls for i in batch] == ids[4:]  # shards 0 and 1 were not encoded again

    calls.clear()
    colour_image("blue").save(corpus / "red.png")  # same name, new content (size/mtime change)
    os.utime(corpus / "red.png", ns=(1, 1))
    build_index(tiny_repo, corpus, out, batch_size=2, shard_size=2, encoder=tiny_st, show_progress=False)
    assert calls == [["red.png", "sub/blue.png"]]  # only the shard holding the changed file
    index = CorpusIndex.load(out)
    np.testing.assert_allclose(index.embeddings()[ids.index("red.png")],
                               tiny_st.encode_document([str(corpus / "sub" / "blue.png")])[0], atol=1e-5)

    (corpus / "note.txt").unlink()  # a smaller corpus: stale shards are removed at merge
    build_index(tiny_repo, corpus, out, batch_size=2, shard_size=2, encoder=tiny_st, show_progress=False)
    assert len(CorpusIndex.load(out)) == 6 and len(list((out / "shards").glob("*.jsonl"))) == 3


def test_jsonl_corpus_and_errors(tiny_repo, tiny_st, gallery, tmp_path):
    jsonl = tmp_path / "corpus.jsonl"
    rows = [{"id": "doc", "document": os.path.relpath(gallery / "pages.pdf", tmp_path), "meta": {"src": "x"}},
            {"image": str(gallery / "red.png"), "text": "a red card"},
            {"text": "plain text row"}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = build_index(tiny_repo, jsonl, tmp_path / "idx", encoder=tiny_st, show_progress=False)
    records = CorpusIndex.load(out).records
    assert [r["id"] for r in records] == ["doc#page=0", "doc#page=1", "line-2", "line-3"]
    assert records[0]["meta"] == {"src": "x"} and records[2]["kind"] == "mixed" and records[3]["kind"] == "text"
    np.testing.assert_allclose(CorpusIndex.load(out).embeddings()[2],
                               tiny_st.encode_document([{"image": str(gallery / "red.png"), "text": "a red card"}])[0],
                               atol=1e-5)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"imgae": "x.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has unknown key\(s\) \['imgae'\]"):
        build_index(tiny_repo, bad, tmp_path / "bad-idx", encoder=tiny_st, show_progress=False)
    with pytest.raises(ValueError, match="must be an existing folder or a .jsonl file"):
        build_index(tiny_repo, tmp_path / "missing", tmp_path / "m-idx", encoder=tiny_st, show_progress=False)
    with pytest.raises(FileNotFoundError, match="no finished index"):
        CorpusIndex.load(tmp_path / "bad-idx")

    _assert_broken_file_fails_or_is_skipped(tiny_repo, tiny_st, tmp_path / "corrupt", "broken.png", b"not a png",
                                            r"\['broken.png', 'ok.png'\] failed")


def _assert_broken_file_fails_or_is_skipped(tiny_repo, tiny_st, folder, name, data, error) -> None:
    """A folder of ok.png + an undecodable file: the build fails with `error`; --skip-errors indexes ok.png alone."""
    folder.mkdir()
    colour_image("red").save(folder / "ok.png")
    (folder / name).write_bytes(data)
    with pytest.raises(ValueError, match=error):
        build_index(tiny_repo, folder, folder.with_name(folder.name + "-idx"), encoder=tiny_st, show_progress=False)
    out = build_index(tiny_repo, folder, folder.with_name(folder.name + "-idx"), encoder=tiny_st, show_progress=False,
                      skip_errors=True)
    index = CorpusIndex.load(out)
    assert [r["id"] for r in index.records] == ["ok.png"] and index.manifest["errors"] == 1


def test_settings_need_overwrite_and_faiss_factories(tiny_repo, tiny_st, tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    colour_image("red").save(corpus / "red.png")
    colour_image("green").save(corpus / "green.png")
    hnsw = build_index(tiny_repo, corpus, tmp_path / "hnsw", faiss_factory="HNSW8", encoder=tiny_st, show_progress=False)
    hits = CorpusIndex.load(hnsw).search(tiny_st.encode_document([str(corpus / "red.png")]), k=2)[0]
    assert [h.id for h in hits] == ["red.png", "green.png"] and "HNSW" in type(CorpusIndex.load(hnsw).index).__name__
    with pytest.raises(ValueError, match="--faiss-factory 'IVF64,Flat' could not be built on 2 vectors"):
        build_index(tiny_repo, corpus, tmp_path / "ivf", faiss_factory="IVF64,Flat", encoder=tiny_st,
                    show_progress=False)
    out = build_index(tiny_repo, corpus, tmp_path / "idx", encoder=tiny_st, show_progress=False)
    with pytest.raises(ValueError, match="shard_size differ.*--overwrite"):
        build_index(tiny_repo, corpus, out, shard_size=7, encoder=tiny_st, show_progress=False)
    build_index(tiny_repo, corpus, out, shard_size=7, encoder=tiny_st, show_progress=False, overwrite=True)
    assert json.loads((out / "build.json").read_text())["shard_size"] == 7


def _readme_commands(section: str) -> list[list[str]]:
    """The commands of the ```bash blocks in README section `section`, split like a shell would (comments dropped)."""
    text = (REPO_ROOT / "README.md").read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", body, re.S)
    return [shlex.split(line, comments=True) for block in blocks for line in block.replace("\\\n", " ").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _localise(argv: list[str], tiny_repo, runs) -> list[str]:
    """A README command with .venv/bin/* -> this interpreter, runs/tiny -> the tiny repo, runs/* -> a temp folder."""
    head = {".venv/bin/python": [sys.executable],
            ".venv/bin/accelerate": [sys.executable, "-m", "accelerate.commands.accelerate_cli"]}[argv[0]]
    tail = [str(tiny_repo) if a == "runs/tiny" else str(runs / a[5:]) if a.startswith("runs/") else a for a in argv[1:]]
    return head + tail


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}  # CPU + gloo even on a GPU machine: compared with the CPU-built index
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_readme_index_commands(tiny_repo, tmp_path):
    """The README's index block, as pasted (model build skipped: the tiny repo stands in for runs/tiny)."""
    commands = [c for c in _readme_commands("Corpus index") if c[0] == ".venv/bin/python" and "--tiny" not in c]
    assert [c[2] for c in commands] == ["demo.sample_gallery", "serving.index", "serving.index", "serving.index"]
    outputs = [subprocess.run(_localise(c, tiny_repo, tmp_path), env=_env(), cwd=REPO_ROOT, timeout=600,
                              capture_output=True, text=True, check=True).stdout for c in commands]
    assert "indexed 8 records" in outputs[1]
    assert "query: a red square" in outputs[2] and len(outputs[2].splitlines()) == 1 + 5
    assert outputs[3].splitlines()[1].split()[-1] == "red.png"  # the gallery image itself comes first


def test_two_gloo_processes_match_one(tiny_repo, built, gallery, tmp_path):
    """The README's `accelerate launch --multi_gpu --num_processes 2` line on CPU (2 gloo processes) gives the
    1-process order and vectors."""
    (line,) = [c for c in _readme_commands("Corpus index") if c[:3] == [".venv/bin/accelerate", "launch", "--multi_gpu"]]
    argv = _localise(line, tiny_repo, tmp_path)
    argv[argv.index("--inputs") + 1] = str(gallery)
    argv[argv.index("launch") + 1 : argv.index("launch") + 1] = ["--main_process_port", "0"]  # a free port in CI
    out = Path(argv[argv.index("--output") + 1])
    result = subprocess.run(argv, env=_env(), cwd=REPO_ROOT, timeout=600, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "indexed 8 records" in result.stdout
    assert "embedding (rank 0)" in result.stderr and "embedding (rank 1)" in result.stderr  # really 2 processes
    one, two = CorpusIndex.load(built), CorpusIndex.load(out)
    assert [r["id"] for r in two.records] == [r["id"] for r in one.records] == EXPECTED_IDS
    np.testing.assert_allclose(two.embeddings(), one.embeddings(), atol=1e-5)
    assert two.manifest["shards"] == 3 and (out / "shards" / "00001.jsonl").is_file()


def test_unreadable_pdf_is_skipped_by_skip_errors(tiny_repo, tiny_st, tmp_path):
    """A PDF that pypdfium2 cannot open (corrupt, or password-protected) fails like any other undecodable file: named
    in the error without --skip-errors, left out and counted with it (it used to stop the build while listing pages)."""
    _assert_broken_file_fails_or_is_skipped(
        tiny_repo, tiny_st, tmp_path / "corpus", "broken.pdf", b"%PDF-1.7\nnot really a pdf\n",
        r"\['broken.pdf#page=0', 'ok.png'\] failed.*broken.pdf' could not be opened")
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text(json.dumps({"id": "manual", "document": "corpus/broken.pdf"}) + "\n" + '{"text": "fine"}\n')
    out = build_index(tiny_repo, jsonl, tmp_path / "j-idx", encoder=tiny_st, show_progress=False, skip_errors=True)
    assert [r["id"] for r in CorpusIndex.load(out).records] == ["line-2"]
