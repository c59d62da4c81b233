"""Generate docs/hooks.md, the hook reference, from astkit/hookspecs.py.

Every ``astkit_*`` hook specification is rendered from its signature and its
docstring (reST roles and ``:param:`` / ``:return:`` fields become Markdown),
so the reference can never drift from the contract the engine calls. The
generated page is committed; ``tests/test_docs.py`` fails when it differs from
what this script produces from the current hookspecs.

    python docs/gen_hooks.py          # rewrite docs/hooks.md
    python docs/gen_hooks.py --check  # exit 1 if docs/hooks.md is stale
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = HERE / "hooks.md"

KIND_BEHAVIOUR = "behaviour"
KIND_REGISTRATION = "registration"
KIND_EVENT = "event"

SECTIONS = [
    (KIND_BEHAVIOUR, "Behaviour hooks",
     "Called only on the plugins enabled for a run (`--plugins`, `plugins = [...]`). Each first-result "
     "hook has an MTT baseline answer in `astkit._defaults`, registered `trylast`, so an enabled plugin "
     "that answers replaces it; two enabled plugins answering the same one (wrappers excepted) are "
     "refused at start-up, naming both. `astkit_init_state` and `astkit_update_synthetic` call every "
     "enabled plugin. Distillation's hooks get `state`, the run's plugin state, saved in checkpoints."),
    (KIND_REGISTRATION, "Registration hooks",
     "Called on every *installed* plugin, enabled or not, so names a plugin registers (models, "
     "datasets, presets, option namespaces, commands) are always visible."),
    (KIND_EVENT, "Lifecycle events",
     "Called on the enabled plugins when something happened; return values are ignored."),
]


def _hookspecs():
    sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
    import astkit._defaults as defaults
    import astkit.hookspecs as hookspecs

    return hookspecs, defaults


def spec_names(hookspecs) -> list[str]:
    """Every hook specification of the module, in definition order."""
    return [
        name for name, obj in vars(hookspecs).items()
        if name.startswith("astkit_") and inspect.isfunction(obj) and hasattr(obj, "astkit_spec")
    ]


def kind_of(name: str, hookspecs) -> str:
    if name.startswith("astkit_on_"):
        return KIND_EVENT
    if name.startswith("astkit_register_") or name == "astkit_plugin_options":
        return KIND_REGISTRATION
    return KIND_BEHAVIOUR


# ----------------------------------------------------------------- reST -> md
def inline(text: str) -> str:
    """reST inline markup to Markdown: roles and double backquotes become code."""
    text = re.sub(r":(?:class|meth|func|mod|attr|data|obj|exc):`~?([^`]+)`", r"`\1`", text)
    text = re.sub(r"``(.+?)``", r"`\1`", text, flags=re.S)
    return text


def _fields(lines: list[str]) -> list[tuple[str, str, str]]:
    """Split docstring lines into ("text", "", line) and ("param"/"return", name, text) items."""
    items: list[tuple[str, str, str]] = []
    for line in lines:
        m = re.match(r":param\s+(\w+):\s*(.*)", line)
        r = re.match(r":returns?:\s*(.*)", line)
        if m:
            items.append(("param", m.group(1), m.group(2)))
        elif r:
            items.append(("return", "", r.group(1)))
        elif line.startswith(" ") and items and items[-1][0] in ("param", "return") and line.strip():
            kind, name, text = items[-1]
            items[-1] = (kind, name, f"{text} {line.strip()}")
        else:
            items.append(("text", "", line))
    return items


def docstring_to_md(doc: str) -> str:
    """A hook's docstring as Markdown (parameters as a list, the rest as text)."""
    out: list[str] = []
    in_params = False
    for kind, name, text in _fields(inspect.cleandoc(doc).splitlines()):
        if kind == "param":
            if not in_params:
                if out and out[-1] != "":
                    out.append("")
                out += ["**Parameters**", ""]
                in_params = True
            out.append(f"- `{name}`: {text}")
            continue
        in_params = False
        if kind == "return":
            if out and out[-1] != "":
                out.append("")
            out += [f"**Returns**: {text}", ""]
        elif text.rstrip().endswith("::"):
            out.append(text.rstrip()[:-1])
        else:
            out.append(text.rstrip())
    md = inline("\n".join(out))
    md = re.sub(r"\n{3,}", "\n\n", md).strip()
    return md


