"""Loading: evaluate BUILD files (Starlark, via starlark-pyo3) into targets.

Each rule type is exposed to BUILD files as a small Starlark wrapper defined in
a prelude, `def genrule(**kwargs): _rule("genrule", call_stack(), kwargs)`, so
the host sees where the call came from: starlark-pyo3 gives host callbacks no
location of their own. `.bzl` files get the same prelude, where rules are also
reachable as `native.genrule(...)` as in Bazel.
"""

from __future__ import annotations

import ast as pyast
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import starlark as sl

from forge.errors import ForgeError, LoadError, Location, did_you_mean
from forge.labels import Label, LabelError, parse_label
from forge.model import ATTR_TYPES, Attr, RuleType
from forge.ruleset import RuleSet, installed
from forge.workspace import CONFIG_NAME, SKIP_DIRS, Workspace, build_file

_GLOBALS = sl.Globals.extended_by([sl.LibraryExtension.StructType,
                                   sl.LibraryExtension.CallStack,
                                   sl.LibraryExtension.Print])
_BUILTINS = ("glob", "package_name", "exports_files", "package", "native", "select", "struct",
             "len", "str", "list", "dict", "range", "sorted", "print", "fail")
_FRAME = re.compile(r"^\s*\* (.+?):(\d+), in ")
_LOC = re.compile(r"-->\s*(.+?):(\d+):(\d+)")
_UNDEFINED = re.compile(r"Variable `([^`]+)` not found")


@dataclass
class Target:
    label: Label
    kind: str
    attrs: dict  # validated values, label strings resolved to Label objects
    location: Location

    def attr_location(self, name: str) -> Location:
        """Where attribute `name` is written, else where the rule is called."""
        return _attr_location(self.location, name)


@dataclass
class Package:
    name: str
    build_file: Path
    targets: dict[str, Target] = field(default_factory=dict)
    outputs: dict[str, Label] = field(default_factory=dict)  # output file name -> its rule


def _prelude(rules: RuleSet) -> str:
    names = sorted(rules.rules)
    defs = [f'def {n}(**kwargs):\n    _rule("{n}", call_stack(), kwargs)\n' for n in names]
    members = ", ".join(f"{n} = {n}" for n in names)
    defs += [rules.build_helpers[n] for n in sorted(rules.build_helpers)]
    defs.append(f"native = struct({members}, glob = glob, package_name = package_name, "
                f"exports_files = exports_files, package = package)\n")
    return "\n".join(defs)


