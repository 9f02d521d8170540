"""One config loader and one error style for every training stage.

A stage config is a dataclass; its YAML file holds the same keys (nested dataclasses as nested mappings). Flags
override keys (a `None` flag means "not given"). Relative paths resolve against the working directory first, then
the repo root, so the configs under `training/configs/` work from any folder. Every problem raises `ConfigError`
(a `ValueError`) whose message reads "<where>: <what is wrong>; expected <what is allowed>".
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from training.common.hub_code import REPO_ROOT

T = TypeVar("T")


class ConfigError(ValueError):
    """Bad configuration or command-line input; the message names the input and what was expected."""


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file holding one mapping (an empty file is `{}`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist; expected a YAML mapping of config keys")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a YAML mapping of config keys, got {type(raw).__name__}")
    return raw


def merged(path: str | os.PathLike | None, overrides: Mapping[str, Any] | None = None,
           raw: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """(YAML at `path` or `raw`, updated by the overrides that are not None; a name for errors)."""
    values = read_yaml(path) if path is not None else dict(raw or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return values, str(path) if path is not None else "config"


def require(values: Mapping[str, Any], keys: Iterable[str], where: str) -> None:
    """ConfigError naming the first of `keys` that `values` lacks (or holds empty)."""
    for key in keys:
        if values.get(key) in (None, ""):
            raise ConfigError(f"{where}: missing required key {key!r}")


def check_keys(values: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """ConfigError when `values` holds a key outside `allowed` (for free-form mappings such as `loss`)."""
    allowed = sorted(allowed)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected keys among {allowed}")


def build_dataclass(cls: type[T], values: Any, where: str) -> T:
    """`cls(**values)` with an error naming `where` and the allowed keys (YAML typos fail loudly)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} keys, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected keys among {sorted(names)}")
    return cls(**values)


def resolve_path(path: str | os.PathLike) -> str:
    """An absolute path as given; a relative one against the CWD if it exists there (or nowhere), else the repo root."""
    candidate = Path(path)
    if candidate.is_absolute():
        return str(candidate)
    if candidate.exists() or not (REPO_ROOT / candidate).exists():
        return str(candidate.resolve())
    return str(REPO_ROOT / candidate)
