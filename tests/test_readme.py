"""The README's commands: CI runs exactly its test command; its files exist."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    blocks = bash_blocks((ROOT / "README.md").read_text())
    test_command = next(b.strip() for b in blocks if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_readme_paths_exist():
    text = (ROOT / "README.md").read_text()
    for path in re.findall(r"(?:examples|docs)/[\w./-]+\.(?:toml|md|png|py)", text):
        assert (ROOT / path).is_file(), path
