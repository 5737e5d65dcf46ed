"""`HttpClient`: every HTTP request forge sends goes through one of these.

* Connections are pooled per host (urllib3), so a thousand small GETs to one server cost
  one TCP (and TLS) handshake per worker thread, not one per request.
* A proxy is chosen per URL from the environment as curl does (`proxy`); HTTPS goes
  through a proxy with CONNECT, so the proxy never sees the bytes.
* TLS trusts the system CA store plus `ca_bundle` (a company CA), never instead of it.
* Connection errors, timeouts, 429 and 5xx (not 501/505) are retried with exponential
  backoff; a `Retry-After` (seconds or an HTTP date) replaces the backoff; every wait is
  capped at `max_wait`, so a server cannot park a build for an hour.
* `download` resumes a cut body with `Range` (and `If-Range`, so a file that changed
  meanwhile comes whole): a `206` must start where the cut was (`Content-Range`), a `200`
  means the server ignored the range and the sink starts over. The caller verifies the
  digest of the result; nothing here trusts the bytes.

`requests` counts the requests sent by method (tests use it).
"""

from __future__ import annotations

import email.utils
import os
import re
import ssl
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping, Protocol
from urllib.parse import urljoin, urlsplit, urlunsplit

import urllib3
from urllib3.exceptions import (ConnectTimeoutError, LocationParseError, MaxRetryError,
                                NewConnectionError, ProtocolError, ProxyError,
                                ProxySchemeUnknown, ReadTimeoutError, SSLError)

from forge.formats.http.errors import (ConnectError, DroppedError, HttpError, HttpTimeoutError,
                                       NotFoundError, StatusError, TlsError, TruncatedError)
from forge.formats.http.progress import LARGE, Bar
from forge.formats.http.proxy import ProxySettings

CHUNK = 1 << 20
RETRY_STATUSES = frozenset({408, 429, *range(500, 600)}) - {501, 505}
_CUT = (ProtocolError, ReadTimeoutError, SSLError, OSError)  # a body that stopped coming
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
# urllib3 follows redirects only; every other retry is this module's (with Retry-After)
_FOLLOW, _STAY = (urllib3.Retry(total=None, connect=0, read=0, other=0, status=0, redirect=n,
                                raise_on_redirect=False, raise_on_status=False,
                                respect_retry_after_header=False) for n in (5, 0))


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
        try:
            for chunk in self.chunks():
                write(chunk)
                n += len(chunk)
        except ReadTimeoutError:
            raise HttpTimeoutError(f"GET {self.url}: the body stalled after {n} bytes",
                                   url=self.url) from None
        except _CUT as e:
            raise TruncatedError(f"GET {self.url}: the body was cut after {n} bytes "
                                 f"({_why(e)})", url=self.url) from None
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


