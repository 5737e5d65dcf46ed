"""The whole surface for rule authors.

A rule family is one module in `rules/` registered under the `forge.rules`
entry-point group. It declares rule types with `@rule(...)`, each with a typed
attribute schema (`attr.*`) and an analysis function that turns one target into
actions: pure data, never run during analysis. The engine validates attributes,
hashes, caches, schedules and runs; rules only plan.

    from forge.api import rule, attr

    @rule("genrule", version=1, doc="Run a shell command.", attrs={
        "srcs": attr.label_list(doc="Inputs."),
        "outs": attr.output_list(mandatory=True, doc="Files the command writes."),
        "cmd": attr.string(mandatory=True, doc="The bash command."),
    })
    def genrule(ctx):
        outs = [ctx.declare(o) for o in ctx.attr.outs]
        ctx.run_shell(ctx.attr.cmd, inputs=ctx.files("srcs"), outputs=outs,
                      mnemonic="Genrule")
        return ctx.info(files=outs)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from forge.errors import (AnalysisError, ForgeError, LoadError, Location, UsageError,  # noqa: F401 (for rules)
                          did_you_mean)
from forge.labels import Label, parse_label  # noqa: F401 (for rules)

__all__ = [
    "Action", "AnalysisError", "Artifact", "Attr", "ExecContext", "ForgeError", "Label",
    "RuleType", "RunContext", "TargetInfo", "action_function", "attr", "rule", "runner",
    "pin_resolver", "pool", "RULES", "FUNCTIONS", "RUNNERS", "PIN_RESOLVERS",
]

OUT_PREFIX = "forge-out"


# --- data model ---------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class Artifact:
    """A file an action reads or writes, named by its path in the sandbox.

    Sources sit at `pkg/file`; generated files at `forge-out/pkg/file`, which is
    also where they are materialised in the workspace.
    """

    path: str
    source: bool = True
    directory: bool = False  # a generated directory ("tree artifact"), e.g. an OCI layout

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class Action:
    """One unit of cached work. Exactly one of `argv` or `function` is set.

    `function` names an in-process step registered with `@action_function`; its
    `params` must be JSON-able because they enter the key as they are.
    """

    owner: Label
    mnemonic: str
    rule: str  # "name@version": bumping a rule's version changes every key it makes
    inputs: tuple[Artifact, ...]
    outputs: tuple[Artifact, ...]
    argv: tuple[str, ...] | None = None
    function: str | None = None
    params: Any = None
    env: tuple[tuple[str, str], ...] = ()
    tools: tuple[str, ...] = ()  # host programs whose identity enters the key
    pool: str | None = None  # at most POOLS[pool] actions of a pool run at once
    executable: tuple[str, ...] = ()  # output paths to mark executable
    description: str = ""
    timeout: float | None = None

    @property
    def id(self) -> str:
        """Stable identity across builds (explain compares builds by it)."""
        return f"{self.owner}#{self.mnemonic}#{self.outputs[0].path if self.outputs else ''}"


@dataclass(frozen=True)
class TargetInfo:
    """What a target gives the targets that depend on it."""

    files: tuple[Artifact, ...] = ()
    executable: Artifact | None = None
    runfiles: tuple[Artifact, ...] = ()
    extra: dict = field(default_factory=dict)  # rule-family specific data (JSON-able)


# --- attribute schema -----------------------------------------------------------------

@dataclass(frozen=True)
class Attr:
    """One attribute of a rule: its type, default, allowed values and help text."""

    type: str
    default: Any = None
    mandatory: bool = False
    values: tuple | None = None
    doc: str = ""

    @property
    def is_label(self) -> bool:
        return self.type in ("label", "label_list", "label_dict")

    @property
    def is_output(self) -> bool:
        return self.type in ("output", "output_list")


class _AttrFactory:
    """`attr.string(...)`, `attr.label_list(...)`: the types a schema can use."""

    TYPES = {
        "string": "a string", "int": "an integer", "bool": "a boolean (True or False)",
        "string_list": "a list of strings", "string_dict": "a dict of string to string",
        "label": "a label string", "label_list": "a list of label strings",
        "label_dict": "a dict of string to label string",
        "output": "a file name", "output_list": "a list of file names",
        "int_dict": "a dict of integer to integer",
        "dict": "a dict with string keys (values: strings, numbers, booleans, lists, dicts)",
    }

    def __getattr__(self, type_name: str) -> Callable[..., Attr]:
        if type_name not in self.TYPES:
            raise AttributeError(type_name)

        def make(*, default=None, mandatory=False, values=None, doc="") -> Attr:
            return Attr(type_name, default, mandatory, tuple(values) if values else None, doc)
        return make


attr = _AttrFactory()

# Every target accepts these; rules do not declare them.
COMMON_ATTRS = {
    "name": Attr("string", mandatory=True, doc="The target's name, unique in its package."),
    "visibility": Attr("string_list", default=[], doc="Accepted for Bazel compatibility."),
    "tags": Attr("string_list", default=[], doc="Free-form tags; `manual` keeps a target out of `//...`."),
    "testonly": Attr("bool", default=False, doc="Accepted for Bazel compatibility."),
}


# --- registration ---------------------------------------------------------------------

@dataclass(frozen=True)
class RuleType:
    name: str
    impl: Callable[["AnalysisContext"], TargetInfo]
    attrs: dict[str, Attr]
    version: int = 1
    doc: str = ""
    test: bool = False  # `forge test` runs its executable
    # Labels a target names inside its source files (an assembly's `image: //x:y`), found
    # while the target graph is built: (SourceReader) -> label strings. See SourceReader.
    implicit_deps: Callable[["SourceReader"], list[str]] | None = None

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class SourceReader:
    """What a rule's `implicit_deps` sees: the target's attributes (labels still as
    written) and `read(label)`, the text of a source file of the workspace. Files read
    here invalidate the cached plan when they change, like BUILD files."""

    package: str
    attrs: Any
    read: Callable[[str], str]
    path: Callable[[str], str]  # label -> workspace-relative path (for error locations)


RULES: dict[str, RuleType] = {}
# Starlark definitions added to every BUILD file's globals, e.g. constructors of the
# values a rule's `dict` attribute takes (`probe = redis_ping()`).
BUILD_HELPERS: dict[str, str] = {}
FUNCTIONS: dict[str, tuple[Callable[["ExecContext"], None], int]] = {}
# Named resource pools and how many of their actions may run at once.
POOLS: dict[str, int] = {}


def rule(name: str, *, attrs: dict[str, Attr], version: int = 1, doc: str = "",
         test: bool = False, implicit_deps: Callable | None = None) -> Callable:
    """Register an analysis function as the rule type `name`. `implicit_deps`, if given,
    returns the labels the target's source files name (see SourceReader)."""
    def register(impl):
        all_attrs = dict(COMMON_ATTRS)
        all_attrs.update(attrs)
        RULES[name] = RuleType(name, impl, all_attrs, version, doc or (impl.__doc__ or ""), test,
                               implicit_deps)
        return impl
    return register


