"""Generate docs/errors.md: every error astkit raises on purpose, from the source.

Each ``raise UserError/PluginError/FileFormatError/DivergenceError(...)`` in
astkit/ and plugins/ becomes one row: the message (placeholders shown as
``{...}``), what it means, and the fix (the part after the ``;``).

    python docs/gen_errors.py          # rewrite docs/errors.md
    python docs/gen_errors.py --check  # exit 1 if docs/errors.md is stale
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "errors.md"
ERRORS = {"UserError", "PluginError", "FileFormatError", "DivergenceError"}

HEADER = """# Error messages

Every error astkit raises on purpose, generated from the source by
`docs/gen_errors.py` (a test keeps this page in step with the code). The CLI
prints each as one line, `error: <message>`, with no traceback (add `--debug`
for one) and exits with status 2 (1 for divergence, 130 for Ctrl-C). `{...}`
stands for a value filled in at run time. Most messages name the fix after
the `;`.

Nothing is half-written when an error stops a run: files are written to a
temporary name and renamed (see [file formats](file-formats.md)); a
diverging run keeps its last sane distilled set; Ctrl-C writes a checkpoint
(`--resume` continues).
"""


def template(node: ast.expr) -> str | None:
    """The message with placeholders as ``{...}``, or None if not a literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{...}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = template(node.left), template(node.right)
        return None if left is None or right is None else left + right
    return None


def collect() -> list[tuple[str, str, str]]:
    rows = []
    files = sorted((ROOT / "astkit").rglob("*.py")) + sorted((ROOT / "plugins").glob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue
            func = node.exc.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name not in ERRORS or not node.exc.args:
                continue
            message = template(node.exc.args[0])
            if message is None:
                continue
            rows.append((str(path.relative_to(ROOT)), name, message))
    return rows


def render() -> str:
    lines = [HEADER]
    by_file: dict[str, list[tuple[str, str]]] = {}
    for path, kind, message in collect():
        by_file.setdefault(path, []).append((kind, message))
    for path, items in by_file.items():
        lines.append(f"\n## `{path}`\n")
        lines.append("| error | message | fix |")
        lines.append("|---|---|---|")
        seen = set()
        for kind, message in items:
            if message in seen:
                continue
            seen.add(message)
            problem, _, fix = message.partition("; ")
            cell = problem.replace("|", "\\|")
            fix = fix.replace("|", "\\|") or "(the message names the value to correct)"
            lines.append(f"| {kind} | `{cell}` | {fix} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if TARGET.read_text() == text else 1)
    TARGET.write_text(text)