class HttpClient:
    """Pooled, proxied, retrying HTTP; thread-safe. `env` replaces os.environ for the
    proxy variables (tests); `sleep` is what waits between attempts."""

    def __init__(self, *, timeout: float = 30.0, connect_timeout: float | None = None,
                 retries: int = 3, backoff: float = 0.25, max_wait: float = 30.0,
                 ca_bundle: str | os.PathLike | None = None, user_agent: str = "forge",
                 env: Mapping[str, str] | None = None, pool_size: int = 10,
                 progress_threshold: int = LARGE, sleep=time.sleep):
        self.timeout, self.retries, self.backoff, self.max_wait = timeout, retries, backoff, max_wait
        self.user_agent, self.progress_threshold, self._sleep = user_agent, progress_threshold, sleep
        self._timeout = urllib3.Timeout(connect=connect_timeout or timeout, read=timeout)
        self.proxies = ProxySettings.from_env(env)
        self._ssl = ssl.create_default_context()
        if ca_bundle:
            try:
                self._ssl.load_verify_locations(cafile=os.fspath(ca_bundle))
            except (OSError, ssl.SSLError) as e:
                raise TlsError(f"the CA bundle {ca_bundle} cannot be loaded ({e}): point it at "
                               "a readable PEM file of CA certificates") from None
        self._pool_size = pool_size
        self._direct = urllib3.PoolManager(num_pools=50, maxsize=pool_size, ssl_context=self._ssl)
        self._via: dict[str, urllib3.ProxyManager] = {}
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()

    # ---- pools ---------------------------------------------------------------------------

    def _manager(self, url: str) -> tuple[urllib3.PoolManager, str | None]:
        proxy = self.proxies.proxy_for(url)
        if proxy is None:
            return self._direct, None
        with self._lock:
            manager = self._via.get(proxy)
            if manager is None:
                u = urlsplit(proxy)
                headers = None
                if u.username is not None:
                    auth = f"{u.username}:{u.password or ''}"
                    headers = urllib3.make_headers(proxy_basic_auth=auth)
                    proxy_url = urlunsplit((u.scheme, u.hostname + (f":{u.port}" if u.port else ""),
                                            u.path, "", ""))
                else:
                    proxy_url = proxy
                try:
                    manager = urllib3.ProxyManager(proxy_url, num_pools=50, maxsize=self._pool_size,
                                                   proxy_headers=headers, ssl_context=self._ssl,
                                                   proxy_ssl_context=self._ssl)
                except (ProxySchemeUnknown, ValueError, LocationParseError) as e:
                    raise ConnectError(f"proxy {_shown(proxy)} (from the environment) cannot be "
                                       f"used ({e}): set HTTPS_PROXY/HTTP_PROXY to an http:// or "
                                       "https:// proxy, or unset it", url=url) from None
                self._via[proxy] = manager
        return manager, proxy

    def close(self) -> None:
        self._direct.clear()
        with self._lock:
            for m in self._via.values():
                m.clear()

    # ---- requests ------------------------------------------------------------------------

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds before attempt `attempt + 1`: `Retry-After` if the server sent one, else
        exponential backoff; capped at `max_wait`."""
        wait = parse_retry_after(retry_after)
        if wait is None:
            wait = self.backoff * (2 ** attempt)
        return min(wait, self.max_wait)

    def wait(self, attempt: int) -> None:
        """Sleep the backoff before attempt `attempt + 1`."""
        self._sleep(self.delay(attempt))

    def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                body: bytes | Path | BinaryIO | None = None, stream: bool = False,
                redirect: bool = True, retries: int | None = None) -> Response:
        """Send a request, retrying what is worth retrying; the last answer is returned
        whatever its status (`check` turns an unwanted one into an error). Raises an
        `HttpError` when no answer came. With `stream`, the body is left to `chunks()` or
        `download()`; otherwise it is in `.body`."""
        retries = self.retries if retries is None else retries
        h = {"User-Agent": self.user_agent, **(headers or {})}
        start = body.tell() if hasattr(body, "tell") else 0
        attempt = 0
        while True:
            try:
                raw, proxy = self._send(method, url, h, body, start, redirect)
            except _Failure as f:
                if f.retry and attempt < retries:
                    self._sleep(self.delay(attempt))
                    attempt += 1
                    continue
                raise f.error(attempt + 1) from None
            if raw.status in RETRY_STATUSES and attempt < retries:
                wait = self.delay(attempt, raw.headers.get("Retry-After"))
                Response(raw, url, attempt + 1).close()
                self._sleep(wait)
                attempt += 1
                continue
            r = Response(raw, _final_url(raw, url), attempt + 1)
            if stream:
                return r
            try:
                r.body = raw.read(decode_content=False)
                r.close()
                return r
            except _CUT as e:
                r.close()
                if attempt < retries:
                    self._sleep(self.delay(attempt))
                    attempt += 1
                    continue
                raise TruncatedError(f"{method} {url}: the answer was cut short ({_why(e)}) "
                                     f"{attempt + 1} times{_via(proxy)}; retry later, or check "
                                     "the server and the network", url=url) from None

    def _send(self, method, url, headers, body, start, redirect):
        manager, proxy = self._manager(url)
        with self._lock:
            self.requests[method] += 1
        opened = None
        h = dict(headers)
        try:
            if isinstance(body, Path):
                h.setdefault("Content-Length", str(body.stat().st_size))
                opened = data = body.open("rb")
            elif hasattr(body, "read"):
                body.seek(start)
                data = body
            else:
                data = body
                if body is not None:
                    h.setdefault("Content-Length", str(len(body)))
            raw = manager.urlopen(method, url, body=data, headers=h, redirect=redirect,
                                  retries=_FOLLOW if redirect else _STAY,
                                  preload_content=False, decode_content=False,
                                  timeout=self._timeout, assert_same_host=False)
            return raw, proxy
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as e:
            raise _Failure.of(e, method, url, proxy, self.timeout) from None
        finally:
            if opened is not None:
                opened.close()

    def check(self, r: Response, method: str, what: str | None = None,
              ok: tuple[int, ...] = (200,)) -> Response:
        """`r` if its status is in `ok`, else the `StatusError` that explains it."""
        if r.status in ok:
            return r
        r.close()
        raise status_error(r, method, what)

    def get(self, url: str, *, headers: Mapping[str, str] | None = None) -> bytes:
        """The body of a 200 answer to GET `url`."""
        return self.check(self.request("GET", url, headers=headers), "GET").body

    # ---- downloads -----------------------------------------------------------------------

    def download(self, url: str, sink: Sink, *, headers: Mapping[str, str] | None = None,
                 size: int | None = None, label: str | None = None,
                 response: Response | None = None) -> int:
        """GET `url` (or continue `response`, a streamed 200) into `sink`; the number of
        bytes written. A cut body is resumed or restarted (module docstring)."""
        headers = dict(headers or {})
        r = response or self.check(self.request("GET", url, headers=headers, stream=True), "GET")
        total = size if size is not None else _int(r.headers.get("Content-Length"))
        validator = _validator(r.headers)
        bar = Bar(total, label or url, threshold=self.progress_threshold)
        got = cuts = 0
        try:
            while True:
                try:
                    for chunk in r.chunks():
                        sink.write(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
                    r.close()
                    if total is not None and got < total:
                        raise ProtocolError(f"the connection closed after {got} of {total} bytes")
                    return got
                except _CUT as e:
                    r.close()
                    if cuts >= self.retries:
                        if isinstance(e, ReadTimeoutError):
                            raise HttpTimeoutError(
                                f"GET {url}: no data for {self.timeout:g} s after {got} bytes"
                                f"{_via(self.proxies.proxy_for(url))}; the server stalled: retry "
                                "later or raise the timeout", url=url) from None
                        raise TruncatedError(
                            f"GET {url}: the download was cut {cuts + 1} times (last after {got}"
                            f" bytes: {_why(e)}); retry later, or check the server and the "
                            "network", url=url) from None
                    self._sleep(self.delay(cuts))
                    cuts += 1
                    r = self._resume(r.url, headers, got, total, validator)
                    if r.status == 200:
                        sink.restart()
                        bar.reset()
                        got = 0
                        total = size if size is not None else _int(r.headers.get("Content-Length"))
        finally:
            bar.close()

    def _resume(self, url: str, headers: dict, got: int, total: int | None,
                validator: str | None) -> Response:
        """The rest of a body from byte `got`, or (status 200) the whole of it again."""
        h = {**headers, "Range": f"bytes={got}-"}
        if validator:
            h["If-Range"] = validator
        r = self.request("GET", url, headers=h, stream=True)
        if r.status == 206:
            m = _CONTENT_RANGE.fullmatch((r.headers.get("Content-Range") or "").strip())
            whole = m and m.group(3) != "*" and int(m.group(3))
            if m and int(m.group(1)) == got and (total is None or not whole or whole == total):
                return r
            r.close()  # a range other than the one asked for: take the whole file again
        elif r.status == 200:
            return r
        elif r.status != 416:
            return self.check(r, "GET")
        else:
            r.close()
        return self.check(self.request("GET", url, headers=headers, stream=True), "GET")


# ---- errors --------------------------------------------------------------------------------

class _Failure(Exception):
    """A request that got no answer: whether to retry it, and the error to raise if not."""

    def __init__(self, retry: bool, make):
        self.retry, self.error = retry, make

    @classmethod
    def of(cls, e: BaseException, method: str, url: str, proxy: str | None, timeout: float):
        if isinstance(e, MaxRetryError) and e.reason is not None:
            e = e.reason
        where = f"{method} {url}"
        via = _via(proxy)
        if isinstance(e, ProxyError):
            return cls(True, lambda n: ConnectError(
                f"{where}: the proxy {_shown(proxy)} failed ({_why(e)}) after {n} attempt(s): "
                "check that the proxy runs and allows this host, or list the host in NO_PROXY",
                url=url))
        if isinstance(e, SSLError):
            return cls(False, lambda n: TlsError(
                f"{where}: TLS failed ({_why(e)}){via}: if the server's certificate is signed "
                "by a private CA, add that CA (ca_cert); check the URL's host name", url=url))
        # NewConnectionError derives from ConnectTimeoutError in urllib3: test it first
        if isinstance(e, (NewConnectionError, ConnectionRefusedError)):
            return cls(True, lambda n: ConnectError(
                f"{where}: cannot connect ({_why(e)}; {n} attempt(s)){via}: check that it is "
                "running and the address is right", url=url))
        if isinstance(e, (ConnectionError, ProtocolError)):
            return cls(True, lambda n: DroppedError(
                f"{where}: the connection was dropped before an answer ({_why(e)}; {n} "
                f"attempt(s)){via}: retry later, or check the server", url=url))
        if isinstance(e, (ConnectTimeoutError, ReadTimeoutError, TimeoutError)):
            return cls(True, lambda n: HttpTimeoutError(
                f"{where}: no answer within {timeout:g} s ({n} attempt(s)){via}: the server is "
                "stalled or overloaded; retry later, or raise the timeout", url=url))
        if isinstance(e, (LocationParseError, ValueError)) and not isinstance(e, OSError):
            return cls(False, lambda n: HttpError(f"{url!r} is not a URL forge can fetch "
                                                  f"({e}): use http:// or https://", url=url))
        return cls(True, lambda n: ConnectError(f"{where}: {_why(e)} ({n} attempt(s)){via}",
                                                url=url))


def status_error(r: Response, method: str, what: str | None = None) -> StatusError:
    """The error for an unwanted status: what was asked, what came back, what to do."""
    s, head = r.status, f"{method} {r.url}" + (f" ({what})" if what else "")
    after = f" after {r.attempts} attempts" if r.attempts > 1 else ""
    if s in (404, 410):
        return NotFoundError(f"{head}: the server has no such file (HTTP {s}): check the URL",
                             url=r.url, status=s)
    if s == 407:
        how = ("the proxy wants credentials: put them in the proxy URL "
               "(http://user:password@proxy:port)")
    elif s in (401, 403):
        how = "access refused: check the credentials, or whether this URL is public"
    elif s == 429:
        how = f"the server is rate-limiting requests{after}: retry later"
    elif s >= 500:
        how = f"the server is failing{after}: retry later, or check the server"
    else:
        how = "the request was refused"
    return StatusError(f"{head}: HTTP {s} {r.raw.reason or ''}".rstrip() + f": {how}",
                       url=r.url, status=s)


def _why(e: BaseException) -> str:
    """The innermost, human part of urllib3's nested messages."""
    while isinstance(e, MaxRetryError) and e.reason is not None:
        e = e.reason
    text = str(e.args[-1] if getattr(e, "args", None) else e)
    if isinstance(e, NewConnectionError):
        text = str(e).split("new connection: ", 1)[-1]
    return text.strip() or type(e).__name__


def _via(proxy: str | None) -> str:
    return f" (through the proxy {_shown(proxy)})" if proxy else ""


def _shown(proxy: str | None) -> str:
    """A proxy URL without its password."""
    u = urlsplit(proxy or "")
    if u.password is None:
        return proxy or ""
    return proxy.replace(f":{u.password}@", ":***@", 1)


def _final_url(raw, url: str) -> str:
    """The URL that answered: urllib3 gives a path, or a URL after a redirect."""
    return urljoin(url, getattr(raw, "url", None) or url)


def _int(value: str | None) -> int | None:
    return int(value) if value and value.strip().isdigit() else None


def _validator(headers) -> str | None:
    """What `If-Range` may carry: a strong ETag, else Last-Modified."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


_default: HttpClient | None = None
_default_lock = threading.Lock()


def default_client() -> HttpClient:
    """The process's shared client (proxies from os.environ), for callers without their
    own settings: its pools are shared by every such download."""
    global _default
    with _default_lock:
        if _default is None:
            _default = HttpClient(timeout=60)
        return _default
