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

import os
import re
import ssl
import threading
import time
from collections import Counter
from pathlib import Path
from typing import BinaryIO, Mapping
from urllib.parse import urljoin, urlsplit, urlunsplit

import urllib3
from urllib3.exceptions import LocationParseError, ProtocolError, ProxySchemeUnknown, ReadTimeoutError

from forge.formats.http.errors import (ConnectError, HttpError, HttpTimeoutError, TlsError,
                                       TruncatedError)
from forge.formats.http.failures import Failure, shown, status_error, via, why
from forge.formats.http.progress import LARGE, Bar
from forge.formats.http.proxy import ProxySettings
from forge.formats.http.response import CUT, Response, Sink, parse_retry_after

RETRY_STATUSES = frozenset({408, 429, *range(500, 600)}) - {501, 505}
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
# urllib3 follows redirects only; every other retry is this module's (with Retry-After)
_FOLLOW, _STAY = (urllib3.Retry(total=None, connect=0, read=0, other=0, status=0, redirect=n,
                                raise_on_redirect=False, raise_on_status=False,
                                respect_retry_after_header=False) for n in (5, 0))


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
                    raise ConnectError(f"proxy {shown(proxy)} (from the environment) cannot be "
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
            except Failure as f:
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
            except CUT as e:
                r.close()
                if attempt < retries:
                    self._sleep(self.delay(attempt))
                    attempt += 1
                    continue
                raise TruncatedError(f"{method} {url}: the answer was cut short ({why(e)}) "
                                     f"{attempt + 1} times{via(proxy)}; retry later, or check "
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
            raise Failure.of(e, method, url, proxy, self.timeout) from None
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
        chunks = r.chunks()
        try:
            while True:
                try:  # only the wire's failures are cuts: the sink's own errors pass through
                    chunk = next(chunks, None)
                    if chunk is None and total is not None and got < total:
                        raise ProtocolError(f"the connection closed after {got} of {total} bytes")
                except CUT as e:
                    r.close()
                    if cuts >= self.retries:
                        raise self._gave_up(url, e, cuts, got) from None
                    self._sleep(self.delay(cuts))
                    cuts += 1
                    r = self._resume(r.url, headers, got, total, validator)
                    chunks = r.chunks()
                    if r.status == 200:
                        sink.restart()
                        bar.reset()
                        got = 0
                        total = size if size is not None else _int(r.headers.get("Content-Length"))
                    continue
                if chunk is None:
                    return got
                sink.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        finally:
            r.close()
            bar.close()

    def _gave_up(self, url: str, e: BaseException, cuts: int, got: int) -> HttpError:
        if isinstance(e, ReadTimeoutError):
            return HttpTimeoutError(f"GET {url}: no data for {self.timeout:g} s after {got} bytes"
                                    f"{via(self.proxies.proxy_for(url))}; the server stalled: "
                                    "retry later or raise the timeout", url=url)
        return TruncatedError(f"GET {url}: the download was cut {cuts + 1} times (last after "
                              f"{got} bytes: {why(e)}); retry later, or check the server and "
                              "the network", url=url)

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
    """The process's shared client, for callers without settings of their own: its pools
    are shared by every such download. It follows the proxy variables of os.environ, which
    the forge server replaces for each command it runs."""
    global _default
    proxies = ProxySettings.from_env()
    with _default_lock:
        if _default is None or _default.proxies != proxies:
            if _default is not None:
                _default.close()
            _default = HttpClient(timeout=60)
        return _default
