"""Builders of real test inputs shared by several test files: a `.deb` made by
`dpkg-deb`, a kernel module compiled by gcc with the `.modinfo` fields asked for."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CONTROL = """\
Package: {name}
Version: {version}
Architecture: amd64
Maintainer: Forge Tests <tests@localhost>
Depends: libc6 (>= 2.36), foo | bar
Description: a test package
 made by the forge test suite.
 .
 Second paragraph.
"""


def make_deb(tmp: Path, name: str, version: str, compression: str = "xz",
             files: dict[str, bytes] | None = None) -> Path:
    root = tmp / f"{name}-{version}-{compression}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(CONTROL.format(name=name, version=version))
    for rel, data in (files or {"usr/share/doc/hello/greeting": b"hello\n"}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    out = tmp / f"{name}_{version}_{compression}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", str(root),
                    str(out)], check=True, capture_output=True)
    return out



def compile_module(tmp: Path, fields: list[str], stem: str) -> bytes:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    body = "".join(f + "\\0" for f in fields)
    src = tmp / f"{stem}.c"
    src.write_text(f'static const char __mod[] __attribute__((section(".modinfo"), used)) = "{body}";\n'
                   "int module_code(void) { return 42; }\n")
    obj = tmp / f"{stem}.o"
    subprocess.run(["gcc", "-c", "-O0", "-o", str(obj), str(src)], check=True, capture_output=True)
    return obj.read_bytes()
