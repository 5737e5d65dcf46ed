"""The Bazel HTTP cache protocol (nginx WebDAV, bazel-remote, most commercial caches).

    GET|HEAD|PUT <base>/cas/<sha256 hex>   blob bytes
    GET|HEAD|PUT <base>/ac/<sha256 hex>    a serialized REAPI v2 ActionResult

404 is a miss. Requests go through the shared HTTP client (`forge.formats.http`): a pool
of keep-alive connections as large as `[remote] jobs`, the proxy variables, the system CAs
plus `[remote] ca_cert`. It retries nothing itself: `transfer.with_retries` decides, so
that a remote that is down costs one short warning. The server checks nothing (nginx
stores whatever it is sent), so every blob is verified by the caller (transfer.Sink) and
every ActionResult is checked against the action (results.py).
"""

from __future__ import annotations

from pathlib import Path

from forge import __version__
from forge.formats.http.client import HttpClient
from forge.formats.http.errors import ConnectError, HttpError, HttpTimeoutError, TlsError
from forge.remote.proto import remote_execution_pb2 as re_pb
from forge.remote.results import Digest
from forge.remote.settings import RemoteSettings
from forge.remote.transfer import RemoteError, with_retries

HEAD_ABOVE = 64 << 10  # smaller blobs are PUT without asking whether the server has them


class HttpStore:
    batch_limit = 0  # one request per blob: HTTP/1.1 has no batches

    def __init__(self, s: RemoteSettings):
        self.s = s
        host = f"[{s.host}]" if ":" in s.host else s.host
        self._base = f"{s.scheme}://{host}:{s.port}{s.path}"
        self._http = HttpClient(timeout=s.timeout, retries=0, ca_bundle=s.ca_cert,
                                user_agent=f"forge/{__version__}",
                                pool_size=s.jobs + 2)  # the transfer threads and 2 uploaders
        self._headers = {}
        if s.authorization:
            self._headers["Authorization"] = s.authorization

    def describe(self) -> str:
        return self.s.url

    def _call(self, method: str, kind: str, h: str, body=None, size: int | None = None,
              consume=None):
        """One request; `consume(response)` reads a 200 body. Returns (status, value)."""
        headers = dict(self._headers)
        if size is not None:
            headers["Content-Length"] = str(size)
            headers["Content-Type"] = "application/octet-stream"
        what = f"{method} {kind}/{h[:16]}..."
        try:
            r = self._http.request(method, f"{self._base}/{kind}/{h}", headers=headers, body=body,
                                   stream=consume is not None)
            value = None
            if r.status == 200 and consume is not None:
                value = consume(r)
            r.close()
        except ConnectError as e:
            raise RemoteError(f"cannot connect to {self.s.url}: {e}", retry=True, down=True) from None
        except HttpTimeoutError:
            raise RemoteError(f"{what} timed out after {self.s.timeout:g} s",
                              retry=True, down=True) from None
        except TlsError as e:
            raise RemoteError(f"{self.s.url}: {e}", down=True) from None
        except HttpError as e:  # reset, cut or stale keep-alive connection: a new one may work
            raise RemoteError(f"{what} failed: {e}", retry=True) from None
        if r.status >= 500 or r.status in (408, 429):
            raise RemoteError(f"{what} answered HTTP {r.status}", retry=True)
        if r.status in (401, 403):
            raise RemoteError(f"{self.s.url} refused {method} with HTTP {r.status}: check the "
                              "credentials (FORGE_REMOTE_TOKEN, the URL or ~/.netrc)")
        return r.status, value

    # --- the protocol --------------------------------------------------------------------

    def get_action_result(self, d: Digest, cancel=None, inline=()) -> re_pb.ActionResult | None:
        status, data = with_retries(lambda: self._call("GET", "ac", d.hash, consume=_read_all),
                                    "ac", cancel)
        if status == 404:
            return None
        if status != 200:
            raise RemoteError(f"GET ac/{d.hash[:16]}... answered HTTP {status}")
        try:
            return re_pb.ActionResult.FromString(data)
        except Exception:  # protobuf's DecodeError: garbage stored under the key
            raise RemoteError(f"the entry ac/{d.hash[:16]}... is not an ActionResult") from None

    def update_action_result(self, d: Digest, result: re_pb.ActionResult, cancel=None) -> None:
        data = result.SerializeToString(deterministic=True)
        self._put("ac", d.hash, data, len(data), cancel)

    def find_missing(self, digests: list[Digest], cancel=None) -> list[Digest]:
        missing = []
        for d in digests:
            if d.size <= HEAD_ABOVE:
                missing.append(d)
                continue
            status, _ = with_retries(lambda: self._call("HEAD", "cas", d.hash), "cas", cancel)
            if status != 200:
                missing.append(d)
        return missing

    def read(self, d: Digest, sink, cancel=None) -> str | None:
        """Fetch a blob into `sink`; its xxh3 once verified, None when the server lacks it."""
        def attempt():
            sink.restart()
            status, _ = self._call("GET", "cas", d.hash, consume=lambda r: _stream(r, sink))
            if status == 404:
                return None
            if status != 200:
                raise RemoteError(f"GET cas/{d.hash[:16]}... answered HTTP {status}")
            return sink.finish()
        return with_retries(attempt, "cas", cancel)

    def write(self, d: Digest, source: Path | bytes, cancel=None) -> None:
        self._put("cas", d.hash, source, d.size, cancel)

    def _put(self, kind: str, h: str, source, size: int, cancel) -> None:
        def attempt():
            if isinstance(source, (bytes, bytearray)):
                status, _ = self._call("PUT", kind, h, body=source, size=size)
            else:
                with open(source, "rb") as f:
                    status, _ = self._call("PUT", kind, h, body=f, size=size)
            if status not in (200, 201, 204):
                raise RemoteError(f"PUT {kind}/{h[:16]}... answered HTTP {status}")
        with_retries(attempt, kind, cancel)

    def close(self) -> None:
        self._http.close()


def _read_all(r) -> bytes:
    chunks: list[bytes] = []
    r.copy_to(chunks.append)
    return b"".join(chunks)


def _stream(r, sink) -> None:
    r.copy_to(sink.write)
