"""The shape of the code (docs/architecture.md): the import contracts of pyproject.toml
checked by import-linter, every module importable on its own, no module taking another's
private names, and a lazy `forge --version`.

Run as a script, this file prints the figures the checks are about: import cycles,
cross-module private names and the largest modules.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("forge", "rules")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = p
    return out


def imported(mod: str, path: Path, known: dict[str, Path]):
    """(imported module, names taken from it, AST) for every import in `path`, function-level
    ones too: they hold a module together as much as top-level ones."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, (), a.asname or a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = mod.split(".")[: len(mod.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:
                if f"{base}.{a.name}" in known:
                    yield f"{base}.{a.name}", (), a.asname or a.name
                else:
                    yield base, (a.name,), None


def private_uses() -> list[str]:
    """`from x import _y` and `x._y` where x is another module of forge or rules."""
    known = modules()
    found = []
    for mod, path in known.items():
        aliases = {}
        for target, names, alias in imported(mod, path, known):
            if target not in known or target == mod:
                continue
            if alias:
                aliases[alias] = target
            found += [f"{mod}: from {target} import {n}" for n in names
                      if n.startswith("_") and not n.startswith("__")]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                found.append(f"{mod}: {aliases[node.value.id]}.{node.attr}")
    return found


def import_cycles() -> list[list[str]]:
    import networkx as nx
    known = modules()
    g = nx.DiGraph()
    for mod, path in known.items():
        for target, _, _ in imported(mod, path, known):
            if target in known and target != mod:
                g.add_edge(mod, target)
    return [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]


def test_import_contracts_hold():
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_no_module_takes_another_modules_private_names():
    assert private_uses() == []


def test_no_import_cycles():
    assert import_cycles() == []


def test_every_module_imports_alone():
    """Each module in a fresh interpreter: an import that only works after another module
    happened to load first (a hidden cycle, a missing import) fails here."""
    def try_import(mod: str) -> str | None:
        r = subprocess.run([sys.executable, "-c", f"import {mod}"], cwd=ROOT,
                           capture_output=True, text=True)
        return None if r.returncode == 0 else f"{mod}: {r.stderr.strip().splitlines()[-1]}"
    with ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
        failures = [f for f in pool.map(try_import, modules()) if f]
    assert failures == []


def test_version_imports_nothing_heavy():
    code = ("import sys, forge.cli; forge.cli.main(['--version']) if False else None; "
            "print(','.join(sorted(m for m in ('starlark','networkx','diskcache','tqdm','docker','yaml',"
            "'grpc','google.protobuf') "
            "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    v = subprocess.run([sys.executable, "-m", "forge", "--version"], capture_output=True, text=True)
    assert v.returncode == 0 and v.stdout.startswith("forge ")


if __name__ == "__main__":
    cycles, private = import_cycles(), private_uses()
    print(f"import cycles: {len(cycles)}", *(f"  {c}" for c in cycles), sep="\n")
    print(f"cross-module private names: {len(private)}", *(f"  {p}" for p in private), sep="\n")
    sizes = sorted(((len(p.read_text().splitlines()), m) for m, p in modules().items()), reverse=True)
    print("largest modules:", ", ".join(f"{m} ({n} lines)" for n, m in sizes[:5]))
