"""The one pickle-free training-state format: tensors in safetensors, everything else in JSON.

`save_training_state(folder, state)` takes any nest of dicts / lists / tuples / tensors / JSON scalars (optimizer
and scheduler `state_dict()`s, model state dicts, counters, histories) and writes `state.safetensors` (every tensor,
under its path in the nest) and `state.json` (the nest with tensors replaced by references; dicts with non-string
keys, e.g. an optimizer's `{0: ...}` state, and tuples are tagged so they come back as they went in). The folder is
written atomically (temporary sibling, one rename). `load_training_state` reverses it with `safetensors` and
`json` only, so resuming never unpickles (unlike `torch.load(weights_only=False)`).

`rng_state()` / `set_rng_state()` carry Python's, NumPy's and torch's (CPU + CUDA) generator states through this
format. They are our own because accelerate's `save_state` pickles them (`random_states_N.pkl`) and, when that file
cannot be loaded, only logs it and resumes with a different RNG; here a missing or bad state is an error.

The stages' full checkpoints (`trainer.save_checkpoint`) are accelerate `save_state` folders, whose model weights are
safetensors and whose optimizer / scheduler files accelerate loads with `weights_only=True` (a file with pickle code
is refused), plus this format for the loop's own state (step, sampler position, RNG) instead of accelerate's pickled
custom objects and RNG file.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TENSORS_FILE = "state.safetensors"
JSON_FILE = "state.json"
FORMAT = "conan-training-state/1"


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, f"{path}.k{i}", tensors), _encode(v, f"{path}.{i}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"save_training_state: {path} holds a {type(obj).__name__}; expected tensors, dicts, lists, "
                    "tuples, str, int, float, bool or None")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def save_training_state(folder: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` (see module doc) to `folder` atomically; returns the folder."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, "state", tensors)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / TENSORS_FILE))
        (tmp / JSON_FILE).write_text(json.dumps({"format": FORMAT, "state": skeleton}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_training_state(folder: str | os.PathLike) -> dict[str, Any]:
    """The state `save_training_state` wrote (tensors on CPU). Raises FileNotFoundError / ValueError."""
    folder = Path(folder)
    if not (folder / JSON_FILE).is_file() or not (folder / TENSORS_FILE).is_file():
        raise FileNotFoundError(f"{folder}: expected {JSON_FILE} and {TENSORS_FILE} (a training-state folder)")
    payload = json.loads((folder / JSON_FILE).read_text())
    if payload.get("format") != FORMAT:
        raise ValueError(f"{folder / JSON_FILE}: format {payload.get('format')!r}; expected {FORMAT!r}")
    return _decode(payload["state"], load_file(str(folder / TENSORS_FILE)))


def rng_state() -> dict[str, Any]:
    """This process's Python / NumPy / torch CPU (+ every CUDA device's) generator states, in this format's types."""
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned. Raises ValueError when `state` lacks a generator."""
    import numpy as np

    missing = sorted({"python", "numpy", "torch"} - set(state))
    if missing:
        raise ValueError(f"RNG state lacks {missing}; expected the dict rng_state() returns")
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
