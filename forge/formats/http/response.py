"""An answer of `HttpClient` (`Response`), where a download goes (`Sink`), and reading
`Retry-After`."""

from __future__ import annotations

import email.utils
import time
from datetime import datetime, timezone
from typing import Iterator, Protocol

import urllib3
from urllib3.exceptions import ProtocolError, ReadTimeoutError, SSLError

from forge.formats.http.errors import HttpTimeoutError, TruncatedError
from forge.formats.http.failures import why

CHUNK = 1 << 20
CUT = (ProtocolError, ReadTimeoutError, SSLError, OSError)  # a body that stopped coming


class Sink(Protocol):
    """Where `download` puts a body: `write` chunks in order; `restart` forgets them all
    (the server sent the file again from its first byte)."""

    def write(self, data: bytes) -> None: ...

    def restart(self) -> None: ...


class Response:
    """An answer: `status`, `headers` (case-insensitive), `url` (after redirects),
    `attempts`; `body` once read (`request(stream=False)` reads it), or `chunks()`."""

    def __init__(self, raw: urllib3.BaseHTTPResponse, url: str, attempts: int):
        self.raw, self.status, self.headers = raw, raw.status, raw.headers
        self.url, self.attempts = url, attempts
        self.body = b""

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The body as it arrives; urllib3's errors pass through (`download` handles them)."""
        yield from self.raw.stream(size, decode_content=False)

    def copy_to(self, write) -> int:
        """Pass the body to `write` chunk by chunk; the bytes passed. A body cut short or
        stalled raises `TruncatedError` or `HttpTimeoutError`, without resuming it."""
        n = 0
        chunks = self.chunks()
        try:
            while True:
                try:  # the wire's failures only; `write`'s own pass through
                    chunk = next(chunks, None)
                except ReadTimeoutError:
                    raise HttpTimeoutError(f"GET {self.url}: the body stalled after {n} bytes",
                                           url=self.url) from None
                except CUT as e:
                    raise TruncatedError(f"GET {self.url}: the body was cut after {n} bytes "
                                         f"({why(e)})", url=self.url) from None
                if chunk is None:
                    break
                write(chunk)
                n += len(chunk)
        finally:
            self.close()
        return n

    def close(self) -> None:
        """Give the connection back to the pool when the body was read, else drop it."""
        if self.raw.isclosed() or self.raw.closed:
            self.raw.release_conn()
            return
        left = self.raw.length_remaining
        if left is not None and left <= 64 << 10:
            try:
                self.raw.drain_conn()  # cheap, and the connection stays usable
            except Exception:
                self.raw.close()
        else:
            self.raw.close()
        self.raw.release_conn()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` value (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now_dt = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
    return max(0.0, (when - now_dt).total_seconds())
