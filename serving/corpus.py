"""Corpus records: what `serving.index build` embeds, one record per vector, in one deterministic order.

A corpus is a folder (walked recursively, sorted by relative path) or a JSONL file (one item a line, in file order).
Each record is a JSON-serialisable dict:

    {"id": str, "kind": "image"|"audio"|"video"|"pdf"|"text", "path": str|None, "page": int|None,
     "stat": [size_bytes, mtime_ns]|None, "input": ITEM, "meta": dict|None}

where ITEM is the processor's dict input (`ConanProcessor.prepare`): `{"image": path}`, `{"audio": path}`,
`{"video": path}`, `{"document": path, "page": p}` (one record per PDF page) or `{"text": str}`. `stat` lets a
resumed build notice that a file changed. File types are the ones `media_conan.media_kind_of_path` knows, plus text
files (`TEXT_EXTENSIONS`, embedded as their UTF-8 content).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from training.common import hub_code

_media = hub_code.load("media_conan")  # the package's own decoders (root Hub file, imported as a package)
count_pdf_pages = _media.count_pdf_pages
media_kind_of_path = _media.media_kind_of_path

TEXT_EXTENSIONS = (".txt", ".md")
ITEM_KEYS = ("text", "image", "document", "page", "video", "audio")
_PATH_KEYS = ("image", "document", "video", "audio")


def kind_of_path(path: str) -> str | None:
    """'image' | 'audio' | 'video' | 'pdf' | 'text' for a file the index can embed, else None."""
    if os.path.splitext(path)[1].lower() in TEXT_EXTENSIONS:
        return "text"
    return media_kind_of_path(path)


def _stat(path: str) -> list[int]:
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


def pdf_pages(path: str) -> range:
    """The page numbers of a PDF; page 0 alone when pypdfium2 cannot open it (corrupt, password-protected), so that
    record fails at encoding time like any other undecodable file: named in the error, or left out by --skip-errors."""
    try:
        return range(count_pdf_pages(path))
    except ValueError:
        return range(1)


def file_records(path: str, record_id: str, meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The records of one file: one per PDF page, one otherwise. Raises ValueError for an unknown file type."""
    kind = kind_of_path(path)
    if kind is None:
        raise ValueError(f"{path!r} is not a file type the index embeds (image, audio, video, PDF, {TEXT_EXTENSIONS}).")
    stat = _stat(path)
    base = {"kind": kind, "path": path, "page": None, "stat": stat, "meta": meta}
    if kind == "pdf":
        return [
            {**base, "id": f"{record_id}#page={page}", "page": page, "input": {"document": path, "page": page}}
            for page in pdf_pages(path)
        ]
    if kind == "text":
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        if not text.strip():
            return []  # an empty text file has nothing to embed (the processor rejects empty text)
        return [{**base, "id": record_id, "input": {"text": text}}]
    key = {"image": "image", "audio": "audio", "video": "video"}[kind]
    return [{**base, "id": record_id, "input": {key: path}}]


def folder_records(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every embeddable file under `folder` (recursively, hidden files and folders skipped), sorted by relative path.

    Record ids are POSIX relative paths (`sub/photo.jpg`, `manual.pdf#page=3`).
    """
    root = Path(folder).resolve()
    if not root.is_dir():
        raise ValueError(f"--inputs {folder!r} is not a folder.")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and kind_of_path(name) is not None:
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), str(path)))
    records = []
    for rel, path in sorted(found):
        records.extend(file_records(path, rel))
    return records


def _resolve_item(item: dict[str, Any], base: Path, where: str) -> dict[str, Any]:
    unknown = sorted(set(item) - set(ITEM_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; expected keys among {ITEM_KEYS} plus 'id' and 'meta'.")
    resolved = dict(item)
    for key in _PATH_KEYS:
        value = item.get(key)
        if isinstance(value, str):
            path = Path(value) if os.path.isabs(value) else base / value
            if not path.is_file():
                raise ValueError(f"{where}: {key} file {value!r} does not exist (relative paths are read from {base}).")
            resolved[key] = str(path.resolve())
        elif value is not None:
            raise TypeError(f"{where}: {key} must be a file path in a JSONL corpus, got {type(value).__name__}.")
    return resolved


def jsonl_records(jsonl: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL corpus: each line `{"id"?: str, "meta"?: dict, ...ITEM keys}` with paths relative to the file.

    A `document` PDF without `page` expands into one record per page; a missing id becomes `line-<n>` (1-based).
    """
    jsonl = Path(jsonl).resolve()
    base = jsonl.parent
    records: list[dict[str, Any]] = []
    with open(jsonl, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{jsonl}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON: {error}") from error
            if not isinstance(row, dict):
                raise ValueError(f"{where} is a {type(row).__name__}; expected a JSON object with keys {ITEM_KEYS}.")
            record_id = str(row.pop("id", f"line-{number}"))
            meta = row.pop("meta", None)
            item = _resolve_item(row, base, where)
            if not any(item.get(k) is not None for k in ("text", "image", "document", "video", "audio")):
                raise ValueError(f"{where} has no content; expected at least one of text/image/document/video/audio.")
            paths = [item[k] for k in _PATH_KEYS if item.get(k) is not None]
            kinds = [kind_of_path(p) for p in paths]
            kind = kinds[0] if len(kinds) == 1 and set(item) <= set(_PATH_KEYS) | {"page"} else (
                "text" if not paths else "mixed")
            stat = [_stat(p) for p in paths] or None
            base_record = {"kind": kind, "path": paths[0] if len(paths) == 1 else None, "page": item.get("page"),
                           "stat": stat, "meta": meta}
            document = item.get("document")
            if document is not None and kind_of_path(document) == "pdf" and item.get("page") is None:
                for page in pdf_pages(document):
                    records.append({**base_record, "id": f"{record_id}#page={page}", "page": page,
                                    "input": {**item, "page": page}})
            else:
                records.append({**base_record, "id": record_id, "input": item})
    return records


def corpus_records(inputs: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a folder or a `.jsonl` file (see the module docstring). Raises ValueError for anything else."""
    path = Path(inputs)
    if path.is_dir():
        records = folder_records(path)
    elif path.is_file() and path.suffix.lower() == ".jsonl":
        records = jsonl_records(path)
    else:
        raise ValueError(f"--inputs {str(inputs)!r} must be an existing folder or a .jsonl file.")
    seen: set[str] = set()
    for record in records:
        if record["id"] in seen:
            raise ValueError(f"--inputs {str(inputs)!r} holds the id {record['id']!r} twice; ids must be unique.")
        seen.add(record["id"])
    return records
