"""HTTP to registries: endpoints (mirrors first when pulling), plain HTTP for loopback and
insecure registries (as Docker does) and verified HTTPS otherwise, redirects, retries with
exponential backoff for connection errors and 5xx answers (never for other 4xx), the
authentication dance on 401, and errors that say what to do.

`requests` counts the requests sent by method (tests use it to prove a second push
uploads nothing).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from forge.formats.image.reference import DOCKER_HUB
from forge.formats.registry.auth import DOCKER_HUB_API, USER_AGENT, Authenticator, auth_key
from forge.formats.registry.errors import (NotFoundError, RegistryAuthError, RegistryError,
                                           RegistryUnavailableError, VerificationError)


@dataclass(frozen=True)
class Endpoint:
    host: str        # host[:port] that requests go to
    scheme: str
    registry: str    # the registry it serves, for credentials and messages

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}"


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes = b""
    stream: http.client.HTTPResponse | None = None
    conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def is_loopback(host: str) -> bool:
    name = urlsplit(f"//{host}").hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Transport:
    """Requests to registries with one configuration; thread-safe."""

    def __init__(self, *, insecure: list[str] | tuple[str, ...] = (),
                 mirrors: dict[str, list[str]] | None = None,
                 docker_config: Path | None = None, timeout: float = 30, retries: int = 3,
                 backoff: float = 0.25):
        self.insecure = [i.split("://", 1)[-1].rstrip("/") for i in insecure]
        self.mirrors = {auth_key(k): list(v) for k, v in (mirrors or {}).items()}
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.requests: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        self._ssl = ssl.create_default_context()
        self.auth = Authenticator(docker_config=docker_config, open=self.open, timeout=timeout,
                                  retries=retries, sleep=self.sleep)

    # ---- endpoints --------------------------------------------------------------------

    def plain_http(self, host: str) -> bool:
        if is_loopback(host):
            return True
        name = urlsplit(f"//{host}").hostname or ""
        for entry in self.insecure:
            if entry in (host, name):
                return True
            try:
                if ipaddress.ip_address(name) in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
        return False

    def endpoint(self, spec: str, registry: str) -> Endpoint:
        if "://" in spec:
            u = urlsplit(spec)
            return Endpoint(u.netloc, u.scheme, registry)
        host = DOCKER_HUB_API if spec == DOCKER_HUB else spec
        return Endpoint(host, "http" if self.plain_http(host) else "https", registry)

    def endpoints(self, registry: str, pull: bool) -> list[Endpoint]:
        mirrors = self.mirrors.get(registry, []) if pull else []
        return [self.endpoint(m.rstrip("/"), registry) for m in mirrors] + \
            [self.endpoint(registry, registry)]

    def each_endpoint(self, registry: str, pull: bool, fn):
        """Mirrors first (pull only), then the registry; the last endpoint's error wins."""
        endpoints = self.endpoints(registry, pull)
        for i, ep in enumerate(endpoints):
            try:
                return fn(ep)
            except RegistryError:
                if i == len(endpoints) - 1:
                    raise

    # ---- HTTP -------------------------------------------------------------------------

    def open(self, method: str, url: str, headers: dict, body: bytes | Path | None):
        u = urlsplit(url)
        if u.scheme == "https":
            conn = http.client.HTTPSConnection(u.netloc, timeout=self.timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(u.netloc, timeout=self.timeout)
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        with self._count_lock:
            self.requests[method] += 1
        try:
            if isinstance(body, Path):
                headers["Content-Length"] = str(body.stat().st_size)
                with body.open("rb") as f:
                    conn.request(method, target, body=f, headers=headers)
            else:
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                conn.request(method, target, body=body, headers=headers)
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    def sleep(self, attempt: int) -> None:
        time.sleep(self.backoff * (2 ** attempt))

    def request(self, ep: Endpoint, method: str, path: str, *, scope: str, what: str,
                 ok: tuple[int, ...] = (200,), headers: dict | None = None,
                 body: bytes | Path | None = None, stream: bool = False) -> Reply:
        url = path if "://" in path else ep.base + path
        attempt = redirects = 0
        authed = False
        while True:
            h = {"User-Agent": USER_AGENT, **(headers or {})}
            same_host = urlsplit(url).netloc == ep.host
            sent = self.auth.authorization(ep.host, scope) if same_host else None
            if sent:
                h["Authorization"] = sent
            try:
                conn, resp = self.open(method, url, h, body)
            except ssl.SSLCertVerificationError as e:
                raise RegistryUnavailableError(
                    f"registry {ep.host}: TLS certificate verification failed ({e.verify_message}); "
                    "install the registry's CA certificate, or list the registry as insecure "
                    "if it speaks plain HTTP") from None
            except (OSError, http.client.HTTPException) as e:
                if attempt < self.retries:
                    self.sleep(attempt)
                    attempt += 1
                    continue
                raise RegistryUnavailableError(
                    f"cannot reach registry {ep.host} ({method} {url}): {e}; check that it is "
                    f"running and the address is right"
                    + (" (it was spoken to over HTTPS: list it as insecure if it speaks plain HTTP)"
                       if ep.scheme == "https" else "")) from None
            status = resp.status
            if status in (301, 302, 303, 307, 308) and redirects < 5 and resp.getheader("Location"):
                url = urljoin(url, resp.getheader("Location"))
                resp.read()
                conn.close()
                redirects += 1
                if status == 303:
                    method, body = "GET", None
                continue
            if status == 401 and not authed and same_host:
                challenge = resp.getheader("WWW-Authenticate", "")
                resp.read()
                conn.close()
                self.auth.authenticate(ep.host, scope, challenge, sent, what)
                authed = True
                continue
            if status >= 500 and attempt < self.retries:
                resp.read()
                conn.close()
                self.sleep(attempt)
                attempt += 1
                continue
            if status in ok:
                if stream:
                    return Reply(status, resp.headers, stream=resp, conn=conn)
                try:
                    data = resp.read()
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    if attempt < self.retries:
                        self.sleep(attempt)
                        attempt += 1
                        continue
                    raise VerificationError(f"{what} from {ep.host}: the body was cut short "
                                            f"({e}); retry, or check the registry") from None
                conn.close()
                return Reply(status, resp.headers, data)
            try:
                data = resp.read()
            except (OSError, http.client.HTTPException):
                data = b""
            conn.close()
            raise self.http_error(ep, status, method, what, data, scope)

    def http_error(self, ep: Endpoint, status: int, method: str, what: str, data: bytes,
                    scope: str) -> RegistryError:
        codes, detail = [], ""
        try:
            errors = json.loads(data).get("errors") or []
            codes = [e.get("code", "") for e in errors]
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        except (ValueError, AttributeError, TypeError):  # not the spec's error body: no detail
            pass
        head = f"registry {ep.host} answered {status} for {what}"
        extra = f" (registry says {detail})" if detail else ""
        if status == 401:
            return RegistryAuthError(f"{head}: unauthorized{extra}: set credentials with docker "
                                     f"login or in ~/.docker/config.json")
        if status == 403:
            return RegistryAuthError(f"{head}: access denied{extra}: the credentials lack the "
                                     f"rights {scope!r}; use an account allowed to "
                                     f"{'push to' if 'push' in scope else 'pull from'} it")
        if status == 404:
            if "NAME_UNKNOWN" in codes:
                why = "the repository does not exist (check its spelling, or push it first)"
            elif what.startswith("manifest") and "@" not in what:
                why = "the tag does not exist (check the tag, or push it first)"
            elif what.startswith("manifest"):
                why = "no manifest with this digest exists in the repository"
            elif what.startswith("blob"):
                why = "the blob is missing from the repository (re-push the image)"
            else:
                why = "not found: is this an OCI registry at this address?"
            return NotFoundError(f"{head}: {why}{extra}")
        if status >= 500:
            return RegistryUnavailableError(f"{head} after {self.retries + 1} attempts: the "
                                            f"registry is failing{extra}; retry later or check "
                                            "its logs")
        return RegistryError(f"{head} ({method}): the request was refused{extra}")
