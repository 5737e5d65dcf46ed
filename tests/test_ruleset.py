"""Registration is explicit: importing a rule module registers nothing; each entry point's
`register` hands over exactly what its module declares."""

from __future__ import annotations

import importlib
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from forge.api import action_function, pool
from forge.errors import ForgeError
from forge.ruleset import GROUP, RuleSet, declaration_of

ROOT = Path(__file__).resolve().parent.parent


def declared_in(module) -> set[tuple[type, str]]:
    """(kind, name) of every declaration made in `module` (decorated here or a value)."""
    out = set()
    for v in vars(module).values():
        d = declaration_of(v)
        if d is not None and (d is v or v.__module__ == module.__name__):
            out.add((type(d), getattr(d, "kind", None) or d.name))
    return out


def test_every_declaring_module_is_an_entry_point_that_registers_all_it_declares():
    eps = {ep.module: ep for ep in entry_points(group=GROUP)}
    for path in sorted((ROOT / "rules").glob("*.py")):
        module = importlib.import_module(f"rules.{path.stem}")
        declared = declared_in(module)
        if not declared:
            continue
        assert module.__name__ in eps, f"{path} declares rules but is no `{GROUP}` entry point"
        rs = RuleSet()
        eps[module.__name__].load()(rs)
        assert set(rs.declared) == declared, f"{module.__name__}.register misses " \
            f"{sorted(name for _, name in declared - set(rs.declared))}"


def test_importing_rule_modules_registers_nothing():
    code = ("import importlib, pathlib, sys; "
            "[importlib.import_module('rules.' + p.stem) for p in pathlib.Path('rules').glob('*.py')]; "
            "from forge.ruleset import installed; r = installed(); "
            "print(len(r.rules) + len(r.functions) + len(r.pools) + len(r.runners))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "0"


def test_installed_families_load_once_with_their_names():
    from forge.ruleset import installed
    rs = installed().load()
    assert rs.load() is rs
    assert rs.families["genrule"] == ("core", "rules.core")
    assert rs.pools["network"] == 4 and rs.functions["HttpFetch"].version == 1


@action_function("TestStep", version=3)
def step(ctx):
    pass


def test_a_fresh_rule_set_holds_only_what_it_is_given():
    rs = RuleSet()
    rs.add(step, pool("p", 2))
    rs.add(step)  # the same declaration again is harmless
    assert rs.load() is rs and list(rs.functions) == ["TestStep"] and rs.pools == {"p": 2}
    with pytest.raises(ForgeError, match="declared twice"):
        rs.add(pool("p", 3))
    with pytest.raises(TypeError, match="not a declaration"):
        rs.add(lambda ctx: None)
