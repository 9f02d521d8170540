"""A corpus index: embed a folder or JSONL of media with a Conan model, search it with FAISS.

    python -m serving.index build --model DIR --inputs FOLDER_OR_JSONL --output INDEX [--batch-size --shard-size]
    python -m serving.index search --index INDEX --query TEXT_OR_PATH [--k 10]
    accelerate launch --num_processes N -m serving.index build ...      # shards the inputs over N processes

Encoding goes through `SentenceTransformer(model, trust_remote_code=True).encode_document` (queries through
`encode_query`), so stored vectors equal the reference implementation's. The inputs (`serving.corpus`: every file type
the processor takes, one vector per PDF page) are cut into global shards of `--shard-size` consecutive records;
shard `s` is encoded by rank `s % world_size`, so every rank writes its own shards and the order never depends on
the number of processes. A shard is written atomically (embeddings, then its metadata JSONL as the commit marker);
a killed build, rerun with the same arguments, re-encodes only the shards that are missing or whose inputs changed.
At the end rank 0 merges the shards into `merged/` (one atomic folder swap): `records.jsonl` (row i = FAISS id i),
`index.faiss` (FAISS, inner product over L2-normalised vectors = cosine) and `index.json`.

Folder layout of INDEX:

    build.json                  model identity and settings of the build (a rerun with another model is refused)
    shards/00000.safetensors    {"embeddings": float32 (n, dim)}   n <= shard_size, rows in record order
    shards/00000.jsonl          the n records (`serving.corpus`), + "error" for inputs that failed (--skip-errors)
    merged/index.json           {"model", "dim", "count", "faiss_factory", "metric", "shards", "errors", ...}
    merged/records.jsonl        the records that have a vector, in FAISS id order
    merged/index.faiss          faiss.write_index of the vector index
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.corpus import corpus_records, file_records, kind_of_path
from training.common.io_utils import atomic_output_dir, write_json_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 256
DEFAULT_BATCH_SIZE = 8


# ------------------------------------------------------------------------------------------------ small helpers
@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    """A temp path next to `path`, renamed over it on success and removed on error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with _atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _save_embeddings(path: Path, embeddings: np.ndarray) -> None:
    from safetensors.numpy import save_file

    with _atomic_file(path) as tmp:
        save_file({"embeddings": np.ascontiguousarray(embeddings, dtype=np.float32)}, str(tmp))


