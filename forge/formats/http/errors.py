"""The errors of the HTTP client: one base, `HttpError`, carrying the URL; each message
says what happened and how to fix it. Callers in other domains turn them into their own
errors (a registry that cannot be reached, a Debian mirror that fails)."""

from __future__ import annotations

from forge.formats.errors import FormatError


class HttpError(FormatError):
    """A request that failed on the wire or with an unwanted status."""

    def __init__(self, message: str, *, url: str = ""):
        super().__init__(message)
        self.url = url


class ConnectError(HttpError):
    """No connection: refused, unknown host, or a proxy that would not relay."""


class DroppedError(HttpError):
    """A connection that was reset or closed before the answer (or all of it) came."""


class HttpTimeoutError(HttpError):
    """The server (or the proxy) accepted the connection but did not answer in time."""


class TlsError(HttpError):
    """The server's certificate was not trusted, or the TLS handshake failed."""


class StatusError(HttpError):
    """An answer with a status the caller did not want (after any retries)."""

    def __init__(self, message: str, *, url: str = "", status: int = 0):
        super().__init__(message, url=url)
        self.status = status


class NotFoundError(StatusError):
    """404 or 410: the server has no such file."""


class TruncatedError(DroppedError):
    """The body kept being cut short, even after resuming or restarting it."""
