"""Error messages as data: each folder of tests/error_cases holds a workspace,
`args` (the forge command line) and `expected` (the exact stderr, then the exit
code). Every new message adds a folder."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).parent / "error_cases"


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_error_case(case, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(CASES / case, ws, ignore=shutil.ignore_patterns("args", "expected"))
    args = shlex.split((CASES / case / "args").read_text())
    env = {k: v for k, v in os.environ.items() if k != "FORGE_CACHE_DIR"}
    p = subprocess.run([sys.executable, "-m", "forge", *args, "--cache-dir", str(tmp_path / "c")],
                       cwd=ws, capture_output=True, text=True, env=env)
    got = p.stderr + f"exit {p.returncode}\n"
    assert "Traceback" not in p.stderr
    assert got == (CASES / case / "expected").read_text()