def _load_embeddings(path: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(str(path))["embeddings"]


def _faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError("serving.index needs FAISS: pip install faiss-cpu (pinned in requirements-serving.txt)") from error
    return faiss


def model_identity(model: str | os.PathLike) -> dict[str, Any]:
    """What a resumed build compares: the model's resolved folder and the size/mtime of its weight files."""
    path = Path(model)
    if not path.is_dir():
        return {"model": str(model), "weights": None}
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {"model": str(path.resolve()), "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights]}


def load_model(model: str | os.PathLike, device: str | None = None):
    """`SentenceTransformer(model, trust_remote_code=True)` (the reference encoder), in eval mode."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model), trust_remote_code=True, device=device)


def _shard_name(shard: int) -> str:
    return f"{shard:05d}"


def _strip_error(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "error"}


def distributed_state():
    """`accelerate.PartialState` for this process: the launcher's process group (NCCL on GPUs; gloo on a machine
    without CUDA or with ACCELERATE_USE_CPU=true, where accelerate would otherwise ignore torchrun's ranks)."""
    import torch
    from accelerate import PartialState

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    return PartialState(cpu=use_cpu or not torch.cuda.is_available())


# ------------------------------------------------------------------------------------------------ build
def _shard_done(shards_dir: Path, shard: int, planned: list[dict[str, Any]]) -> bool:
    """True when shard `shard` exists, is complete and was made from exactly these records (JSON-equal)."""
    meta, vectors = shards_dir / f"{_shard_name(shard)}.jsonl", shards_dir / f"{_shard_name(shard)}.safetensors"
    if not (meta.is_file() and vectors.is_file()):
        return False
    try:
        from safetensors import safe_open

        stored = read_jsonl(meta)
        with safe_open(str(vectors), framework="np") as handle:
            n_rows = handle.get_slice("embeddings").get_shape()[0]
    except Exception:  # a truncated file from a killed process: encode the shard again
        return False
    planned_json = json.loads(json.dumps(planned))
    return n_rows == len(planned) and [_strip_error(r) for r in stored] == planned_json


def _encode_records(model, records: list[dict[str, Any]], skip_errors: bool) -> tuple[np.ndarray, list[str | None]]:
    """Document embeddings (len(records), dim) of the records' inputs; failed inputs get a zero row + their error."""
    inputs = [r["input"] for r in records]
    try:
        vectors = model.encode_document(inputs, batch_size=len(inputs), convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32), [None] * len(records)
    except (ValueError, TypeError, OSError) as error:
        if not skip_errors:
            ids = [r["id"] for r in records]
            raise ValueError(f"Encoding the input(s) {ids} failed: {error} (--skip-errors leaves bad inputs out)") from error
    rows, errors = [], []
    for record in records:  # find the bad input(s) of the batch, one by one
        try:
            rows.append(model.encode_document([record["input"]], convert_to_numpy=True, show_progress_bar=False)[0])
            errors.append(None)
        except (ValueError, TypeError, OSError) as error:
            logger.warning("Skipping %s: %s", record["id"], error)
            rows.append(None)
            errors.append(str(error))
    dim = next((len(r) for r in rows if r is not None), model.get_embedding_dimension())
    return np.stack([r if r is not None else np.zeros(dim, np.float32) for r in rows]).astype(np.float32), errors


def _prepare_build(
    inputs: str | os.PathLike, output: Path, identity: dict[str, Any], settings: dict[str, Any], overwrite: bool
) -> list[dict[str, Any]]:
    """Rank 0: list the records, then check (or write) build.json."""
    records = corpus_records(inputs)
    if not records:
        raise ValueError(f"--inputs {str(inputs)!r} holds nothing to embed (no image/audio/video/PDF/text files or rows).")
    build_json = output / "build.json"
    wanted = {"format_version": FORMAT_VERSION, **identity, **settings}
    if build_json.is_file():
        previous = json.loads(build_json.read_text())
        if previous != wanted:
            if not overwrite:
                changed = sorted(k for k in set(previous) | set(wanted) if previous.get(k) != wanted.get(k))
                raise ValueError(
                    f"--output {str(output)!r} holds a build with other settings ({', '.join(changed)} differ); "
                    "pass --overwrite to rebuild it from scratch."
                )
            for stale in (output / "shards").glob("*"):
                stale.unlink()
    write_json_atomic(build_json, wanted)
    return records


def build_index(
    model: str | os.PathLike,
    inputs: str | os.PathLike,
    output: str | os.PathLike,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    faiss_factory: str = "Flat",
    overwrite: bool = False,
    skip_errors: bool = False,
    show_progress: bool = True,
    encoder: Any = None,
) -> Path:
    """Embed every record of `inputs` into INDEX `output` and build its FAISS index; returns `output`.

    `model` is a model folder or Hub id, loaded with `load_model` on this rank's device unless `encoder` is that
    model already loaded (a `SentenceTransformer`; the demo passes its own). A rerun reuses the shards only when the
    model (folder and weight files' size/mtime) and settings match `build.json`.
    Runs on every process of an `accelerate launch` / `torchrun` (the process group comes from `distributed_state`):
    all ranks encode their shards, rank 0 merges. `faiss_factory` is a `faiss.index_factory` string ("Flat" = exact
    search; "HNSW32" for a graph index; "IVF1024,Flat" needs at least 1024 vectors to train).
    Errors: ValueError for bad inputs, an existing build of another model/settings (unless `overwrite`), or an input
    that fails to encode (unless `skip_errors`, which leaves it out of the merged index and counts it in index.json).
    """
    from accelerate.utils import broadcast_object_list
    from tqdm.auto import tqdm

    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}.")
    _faiss()  # fail before encoding anything when FAISS is missing
    state = distributed_state()
    output = Path(output)
    identity = model_identity(model)
    settings = {"prompt_name": "document", "shard_size": shard_size, "faiss_factory": faiss_factory}

    payload: list[Any] = [None]
    if state.is_main_process:
        try:
            payload = [("ok", _prepare_build(inputs, output, identity, settings, overwrite))]
        except Exception as error:  # hand the error to every rank, so none waits forever in the broadcast
            payload = [("error", error)]
    if state.num_processes > 1:
        broadcast_object_list(payload, from_process=0)
    status, value = payload[0]
    if status == "error":
        raise value
    records: list[dict[str, Any]] = value
    encoder = encoder if encoder is not None else load_model(model, device=str(state.device))

    shards_dir = output / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(records) // shard_size)
    mine = list(range(state.process_index, n_shards, state.num_processes))
    planned = {s: records[s * shard_size : (s + 1) * shard_size] for s in mine}
    todo = [s for s in mine if not _shard_done(shards_dir, s, planned[s])]
    total = sum(len(planned[s]) for s in mine)
    done = total - sum(len(planned[s]) for s in todo)
    desc = "embedding" if state.num_processes == 1 else f"embedding (rank {state.process_index})"
    with tqdm(total=total, initial=done, desc=desc, unit="item", disable=not show_progress,
              position=state.process_index if state.num_processes > 1 else None) as bar:
        for shard in todo:
            rows, vectors, errors = planned[shard], [], []
            for start in range(0, len(rows), batch_size):
                batch_vectors, batch_errors = _encode_records(encoder, rows[start : start + batch_size], skip_errors)
                vectors.append(batch_vectors)
                errors.extend(batch_errors)
                bar.update(len(batch_vectors))
            _save_embeddings(shards_dir / f"{_shard_name(shard)}.safetensors", np.concatenate(vectors))
            _write_jsonl(shards_dir / f"{_shard_name(shard)}.jsonl",
                         [{**r, "error": e} if e else r for r, e in zip(rows, errors)])
    state.wait_for_everyone()
    if state.is_main_process:
        merge_shards(output, n_shards, identity["model"], faiss_factory)
    state.wait_for_everyone()
    return output


def merge_shards(output: str | os.PathLike, n_shards: int, model: str, faiss_factory: str = "Flat") -> Path:
    """Concatenate shards 0..n_shards-1 of INDEX `output` into `output/merged/` (FAISS index + records), atomically.

    Shards numbered n_shards and above (left from an earlier, larger corpus) are deleted. Returns the merged folder.
    """
    faiss = _faiss()
    output = Path(output)
    shards_dir = output / "shards"
    records, blocks, errors = [], [], 0
    for shard in range(n_shards):
        rows = read_jsonl(shards_dir / f"{_shard_name(shard)}.jsonl")
        vectors = _load_embeddings(shards_dir / f"{_shard_name(shard)}.safetensors")
        if vectors.shape[0] != len(rows):
            raise ValueError(f"Shard {shard} of {output} has {vectors.shape[0]} vectors for {len(rows)} records.")
        keep = [i for i, row in enumerate(rows) if not row.get("error")]
        errors += len(rows) - len(keep)
        records.extend(rows[i] for i in keep)
        blocks.append(vectors[keep])
    for path in shards_dir.glob("*"):
        if path.stem.isdigit() and int(path.stem) >= n_shards:
            path.unlink()
    if not records:
        raise ValueError(f"No input of {output} could be embedded ({errors} failed); nothing to index.")
    vectors = np.concatenate(blocks).astype(np.float32)
    normalised = vectors.copy()
    faiss.normalize_L2(normalised)  # the model already returns unit vectors; this guards truncated/other models
    try:
        index = faiss.index_factory(vectors.shape[1], faiss_factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(normalised)
        index.add(normalised)
    except RuntimeError as error:  # faiss reports a bad factory string or too few training vectors this way
        raise ValueError(
            f"--faiss-factory {faiss_factory!r} could not be built on {len(records)} vectors of dim {vectors.shape[1]}: "
            f"{str(error).strip().splitlines()[-1]}"
        ) from error
    manifest = {
        "format_version": FORMAT_VERSION, "model": model, "dim": int(vectors.shape[1]), "count": len(records),
        "errors": errors, "faiss_factory": faiss_factory, "metric": "inner_product", "normalized": True,
        "shards": n_shards, "prompt_name": "document",
    }
    with atomic_output_dir(output / "merged", overwrite=True) as tmp:
        faiss.write_index(index, str(tmp / "index.faiss"))
        _write_jsonl(tmp / "records.jsonl", records)
        write_json_atomic(tmp / "index.json", manifest)
    return output / "merged"


# ------------------------------------------------------------------------------------------------ search
@dataclass
class Hit:
    """One search result: 1-based rank, cosine score, the record's id and its full record (`serving.corpus`)."""

    rank: int
    score: float
    id: str
    record: dict[str, Any]


class CorpusIndex:
    """A built INDEX folder, loaded for search (`CorpusIndex.load(path)`)."""

    def __init__(self, path: Path, manifest: dict[str, Any], records: list[dict[str, Any]], index: Any):
        self.path, self.manifest, self.records, self.index = path, manifest, records, index

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CorpusIndex":
        """Raises FileNotFoundError when `path` holds no finished build (run `serving.index build` first)."""
        faiss = _faiss()
        path = Path(path)
        merged = path / "merged"
        if not (merged / "index.json").is_file():
            raise FileNotFoundError(f"--index {str(path)!r} holds no finished index (no merged/index.json); build it first.")
        manifest = json.loads((merged / "index.json").read_text())
        records = read_jsonl(merged / "records.jsonl")
        index = faiss.read_index(str(merged / "index.faiss"))
        if index.ntotal != len(records) or len(records) != manifest["count"]:
            raise ValueError(f"{merged} is inconsistent: {index.ntotal} vectors, {len(records)} records.")
        return cls(path, manifest, records, index)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def model(self) -> str:
        return self.manifest["model"]

    def embeddings(self) -> np.ndarray:
        """The stored document embeddings (len(self), dim) float32, in FAISS id order (read from the shards)."""
        shards_dir = self.path / "shards"
        blocks = []
        for shard in range(self.manifest["shards"]):
            rows = read_jsonl(shards_dir / f"{_shard_name(shard)}.jsonl")
            vectors = _load_embeddings(shards_dir / f"{_shard_name(shard)}.safetensors")
            blocks.append(vectors[[i for i, row in enumerate(rows) if not row.get("error")]])
        return np.concatenate(blocks)

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Top-`k` hits for each query vector of `queries` (n, dim) (or (dim,)), best first, scores = cosine."""
        faiss = _faiss()
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32)).copy()
        if queries.shape[1] != self.manifest["dim"]:
            raise ValueError(f"query vectors have dim {queries.shape[1]}; the index {self.path} holds dim {self.manifest['dim']}.")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        faiss.normalize_L2(queries)
        scores, ids = self.index.search(queries, min(k, len(self)))
        return [
            [Hit(rank + 1, float(score), self.records[i]["id"], self.records[i])
             for rank, (score, i) in enumerate(zip(row_scores, row_ids)) if i >= 0]
            for row_scores, row_ids in zip(scores, ids)
        ]


def query_input(query: Any) -> Any:
    """A search query as a processor input: an existing embeddable file path -> its first record's input (text files
    -> their content, PDFs -> page 0); any other str -> text; dicts and PIL images unchanged."""
    if isinstance(query, (str, os.PathLike)) and os.path.isfile(query) and kind_of_path(os.fspath(query)):
        records = file_records(os.fspath(query), os.fspath(query))
        if not records:
            raise ValueError(f"--query file {os.fspath(query)!r} is empty.")
        return records[0]["input"]
    if isinstance(query, str) and not query.strip():
        raise ValueError("--query is empty; expected text or the path of an image/audio/video/PDF/text file.")
    return query


def encode_queries(model: Any, queries: Sequence[Any], prompt_name: str = "query") -> np.ndarray:
    """Query embeddings (len(queries), dim): `encode_query` for prompt_name "query", `encode_document` for "document"
    (symmetric item-to-item search)."""
    inputs = [query_input(q) for q in queries]
    encode = {"query": model.encode_query, "document": model.encode_document}.get(prompt_name)
    if encode is None:
        raise ValueError(f"prompt_name must be 'query' or 'document', got {prompt_name!r}.")
    return np.asarray(encode(inputs, convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.index", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="embed a folder or JSONL into an index (resumable; accelerate-launchable)")
    build.add_argument("--model", required=True, help="Conan model folder or Hub id")
    build.add_argument("--inputs", required=True, help="a folder (walked recursively) or a .jsonl file")
    build.add_argument("--output", required=True, help="the INDEX folder (created; reused to resume)")
    build.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    build.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="records per shard file")
    build.add_argument("--faiss-factory", default="Flat", help='faiss.index_factory string ("Flat", "HNSW32", ...)')
    build.add_argument("--overwrite", action="store_true", help="rebuild when --output holds another model's build")
    build.add_argument("--skip-errors", action="store_true", help="leave inputs that fail to decode out of the index")
    search = sub.add_parser("search", help="top-k records for a text query or a file")
    search.add_argument("--index", required=True)
    search.add_argument("--query", required=True, action="append", help="text or a file path (repeatable)")
    search.add_argument("--k", type=int, default=10)
    search.add_argument("--model", help="defaults to the model the index was built with")
    search.add_argument("--prompt-name", default="query", choices=("query", "document"),
                        help="'document' for item-to-item search (the query encoded like the corpus)")
    search.add_argument("--json", action="store_true", help="print one JSON object per hit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        return _build(args) if args.command == "build" else _search(args)
    except (ValueError, FileNotFoundError) as error:  # bad input: a one-line message, not a traceback
        print(f"python -m serving.index {args.command}: error: {error}", file=sys.stderr)
        return 2


def _build(args: argparse.Namespace) -> int:
    out = build_index(
        args.model, args.inputs, args.output, batch_size=args.batch_size, shard_size=args.shard_size,
        faiss_factory=args.faiss_factory, overwrite=args.overwrite, skip_errors=args.skip_errors,
    )
    if distributed_state().is_main_process:
        manifest = json.loads((out / "merged" / "index.json").read_text())
        print(f"indexed {manifest['count']} records (dim {manifest['dim']}, {manifest['errors']} failed) -> {out}")
    return 0


def _search(args: argparse.Namespace) -> int:
    index = CorpusIndex.load(args.index)
    model = load_model(args.model or index.model)
    for query, hits in zip(args.query, index.search(encode_queries(model, args.query, args.prompt_name), args.k)):
        if args.json:
            for hit in hits:
                print(json.dumps({"query": query, "rank": hit.rank, "score": hit.score, "id": hit.id,
                                  "kind": hit.record["kind"], "path": hit.record["path"], "page": hit.record["page"]}))
            continue
        print(f"query: {query}")
        for hit in hits:
            print(f"  {hit.rank:>3}  {hit.score:+.4f}  {hit.record['kind']:<5}  {hit.id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
