"""Registry authentication: `WWW-Authenticate` challenges, Bearer tokens and Basic
credentials from the Docker config file (`auths`, `credsStore`, `credHelpers` through
the real `docker-credential-<helper> get` protocol).

`Authenticator` keeps the `Authorization` value per (host, scope) and renews it when a
registry answers 401; it reaches token servers through the HTTP client it is given (the
transport's), so that requests are pooled, proxied, retried and counted in one place.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from forge.formats.http.client import HttpClient
from forge.formats.http.errors import HttpError
from forge.formats.image.reference import DOCKER_HUB, Reference
from forge.formats.registry.errors import RegistryAuthError, RegistryUnavailableError

DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
USER_AGENT = "forge-registry-client/1"
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"

_PARAM = re.compile(rf"\s*({_TOKEN})\s*=\s*(?:\"((?:[^\"\\]|\\.)*)\"|([^\s,\"]+))")
_SCHEME = re.compile(rf"\s*({_TOKEN})(?=\s|$|,)")


@dataclass(frozen=True)
class Challenge:
    """One challenge of a `WWW-Authenticate` header: scheme (lowercase) and parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def parse_www_authenticate(value: str) -> list[Challenge]:
    """Parse `Bearer realm="...",service="...",scope="..."` (several challenges allowed)."""
    challenges: list[Challenge] = []
    pos = 0
    while pos < len(value):
        if value[pos] in ", \t":
            pos += 1
            continue
        m = _PARAM.match(value, pos) if challenges else None
        if m:
            quoted, plain = m.group(2), m.group(3)
            v = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else plain
            challenges[-1].params[m.group(1).lower()] = v
            pos = m.end()
            continue
        m = _SCHEME.match(value, pos)
        if not m:
            break  # token68 or garbage: keep what was understood
        challenges.append(Challenge(m.group(1).lower(), {}))
        pos = m.end()
    return challenges


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def auth_key(server: str) -> str:
    """Normalise a config.json key or registry name: no scheme, no path, Hub as docker.io."""
    host = server.split("://", 1)[-1].split("/", 1)[0].lower()
    return DOCKER_HUB if host in ("index.docker.io", DOCKER_HUB_API, DOCKER_HUB) else host


def token_scope(ref: Reference, push: bool) -> str:
    """The token scope a request on `ref`'s repository needs."""
    return f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"


