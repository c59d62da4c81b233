"""The layers of astkit, read from the source with ``ast`` (nothing is imported
to find the imports):

* plugins/ and examples/ use the package face only: ``import astkit`` or
  ``from astkit import NAME`` with NAME in ``astkit.__all__`` (and
  ``astkit.NAME`` likewise);
* nothing in astkit/ outside the command line (``astkit/cli/``,
  ``astkit/__main__.py``) imports the built-in plugins (``astkit_plugins``),
  the CLI or the reporter (``astkit.report``); the progress bars and the
  figures are imported by the CLI and the reporter only;
* astkit's modules import each other without a cycle at module level
  (imports inside functions and ``if TYPE_CHECKING:`` blocks do not count).

docs/architecture.md ("Layers") says the same in words.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "astkit"

#: the command line: the only code that may import the reporter and the CLI
CLI = ("astkit.cli", "astkit.__main__")
#: the reporter plugin the CLI registers
REPORTER = "astkit.report"
#: what the reporter draws with; only the CLI and the reporter import them
PRESENTATION = ("astkit.figures", "astkit.rich_progress")
#: never imported from astkit/ outside the CLI (the reporter's helpers: outside the CLI and the reporter)
FORBIDDEN_BELOW_CLI = ("astkit_plugins", "astkit.cli", REPORTER)


# ------------------------------------------------------------------ reading
def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def astkit_modules() -> dict[str, Path]:
    """Every module of the astkit package: ``{"astkit.engine": path, ...}``."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = astkit_modules()


