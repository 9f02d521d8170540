"""The import rules of `training/` (docs/ARCHITECTURE.md "Layout"), checked by parsing every import with `ast`.

Shared layers, bottom to top: `common` <- `contrastive` <- `evaluation`, and `data_sources` on `common`. A shared
layer imports only the layers below it, never a stage. A stage (`base`, `specialist`, `fusion`, `recovery`,
`rehearsal`) imports only shared layers, never another stage. `pipeline/` and the thin entry modules directly under
`training/` may import anything. The root Hub files import nothing from `training/`, `bench/` or `tests/`.

    python -m pytest -q tests/test_layering.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

SHARED = {"common": set(), "contrastive": {"common"}, "evaluation": {"common", "contrastive"},
          "data_sources": {"common"}}
STAGES = {"base", "specialist", "fusion", "recovery", "rehearsal", "coma"}
ORCHESTRATION = {"pipeline"}
HUB_FILES = ("configuration_conan.py", "modeling_conan.py", "processing_conan.py", "media_conan.py",
             "sentence_conan.py")


def imported_modules(path: Path, root: Path = REPO_ROOT) -> set[str]:
    """Absolute dotted names of every module `path` imports (relative imports resolved against its package)."""
    package = path.relative_to(root).with_suffix("").parts[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join((*base, node.module) if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from training import x`
    return found


def training_folder(module: str) -> str | None:
    """`training.recovery.recover` -> "recovery"; a module directly under training/ -> its own name."""
    parts = module.split(".")
    return parts[1] if parts[0] == "training" and len(parts) > 1 else None


def layer_files(layer: str, root: Path = REPO_ROOT) -> list[Path]:
    return sorted((root / "training" / layer).rglob("*.py"))


def violations(layer: str, allowed: set[str], root: Path = REPO_ROOT) -> list[str]:
    """Every import in training/<layer>/ of another shared layer or stage that `allowed` does not list."""
    known = set(SHARED) | STAGES | ORCHESTRATION
    bad = []
    for path in layer_files(layer, root):
        for module in sorted(imported_modules(path, root)):
            target = training_folder(module)
            if target in known and target != layer and target not in allowed:
                bad.append(f"{path.relative_to(root)} imports {module}")
    return bad


@pytest.mark.parametrize("layer", sorted(SHARED))
def test_shared_layer_imports_only_lower_layers(layer):
    assert layer_files(layer), f"training/{layer}/ is missing"
    assert violations(layer, SHARED[layer]) == []


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_imports_only_shared_layers(stage):
    assert layer_files(stage), f"training/{stage}/ is missing"
    assert violations(stage, set(SHARED)) == []


def test_hub_files_import_nothing_from_the_repo_tooling():
    for name in HUB_FILES:
        heads = {module.split(".")[0] for module in imported_modules(REPO_ROOT / name)}
        assert not heads & {"training", "bench", "tests", "serving"}, name


def test_checker_sees_relative_and_from_imports(tmp_path):
    """The rule check itself: a stage importing another stage (`from training import x`) is caught, a relative
    import of a shared layer is resolved and allowed."""
    for folder in ("recovery", "specialist", "common"):
        (tmp_path / "training" / folder).mkdir(parents=True)
    (tmp_path / "training" / "recovery" / "x.py").write_text(
        "from training import specialist\nfrom ..common import io_utils\nfrom ..specialist.decouple import f\n")
    assert violations("recovery", set(SHARED), tmp_path) == [
        "training/recovery/x.py imports training.specialist",
        "training/recovery/x.py imports training.specialist.decouple",
        "training/recovery/x.py imports training.specialist.decouple.f",
    ]
