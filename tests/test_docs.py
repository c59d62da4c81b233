"""The documentation builds, and stays in step with the code it describes.

* the mkdocs site builds with ``--strict`` (broken links and anchors fail);
* docs/hooks.md is exactly what docs/gen_hooks.py generates from the current
  hookspecs (change a hook, then run ``python docs/gen_hooks.py``);
* every config key and every AST plugin option is documented;
* every command-line option cli.md names exists in the CLI.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def load_generator():
    spec = importlib.util.spec_from_file_location("astkit_docs_gen_hooks", DOCS / "gen_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ast_plugins() -> list[str]:
    """The technique plugins astkit ships: AST's five, DATM, FTD and PAD."""
    from astkit_plugins.presets import AST

    return [*AST, "datm", "ftd", "pad"]


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is in the `test` extra: pip install -e '.[test]'")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
         "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()
    assert not (tmp_path / "site" / "gen_hooks.py").exists()


def test_hook_reference_is_generated_from_the_current_hookspecs():
    from astkit import hookspecs

    generator = load_generator()
    committed = (DOCS / "hooks.md").read_text()
    assert committed == generator.generate(), (
        "docs/hooks.md is stale: run `python docs/gen_hooks.py` and commit the result"
    )
    specs = [n for n, obj in vars(hookspecs).items() if n.startswith("astkit_") and callable(obj)
             and hasattr(obj, "astkit_spec")]
    assert len(specs) >= 14
    for name in specs:
        assert f"\n### {name}\n" in committed, f"{name} has no section in docs/hooks.md"


def test_every_config_key_is_documented():
    from astkit.config import SECTIONS, RunConfig

    text = (DOCS / "configuration.md").read_text()
    missing = [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
               if f"`{section}.{f.name}`" not in text]
    assert not missing, f"docs/configuration.md does not document: {', '.join(missing)}"
    top = [f.name for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS]
    missing = [name for name in top if f"`{name}`" not in text]
    assert not missing, f"docs/configuration.md does not document the top-level keys: {', '.join(missing)}"


@pytest.mark.parametrize("name", ast_plugins())
def test_every_technique_page_documents_its_plugin_options(name):
    page = DOCS / "techniques" / f"{name}.md"
    assert page.is_file(), f"missing technique page docs/techniques/{name}.md"
    text = page.read_text()
    module = importlib.import_module(f"astkit_plugins.{name.replace('-', '_')}")
    declared = module.astkit_plugin_options()
    assert declared, f"{name} declares no options"
    for namespace, options in declared.items():
        assert f"`{namespace}`" in text or f"{namespace}." in text, f"{page.name}: namespace {namespace} missing"
        for key in options:
            assert f"`{key}`" in text, f"{page.name} does not document the option {namespace}.{key}"
    assert f"--disable {name}" in text, f"{page.name}: show the ablation `--plugins ast --disable {name}`"
    config_text = (DOCS / "configuration.md").read_text()
    assert f"`{name}`" in config_text, f"configuration.md: list the option namespace {name}"


def test_cli_page_names_only_options_that_exist():
    import typer

    from astkit.cli import build_app

    command = typer.main.get_command(build_app())
    known = {"--help", "-h", "--version"}
    for sub in command.commands.values():
        for param in sub.params:
            if getattr(param, "param_type_name", "") == "option":  # Typer may vendor its own click
                known.update(param.opts)
                known.update(param.secondary_opts)
    text = (DOCS / "cli.md").read_text()
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", text))
    unknown = sorted(named - known)
    assert not unknown, f"docs/cli.md names options the CLI does not have: {', '.join(unknown)}"
    for name in command.commands:
        assert f"astkit {name}" in text, f"docs/cli.md does not describe `astkit {name}`"


def test_error_reference_is_generated_from_the_code():
    """docs/errors.md lists every error astkit raises, as the code has it now."""
    spec = importlib.util.spec_from_file_location("astkit_docs_gen_errors", DOCS / "gen_errors.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (DOCS / "errors.md").read_text() == gen.render(), (
        "docs/errors.md is stale: run `python docs/gen_errors.py` and commit the result"
    )
    rows = gen.collect()
    assert len(rows) > 50
    text = (DOCS / "errors.md").read_text()
    for _, _, message in rows:
        assert message.partition("; ")[0].replace("|", "\\|") in text