def within(name: str, prefixes: tuple[str, ...] | str) -> bool:
    """``name`` is one of ``prefixes`` or a submodule of one."""
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_nodes(tree: ast.Module, *, module_level: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements of a module: all of them, or only those that run
    when the module is imported (not in functions, not under ``if TYPE_CHECKING:``)."""
    if not module_level:
        yield from (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        return

    def visit(statements: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
        for node in statements:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    yield from visit(node.body)
                yield from visit(node.orelse)
            elif isinstance(node, (ast.Try, ast.TryStar)):
                yield from visit(node.body)
                for handler in node.handlers:
                    yield from visit(handler.body)
                yield from visit(node.orelse)
                yield from visit(node.finalbody)
            elif isinstance(node, (ast.With, ast.For, ast.While)):
                yield from visit(node.body)
                yield from visit(getattr(node, "orelse", []))
            elif isinstance(node, ast.ClassDef):  # a class body runs at import
                yield from visit(node.body)

    yield from visit(tree.body)


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """The modules an import statement names, relative imports resolved;
    ``from pkg import sub`` names ``pkg.sub`` when it is an astkit module,
    ``pkg`` itself otherwise (an attribute of its ``__init__``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    subs = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in MODULES]
    plain = [alias.name for alias in node.names if f"{source}.{alias.name}" not in MODULES]
    return subs + ([source] if plain else [])


def rel(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def public_names() -> list[str]:
    """``astkit.__all__``, read from astkit/__init__.py."""
    for node in parse(PACKAGE / "__init__.py").body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("astkit/__init__.py defines no __all__")


# ------------------------------------------------------ plugins and examples
def face_violations(path: Path, allowed: set[str]) -> list[str]:
    """Where a plugin or example reaches past ``astkit.__all__``."""
    tree = parse(path)
    where = rel(path)
    problems: list[str] = []
    aliases: set[str] = set()
    for node in import_nodes(tree, module_level=False):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "astkit":
                    aliases.add(alias.asname or "astkit")
                elif alias.name.startswith("astkit."):
                    problems.append(f"{where}:{node.lineno}: import {alias.name} (use `import astkit` / `from astkit import ...`)")
        elif node.level == 0 and node.module == "astkit":
            for alias in node.names:
                if alias.name != "*" and alias.name not in allowed:
                    problems.append(f"{where}:{node.lineno}: from astkit import {alias.name}, which is not in astkit.__all__")
        elif node.level == 0 and node.module and node.module.startswith("astkit."):
            names = ", ".join(a.name for a in node.names)
            problems.append(f"{where}:{node.lineno}: from {node.module} import {names} (import it from astkit)")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr not in allowed:
                problems.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr} is not in astkit.__all__")
    return problems


def client_files() -> list[Path]:
    return sorted([*(ROOT / "plugins").glob("*.py"), *(ROOT / "examples").rglob("*.py")])


def test_public_names_exist():
    import astkit

    names = public_names()
    assert sorted(names) == sorted(astkit.__all__)
    missing = [n for n in names if not hasattr(astkit, n)]
    assert not missing, f"astkit.__all__ lists names astkit does not define: {missing}"
    for needed in ("UserError", "PluginError", "FileFormatError", "atomic_write", "hookimpl", "RunFolder", "RawData"):
        assert needed in names


def test_plugins_and_examples_use_only_the_package_face():
    assert client_files(), "no plugins/ or examples/ sources found"
    allowed = set(public_names())
    problems = [p for path in client_files() for p in face_violations(path, allowed)]
    assert not problems, "plugins and examples must import only names in astkit.__all__:\n" + "\n".join(problems)


# ---------------------------------------------------------------- the layers
def layer_violations(modules: dict[str, Path]) -> list[str]:
    problems = []
    for name, path in modules.items():
        if within(name, CLI):
            continue
        is_package = path.name == "__init__.py"
        forbidden = FORBIDDEN_BELOW_CLI + (() if within(name, (REPORTER, *PRESENTATION)) else PRESENTATION)
        for node in import_nodes(parse(path), module_level=False):
            for target in imported_modules(node, name, is_package):
                if within(target, forbidden) and not within(target, name):
                    problems.append(f"{rel(path)}:{node.lineno}: {name} imports {target}")
    return problems


def test_the_layer_modules_exist():
    """The table above names real modules (renaming one must update it)."""
    for name in (*CLI, REPORTER, *PRESENTATION):
        assert name in MODULES, f"{name} is not an astkit module; update tests/test_layers.py and docs/architecture.md"


def test_nothing_below_the_cli_imports_plugins_the_cli_or_the_reporter():
    problems = layer_violations(MODULES)
    assert not problems, (
        "astkit/ outside the CLI must not import astkit_plugins, astkit.cli or astkit.report, and only the CLI "
        "and the reporter import " + ", ".join(PRESENTATION) + ":\n" + "\n".join(problems)
    )


# -------------------------------------------------------------------- cycles
def module_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: astkit modules it imports at module level}``."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in import_nodes(parse(path), module_level=True):
            for target in imported_modules(node, name, path.name == "__init__.py"):
                if target in modules and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:  # the shortest way from its first module back to it
        members, start = set(component), component[0]
        paths = {w: [start, w] for w in sorted(graph[start]) if w in members}
        queue = list(paths)
        while start not in paths:
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w in members and w not in paths:
                    paths[w] = [*paths[v], w]
                    queue.append(w)
        cycles.append(paths[start])
    return cycles


def test_no_import_cycle_at_module_level():
    cycles = find_cycles(module_graph(MODULES))
    assert not cycles, "import cycles among astkit's modules (module-level imports):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


# --------------------------------------------------- the checks can fail
def test_the_checks_see_what_they_are_meant_to_see(tmp_path):
    """Each check, on a small made-up source, finds the fault it is for."""
    bad = tmp_path / "bad_plugin.py"
    bad.write_text(
        "import astkit\nimport astkit.store\nfrom astkit.errors import UserError\n"
        "from astkit import Engine, _defaults\n\ndef f():\n    from astkit.store import atomic_write\n"
        "    return astkit.engine\n"
    )
    problems = face_violations(bad, {"Engine", "UserError"})
    assert len(problems) == 5, problems  # astkit.store, astkit.errors, _defaults, astkit.store (lazy), astkit.engine

    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import astkit.a\n"
                     "import astkit.b\ndef f():\n    import astkit.c\nclass K:\n    import astkit.d\n")
    top = [a.name for n in import_nodes(tree, module_level=True) for a in n.names]
    assert top == ["TYPE_CHECKING", "astkit.b", "astkit.d"]

    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
