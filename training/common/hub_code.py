"""Import the repo-root model files (the Hub's remote code) as one package, so their relative imports work.

The root files use `from .configuration_conan import ...` because that is what `trust_remote_code` needs; plain
`import modeling_conan` would break that. Training code imports the classes from here instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "conan_hub_code"
REMOTE_CODE_FILES = (
    "configuration_conan.py",
    "modeling_conan.py",
    "processing_conan.py",
    "media_conan.py",
    "sentence_conan.py",
)


def _package() -> ModuleType:
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_loader(PACKAGE, loader=None, is_package=True)
        package = importlib.util.module_from_spec(spec)
        package.__path__ = [str(REPO_ROOT)]
        sys.modules[PACKAGE] = package
    return sys.modules[PACKAGE]


def load(module: str) -> ModuleType:
    """`load("modeling_conan")` -> the repo-root module, imported inside the package."""
    _package()
    return importlib.import_module(f"{PACKAGE}.{module}")


def __getattr__(name: str):
    classes = {
        "ConanConfig": "configuration_conan",
        "ConanModel": "modeling_conan",
        "ConanProcessor": "processing_conan",
        "ConanEmbedder": "sentence_conan",
    }
    if name in classes:
        return getattr(load(classes[name]), name)
    raise AttributeError(name)
