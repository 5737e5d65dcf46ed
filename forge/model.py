"""The engine's data model: what a rule declares and what it plans.

A rule type (`RuleType`) has an attribute schema (`Attr`) and an analysis function that
turns one target into `Action`s reading and writing `Artifact`s, and gives the targets
that depend on it a `TargetInfo`. All of it is frozen data: the plan cache pickles it,
and an action's fields are what its key is made of (forge.keys).

Rule authors reach these through forge.api; the engine imports them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

from forge.labels import Label

OUT_PREFIX = "forge-out"


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
    pool: str | None = None  # at most the pool's size of its actions run at once
    executable: tuple[str, ...] = ()  # output paths to mark executable
    description: str = ""
    timeout: float | None = None
    # Non-empty: why the result depends on this machine (a file outside the workspace).
    # Such an action is never looked up in nor uploaded to a shared cache; the text is the
    # warning each build prints. Not in the key: it does not change what the action makes.
    local: str = ""
    # Where what the action fetched from outside came from, for provenance
    # (forge.provenance): (name, uri, "sha256:<hex>") known when planning, and the path of
    # an output the step writes listing more ({"origins": [{"name", "uri", "digest"}]}).
    # Not in the key: the digests are already in the params or checked by the step.
    origins: tuple[tuple[str, str, str], ...] = ()
    origins_file: str = ""
    # True: hermetic, it needs nothing of this machine but its inputs and the tools every
    # worker has, so a remote executor may run it. `exec_properties` are the REAPI platform
    # properties the worker must have (docker=1, ISA=x86-64). Neither enters the key: where
    # an action runs does not change what it makes.
    remote: bool = False
    exec_properties: tuple[tuple[str, str], ...] = ()
    # Executed remotely, its result stays out of the executor's action cache (REAPI
    # do_not_cache): for actions whose result must be made afresh each time it is asked.
    do_not_cache: bool = False

    @cached_property  # asked for every action of every build: computed once per action
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

# Attribute type -> what a BUILD file passes for it (error messages and docs/rules.md).
ATTR_TYPES = {
    "string": "a string", "int": "an integer", "bool": "a boolean (True or False)",
    "string_list": "a list of strings", "string_dict": "a dict of string to string",
    "label": "a label string", "label_list": "a list of label strings",
    "label_dict": "a dict of string to label string",
    "output": "a file name", "output_list": "a list of file names",
    "int_dict": "a dict of integer to integer",
    "dict": "a dict with string keys (values: strings, numbers, booleans, lists, dicts)",
}


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


# Every target accepts these; rules do not declare them.
COMMON_ATTRS = {
    "name": Attr("string", mandatory=True, doc="The target's name, unique in its package."),
    "visibility": Attr("string_list", default=[], doc="Accepted for Bazel compatibility."),
    "tags": Attr("string_list", default=[], doc="Free-form tags; `manual` keeps a target out of `//...`."),
    "testonly": Attr("bool", default=False, doc="Accepted for Bazel compatibility."),
}


@dataclass(frozen=True)
class RuleType:
    name: str
    impl: Callable[..., TargetInfo]  # (forge.analysis.AnalysisContext) -> TargetInfo
    attrs: dict[str, Attr]  # COMMON_ATTRS included
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
