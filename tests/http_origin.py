"""A loopback HTTP/1.1 origin server for the HTTP client's tests: keep-alive, `Range`,
strong ETags, faults scripted per path, and what a test needs to see from the server's
side (connections accepted, requests with their headers, peers and times).

Faults, consumed one per request of that path (`origin.faults[path] = [...]`):
"cut" (announce the whole length, send half the body, close), "ignore-range" (answer 200
with the whole file to a Range request), "bad-range" (answer 206 from byte 0 whatever was
asked), "stall" (never answer), "stall-body" (send half the body, then nothing),
"STATUS" or "STATUS:RETRY-AFTER" (e.g. "503:1", "429:<HTTP date>").

`only_from`: a peer address; connections from any other are answered 403, so a test can
prove that requests came through a proxy bound to that address. `tls`: (certificate, key)
files to speak HTTPS with.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Seen:
    method: str
    path: str
    headers: dict
    peer: str
    at: float


class Origin:
    def __init__(self, files: dict[str, bytes], host: str = "127.0.0.1",
                 only_from: str | None = None, tls: tuple | None = None):
        self.files, self.only_from = dict(files), only_from
        self.faults: dict[str, list[str]] = {}
        self.seen: list[Seen] = []
        self.connections = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as real servers do: no 40 ms delayed-ACK stalls

            def setup(self):
                super().setup()
                with origin._lock:
                    origin.connections += 1

            def log_message(self, *args):
                pass

            def do_GET(self):
                origin._answer(self)

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if tls:
            import ssl
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*map(str, tls))
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.host = f"{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}{path}"

    def requests(self, path: str | None = None) -> list[Seen]:
        return [s for s in self.seen if path is None or s.path == path]

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        peer = h.client_address[0]
        with self._lock:
            self.seen.append(Seen(h.command, h.path, dict(h.headers), peer, time.monotonic()))
            queue = self.faults.get(h.path) or []
            fault = queue.pop(0) if queue else ""
        if self.only_from and peer != self.only_from:
            return _send(h, 403, {}, b"direct connections are refused: use the proxy\n",
                         close=True)
        if fault == "stall":
            self.stop.wait(60)
            return
        if fault[:1].isdigit():
            status, _, after = fault.partition(":")
            return _send(h, int(status), {"Retry-After": after} if after else {}, b"busy\n")
        if h.path not in self.files:
            return _send(h, 404, {}, b"not found\n")
        data = self.files[h.path]
        headers = {"ETag": '"%s"' % hashlib.sha256(data).hexdigest()[:16],
                   "Accept-Ranges": "bytes"}
        status, body = 200, data
        m = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        if m and fault != "ignore-range":
            start = 0 if fault == "bad-range" else int(m.group(1))
            status, body = 206, data[start:]
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if fault in ("cut", "stall-body"):
            h.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(body[:len(body) // 2])
            h.wfile.flush()
            if fault == "stall-body":
                self.stop.wait(60)
            h.close_connection = True
            return
        _send(h, status, headers, b"" if h.command == "HEAD" else body,
              length=len(body))


def _send(h, status: int, headers: dict, body: bytes, *, close: bool = False,
          length: int | None = None) -> None:
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body) if length is None else length))
    if close:
        h.send_header("Connection", "close")
        h.close_connection = True
    h.end_headers()
    h.wfile.write(body)