class Loader:
    """Loads packages on demand and remembers every file it read (for caching)."""

    def __init__(self, ws: Workspace, rules: RuleSet | None = None):
        self.ws = ws
        _ROOT[0] = ws.root
        _PY_CALLS.clear()
        self.rule_set = rules if rules is not None else installed().load()
        self.rules = self.rule_set.rules
        self.packages: dict[str, Package] = {}
        self.bzl: dict[str, sl.FrozenModule] = {}
        # Files and directories whose change invalidates what was loaded.
        self.inputs: dict[str, tuple[int, int]] = {}
        self.dirs: dict[str, int] = {}
        # BUILD or .bzl file -> the .bzl files it loads (workspace-relative), for affected.py.
        self.loads: dict[str, set[str]] = {}
        self._prelude_src = _prelude(self.rule_set)
        self._current: Package | None = None
        self._pending: BaseException | None = None
        self._lock = threading.Lock()

    # --- the host functions BUILD files call ----------------------------------------

    def _rule(self, kind: str, stack: str, kwargs: dict) -> None:
        try:
            self._record(kind, stack, kwargs)
        except BaseException as e:  # starlark-pyo3 drops the type: keep it to re-raise
            self._pending = e
            raise

    def _glob(self, include, exclude=None, allow_empty=True, exclude_directories=1):
        try:
            return self._do_glob(include, exclude or [], allow_empty)
        except BaseException as e:
            self._pending = e
            raise

    def _package_name(self) -> str:
        return self._current.name if self._current else ""

    # --- loading --------------------------------------------------------------------

    def load_package(self, name: str) -> Package:
        pkg = self.packages.get(name)
        if pkg is not None:
            return pkg
        directory = self.ws.root / name if name else self.ws.root
        bf = build_file(directory)
        if bf is None or (name and (directory / CONFIG_NAME).exists()):
            raise LoadError(f"no package '//{name}': there is no {name or '.'}/BUILD in the workspace",
                            hint="create a BUILD file there, or check the label's package part")
        with self._lock:
            pkg = Package(name, bf)
            self._current = pkg
            try:
                self._eval(bf, self._rel(bf))
            finally:
                self._current = None
            self.packages[name] = pkg
        return pkg

    def _rel(self, path: Path) -> str:
        # A host file read while planning (a system keyring) stays absolute; joining it
        # to the root gives it back when the plan cache checks it.
        try:
            return path.relative_to(self.ws.root).as_posix()
        except ValueError:
            return path.as_posix()

    def remember(self, path: Path) -> None:
        """Record a file whose change invalidates what was loaded: its size, mtime and mode
        (`chmod +x` changes a LinuxKit package's tag, and no mtime)."""
        st = path.stat()
        self.inputs[self._rel(path)] = (st.st_size, st.st_mtime_ns, st.st_mode)

    def _module(self) -> sl.Module:
        m = sl.Module()
        m.add_callable("_rule", self._rule)
        m.add_callable("glob", self._glob)
        m.add_callable("package_name", self._package_name)
        m.add_callable("exports_files", lambda *a, **k: None)
        m.add_callable("package", lambda *a, **k: None)
        sl.eval(m, sl.parse("<forge prelude>", self._prelude_src, sl.Dialect.standard()), _GLOBALS)
        return m

    def _eval(self, path: Path, display: str, module: sl.Module | None = None) -> sl.Module:
        try:
            text = path.read_text()
        except OSError as e:
            raise LoadError(f"cannot read {display}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise LoadError(f"{display} is not UTF-8 text: byte {e.object[e.start]:#04x} at "
                            f"offset {e.start}", location=Location(display, _line_at(e), 0),
                            hint="Starlark files are UTF-8; re-save it in that encoding") from None
        self.remember(path)
        m = module or self._module()
        self._pending = None
        try:
            ast = sl.parse(display, text, sl.Dialect.standard())
            sl.eval(m, ast, _GLOBALS, sl.FileLoader(lambda mid: self._load_bzl(mid, display)))
        except sl.StarlarkError as e:
            pending, self._pending = self._pending, None
            located = self._starlark_error(str(e), display)
            if isinstance(pending, ForgeError):
                raise pending.with_location(located.location) from None
            raise located from None
        return m

    def _load_bzl(self, module_id: str, requester: str) -> sl.FrozenModule:
        try:
            pkg = self._current.name if self._current else ""
            label = parse_label(module_id, pkg)
        except LabelError as e:
            self._pending = e
            raise
        key = str(label)
        if key not in self.bzl:
            path = self.ws.root / label.package / label.name
            display = self._rel(path) if path.exists() else key
            if not path.is_file():
                err = LoadError(f"cannot load '{module_id}': {display} does not exist",
                                hint="load() takes a label of a .bzl file, e.g. //tools:defs.bzl")
                self._pending = err
                raise err
            m = self._eval(path, display)
            self.bzl[key] = m.freeze()
        rel = f"{label.package}/{label.name}" if label.package else label.name
        self.loads.setdefault(requester, set()).add(rel)
        return self.bzl[key]

    def _starlark_error(self, text: str, display: str) -> LoadError:
        m = _LOC.search(text)
        loc = Location(m.group(1), int(m.group(2)), int(m.group(3))) if m else Location(display)
        first = next((ln for ln in text.splitlines() if ln.startswith("error:")), "error: " + text)
        msg = first[len("error:"):].strip()
        hint = None
        if msg.startswith("Parse error: "):
            msg, hint = _parse_error(msg, loc)
        u = _UNDEFINED.search(msg)
        if u:
            name = u.group(1)
            msg = f"'{name}' is not defined"
            kinds = list(self.rules) + list(_BUILTINS) + list(self.rule_set.build_helpers)
            hint = did_you_mean(name, kinds) or f"known rules: {', '.join(sorted(self.rules))}"
        return LoadError(msg, location=loc, hint=hint)

    # --- recording targets ----------------------------------------------------------

    def _record(self, kind: str, stack: str, kwargs: dict) -> None:
        pkg = self._current
        if pkg is None:
            raise LoadError(f"rule '{kind}' can only be called while a BUILD file is evaluated")
        loc = _call_location(stack)
        rule = self.rules[kind]
        name = kwargs.get("name")
        if not isinstance(name, str) or not name:
            raise LoadError(f"{kind} needs a 'name' attribute (a non-empty string)",
                            location=loc)
        try:
            label = parse_label(":" + name, pkg.name)
        except LabelError as e:
            raise LoadError(f"invalid name '{name}' for {kind}", location=_attr_location(loc, "name"),
                            hint=e.hint) from None
        if name in pkg.targets:
            prev = pkg.targets[name].location
            raise LoadError(f"target '{name}' is already defined in package //{pkg.name} (at {prev})",
                            location=loc, hint="give each target of a package a unique name")
        attrs = check_attrs(rule, name, kwargs, loc)
        for a, spec in rule.attrs.items():
            if spec.is_output:
                outs = attrs[a] if spec.type == "output_list" else [attrs[a]] if attrs[a] else []
                for out in outs:
                    if out in pkg.outputs or out in pkg.targets:
                        raise LoadError(f"output '{out}' of {kind} '{name}' clashes with another "
                                        f"target or output of //{pkg.name}",
                                        location=_attr_location(loc, a))
                    pkg.outputs[out] = label
        if name in pkg.outputs:
            raise LoadError(f"target '{name}' has the name of an output file of //{pkg.name}",
                            location=loc)
        pkg.targets[name] = Target(label, kind, attrs, loc)

    def _do_glob(self, include, exclude, allow_empty) -> list[str]:
        pkg = self._current
        if pkg is None:
            raise LoadError("glob() can only be called while a BUILD file is evaluated")
        include = [include] if isinstance(include, str) else list(include)
        base = self.ws.root / pkg.name if pkg.name else self.ws.root
        files = self._package_files(base)
        matched = {f for f in files if any(_glob_match(p, f) for p in include)}
        matched = {f for f in matched if not any(_glob_match(p, f) for p in exclude)}
        return sorted(matched)

    def _package_files(self, base: Path) -> list[str]:
        """Files of one package: below its directory, but not inside subpackages."""
        out = []
        stack = [base]
        while stack:
            d = stack.pop()
            self.dirs[self._rel(d) if d != self.ws.root else ""] = d.stat().st_mtime_ns
            for e in os.scandir(d):
                if e.is_dir(follow_symlinks=False):
                    p = Path(e.path)
                    if (e.name in SKIP_DIRS or e.name.startswith(".") or build_file(p)
                            or (p / CONFIG_NAME).exists()):
                        continue
                    stack.append(p)
                elif e.name not in ("BUILD", "BUILD.forge"):
                    out.append(Path(e.path).relative_to(base).as_posix())
        return out


def _line_at(e: UnicodeDecodeError) -> int:
    return e.object.count(b"\n", 0, e.start) + 1


def _parse_error(msg: str, loc: Location) -> tuple[str, str | None]:
    """Starlark's parse errors list every token it could accept: keep the first part."""
    what, _, expected = msg[len("Parse error: "):].partition(", expected one of ")
    what = what.replace(" here", "")
    hint = None
    if '","' in expected.replace(" ", "") or '","' in expected:
        hint = f"is a comma missing at the end of line {loc.line - 1}?" if loc.line > 1 else None
    return f"syntax error: {what}", hint


def _glob_match(pattern: str, path: str) -> bool:
    return _glob_regex(pattern).match(path) is not None


_GLOB_CACHE: dict[str, re.Pattern] = {}


def _glob_regex(pattern: str) -> re.Pattern:
    rx = _GLOB_CACHE.get(pattern)
    if rx is None:
        out, i = [], 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out.append("(?:.*/)?")
                i += 3
            elif pattern.startswith("**", i):
                out.append(".*")
                i += 2
            elif pattern[i] == "*":
                out.append("[^/]*")
                i += 1
            elif pattern[i] == "?":
                out.append("[^/]")
                i += 1
            else:
                out.append(re.escape(pattern[i]))
                i += 1
        rx = _GLOB_CACHE[pattern] = re.compile("".join(out) + r"\Z")
    return rx


# --- locations ----------------------------------------------------------------------

def _call_location(stack: str) -> Location:
    """The outermost frame of a call stack that is not the prelude: the BUILD call site."""
    for line in stack.splitlines():
        m = _FRAME.match(line)
        if m and m.group(1) != "<forge prelude>":
            loc = Location(m.group(1), int(m.group(2)), 0)
            return _call_column(loc)
    return Location("<unknown>")


_PY_CALLS: dict[str, dict[int, list[pyast.Call]]] = {}
_ROOT = [Path(".")]  # the workspace root that relative locations are read from


def _calls_at(loc: Location) -> list[pyast.Call]:
    """The calls that start on `loc.line` of `loc.file`.

    Starlark's syntax is a subset of Python's, so Python's parser finds the columns
    that starlark-pyo3's call stack does not give. Each file is parsed once.
    """
    index = _PY_CALLS.get(loc.file)
    if index is None:
        index = _PY_CALLS[loc.file] = {}
        try:
            tree = pyast.parse((_ROOT[0] / loc.file).read_text())
        except (OSError, SyntaxError, ValueError):
            tree = None
        for n in pyast.walk(tree) if tree is not None else ():
            if isinstance(n, pyast.Call):
                index.setdefault(n.lineno, []).append(n)
    return index.get(loc.line, [])


def _call_column(loc: Location) -> Location:
    calls = _calls_at(loc)
    col = min((c.col_offset for c in calls), default=0) + 1
    return Location(loc.file, loc.line, col)


def _attr_location(call: Location, name: str) -> Location:
    for c in _calls_at(call):
        for kw in c.keywords:
            if kw.arg == name:
                return Location(call.file, kw.lineno, kw.col_offset + 1)
    return call


def reset_location_cache() -> None:
    _PY_CALLS.clear()


# --- attribute checking -------------------------------------------------------------

def _type_ok(spec: Attr, v) -> bool:
    t = spec.type
    if t in ("string", "label", "output"):
        return isinstance(v, str)
    if t == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "bool":
        return isinstance(v, bool)
    if t in ("string_list", "label_list", "output_list"):
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if t == "int_dict":
        return isinstance(v, dict) and all(isinstance(k, int) and isinstance(x, int)
                                           and not isinstance(x, bool) for k, x in v.items())
    if t == "dict":
        return isinstance(v, dict) and all(isinstance(k, str) for k in v)
    if t in ("string_dict", "label_dict"):
        return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str)
                                           for k, x in v.items())
    return True


