"""The README's usage blocks run as a newcomer would copy them (pointed at the tiny repo)."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT


def test_readme_python_blocks_run(tiny_repo):
    text = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block.replace('"runs/tiny"', repr(str(tiny_repo))), "README.md", "exec"), {})


def test_readme_starts_with_the_two_commands():
    text = (REPO_ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert "# main job" in first_block[0] and "# tests" in first_block[1]
