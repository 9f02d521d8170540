"""One way to write and read a Conan repo folder (the Hub layout every stage produces and consumes).

`save_conan_repo` writes weights, processor, the root remote-code files and the sentence-transformers files into a
fresh folder (callers wrap it in `io_utils.atomic_output_dir`, so a crash never leaves a half-written repo);
`load_conan` reads one back through the repo's own classes (no remote-code prompt), its processor through
`load_processor`, which parses each distinct tokenizer once per process. Fusion streams its tensors
through `training/fusion/st_io.py` instead (it never holds a whole model) into the same `atomic_output_dir` and
copies these side files from the base.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from training.common import hub_code
from training.common.io_utils import write_json_atomic

DEFAULT_PROMPTS = {
    "query": "Represent the query for retrieving relevant documents, images, videos or audio.",
    "document": "Represent the user's input.",
}


class NotAConanRepo(FileNotFoundError):
    """A folder that should hold a Conan repo has no config.json."""


def write_sentence_transformers_files(out: Path, prompts: dict[str, str] | None = None) -> None:
    """modules.json + config_sentence_transformers.json pointing sentence-transformers at `ConanEmbedder`."""
    import sentence_transformers

    write_json_atomic(out / "modules.json", [{"idx": 0, "name": "0", "path": "", "type": "sentence_conan.ConanEmbedder"}])
    write_json_atomic(out / "sentence_conan_config.json", {"padding_side": "right"})
    write_json_atomic(
        out / "config_sentence_transformers.json",
        {
            "__version__": {"sentence_transformers": sentence_transformers.__version__, "pytorch": torch.__version__},
            "model_type": "SentenceTransformer",
            "prompts": dict(prompts or DEFAULT_PROMPTS),
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )


def copy_remote_code(out: Path) -> None:
    """The root .py files the Hub runs with trust_remote_code (auto_map names some; their imports need the rest)."""
    for name in hub_code.REMOTE_CODE_FILES:
        shutil.copy2(hub_code.REPO_ROOT / name, out / name)


def save_conan_repo(model: torch.nn.Module, processor: Any, out: Path, prompts: dict[str, str] | None = None) -> None:
    """Write a complete, loadable Conan repo into `out` (which must be a fresh/temporary folder)."""
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModel")
    type(processor).register_for_auto_class("AutoProcessor")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    copy_remote_code(out)
    write_sentence_transformers_files(out, prompts)
    readme = hub_code.REPO_ROOT / "README.md"
    if readme.exists():
        shutil.copy2(readme, out / "README.md")


# Every file ConanProcessor.from_pretrained may read; their bytes are the processor cache's key.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "processor_config.json",
                   "preprocessor_config.json", "video_preprocessor_config.json")
_loaded_processors: dict[str, Any] = {}


def load_processor(path: str | os.PathLike) -> Any:
    """`ConanProcessor.from_pretrained(path)`, parsed once per process for each distinct set of processor files.

    Why: transformers 5 parses the Qwen2 tokenizer.json (18 MB) three times a load, ~2.5 s on 2 cores, and one
    pipeline run loads the same tokenizer from ~26 model folders (~65 s of the 210 s smoke run). The key is the bytes
    of the folder's :data:`PROCESSOR_FILES`, so a folder with other tokens or settings gets its own load.
    Each call returns a deep copy of the cached processor that shares only the Rust tokenizer backend
    (`tokenizer.backend_tokenizer`) and the vocabulary and merges it was built from: every Python-level setting
    (`padding_side`, the special tokens, `init_kwargs`, `compression_tokens`, the image processor and feature
    extractor) stays the caller's, and the backend's own padding, truncation and special-token splitting are set
    again by the tokenizer on every call (a caller that uses the backend directly sets them itself). A caller that
    adds tokens must load its own with `hub_code.ConanProcessor.from_pretrained` (as
    `training.base.build_base.extend_repo_with_compression_tokens` does). A `path` that is not a local folder (a Hub
    repo id) is loaded each time, uncached.
    """
    if not Path(path).is_dir():
        return hub_code.ConanProcessor.from_pretrained(path, trust_remote_code=True)
    path = Path(path)
    digest = hashlib.sha256()
    for name in PROCESSOR_FILES:
        if (path / name).is_file():
            digest.update(name.encode() + b"\0" + (path / name).read_bytes() + b"\0")
    key = digest.hexdigest()
    if key not in _loaded_processors:
        _loaded_processors[key] = hub_code.ConanProcessor.from_pretrained(path, trust_remote_code=True)
    cached = _loaded_processors[key]
    # Shared, never copied: the Rust backend and the vocabulary and merges it was built from (read only at
    # construction; deep-copying Qwen2's 150k-entry vocab and 290k merges would take ~0.9 s a call).
    shared = [cached.tokenizer.backend_tokenizer] + [getattr(cached.tokenizer, name) for name in ("_vocab", "_merges")
                                                      if getattr(cached.tokenizer, name, None) is not None]
    return copy.deepcopy(cached, memo={id(obj): obj for obj in shared})


def load_conan(path: str | os.PathLike, dtype: str | torch.dtype = "auto") -> tuple[torch.nn.Module, Any]:
    """A Conan folder -> (ConanModel in eval mode, ConanProcessor), through the repo's own classes.

    `dtype`: "auto" (as saved), a torch dtype name ("float32") or a `torch.dtype`. The processor comes from
    :func:`load_processor` (its tokenizer backend is shared; never add tokens to it). Raises `NotAConanRepo` when
    `path` has no config.json.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise NotAConanRepo(f"{path} is not a Conan model folder (no config.json).")
    torch_dtype = dtype if dtype == "auto" or isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    model = hub_code.ConanModel.from_pretrained(path, dtype=torch_dtype).eval()
    return model, load_processor(path)
