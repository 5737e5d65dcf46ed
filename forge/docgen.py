"""The BUILD-file reference, generated from the rule schemas.

`docs/rules.md` is this module's output and is never edited by hand:

    python -m forge.docgen > docs/rules.md

The installed rule families (the `forge.rules` entry points) are documented;
tests register theirs in rule sets of their own, which never leak in.
"""

from __future__ import annotations

import json
import sys
from forge.model import ATTR_TYPES, COMMON_ATTRS, Attr, RuleType
from forge.ruleset import installed

REGENERATE = "python -m forge.docgen > docs/rules.md"


def documented_rules() -> list[RuleType]:
    return sorted(installed().load().rules.values(), key=lambda r: r.name)


def _starlark(v) -> str:
    """A value as it would be written in a BUILD file."""
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_starlark(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_starlark(k)}: {_starlark(x)}" for k, x in v.items()) + "}"
    return "None" if v is None else str(v)


def _default(spec: Attr) -> str:
    if spec.mandatory:
        return "mandatory"
    v = spec.default
    if v is None and spec.type.endswith("_list"):
        v = []
    elif v is None and spec.type.endswith("_dict"):
        v = {}
    return f"`{_starlark(v)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _table(attrs: dict[str, Attr]) -> list[str]:
    rows = ["| Attribute | Type | Default | Allowed values | Description |",
            "|---|---|---|---|---|"]
    for name, spec in attrs.items():
        values = ", ".join(f"`{_starlark(v)}`" for v in spec.values) if spec.values else "any"
        rows.append(f"| `{name}` | {ATTR_TYPES[spec.type]} | {_default(spec)} | "
                    f"{values} | {_cell(spec.doc)} |")
    return rows


def rules_markdown() -> str:
    """The whole reference as Markdown, rules sorted by name."""
    rules = documented_rules()
    families = installed().families
    out = [
        "# BUILD rule reference",
        "",
        f"<!-- Generated from the rule schemas by `{REGENERATE}`. Do not edit. -->",
        "",
        "Every rule forge knows, with every attribute it accepts. A BUILD file calls a rule",
        "with keyword arguments only, e.g. `genrule(name = \"x\", outs = [\"x.txt\"], cmd = \"...\")`.",
        "forge checks every call against the schema below while it loads the BUILD file: an",
        "unknown attribute, a missing mandatory one, or a value of the wrong type or outside the",
        "allowed values stops the build with an error that names the file and line.",
        "",
        "Label attributes take label strings: `//pkg:name`, `:name` or `name` in the same",
        "package, or a file path relative to the package (`src/a.txt`). A label can name a rule",
        "(meaning all its files), a source file, or one output file of a rule.",
        "",
        "Rules: " + ", ".join(f"[`{r.name}`](#{r.name})" for r in rules) + ".",
        "",
        "## Common attributes",
        "",
        "Every rule accepts these, in addition to its own attributes.",
        "",
        *_table(COMMON_ATTRS),
        "",
        "## Attribute types",
        "",
        "| Type | A BUILD file passes |",
        "|---|---|",
        *(f"| `{t}` | {words} |" for t, words in ATTR_TYPES.items()),
        "",
    ]
    for r in rules:
        own = {k: v for k, v in r.attrs.items() if k not in COMMON_ATTRS}
        family, module = families[r.name]
        out += [f"## {r.name}", "", r.doc.strip() or "(no description)", ""]
        facts = [f"Rule family `{family}` (`{module}`), version {r.version}."]
        if r.test:
            facts.append("A test rule: `forge test` runs it.")
        out += [" ".join(facts), ""]
        out += _table(own) if own else ["No attributes besides the common ones."]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(rules_markdown())
