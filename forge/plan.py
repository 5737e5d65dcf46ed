"""The result of loading and analysis: what execution, query and tests need.

Kept apart from the loader so that a build served from the plan cache never
imports the Starlark interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from forge.model import Action, TargetInfo
from forge.labels import Label

SOURCE_KIND = "source file"
GENERATED_KIND = "generated file"


@dataclass
class Node:
    """A vertex of the target graph: a rule target, a source file or a generated file."""

    label: Label
    kind: str
    deps: list[Label] = field(default_factory=list)
    target: "object | None" = None  # forge.loader.Target for rule targets


@dataclass
class Plan:
    """The result of loading and analysis: everything execution needs, picklable."""

    roots: list[Label]
    nodes: dict[Label, Node]
    infos: dict[Label, TargetInfo]
    actions: list[Action]  # in dependency order: producers before consumers
    tests: list[Label]
    static_keys: list[str] = field(default_factory=list)  # keys.static_digest per action


