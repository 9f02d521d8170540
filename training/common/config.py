"""One config loader and one error style for every training stage.

A stage config is a dataclass; its YAML file holds the same keys (nested dataclasses as nested mappings). Flags
override keys (a `None` flag means "not given"). Relative paths resolve against the working directory first, then
the repo root, so the configs under `training/configs/` work from any folder. Every problem raises `ConfigError`
(a `ValueError`) whose message reads "<where>: <what is wrong>; expected <what is allowed>".
"""

from __future__ import annotations

import dataclasses
import os
import typing
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


def _scalar_type(hint: Any) -> type | None:
    """bool, int or float when `hint` is that type or that type | None; else None (not checked)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_args(hint) else [hint]
    return args[0] if len(args) == 1 and args[0] in (bool, int, float) else None


def check_scalar_types(cls: type, values: Mapping[str, Any], where: str) -> None:
    """ConfigError when a bool / int / float key of `cls` holds another type (None is left to the dataclass).

    Why: a dataclass does not check, and the wrong type is silently wrong, e.g. `visual_token_cache: "false"`
    (a quoted string) turns the cache on, `lr: 1e-4` (YAML 1.1 reads it as a string) fails deep in the optimizer."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # annotations that do not resolve at run time: nothing to check against
        return
    for key, value in values.items():
        expected = _scalar_type(hints.get(key))
        if expected is None or value is None:
            continue
        ok = isinstance(value, bool) if expected is bool else (
            isinstance(value, (int, float) if expected is float else int) and not isinstance(value, bool))
        if not ok:
            hint = " (YAML reads 1e-4 without a dot as text: write 1.0e-4)" if isinstance(value, str) and \
                expected is float else ""
            raise ConfigError(f"{where}: {key} must be {'true or false' if expected is bool else expected.__name__}, "
                              f"got {value!r} ({type(value).__name__}){hint}")


def build_dataclass(cls: type[T], values: Any, where: str) -> T:
    """`cls(**values)` with an error naming `where` and the allowed keys (YAML typos fail loudly) or a bool / int /
    float key of the wrong type (`check_scalar_types`)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} keys, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected keys among {sorted(names)}")
    check_scalar_types(cls, values, where)
    return cls(**values)


def resolve_path(path: str | os.PathLike) -> str:
    """An absolute path as given; a relative one against the CWD if it exists there (or nowhere), else the repo root."""
    candidate = Path(path)
    if candidate.is_absolute():
        return str(candidate)
    if candidate.exists() or not (REPO_ROOT / candidate).exists():
        return str(candidate.resolve())
    return str(REPO_ROOT / candidate)
