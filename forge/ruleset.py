"""The rule set: everything rule families contribute to the engine, in one object.

A family is a module named by an entry point of the `forge.rules` group, e.g.
`core = "rules.core:register"`. Importing it changes nothing: its decorators
(forge.api's `rule`, `action_function`, `runner`, `pin_resolver`) only attach a
declaration to the function, and `pool(...)`/`build_helper(...)` return one. The
rule set calls the entry point, `register(rule_set)`, once, and that function hands
its module's declarations over: `rule_set.add(genrule, http_fetch, NETWORK, ...)`.

The engine reads the rule set, never a module-level table, so a test builds its own
`RuleSet()` with fake declarations and passes it where the engine takes one.
"""

from __future__ import annotations

import os
import pickle
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from forge.errors import ForgeError
from forge.model import RuleType

GROUP = "forge.rules"
# Where a decorator leaves its declaration on the function it decorates.
DECLARATION = "__forge_declaration__"


@dataclass(frozen=True)
class ActionFunction:
    """An in-process action step; `version` enters the keys of the actions calling it."""

    name: str
    fn: Callable[[Any], None]  # (forge.contexts.ExecContext) -> None
    version: int = 1


@dataclass(frozen=True)
class Runner:
    """What `forge run` (or an in-process test) does for targets whose info names it."""

    name: str
    fn: Callable[[Any], int]  # (forge.contexts.RunContext) -> exit code


@dataclass(frozen=True)
class PinResolver:
    """How a floating reference of `kind` becomes a pinned value for forge.lock."""

    kind: str
    fn: Callable[[str, dict], str]  # (key, workspace config) -> pinned value
    placeholder: str | None = None  # stands in for what is not pinned under --nobuild


@dataclass(frozen=True)
class Pool:
    """A resource pool: at most `size` of its actions run at once."""

    name: str
    size: int


@dataclass(frozen=True)
class BuildHelper:
    """A Starlark function added to every BUILD file's globals, e.g. a constructor of
    the values a rule's `dict` attribute takes (`probe = redis_ping()`)."""

    name: str
    source: str


DECLARATIONS = (RuleType, ActionFunction, Runner, PinResolver, Pool, BuildHelper)


def declaration_of(obj) -> Any:
    """The declaration `obj` is or carries (see forge.api), else None."""
    return obj if isinstance(obj, DECLARATIONS) else getattr(obj, DECLARATION, None)


class RuleSet:
    """Rule types, in-process steps, runners, pin resolvers, pools and BUILD helpers.

    With a `group`, `load()` registers the families of that entry-point group (once);
    without one it holds what `add` was given."""

    def __init__(self, group: str | None = None):
        self.group = group
        self.rules: dict[str, RuleType] = {}
        self.functions: dict[str, ActionFunction] = {}
        self.runners: dict[str, Callable[[Any], int]] = {}
        self.pin_resolvers: dict[str, Callable[[str, dict], str]] = {}
        self.pin_placeholders: dict[str, str] = {}
        self.pools: dict[str, int] = {}
        self.build_helpers: dict[str, str] = {}
        self.families: dict[str, tuple[str, str]] = {}  # rule name -> (family, module)
        self.declared: dict[tuple[type, str], Any] = {}  # everything added, by kind and name
        self._loaded = group is None
        self._family = ("", "")
        self._lock = threading.Lock()

    def add(self, *declared) -> None:
        """Register declarations: functions decorated by forge.api, or declaration values."""
        for obj in declared:
            d = declaration_of(obj)
            if d is None:
                raise TypeError(f"{obj!r} is not a declaration (forge.api's rule, action_function, "
                                "runner, pin_resolver, pool or build_helper makes them)")
            name = d.kind if isinstance(d, PinResolver) else d.name
            previous = self.declared.setdefault((type(d), name), d)
            if previous != d:
                raise ForgeError(f"{type(d).__name__} '{name}' is declared twice, differently",
                                 hint=f"while registering {self._family[0] or 'a rule set'}")
            if isinstance(d, RuleType):
                self.rules[name] = d
                self.families[name] = self._family
            elif isinstance(d, ActionFunction):
                self.functions[name] = d
            elif isinstance(d, Runner):
                self.runners[name] = d.fn
            elif isinstance(d, PinResolver):
                self.pin_resolvers[name] = d.fn
                if d.placeholder is not None:
                    self.pin_placeholders[name] = d.placeholder
            elif isinstance(d, Pool):
                self.pools[name] = d.size
            else:
                self.build_helpers[name] = d.source

    def load(self) -> "RuleSet":
        """Call every family's `register(self)`, the first time only; returns self. The
        lock matters: in-process tests load from their worker threads."""
        with self._lock:
            if not self._loaded:
                for ep in self._entry_points():
                    try:
                        register = ep.load()
                        if not callable(register):
                            raise ForgeError(f"the entry point must name a function, e.g. "
                                             f"'{ep.value}:register'")
                        self._family = (ep.name, ep.module)
                        register(self)
                    except Exception as e:  # a broken plugin must not hide the others' errors
                        raise ForgeError(f"cannot load rule family '{ep.name}' ({ep.value}): "
                                         f"{e}") from e
                    finally:
                        self._family = ("", "")
                self._loaded = True
        return self

    def _entry_points(self):
        from importlib.metadata import entry_points
        return entry_points(group=self.group)

    def code_fingerprint(self, memo_dir: Path) -> list:
        """What the rule families are, without importing them: the entry points and the
        mtime of every Python file in their packages. A plan made by other rule code is
        not reused (even when a rule's author forgot to bump its version), and a no-op
        build served from the plan cache never imports a rule module.

        Listing entry points scans every installed distribution; the answer is kept in
        `memo_dir` and reused while no directory of sys.path has changed (an install or
        uninstall changes its site-packages directory)."""
        if self.group is None:
            return []
        import sys
        memo = memo_dir / "rules.pickle"
        paths = []
        for p in sys.path:
            try:
                paths.append((p, os.stat(p or ".").st_mtime_ns))
            except OSError:
                pass
        try:
            with open(memo, "rb") as f:
                saved_paths, eps, dirs = pickle.load(f)
            if saved_paths != paths:
                raise ValueError("sys.path changed")
        except (OSError, EOFError, ValueError, pickle.UnpicklingError, TypeError):
            import importlib.util
            eps = sorted((ep.name, ep.value) for ep in self._entry_points())
            dirs = []
            for _, value in eps:
                spec = importlib.util.find_spec(value.split(".")[0])
                dirs += list(spec.submodule_search_locations or []) if spec else []
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f".rules.{os.getpid()}")
            with open(tmp, "wb") as f:
                pickle.dump((paths, eps, dirs), f)
            os.replace(tmp, memo)
        out: list = list(eps)
        for d in sorted(set(dirs)):
            for f in sorted(os.listdir(d)):
                if f.endswith(".py"):
                    out.append((f, os.stat(os.path.join(d, f)).st_mtime_ns))
        return out


_INSTALLED = RuleSet(GROUP)


def installed() -> RuleSet:
    """This process's rule set: the installed families, registered on its first `load()`
    (a build whose every action is cached never loads them)."""
    return _INSTALLED
