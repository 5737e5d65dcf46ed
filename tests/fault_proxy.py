"""A reverse proxy on 127.0.0.1 that forwards to a real server (the test registry, a
Debian archive) and breaks chosen answers on purpose, as a flaky network or a bad mirror
would. Used by tests/test_faults.py and bench/faults.

    proxy = FaultProxy("127.0.0.1:5000")
    proxy.inject(Fault("reset", "/blobs/"))   # the next matching answer is cut half way
    ... forge pulls from proxy.host ...
    proxy.injected  # {"reset": 1}

Kinds: `status` (answer `status` without asking upstream, e.g. 503, or 429 with a
Retry-After), `reset` (send half the body, then a TCP reset), `truncate` (half the body,
then a clean close: a short read), `stall` (half the body, then silence for `seconds`),
`corrupt` (the whole body, one byte changed). Each fault fires `times` times on requests
whose path contains `path` (GET only: HEAD answers carry no body).
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KINDS = ("status", "reset", "truncate", "stall", "corrupt")
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-authorization", "proxy-authenticate"}


@dataclass
class Fault:
    kind: str
    path: str = ""
    times: int = 1
    status: int = 503
    retry_after: str | None = None
    seconds: float = 0.0

    def __post_init__(self):
        assert self.kind in KINDS, self.kind


@dataclass
class FaultProxy:
    upstream: str  # host:port of the real server
    faults: list[Fault] = field(default_factory=list)
    injected: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Range

    def __post_init__(self):
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def inject(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.times > 0 and f.path in path and (method == "GET" or f.kind == "status"):
                    f.times -= 1
                    self.injected[f.kind] = self.injected.get(f.kind, 0) + 1
                    return f
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _forward(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else None
            proxy.requests.append((self.command, self.path, self.headers.get("Range")))
            fault = proxy.take(self.command, self.path)
            if fault is not None and fault.kind == "status":
                self.send_response(fault.status)
                if fault.retry_after is not None:
                    self.send_header("Retry-After", fault.retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            up = http.client.HTTPConnection(proxy.upstream, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            up.request(self.command, self.path, body=body, headers=headers)
            resp = up.getresponse()
            data = resp.read()
            up.close()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if fault is None or not data:
                self.wfile.write(data)
                return
            half = len(data) // 2
            if fault.kind == "corrupt":
                self.wfile.write(data[:half] + bytes([data[half] ^ 0xFF]) + data[half + 1:])
                return
            self.wfile.write(data[:half])
            self.wfile.flush()
            if fault.kind == "stall":
                time.sleep(fault.seconds)
            if fault.kind == "reset":  # SO_LINGER 0: close sends RST, not FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR) if fault.kind != "reset" else None
            except OSError:
                pass

        do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward

    return Handler
