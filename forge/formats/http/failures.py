"""What went wrong, in words: the errors for requests that got no answer (`Failure`, and
whether to retry them) and for unwanted statuses (`status_error`)."""

from __future__ import annotations

from urllib.parse import urlsplit

from urllib3.exceptions import (ConnectTimeoutError, LocationParseError, MaxRetryError,
                                NewConnectionError, ProtocolError, ProxyError, ReadTimeoutError,
                                SSLError)

from forge.formats.http.errors import (ConnectError, DroppedError, HttpError, HttpTimeoutError,
                                       NotFoundError, StatusError, TlsError)


class Failure(Exception):
    """A request that got no answer: whether to retry it, and the error to raise if not."""

    def __init__(self, retry: bool, make):
        self.retry, self.error = retry, make

    @classmethod
    def of(cls, e: BaseException, method: str, url: str, proxy: str | None, timeout: float):
        if isinstance(e, MaxRetryError) and e.reason is not None:
            e = e.reason
        where = f"{method} {url}"
        through = via(proxy)
        if isinstance(e, ProxyError):
            return cls(True, lambda n: ConnectError(
                f"{where}: the proxy {shown(proxy)} failed ({why(e)}) after {n} attempt(s): "
                "check that the proxy runs and allows this host, or list the host in NO_PROXY",
                url=url))
        if isinstance(e, SSLError):
            return cls(False, lambda n: TlsError(
                f"{where}: TLS failed ({why(e)}){through}: if the server's certificate is signed "
                "by a private CA, add that CA (ca_cert); check the URL's host name", url=url))
        # NewConnectionError derives from ConnectTimeoutError in urllib3: test it first
        if isinstance(e, (NewConnectionError, ConnectionRefusedError)):
            return cls(True, lambda n: ConnectError(
                f"{where}: cannot connect ({why(e)}; {n} attempt(s)){through}: check that it is "
                "running and the address is right", url=url))
        if isinstance(e, (ConnectionError, ProtocolError)):
            return cls(True, lambda n: DroppedError(
                f"{where}: the connection was dropped before an answer ({why(e)}; {n} "
                f"attempt(s)){through}: retry later, or check the server", url=url))
        if isinstance(e, (ConnectTimeoutError, ReadTimeoutError, TimeoutError)):
            return cls(True, lambda n: HttpTimeoutError(
                f"{where}: no answer within {timeout:g} s ({n} attempt(s)){through}: the server is "
                "stalled or overloaded; retry later, or raise the timeout", url=url))
        if isinstance(e, (LocationParseError, ValueError)) and not isinstance(e, OSError):
            return cls(False, lambda n: HttpError(f"{url!r} is not a URL forge can fetch "
                                                  f"({e}): use http:// or https://", url=url))
        return cls(True, lambda n: ConnectError(f"{where}: {why(e)} ({n} attempt(s)){through}",
                                                url=url))


def status_error(r, method: str, what: str | None = None) -> StatusError:
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


def why(e: BaseException) -> str:
    """The innermost, human part of urllib3's nested messages."""
    while isinstance(e, MaxRetryError) and e.reason is not None:
        e = e.reason
    text = str(e.args[-1] if getattr(e, "args", None) else e)
    if isinstance(e, NewConnectionError):
        text = str(e).split("new connection: ", 1)[-1]
    return text.strip() or type(e).__name__


def via(proxy: str | None) -> str:
    return f" (through the proxy {shown(proxy)})" if proxy else ""


def shown(proxy: str | None) -> str:
    """A proxy URL without its password."""
    u = urlsplit(proxy or "")
    if u.password is None:
        return proxy or ""
    return proxy.replace(f":{u.password}@", ":***@", 1)