def signature(fn) -> str:
    """``def name(arg: type, ...) -> type`` with the annotations as written."""
    sig = inspect.signature(fn)
    params = [f"{p.name}: {p.annotation}" if p.annotation is not p.empty else p.name
              for p in sig.parameters.values()]
    ret = f" -> {sig.return_annotation}" if sig.return_annotation is not sig.empty else ""
    one_line = f"def {fn.__name__}({', '.join(params)}){ret}: ..."
    if len(one_line) <= 88:
        return one_line
    body = "".join(f"    {p},\n" for p in params)
    return f"def {fn.__name__}(\n{body}){ret}: ..."


def summary(doc: str | None) -> str:
    first = inspect.cleandoc(doc or "").split("\n\n")[0]
    return inline(" ".join(first.split()))


def combination(name: str, spec_opts: dict, kind: str) -> str:
    if spec_opts.get("firstresult"):
        return "first result (wrappers may modify it)"
    if kind == KIND_EVENT:
        return "all enabled plugins; results ignored"
    return "every installed plugin"


# ------------------------------------------------------------------ the page
def generate() -> str:
    """The text of docs/hooks.md for the current astkit/hookspecs.py."""
    hookspecs, defaults = _hookspecs()
    names = spec_names(hookspecs)
    lines = [
        "<!-- Generated by docs/gen_hooks.py from astkit/hookspecs.py. Do not edit by hand: -->",
        "<!-- change the hook specifications, then run `python docs/gen_hooks.py`. -->",
        "",
        "# Hook reference",
        "",
        inline(inspect.cleandoc(hookspecs.__doc__ or "")),
        "",
        "Plugins implement hooks with `@astkit.hookimpl` (the same marker as "
        "`astkit.hookspecs.hookimpl`), using the hook's name and any subset of its arguments, "
        "which are always passed by keyword. See [Writing a plugin](plugins.md) for a walk-through "
        "and [Architecture](architecture.md#the-plugin-model) for how plugins are selected.",
        "",
        "## Summary",
        "",
        "| hook | kind | combination | MTT baseline (`astkit._defaults`) |",
        "|---|---|---|---|",
    ]
    for name in names:
        fn = getattr(hookspecs, name)
        kind = kind_of(name, hookspecs)
        base = getattr(defaults, name, None)
        baseline = summary(base.__doc__) if base is not None else "none"
        lines.append(f"| [`{name}`](#{name}) | {kind} | {combination(name, fn.astkit_spec, kind)} | {baseline} |")
    lines.append("")
    for kind, title, intro in SECTIONS:
        members = [n for n in names if kind_of(n, hookspecs) == kind]
        if not members:
            continue
        lines += [f"## {title}", "", intro, ""]
        for name in members:
            fn = getattr(hookspecs, name)
            opts = fn.astkit_spec
            lines += [f"### {name}", "", "```python", signature(fn), "```", ""]
            flags = [f"kind: {kind}", f"firstresult: {'yes' if opts.get('firstresult') else 'no'}"]
            if opts.get("historic"):
                flags.append("historic: yes")
            base = getattr(defaults, name, None)
            if base is not None:
                flags.append(f"baseline: `astkit._defaults.{name}` (trylast)")
            lines += [" · ".join(flags), "", docstring_to_md(fn.__doc__ or ""), ""]
    other = [n for n in names if kind_of(n, hookspecs) not in {k for k, _, _ in SECTIONS}]
    assert not other, other
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = generate()
    if "--check" in argv:
        current = TARGET.read_text() if TARGET.exists() else ""
        if current != text:
            sys.stderr.write(f"{TARGET} is stale; run `python docs/gen_hooks.py`\n")
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
