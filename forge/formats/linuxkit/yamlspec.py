"""YAML read as LinuxKit reads it, with the `file:line:col` of every node kept for errors.

Plain scalars resolve by the YAML 1.2 core schema, which is what go-yaml v3 (and so
LinuxKit) uses: `yes`/`on` are strings, not booleans. A `Reader` walks `yaml.compose`
nodes against type specs: a name below (`DESCRIBE`), a dict (a mapping with exactly those
keys) or a one-item list (a list of that spec), and raises `AssemblyError`s that say
where, what was expected and how to fix it.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import yaml

from forge.formats.linuxkit.errors import AssemblyError, Loc

DESCRIBE = {"str": "a string", "bool": "a boolean", "int": "an integer", "strs": "a list of strings",
             "id": "a number or an entry name", "ids": "a list of numbers or entry names",
             "map": "a mapping of strings to strings", "any": "a value"}


class _Loader(yaml.SafeLoader):
    yaml_implicit_resolvers: dict = {}


for _tag, _re, _first in (
        ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
        ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
        ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                  r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+.0123456789")):
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_re), list(_first))

_KIND = {"str": "string", "int": "integer", "bool": "boolean", "null": "null", "float": "number"}


def loc(node: yaml.Node, file: str) -> Loc:
    return Loc(file, node.start_mark.line + 1, node.start_mark.column + 1)


def kind_of(node: yaml.Node) -> str:
    """"mapping", "list", or the scalar kind YAML 1.2 resolves: "string", "integer"..."""
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return _KIND.get(node.tag.rsplit(":", 1)[-1], node.tag)


def _got(node: yaml.Node) -> str:
    kind = kind_of(node)
    if kind == "string":
        return f'string "{node.value}"'
    return f"{kind} {node.value}" if isinstance(node, yaml.ScalarNode) and node.value else kind


def _scalar(node: yaml.ScalarNode) -> Any:
    v, kind = node.value, kind_of(node)
    if kind == "integer":
        return int(v[2:], 8) if v.startswith("0o") else int(v, 16) if v.startswith("0x") else int(v)
    return v.lower() == "true" if kind == "boolean" else None if kind == "null" else v


class Reader:
    """Walks one file's nodes against the type specs, raising located errors."""

    def __init__(self, file: str):
        self.file = file

    def fail(self, node: yaml.Node, message: str, hint: str | None = None) -> AssemblyError:
        return AssemblyError(message, loc(node, self.file), hint)

    def pairs(self, node: yaml.MappingNode, keys: dict, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
        seen: dict[str, yaml.Node] = {}
        out = []
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else None
            if key in seen:
                raise self.fail(k, f"duplicate key '{key}'{what}",
                                f"it is already set at line {seen[key].start_mark.line + 1}; keep one")
            if key not in keys:
                close = difflib.get_close_matches(str(key), list(keys), n=1)
                tail = f"; did you mean '{close[0]}'?" if close else ""
                raise self.fail(k, f"unknown key '{key}'{what}{tail}",
                                None if close else "valid keys: " + ", ".join(sorted(keys)))
            seen[key] = k
            out.append((key, k, v))
        return out

    def value(self, node: yaml.Node, spec: Any, what: str) -> Any:
        """`what` names the value in messages: "'readonly' of service 'redis'"."""
        if isinstance(spec, dict):
            self.expect(node, isinstance(node, yaml.MappingNode), "a mapping", what)
            return {k: self.value(v, spec[k], f"'{k}' of {what}")
                    for k, _, v in self.pairs(node, spec, f" in {what}")}
        if isinstance(spec, list) or spec in ("strs", "ids"):
            self.expect(node, isinstance(node, yaml.SequenceNode),
                        "a list" if isinstance(spec, list) else DESCRIBE[spec], what)
            item = spec[0] if isinstance(spec, list) else spec[:-1]
            return [self.value(n, item, f"item {i} of {what}") for i, n in enumerate(node.value, 1)]
        if spec == "map":
            self.expect(node, isinstance(node, yaml.MappingNode), DESCRIBE[spec], what)
            self.pairs(node, {k.value: 0 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}, f" in {what}")
            return {k.value: self.value(v, "str", f"'{k.value}' of {what}") for k, v in node.value}
        if spec == "any":
            return yaml.load(yaml.serialize(node), Loader=_Loader)
        ok = isinstance(node, yaml.ScalarNode) and (
            kind_of(node) in {"str": ("string",), "bool": ("boolean",), "int": ("integer",),
                            "id": ("string", "integer")}[spec])
        self.expect(node, ok, DESCRIBE[spec], what)
        return _scalar(node)

    def expect(self, node: yaml.Node, ok: bool, want: str, what: str) -> None:
        if ok:
            return
        hint = None
        if want == "a boolean" and kind_of(node) == "string":
            hint = "write true or false (in YAML 1.2, which LinuxKit reads, yes/no/on/off are strings)"
        elif want == "a string" and isinstance(node, yaml.ScalarNode):
            hint = f'quote it: "{node.value}"'
        elif want.startswith("a list") and isinstance(node, yaml.ScalarNode):
            hint = f'write a YAML list, e.g. [{node.value}], or one "- item" per line'
        raise self.fail(node, f"{what} must be {want}; got {_got(node)}", hint)


def parse_file(file: str, text: str) -> tuple[yaml.Node | None, Reader]:
    try:
        return yaml.compose(text, Loader=_Loader), Reader(file)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = Loc(file, mark.line + 1, mark.column + 1) if mark else file
        ctx = f" ({e.context})" if e.context else ""
        hint = "check the indentation and quoting on this line and the one before"
        cm = e.context_mark
        if cm is not None and mark is not None and cm.line != mark.line and \
                any(w in (e.context or "") for w in ("quoted scalar", "flow")):
            # an unclosed quote or bracket: where it opened says more than where the file ended
            what = e.context.split(" ", 2)[-1].removeprefix("a ")
            hint = f"the {what} that starts at {file}:{cm.line + 1}:{cm.column + 1} is not closed"
        raise AssemblyError(f"YAML syntax error: {e.problem}{ctx}", where, hint) from None
    except yaml.YAMLError as e:
        raise AssemblyError(f"YAML error: {e}", file) from None
