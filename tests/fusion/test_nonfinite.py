"""Fusion refuses non-finite numbers (issue 13, kind 8): NaN/inf weights at config validation, NaN/inf tensors while
streaming, naming the tensor and its source, with no output folder left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from training.fusion import ConfigError, FusionConfig, PlanError, fuse

REPO = Path(__file__).resolve().parents[2]
LLM = "backbone.language_model.layers.0.mlp.up_proj.weight"
PROJ = "audio_projector.fc1.weight"


def _save(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "conan"}))
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _ckpts(root: Path, dtype=torch.float32, poison: dict[str, tuple[str, float]] | None = None,
           base_value: float | None = None) -> tuple[Path, list[Path]]:
    """Base + specialists a, b; `poison[name] = (key, value)` writes one bad element into that specialist."""
    g = torch.Generator().manual_seed(0)
    base = {LLM: torch.randn(8, 6, generator=g).to(dtype), PROJ: torch.randn(4, 3, generator=g).to(dtype)}
    if base_value is not None:
        base[LLM].fill_(base_value)
    paths = [_save(root / "base", base)]
    for name in ("a", "b"):
        sd = {k: (v.float() + (500.0 if base_value is not None else 0.01)).to(dtype) for k, v in base.items()}
        if name != "a":
            sd[PROJ] = base[PROJ].clone()  # the projector has one owner (a), copied rather than fused
        if poison and name in poison:
            key, value = poison[name]
            sd[key].view(-1)[5] = value
        paths.append(_save(root / name, sd))
    return paths[0], paths[1:]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.fuse", *args, "--no-progress"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf"])
def test_cli_rejects_non_finite_weights(tmp_path, weight):
    base, (a, b) = _ckpts(tmp_path)
    out = tmp_path / "fused"
    result = _cli("--base", str(base), "--model", f"a={a}:{weight}", "--model", f"b={b}", "--output", str(out))
    assert result.returncode == 2
    assert f"models['a'].weight must be a finite number, got {float(weight)}" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("field, value", [("lambda_", float("nan")), ("lambda_groups", {"llm": float("inf")}),
                                          ("density", float("nan"))])
def test_config_rejects_non_finite_scales(tmp_path, field, value):
    base, (a, b) = _ckpts(tmp_path)
    with pytest.raises(ConfigError, match="must be a finite number|density must be in"):
        FusionConfig(base=base, models=[{"path": a}, {"path": b}], output=tmp_path / "o", **{field: value})


# (which specialist, which tensor, bad value, method, text the error must hold)
NONFINITE_GRID = [
    ("a", LLM, float("nan"), "task_arithmetic", f"tensor '{LLM}'"),
    ("b", LLM, float("inf"), "ties", f"tensor '{LLM}'"),
    ("a", PROJ, float("nan"), "task_arithmetic", f"tensor '{PROJ}'"),  # copied from its owner, not fused
]


@pytest.mark.parametrize("name, key, value, method, names", NONFINITE_GRID)
def test_non_finite_tensor_fails_naming_tensor_and_source(tmp_path, name, key, value, method, names):
    base, specs = _ckpts(tmp_path, poison={name: (key, value)})
    out = tmp_path / "fused"
    result = _cli("--base", str(base), *[f"--model={p.name}={p}" for p in specs], "--output", str(out),
                  "--method", method, "--density", "0.5" if method == "ties" else "1.0")
    assert result.returncode == 2, result.stderr
    assert names in result.stderr and f"NaN/inf stored in: {name}" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".fused.*"))


def test_overflow_to_inf_is_reported_as_arithmetic(tmp_path):
    base, specs = _ckpts(tmp_path, dtype=torch.float16, base_value=65000.0)
    cfg = FusionConfig(base=base, models=[{"path": p} for p in specs], output=tmp_path / "fused", progress=False)
    with pytest.raises(PlanError, match=rf"tensor '{LLM}'.*no input holds NaN/inf: the arithmetic overflowed"):
        fuse(cfg)
    assert not (tmp_path / "fused").exists()
