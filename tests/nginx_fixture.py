"""A real Bazel HTTP cache for tests: Debian's nginx with WebDAV PUT on 127.0.0.1.

`start_nginx(base)` writes a config under `base`, starts nginx in the foreground on a free
port and yields an `Nginx` with `.url` (http://127.0.0.1:PORT/forge), `.store` (where
`ac/` and `cas/` land, to damage entries on purpose), `.requests()` (the access log as
(method, path, status) tuples) and `.kill()`. The `nginx` fixture is the usual way in.
`FaultProxy` is a real TCP intermediary that can delay, refuse with 503, cut bodies short
or stall, to show what forge does when a cache misbehaves.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require, wait_for_port
from registry_fixture import free_port

BINARY = shutil.which("nginx", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/nginx"

CONFIG = """
{user}
worker_processes 2;
pid {base}/nginx.pid;
error_log {base}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log {base}/access.log;
    client_body_temp_path {base}/tmp/body;
    proxy_temp_path {base}/tmp/proxy;
    fastcgi_temp_path {base}/tmp/fastcgi;
    uwsgi_temp_path {base}/tmp/uwsgi;
    scgi_temp_path {base}/tmp/scgi;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {base}/data;
        location /forge/ {{
            dav_methods PUT;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
            client_max_body_size 2G;
{auth}
        }}
    }}
}}
"""


@dataclass
class Nginx:
    url: str
    port: int
    base: Path
    proc: subprocess.Popen

    @property
    def store(self) -> Path:
        return self.base / "data" / "forge"

    def requests(self) -> list[tuple[str, str, int]]:
        out = []
        log = self.base / "access.log"
        for line in log.read_text().splitlines() if log.exists() else []:
            try:
                request = line.split('"')[1].split()
                status = int(line.split('"')[2].split()[0])
            except (IndexError, ValueError):
                continue
            out.append((request[0], request[1], status))
        return out

    def blobs(self, kind: str = "cas") -> list[Path]:
        d = self.store / kind
        return sorted(d.iterdir()) if d.exists() else []

    def kill(self) -> None:
        """SIGKILL the master and its workers at once, as a crashing host would."""
        pids = [self.proc.pid, *_children(self.proc.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)


def _children(parent: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            out.append(int(p.name))
    return out


@contextmanager
def start_nginx(base: Path, writer: tuple[str, str] | None = None):
    """`writer=(user, password)`: PUT needs those credentials (basic auth), reads do not."""
    require(Path(BINARY).exists(), "nginx is not installed (apt-get install nginx-full)")
    base.mkdir(parents=True, exist_ok=True)
    for d in ("data/forge", "tmp"):
        (base / d).mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = base / "nginx.conf"
    # Started as root, nginx would run its workers as nobody, who cannot enter pytest's
    # private temp directories.
    user = "user root root;" if os.geteuid() == 0 else ""
    auth = ""
    if writer:
        (base / "htpasswd").write_text(f"{writer[0]}:{{PLAIN}}{writer[1]}\n")
        auth = (f'            limit_except GET HEAD {{ auth_basic "forge"; '
                f'auth_basic_user_file {base}/htpasswd; }}')
    conf.write_text(CONFIG.format(base=base, port=port, user=user, auth=auth))
    log = base / "stderr.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([BINARY, "-e", str(base / "error.log"), "-c", str(conf),
                                 "-g", "daemon off;"], stdout=out, stderr=subprocess.STDOUT)
    n = Nginx(f"http://127.0.0.1:{port}/forge", port, base, proc)
    try:
        errors = base / "error.log"
        wait_for_port(port, proc, seconds=20, what="nginx", output=lambda: log.read_text()[-2000:]
                      + (errors.read_text()[-2000:] if errors.exists() else ""))
        yield n
    finally:
        n.kill()


@pytest.fixture
def nginx(tmp_path):
    with start_nginx(tmp_path / "nginx") as n:
        yield n


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of `upstream_port`.

    `faults` is consumed one entry per accepted connection; when it is empty, `mode` applies.
    Modes: "pass"; "503" (answer 503 without asking upstream); "truncate" (forward the
    first response with half its body, then close); "stall" (read the request, never
    answer); "delay:S" (wait S seconds, then pass)."""

    def __init__(self, upstream_port: int, mode: str = "pass"):
        self.upstream = upstream_port
        self.mode = mode
        self.faults: list[str] = []
        self.connections = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._closing = False
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "/forge") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self._closing = True
        self._sock.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                mode = self.faults.pop(0) if self.faults else self.mode
            threading.Thread(target=self._serve, args=(client, mode), daemon=True).start()

    def _serve(self, client: socket.socket, mode: str) -> None:
        try:
            delay = 0.0
            if mode.startswith("delay:"):
                delay = float(mode.split(":", 1)[1])
                mode = "pass"
            if mode == "503":
                _read_head(client)
                client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                               b"Connection: close\r\n\r\n")
                return
            if mode == "stall":
                _read_head(client)
                deadline = time.monotonic() + 30
                while not self._closing and time.monotonic() < deadline:
                    time.sleep(0.1)
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                return  # upstream gone: the client sees its connection closed
            with up:
                t = threading.Thread(target=_pipe, args=(client, up, delay), daemon=True)
                t.start()
                if mode == "truncate":
                    head, rest = _read_head(up)
                    length = _content_length(head)
                    body = rest
                    while length is not None and len(body) < length:
                        chunk = up.recv(65536)
                        if not chunk:
                            break
                        body += chunk
                    cut = body[:len(body) // 2] if length else body
                    client.sendall(head + cut)
                    return
                _pipe(up, client)
        except OSError:
            pass
        finally:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            client.close()


def _read_head(s: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return None


def _pipe(src: socket.socket, dst: socket.socket, delay: float = 0.0) -> None:
    try:
        while True:
            data = src.recv(1 << 20)
            if not data:
                break
            if delay:
                time.sleep(delay)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
