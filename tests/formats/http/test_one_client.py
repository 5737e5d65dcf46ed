"""Every HTTP request of forge goes through forge/formats/http: import-linter forbids
`http.*` and urllib3 elsewhere (pyproject.toml); this forbids what it cannot name, the
standard library's `urllib.request` (urllib.parse is fine)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_nothing_but_formats_http_opens_urls():
    offenders = []
    for pkg in ("forge", "rules"):
        for path in (ROOT / pkg).rglob("*.py"):
            if (ROOT / "forge/formats/http") in path.parents:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if any(n.startswith(("urllib.request", "urllib.error")) for n in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                if isinstance(node, ast.ImportFrom) and node.module == "urllib" and \
                        {a.name for a in node.names} & {"request", "error"}:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == [], "use forge.formats.http.client instead: " + ", ".join(offenders)