def build_helper(name: str, source: str) -> None:
    """Make the Starlark function `name`, defined by `source`, callable in BUILD files."""
    BUILD_HELPERS[name] = source


def action_function(name: str, *, version: int = 1) -> Callable:
    """Register an in-process action step; its version enters the keys of its actions."""
    def register(fn):
        FUNCTIONS[name] = (fn, version)
        return fn
    return register


def pool(name: str, size: int) -> None:
    """Declare a resource pool (e.g. `pool("qemu", 1)`: one VM at a time)."""
    POOLS[name] = size


# --- execution-time context for in-process actions ------------------------------------

@dataclass
class ExecContext:
    """What an `@action_function` step sees: its parameters and sandbox paths."""

    params: Any
    scratch: "Any"  # pathlib.Path of the sandbox root; inputs and outputs live below it
    inputs: list[str]
    outputs: list[str]
    log: Callable[[str], None] = print
    # Workspace settings that must not change what a step produces (a package mirror,
    # registry mirrors, insecure registries): they are not part of any key.
    config: dict = field(default_factory=dict)
    offline: bool = False
    cancel: Any = None  # threading.Event set on Ctrl-C: long steps should check it
    progress: Callable[[int, int], None] = lambda done, total: None  # bytes, for bars

    def path(self, rel: str):
        return self.scratch / rel

    @property
    def source_date_epoch(self) -> int:
        """The fixed time every archive forge writes carries (SOURCE_DATE_EPOCH)."""
        from forge.sandbox import SOURCE_DATE_EPOCH
        return int(SOURCE_DATE_EPOCH)

    def run(self, argv: list[str], *, env: dict | None = None, cwd=None,
            timeout: float | None = None) -> str:
        """Run a host program the way command actions run: clean fixed environment
        (SOURCE_DATE_EPOCH, TZ=UTC...), its own process group, stopped on Ctrl-C.
        Returns its output; a failure raises ActionFailed with the output's tail."""
        import threading
        import uuid

        from forge import sandbox
        full = sandbox.base_env(self.scratch)
        full.update(env or {})
        res = sandbox.run(list(argv), cwd or self.scratch, full, timeout=timeout,
                          cancel=self.cancel or threading.Event(),
                          log=self.scratch.with_name(f"{self.scratch.name}.step-{uuid.uuid4().hex[:8]}.log"))
        out = res.output.decode(errors="replace")
        try:
            res.log.unlink()
        except OSError:
            pass
        if res.cancelled:
            raise ActionFailed("interrupted")
        if res.returncode != 0 or res.timed_out:
            why = "timed out" if res.timed_out else f"exit code {res.returncode}"
            tail = "\n".join("  " + ln for ln in out.rstrip().splitlines()[-30:])
            raise ActionFailed(f"{argv[0]} failed ({why}):\n  {' '.join(argv)}\n{tail}")
        return out


