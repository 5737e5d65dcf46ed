"""The whole surface for rule authors.

A rule family is one module in `rules/` named by an entry point of the
`forge.rules` group (`core = "rules.core:register"`). It declares rule types with
`@rule(...)`, each with a typed attribute schema (`attr.*`) and an analysis
function that turns one target into actions: pure data, never run during
analysis. The engine validates attributes, hashes, caches, schedules and runs;
rules only plan.

Declaring registers nothing: the decorators only mark what they decorate, and
`pool`/`build_helper` return values. The module's `register` function, which the
engine calls once, hands them to the rule set (see forge.ruleset).

    from forge.api import RuleSet, attr, rule

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

    def register(rules: RuleSet) -> None:
        rules.add(genrule)
"""

from __future__ import annotations

from typing import Callable

from forge import __version__ as FORGE_VERSION  # what documents a rule writes name as their tool
from forge.contexts import ExecContext, RunContext
from forge.errors import (ActionFailed, AnalysisError, ForgeError, LoadError, Location, UsageError,
                          did_you_mean)
from forge.labels import Label, parse_label
from forge.model import (ATTR_TYPES, COMMON_ATTRS, OUT_PREFIX, Action, Artifact, Attr, RuleType,
                         SourceReader, TargetInfo)
from forge.ruleset import (DECLARATION, ActionFunction, BuildHelper, PinResolver, Pool, Runner,
                           RuleSet)

__all__ = [
    "Action", "ActionFailed", "AnalysisError", "Artifact", "Attr", "AttrFactory", "BuildHelper",
    "COMMON_ATTRS", "ExecContext", "FORGE_VERSION", "ForgeError", "Label", "LoadError", "Location", "OUT_PREFIX",
    "Pool", "RuleSet", "RuleType", "RunContext", "SourceReader", "TargetInfo", "UsageError",
    "action_function", "attr", "build_helper", "did_you_mean", "parse_label", "pin_resolver",
    "pool", "rule", "runner",
]


class AttrFactory:
    """`attr.string(...)`, `attr.label_list(...)`: the types a schema can use (ATTR_TYPES)."""

    TYPES = ATTR_TYPES

    def __getattr__(self, type_name: str) -> Callable[..., Attr]:
        if type_name not in ATTR_TYPES:
            raise AttributeError(type_name)

        def make(*, default=None, mandatory=False, values=None, doc="") -> Attr:
            return Attr(type_name, default, mandatory, tuple(values) if values else None, doc)
        return make


attr = AttrFactory()


def _mark(declaration) -> Callable:
    def mark(fn):
        setattr(fn, DECLARATION, declaration(fn))
        return fn
    return mark


def rule(name: str, *, attrs: dict[str, Attr], version: int = 1, doc: str = "",
         test: bool = False, implicit_deps: Callable | None = None) -> Callable:
    """Declare an analysis function as the rule type `name`. `implicit_deps`, if given,
    returns the labels the target's source files name (see SourceReader)."""
    return _mark(lambda impl: RuleType(name, impl, {**COMMON_ATTRS, **attrs}, version,
                                       doc or (impl.__doc__ or ""), test, implicit_deps))


def action_function(name: str, *, version: int = 1) -> Callable:
    """Declare an in-process action step; its version enters the keys of its actions."""
    return _mark(lambda fn: ActionFunction(name, fn, version))


def runner(name: str) -> Callable:
    """Declare what `forge run` does for targets whose info names it:
    `ctx.info(..., run={"runner": name, "params": {...}})`. Returns an exit code."""
    return _mark(lambda fn: Runner(name, fn))


def pin_resolver(kind: str, placeholder: str | None = None) -> Callable:
    """Declare how a floating reference of `kind` (e.g. an image tag) is resolved to a
    pinned value; `forge lock` calls it again to refresh `forge.lock`. `placeholder`, a
    well-formed value, stands in for what is not pinned yet when `--nobuild` plans
    without touching the network."""
    return _mark(lambda fn: PinResolver(kind, fn, placeholder))


def pool(name: str, size: int) -> Pool:
    """A resource pool to register (e.g. `pool("qemu", 1)`: one VM at a time)."""
    return Pool(name, size)


def build_helper(name: str, source: str) -> BuildHelper:
    """The Starlark function `name`, defined by `source`, to make callable in BUILD files."""
    return BuildHelper(name, source)
