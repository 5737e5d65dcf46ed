"""HTTP to registries: endpoints (mirrors first when pulling), plain HTTP for loopback and
insecure registries (as Docker does) and verified HTTPS otherwise (the system CAs plus an
optional `ca_bundle`), redirects (credentials only to the registry's own host), the
authentication dance on 401, and errors that say what to do. Connections, proxies,
timeouts and retries (connection errors, 429 and 5xx, never other 4xx) are the shared
HTTP client's (`forge.formats.http.client`).

`requests` counts the requests sent by method (tests use it to prove a second push
uploads nothing).
"""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping
from urllib.parse import urljoin, urlsplit

from forge.formats.http.client import HttpClient, Response
from forge.formats.http.errors import HttpError, TlsError
from forge.formats.image.reference import DOCKER_HUB
from forge.formats.registry.auth import DOCKER_HUB_API, USER_AGENT, Authenticator, auth_key
from forge.formats.registry.errors import (NotFoundError, RegistryAuthError, RegistryError,
                                           RegistryUnavailableError)


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
    headers: Mapping[str, str]
    body: bytes = b""
    stream: Response | None = None            # the open answer, when asked to stream
    sent: dict[str, str] = field(default_factory=dict)  # the headers that got it (to resume)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


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
                 backoff: float = 0.25, ca_bundle: str | Path | None = None,
                 env: Mapping[str, str] | None = None):
        self.insecure = [i.split("://", 1)[-1].rstrip("/") for i in insecure]
        self.mirrors = {auth_key(k): list(v) for k, v in (mirrors or {}).items()}
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        try:
            self.http = HttpClient(timeout=timeout, retries=retries, backoff=backoff,
                                   ca_bundle=ca_bundle, user_agent=USER_AGENT, env=env)
        except HttpError as e:  # an unreadable CA bundle
            raise RegistryError(str(e)) from None
        self.auth = Authenticator(docker_config=docker_config, http=self.http, timeout=timeout)

    @property
    def requests(self) -> Counter[str]:
        return self.http.requests

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

    def request(self, ep: Endpoint, method: str, path: str, *, scope: str, what: str,
                 ok: tuple[int, ...] = (200,), headers: dict | None = None,
                 body: bytes | Path | None = None, stream: bool = False) -> Reply:
        url = path if "://" in path else ep.base + path
        redirects = 0
        authed = False
        while True:
            h = {"User-Agent": USER_AGENT, **(headers or {})}
            same_host = urlsplit(url).netloc == ep.host
            sent = self.auth.authorization(ep.host, scope) if same_host else None
            if sent:
                h["Authorization"] = sent
            try:
                r = self.http.request(method, url, headers=h, body=body, stream=stream,
                                      redirect=False)
            except TlsError as e:
                raise RegistryUnavailableError(
                    f"registry {ep.host}: {e}; or list the registry as insecure if it speaks "
                    "plain HTTP") from None
            except HttpError as e:  # no answer, or a body cut short every time
                raise RegistryUnavailableError(
                    f"cannot reach registry {ep.host}: {e}"
                    + (" (it was spoken to over HTTPS: list it as insecure if it speaks plain HTTP)"
                       if ep.scheme == "https" else "")) from None
            status = r.status
            if status in (301, 302, 303, 307, 308) and redirects < 5 and r.headers.get("Location"):
                url = urljoin(url, r.headers["Location"])
                r.close()
                redirects += 1
                if status == 303:
                    method, body = "GET", None
                continue
            if status == 401 and not authed and same_host:
                challenge = r.headers.get("WWW-Authenticate", "")
                r.close()
                self.auth.authenticate(ep.host, scope, challenge, sent, what)
                authed = True
                continue
            if status in ok:
                return Reply(status, r.headers, r.body, stream=r if stream else None, sent=h)
            data = r.body
            if stream:
                try:
                    data = r.raw.read(decode_content=False)
                except Exception:  # urllib3's errors for a cut body: the status says enough
                    data = b""
                r.close()
            raise self.http_error(ep, status, method, what, data, scope, r.attempts)

    def http_error(self, ep: Endpoint, status: int, method: str, what: str, data: bytes,
                    scope: str, attempts: int = 1) -> RegistryError:
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
            return RegistryUnavailableError(f"{head} after {attempts} attempts: the "
                                            f"registry is failing{extra}; retry later or check "
                                            "its logs")
        return RegistryError(f"{head} ({method}): the request was refused{extra}")