def _check_config(cfg, path: Path) -> None:
    """The parts of ~/.docker/config.json read here have the types Docker writes."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise RegistryAuthError(f"{path}: {what}: fix it, or log in again with docker login")

    need(isinstance(cfg, dict), "not a JSON object")
    for key in ("auths", "credHelpers"):
        need(isinstance(cfg.get(key) or {}, dict), f"'{key}' is not an object")
    need(isinstance(cfg.get("credsStore") or "", str), "'credsStore' is not a string")
    for name, v in (cfg.get("credHelpers") or {}).items():
        need(isinstance(v, str), f"the credential helper for {name} is not a string")
    for name, entry in (cfg.get("auths") or {}).items():
        if isinstance(entry, dict):
            for field in ("auth", "username", "password", "identitytoken"):
                need(isinstance(entry.get(field) or "", str),
                     f"'{field}' of {name} is not a string")


class Authenticator:
    """Credentials and tokens for one client; thread-safe (one token fetch at a time)."""

    def __init__(self, *, docker_config: Path | None, http: HttpClient, timeout: float):
        self.docker_config = docker_config
        self.timeout = timeout  # for credential helpers
        self._http = http
        self._auth: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self._creds: dict[str, tuple[str | None, str | None, str | None] | None] = {}
        self._config: dict | None = None

    def authorization(self, host: str, scope: str) -> str | None:
        """The `Authorization` value to send to `host` for `scope`, if one is known."""
        return self._auth.get((host, scope))

    def authenticate(self, host: str, scope: str, header: str, sent: str | None,
                     what: str) -> None:
        """Answer a 401 whose `WWW-Authenticate` is `header`; `sent` is what was tried."""
        with self._lock:
            current = self._auth.get((host, scope))
            if current and current != sent:
                return  # another thread already renewed it
            challenges = {c.scheme: c for c in parse_www_authenticate(header)}
            if "bearer" in challenges:
                value = "Bearer " + self._fetch_token(host, challenges["bearer"], scope, what)
            elif "basic" in challenges:
                user, password, _ = self.credentials(host) or (None, None, None)
                if user is None:
                    raise RegistryAuthError(
                        f"registry {host} answered 401 for {what}: unauthorized (it asks for a "
                        f"user name and password): set credentials with docker login or in "
                        f"~/.docker/config.json")
                value = "Basic " + basic(user, password or "")
            else:
                raise RegistryAuthError(f"registry {host} answered 401 for {what} with an "
                                        f"authentication scheme this client does not speak: "
                                        f"{header!r}")
            self._auth[(host, scope)] = value

    def _fetch_token(self, host: str, ch: Challenge, scope: str, what: str) -> str:
        realm = ch.params.get("realm")
        if not realm:
            raise RegistryAuthError(f"registry {host} sent a Bearer challenge without a realm: "
                                    f"{ch.params}")
        try:
            urlsplit(realm)
        except ValueError as e:  # e.g. realm="http://[::1"
            raise RegistryAuthError(f"registry {host} sent a Bearer challenge whose realm "
                                    f"{realm!r} is not a URL: {e}") from None
        scopes = [scope] + ([ch.params["scope"]] if ch.params.get("scope") not in (None, scope)
                            else [])
        user, password, identity = self.credentials(host) or (None, None, None)
        headers = {"User-Agent": USER_AGENT}
        service = ch.params.get("service")
        if identity:
            form = {"grant_type": "refresh_token", "refresh_token": identity,
                    "client_id": "forge", "scope": " ".join(scopes)}
            if service:
                form["service"] = service
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            method, url, body = "POST", realm, urlencode(form).encode()
        else:
            query = ([("service", service)] if service else []) + [("scope", s) for s in scopes]
            sep = "&" if urlsplit(realm).query else "?"
            method, url, body = "GET", realm + sep + urlencode(query), None
            if user is not None:
                headers["Authorization"] = "Basic " + basic(user, password or "")
        token_host = urlsplit(url).netloc
        try:  # connection errors and 5xx are retried by the client
            resp = self._http.request(method, url, headers=headers, body=body)
        except HttpError as e:
            raise RegistryUnavailableError(f"cannot reach the token server {token_host} of "
                                           f"registry {host}: {e}") from None
        data = resp.body
        if resp.status in (401, 403):
            how = ("the stored credentials were refused: log in again with docker login"
                   if user or identity else
                   "set credentials with docker login or in ~/.docker/config.json")
            raise RegistryAuthError(f"registry {host}: the token server {token_host} answered "
                                    f"{resp.status} for {what}: unauthorized: {how}")
        if resp.status != 200:
            raise RegistryAuthError(f"registry {host}: the token server {token_host} answered "
                                    f"{resp.status}: {data[:200]!r}")
        try:
            doc = json.loads(data)
            token = doc.get("token") or doc["access_token"]
        except (ValueError, KeyError, AttributeError):
            token = None
        # A header value: text that http.client can send (latin-1, one line).
        if not isinstance(token, str) or not token.isprintable() or not token.isascii():
            raise RegistryAuthError(f"registry {host}: the token server {token_host} answered "
                                    "without a token or access_token") from None
        return token

    def _load_config(self) -> dict:
        if self._config is None:
            self._config = {}
            if self.docker_config and self.docker_config.is_file():
                try:
                    self._config = json.loads(self.docker_config.read_text())
                except ValueError as e:
                    raise RegistryAuthError(f"{self.docker_config} is not valid JSON ({e}): fix "
                                            "or remove it") from None
                _check_config(self._config, self.docker_config)
        return self._config

    def credentials(self, host: str) -> tuple[str | None, str | None, str | None] | None:
        """(user, password, identity token) for a registry host, or None."""
        key = auth_key(host if host != DOCKER_HUB_API else DOCKER_HUB)
        if key in self._creds:
            return self._creds[key]
        cfg = self._load_config()
        creds = None
        helper = {auth_key(k): v for k, v in (cfg.get("credHelpers") or {}).items()}.get(key)
        if helper:
            creds = self._run_helper(helper, key, "credHelpers")
        else:
            for k, entry in (cfg.get("auths") or {}).items():
                if auth_key(k) != key or not isinstance(entry, dict):
                    continue
                if entry.get("auth"):
                    try:
                        user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
                    except (ValueError, UnicodeDecodeError):
                        raise RegistryAuthError(f"the 'auth' entry for {k} in {self.docker_config}"
                                                " is not base64 of user:password: log in again")\
                            from None
                    creds = (user, pw, entry.get("identitytoken"))
                elif entry.get("username") or entry.get("identitytoken"):
                    creds = (entry.get("username"), entry.get("password"),
                             entry.get("identitytoken"))
            if creds is None and cfg.get("credsStore"):
                creds = self._run_helper(cfg["credsStore"], key, "credsStore")
        self._creds[key] = creds
        return creds

    def _run_helper(self, helper: str, key: str, origin: str):
        program = f"docker-credential-{helper}"
        server = DOCKER_HUB_AUTH_KEY if key == DOCKER_HUB else key
        try:
            p = subprocess.run([program, "get"], input=server, capture_output=True, text=True,
                               timeout=self.timeout)
        except FileNotFoundError:
            raise RegistryAuthError(f"credential helper {program} (named by {origin} in "
                                    f"{self.docker_config}) is not installed: install it, or "
                                    f"remove {origin} from that file") from None
        except subprocess.TimeoutExpired:
            raise RegistryAuthError(f"credential helper {program} did not answer within "
                                    f"{self.timeout}s") from None
        if p.returncode != 0:
            out = (p.stdout + p.stderr).strip()
            if "credentials not found" in out.lower():
                return None
            raise RegistryAuthError(f"credential helper {program} failed for {server} (exit "
                                    f"{p.returncode}): {out[-300:]}")
        try:
            doc = json.loads(p.stdout)
            user, secret = doc["Username"], doc["Secret"]
        except (ValueError, KeyError, TypeError):
            raise RegistryAuthError(f"credential helper {program} printed something that is not "
                                    f"its JSON answer: {p.stdout[:200]!r}") from None
        return (None, None, secret) if user == "<token>" else (user, secret, None)