@dataclass
class RunContext:
    """What a `@runner` sees when `forge run` runs a built target."""

    params: Any
    root: Any  # pathlib.Path of the workspace; built files are at root / artifact.path
    args: list[str]
    config: dict = field(default_factory=dict)
    # Set when a test runs it (`ctx.info(test={"runner": ..., "params": ...})`): where its
    # output goes (kept for the report and JUnit), and the Ctrl-C event to stop at.
    out: Any = None
    cancel: Any = None


RUNNERS: dict[str, Callable[[RunContext], int]] = {}
# kind -> (key, workspace config) -> pinned value, for `forge.lock` (see AnalysisContext.pin)
PIN_RESOLVERS: dict[str, Callable[[str, dict], str]] = {}
PIN_PLACEHOLDERS: dict[str, str] = {}


def runner(name: str) -> Callable:
    """Register what `forge run` does for targets whose info names it:
    `ctx.info(..., run={"runner": name, "params": {...}})`. Returns an exit code."""
    def register(fn):
        RUNNERS[name] = fn
        return fn
    return register


def pin_resolver(kind: str, placeholder: str | None = None) -> Callable:
    """Register how a floating reference of `kind` (e.g. an image tag) is resolved to a
    pinned value; `forge lock` calls it again to refresh `forge.lock`. `placeholder`, a
    well-formed value, stands in for what is not pinned yet when `--nobuild` plans
    without touching the network."""
    def register(fn):
        PIN_RESOLVERS[kind] = fn
        if placeholder is not None:
            PIN_PLACEHOLDERS[kind] = placeholder
        return fn
    return register


class ActionFailed(ForgeError):
    """Raised by an in-process step whose work failed (e.g. a checksum mismatch)."""

    exit_code = 1

