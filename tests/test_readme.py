"""The README's usage blocks run as a newcomer would copy them (pointed at the tiny repo)."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT


def readme_section(title: str) -> tuple[str, str]:
    """(the README's `## title` section, the README without it)."""
    text = (REPO_ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README.md has no '## {title}' section"
    return match.group(0), text[: match.start()] + text[match.end() :]


def test_readme_python_blocks_run(tiny_repo):
    text = readme_section("Serving")[1]  # the Serving blocks need a live server: tests/test_server.py runs them
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block.replace('"runs/tiny"', repr(str(tiny_repo))), "README.md", "exec"), {})


def test_readme_starts_with_the_two_commands():
    text = (REPO_ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert "# main job" in first_block[0] and "# tests" in first_block[1]
