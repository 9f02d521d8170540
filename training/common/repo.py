"""One way to write and read a Conan repo folder (the Hub layout every stage produces and consumes).

`save_conan_repo` writes weights, processor, the root remote-code files and the sentence-transformers files into a
fresh folder (callers wrap it in `io_utils.atomic_output_dir`, so a crash never leaves a half-written repo);
`load_conan` reads one back through the repo's own classes (no remote-code prompt). Fusion streams its tensors
through `training/fusion/st_io.py` instead (it never holds a whole model) into the same `atomic_output_dir` and
copies these side files from the base.
"""

from __future__ import annotations

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


def load_conan(path: str | os.PathLike, dtype: str | torch.dtype = "auto") -> tuple[torch.nn.Module, Any]:
    """A Conan folder -> (ConanModel in eval mode, ConanProcessor), through the repo's own classes.

    `dtype`: "auto" (as saved), a torch dtype name ("float32") or a `torch.dtype`. Raises `NotAConanRepo` when
    `path` has no config.json.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise NotAConanRepo(f"{path} is not a Conan model folder (no config.json).")
    torch_dtype = dtype if dtype == "auto" or isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    model = hub_code.ConanModel.from_pretrained(path, dtype=torch_dtype).eval()
    processor = hub_code.ConanProcessor.from_pretrained(path, trust_remote_code=True)
    return model, processor
