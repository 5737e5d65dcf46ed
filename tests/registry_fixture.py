"""A real OCI registry for tests: Debian's `docker-registry` (distribution v2) on 127.0.0.1.

Use it with `from registry_fixture import registry` in a test module; the fixture yields a
`Registry` with `.host` ("127.0.0.1:PORT") and `.root` (the filesystem storage, to damage
blobs on purpose), and stops the server afterwards. `start_registry` is the same thing for
tests that need extra configuration (token auth).
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require

BINARY = "/usr/bin/docker-registry"


@dataclass
class Registry:
    host: str
    root: Path
    log: Path

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (its `data` file)."""
        hexpart = digest.split(":", 1)[1]
        return self.root / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def start_registry(base: Path, extra_config: str = "", ready_status: int = 200):
    require(Path(BINARY).exists(),
            "Debian's docker-registry is not installed (apt-get install docker-registry)")
    base.mkdir(parents=True, exist_ok=True)
    root = base / "storage"
    root.mkdir()
    port = free_port()
    config = base / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n"
        "storage:\n  filesystem:\n    rootdirectory: " + str(root) + "\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n" + extra_config)
    log = base / "registry.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([BINARY, "serve", str(config)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2).status
            except urllib.error.HTTPError as e:
                status = e.code
            except OSError:
                status = None
            if status == ready_status:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"docker-registry did not become ready on port {port} "
                            f"(exit {proc.poll()}): {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield Registry(f"127.0.0.1:{port}", root, log)
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def registry(tmp_path):
    with start_registry(tmp_path / "registry") as r:
        yield r