def _type_name(v) -> str:
    return {bool: "bool", int: "int", str: "string", list: "list", dict: "dict",
            type(None): "None"}.get(type(v), type(v).__name__)


def check_attrs(rule: RuleType, name: str, kwargs: dict, loc: Location) -> dict:
    """Validate `kwargs` against the rule's schema; the values with defaults filled in."""
    what = f"{rule.name} '{name}'"
    for key in kwargs:
        if key not in rule.attrs:
            raise LoadError(f"{what} has no attribute '{key}'",
                            location=_attr_location(loc, key),
                            hint=did_you_mean(key, rule.attrs)
                            or f"{rule.name} takes: {', '.join(sorted(rule.attrs))}")
    out = {}
    for key, spec in rule.attrs.items():
        if key not in kwargs or kwargs[key] is None:
            if spec.mandatory:
                raise LoadError(f"{what} is missing the mandatory attribute '{key}'", location=loc,
                                hint=f"{key}: {spec.doc}" if spec.doc else None)
            default = spec.default
            if default is None and spec.type.endswith("_list"):
                default = []
            elif default is None and spec.type.endswith("_dict"):
                default = {}
            out[key] = default
            continue
        v = kwargs[key]
        if not _type_ok(spec, v):
            raise LoadError(f"attribute '{key}' of {what} must be {ATTR_TYPES[spec.type]}; "
                            f"got {_type_name(v)} {v!r}", location=_attr_location(loc, key))
        if spec.values is not None:
            bad = [x for x in (v if isinstance(v, list) else [v]) if x not in spec.values]
            if bad:
                raise LoadError(f"attribute '{key}' of {what} must be one of "
                                f"{', '.join(map(str, spec.values))}; got {bad[0]!r}",
                                location=_attr_location(loc, key),
                                hint=did_you_mean(str(bad[0]), map(str, spec.values)))
        out[key] = v
    return out
