"""A real HTTP proxy for tests: Debian's `tinyproxy`, started in the foreground (`-d`) on a
free loopback port with a generated configuration, its log kept to check which requests
went through it. The system service is never used.

The proxy makes its outgoing connections from 127.0.0.3 (`Bind`), so an origin that
answers only peers at that address (`http_origin.Origin(only_from=...)`) is reachable
through the proxy alone.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require, wait_for_port
from registry_fixture import free_port

OUTGOING = "127.0.0.3"


@dataclass
class Proxy:
    url: str
    log: Path

    def requests(self) -> list[str]:
        """The request lines the proxy relayed ("GET http://host/path HTTP/1.1",
        "CONNECT host:port HTTP/1.1")."""
        text = self.log.read_text() if self.log.exists() else ""
        return re.findall(r"Request \(file descriptor \d+\): (.*)", text)


@pytest.fixture
def tinyproxy(tmp_path):
    binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    require(Path(binary).exists(), "tinyproxy is not installed (apt-get install tinyproxy)")
    base = tmp_path / "tinyproxy"
    base.mkdir()
    port = free_port()
    log = base / "tinyproxy.log"
    config = base / "tinyproxy.conf"
    config.write_text(f"Port {port}\nListen 127.0.0.1\nBind {OUTGOING}\nTimeout 30\n"
                      f'LogFile "{log}"\nLogLevel Info\nMaxClients 100\nAllow 127.0.0.1\n'
                      "DisableViaHeader Yes\n")
    out = base / "stdout.txt"
    with out.open("wb") as f:
        proc = subprocess.Popen([binary, "-d", "-c", str(config)], stdout=f,
                                stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, seconds=10, what="tinyproxy",
                      output=lambda: out.read_text() + (log.read_text() if log.exists() else ""))
        yield Proxy(f"http://127.0.0.1:{port}", log)
    finally:
        proc.kill()
        proc.wait(timeout=10)
