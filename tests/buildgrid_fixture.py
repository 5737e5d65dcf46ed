"""A real REAPI server for tests: BuildGrid (`bgd server start`) on 127.0.0.1.

`start_buildgrid(base)` writes a config serving Capabilities, CAS, ByteStream and
ActionCache for instance "main" with CAS on disk under `base/cas` (to damage blobs on
purpose) and an in-memory action cache, starts `bgd` and yields a `BuildGrid` with
`.url` (grpc://127.0.0.1:PORT), `.instance` and `.kill()`. Options: `tls=(cert, key)` for
grpcs, `jwt_secret=` to demand bearer tokens (HS256). The `buildgrid` fixture is the
plain server.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require, wait_for_port
from registry_fixture import free_port


def bgd_binary() -> str | None:
    here = Path(sys.executable).parent / "bgd"
    return str(here) if here.exists() else shutil.which("bgd")


CONFIG = """
server:
  - !channel
    address: "127.0.0.1:{port}"
    insecure-mode: {insecure}
{credentials}
authorization:
{authorization}
monitoring:
  enabled: false

storages:
  - !disk-storage &cas
    path: {base}/cas

caches:
  - !lru-action-cache &ac
    storage: *cas
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: false

instances:
  - name: {instance}
    services:
      - !action-cache
        cache: *ac
      - !cas
        storage: *cas
      - !bytestream
        storage: *cas

thread-pool-size: 16
"""


@dataclass
class BuildGrid:
    url: str
    instance: str
    base: Path
    port: int
    proc: subprocess.Popen

    def blob_path(self, sha256: str) -> Path:
        """Where BuildGrid's disk storage keeps a blob."""
        # Its disk storage splits names like git: objects/<2 hex>/<the other 62>.
        hits = [p for p in (self.base / "cas").rglob(sha256[2:]) if p.parent.name == sha256[:2]]
        assert hits, f"blob {sha256} is not in {self.base / 'cas'}"
        return hits[0]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@contextmanager
def start_buildgrid(base: Path, instance: str = "main", tls: tuple[Path, Path] | None = None,
                    jwt_secret: str | None = None):
    binary = bgd_binary()
    require(binary is not None, "BuildGrid is not installed (pip install buildgrid)")
    base.mkdir(parents=True, exist_ok=True)
    (base / "cas").mkdir(exist_ok=True)
    port = free_port()
    credentials = ""
    if tls:
        credentials = (f"    credentials:\n      tls-server-key: {tls[1]}\n"
                       f"      tls-server-cert: {tls[0]}\n")
    if jwt_secret:
        (base / "jwt.secret").write_text(jwt_secret)
        authorization = (f"  method: jwt\n  secret: {base / 'jwt.secret'}\n  algorithm: hs256\n")
    else:
        authorization = "  method: none\n"
    config = base / "bgd.yml"
    config.write_text(CONFIG.format(port=port, insecure="false" if tls else "true",
                                    credentials=credentials, authorization=authorization,
                                    base=base, instance=instance))
    log = base / "bgd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, "server", "start", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=base)
    scheme = "grpcs" if tls else "grpc"
    bg = BuildGrid(f"{scheme}://127.0.0.1:{port}", instance, base, port, proc)
    try:
        wait_for_port(port, proc, seconds=60, what="BuildGrid", output=lambda: log.read_text()[-3000:])
        yield bg
    finally:
        bg.kill()


@pytest.fixture
def buildgrid(tmp_path):
    with start_buildgrid(tmp_path / "buildgrid") as bg:
        yield bg
