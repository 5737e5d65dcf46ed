"""The import directions of ARCHITECTURE.md, and a lazy `forge --version`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_engine_never_imports_rules():
    for p in (ROOT / "forge").rglob("*.py"):
        bad = [m for m in imports(p) if m == "rules" or m.startswith("rules.")]
        assert not bad, f"{p} imports {bad}: the engine finds rules through the registry"


def test_rules_use_only_the_api_and_formats():
    for p in (ROOT / "rules").rglob("*.py"):
        for m in imports(p):
            if m.startswith("forge"):
                assert m in ("forge", "forge.api") or m.startswith(("forge.api.", "forge.formats")), \
                    f"{p} imports {m}: rules may use forge.api and forge.formats only"


def test_formats_know_nothing_of_the_engine():
    d = ROOT / "forge" / "formats"
    for p in d.rglob("*.py") if d.exists() else []:
        for m in imports(p):
            assert not m.startswith("forge.") or m.startswith("forge.formats"), f"{p} imports {m}"


def test_version_imports_nothing_heavy():
    code = ("import sys, forge.cli; forge.cli.main(['--version']) if False else None; "
            "print(','.join(sorted(m for m in ('starlark','networkx','diskcache','tqdm','docker','yaml',"
            "'grpc','google.protobuf') "
            "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    v = subprocess.run([sys.executable, "-m", "forge", "--version"], capture_output=True, text=True)
    assert v.returncode == 0 and v.stdout.startswith("forge ")
