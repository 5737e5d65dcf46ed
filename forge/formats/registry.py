"""A client for the OCI distribution API (Docker Registry HTTP API v2), standard library only.

Pulling writes an OCI image layout (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`) that
holds one platform's image; pushing reads such a layout. Everything fetched is verified,
because a registry or a mirror is not trusted to send what was asked for:

* manifests are requested with an Accept header naming the OCI and Docker v2 manifest and
  index types (without it a registry may answer with a schema-1 manifest, whose digest
  differs), and `sha256(body)` must equal both the `Docker-Content-Digest` header and the
  digest the reference or the parent index asked for; the bytes are stored exactly as
  served so that the digest stays stable;
* every blob must have the descriptor's size and digest, and each layer's *uncompressed*
  digest must equal the config's `rootfs.diff_ids` entry;
* a pull is written into a temporary directory beside the destination and renamed into
  place only when complete, so a failed pull leaves nothing behind.

Transport: plain HTTP for loopback hosts and for registries listed as insecure (as Docker
does), HTTPS with certificate verification otherwise. Authentication follows the
registry's `WWW-Authenticate` challenge (Bearer token or Basic) with credentials from the
Docker config file, including credential helpers. Connection errors and 5xx answers are
retried with exponential backoff; 4xx answers are not, except for the auth dance.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlencode, urljoin, urlsplit

from forge.formats.reference import DOCKER_HUB, Reference

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
REF_NAME = "org.opencontainers.image.ref.name"
USER_AGENT = "forge-registry-client/1"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"

Progress = Callable[[int, int], None]


class RegistryError(Exception):
    """Any failure talking to a registry; the message says what, why and how to fix it."""


class RegistryUnavailableError(RegistryError):
    """The registry could not be reached, or kept failing with 5xx answers."""


class RegistryAuthError(RegistryError):
    """Missing or refused credentials (401/403), or a credential helper that failed."""


class NotFoundError(RegistryError):
    """The registry answered 404 for a manifest, a blob or the repository."""


class VerificationError(RegistryError):
    """Content that does not match its digest, size or diff_id, or a truncated transfer."""


class UnsupportedError(RegistryError):
    """A manifest or layer this client cannot handle (schema 1, zstd without `zstandard`)."""


class PlatformNotFoundError(RegistryError):
    """An index that has no manifest for the requested platform."""


class LayoutError(RegistryError):
    """An OCI layout to push that is missing or malformed, or a pull destination in the way."""


@dataclass(frozen=True)
class Challenge:
    """One challenge of a `WWW-Authenticate` header: scheme (lowercase) and parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Resolved:
    """What a reference names: `digest` is the top-level object (pin this one), which is an
    index when `index_digest` is set; `manifest_digest` is the chosen platform's manifest."""

    digest: str
    manifest_digest: str
    media_type: str
    index_digest: str | None = None

    def __str__(self) -> str:
        return self.digest


@dataclass(frozen=True)
class PullResult:
    """A pulled image: its layout directory, digests, and the host that served it."""

    reference: Reference
    layout: Path
    digest: str
    manifest_digest: str
    index_digest: str | None
    config_digest: str
    layers: tuple[str, ...]
    source: str
    bytes_fetched: int


@dataclass(frozen=True)
class _Endpoint:
    host: str        # host[:port] that requests go to
    scheme: str
    registry: str    # the registry it serves, for credentials and messages

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}"


@dataclass
class _Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes = b""
    stream: http.client.HTTPResponse | None = None
    conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class _Tracker:
    """Thread-safe accumulation of downloaded bytes for the progress callback."""

    def __init__(self, total: int, callback: Progress | None):
        self.total, self.done, self.callback = total, 0, callback
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            if self.callback:
                self.callback(self.done, self.total)


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf"\s*({_TOKEN})\s*=\s*(?:\"((?:[^\"\\]|\\.)*)\"|([^\s,\"]+))")
_SCHEME = re.compile(rf"\s*({_TOKEN})(?=\s|$|,)")


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


def _sha(data: bytes, algo: str = "sha256") -> str:
    return f"{algo}:{hashlib.new(algo, data).hexdigest()}"


def _split_digest(digest: str) -> tuple[str, str]:
    algo, _, hexpart = digest.partition(":")
    if algo not in ("sha256", "sha512") or not re.fullmatch(r"[0-9a-f]+", hexpart or "-"):
        raise UnsupportedError(f"digest {digest!r} is not supported: expected sha256:<hex> "
                               "(or sha512:<hex>)")
    return algo, hexpart


def _is_loopback(host: str) -> bool:
    name = urlsplit(f"//{host}").hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _Decompressor:
    """Streams a layer through gzip/zstd (sniffed from magic bytes) to hash its diff_id."""

    def __init__(self, digest: str):
        self.digest, self.kind, self.d, self.head = digest, None, None, b""

    def _start(self, head: bytes) -> None:
        if head[:2] == b"\x1f\x8b":
            self.kind, self.d = "gzip", zlib.decompressobj(31)
        elif head[:4] == b"\x28\xb5\x2f\xfd":
            try:
                import zstandard
            except ImportError:
                raise UnsupportedError(
                    f"layer {self.digest} is zstd-compressed and the Python module 'zstandard' "
                    "is not installed: pip install zstandard") from None
            self.kind = "zstd"
            self.d = zstandard.ZstdDecompressor().decompressobj()
        else:
            self.kind = "tar"

    def feed(self, chunk: bytes):
        if self.kind is None:
            self.head += chunk
            if len(self.head) < 4:
                return
            self._start(self.head)
            chunk, self.head = self.head, b""
        if self.kind == "tar":
            yield chunk
        elif self.kind == "zstd":
            yield self.d.decompress(chunk)
        else:
            while chunk:
                yield self.d.decompress(chunk, 1 << 22)
                chunk = self.d.unconsumed_tail
                if self.d.eof:  # concatenated gzip members (pigz) or zero padding
                    rest = self.d.unused_data + chunk
                    if rest.strip(b"\0"):
                        self.d = zlib.decompressobj(31)
                        chunk = rest
                    else:
                        chunk = b""

    def finish(self):
        if self.kind is None and self.head:
            head, self.head = self.head, b""
            self._start(head)
            yield from self.feed(head)
        if self.kind == "gzip" and not self.d.eof:
            raise VerificationError(f"layer {self.digest}: the gzip stream is truncated")


class RegistryClient:
    """Pull and push OCI images. Thread-safe; `requests` counts the HTTP requests sent by
    method (tests use it to prove a second push uploads nothing)."""

    def __init__(self, *, insecure: list[str] | tuple[str, ...] = (),
                 mirrors: dict[str, list[str]] | None = None,
                 docker_config: Path | None = Path("~/.docker/config.json"),
                 timeout: float = 30, retries: int = 3, max_workers: int = 4,
                 backoff: float = 0.25):
        self.insecure = [i.split("://", 1)[-1].rstrip("/") for i in insecure]
        self.mirrors = {_auth_key(k): list(v) for k, v in (mirrors or {}).items()}
        self.docker_config = Path(docker_config).expanduser() if docker_config else None
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_workers = max(1, max_workers)
        self.requests: Counter[str] = Counter()
        self._auth: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()  # guards authentication (one token fetch at a time)
        self._count_lock = threading.Lock()
        self._creds: dict[str, tuple[str | None, str | None, str | None] | None] = {}
        self._config: dict | None = None
        self._ssl = ssl.create_default_context()

    # ---- endpoints --------------------------------------------------------------------

    def _plain_http(self, host: str) -> bool:
        if _is_loopback(host):
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

    def _endpoint(self, spec: str, registry: str) -> _Endpoint:
        if "://" in spec:
            u = urlsplit(spec)
            return _Endpoint(u.netloc, u.scheme, registry)
        host = DOCKER_HUB_API if spec == DOCKER_HUB else spec
        return _Endpoint(host, "http" if self._plain_http(host) else "https", registry)

    def _endpoints(self, registry: str, pull: bool) -> list[_Endpoint]:
        mirrors = self.mirrors.get(registry, []) if pull else []
        return [self._endpoint(m.rstrip("/"), registry) for m in mirrors] + \
            [self._endpoint(registry, registry)]

    def _each_endpoint(self, registry: str, pull: bool, fn):
        """Mirrors first (pull only), then the registry; the last endpoint's error wins."""
        endpoints = self._endpoints(registry, pull)
        for i, ep in enumerate(endpoints):
            try:
                return fn(ep)
            except RegistryError:
                if i == len(endpoints) - 1:
                    raise

    # ---- HTTP -------------------------------------------------------------------------

    def _open(self, method: str, url: str, headers: dict, body: bytes | Path | None):
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

    def _sleep(self, attempt: int) -> None:
        time.sleep(self.backoff * (2 ** attempt))

    def _request(self, ep: _Endpoint, method: str, path: str, *, scope: str, what: str,
                 ok: tuple[int, ...] = (200,), headers: dict | None = None,
                 body: bytes | Path | None = None, stream: bool = False) -> _Reply:
        url = path if "://" in path else ep.base + path
        attempt = redirects = 0
        authed = False
        while True:
            h = {"User-Agent": USER_AGENT, **(headers or {})}
            same_host = urlsplit(url).netloc == ep.host
            sent = self._auth.get((ep.host, scope)) if same_host else None
            if sent:
                h["Authorization"] = sent
            try:
                conn, resp = self._open(method, url, h, body)
            except ssl.SSLCertVerificationError as e:
                raise RegistryUnavailableError(
                    f"registry {ep.host}: TLS certificate verification failed ({e.verify_message}); "
                    "install the registry's CA certificate, or list the registry as insecure "
                    "if it speaks plain HTTP") from None
            except (OSError, http.client.HTTPException) as e:
                if attempt < self.retries:
                    self._sleep(attempt)
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
                self._authenticate(ep, scope, challenge, sent, what)
                authed = True
                continue
            if status >= 500 and attempt < self.retries:
                resp.read()
                conn.close()
                self._sleep(attempt)
                attempt += 1
                continue
            if status in ok:
                if stream:
                    return _Reply(status, resp.headers, stream=resp, conn=conn)
                try:
                    data = resp.read()
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    if attempt < self.retries:
                        self._sleep(attempt)
                        attempt += 1
                        continue
                    raise VerificationError(f"{what} from {ep.host}: the body was cut short "
                                            f"({e}); retry, or check the registry") from None
                conn.close()
                return _Reply(status, resp.headers, data)
            try:
                data = resp.read()
            except (OSError, http.client.HTTPException):
                data = b""
            conn.close()
            raise self._http_error(ep, status, method, what, data, scope)

    def _http_error(self, ep: _Endpoint, status: int, method: str, what: str, data: bytes,
                    scope: str) -> RegistryError:
        codes, detail = [], ""
        try:
            errors = json.loads(data).get("errors") or []
            codes = [e.get("code", "") for e in errors]
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        except (ValueError, AttributeError):
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

    # ---- authentication ---------------------------------------------------------------

    def _authenticate(self, ep: _Endpoint, scope: str, header: str, sent: str | None,
                      what: str) -> None:
        with self._lock:
            current = self._auth.get((ep.host, scope))
            if current and current != sent:
                return  # another thread already renewed it
            challenges = {c.scheme: c for c in parse_www_authenticate(header)}
            if "bearer" in challenges:
                value = "Bearer " + self._fetch_token(ep, challenges["bearer"], scope, what)
            elif "basic" in challenges:
                user, password, _ = self._credentials(ep) or (None, None, None)
                if user is None:
                    raise RegistryAuthError(
                        f"registry {ep.host} answered 401 for {what}: unauthorized (it asks for a "
                        f"user name and password): set credentials with docker login or in "
                        f"~/.docker/config.json")
                value = "Basic " + _basic(user, password or "")
            else:
                raise RegistryAuthError(f"registry {ep.host} answered 401 for {what} with an "
                                        f"authentication scheme this client does not speak: "
                                        f"{header!r}")
            self._auth[(ep.host, scope)] = value

    def _fetch_token(self, ep: _Endpoint, ch: Challenge, scope: str, what: str) -> str:
        realm = ch.params.get("realm")
        if not realm:
            raise RegistryAuthError(f"registry {ep.host} sent a Bearer challenge without a realm: "
                                    f"{ch.params}")
        scopes = [scope] + ([ch.params["scope"]] if ch.params.get("scope") not in (None, scope)
                            else [])
        user, password, identity = self._credentials(ep) or (None, None, None)
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
                headers["Authorization"] = "Basic " + _basic(user, password or "")
        token_host = urlsplit(url).netloc
        for attempt in range(self.retries + 1):
            try:
                conn, resp = self._open(method, url, dict(headers), body)
                data = resp.read()
                conn.close()
            except (OSError, http.client.HTTPException) as e:
                if attempt < self.retries:
                    self._sleep(attempt)
                    continue
                raise RegistryUnavailableError(f"cannot reach the token server {token_host} of "
                                               f"registry {ep.host}: {e}") from None
            if resp.status >= 500 and attempt < self.retries:
                self._sleep(attempt)
                continue
            break
        if resp.status in (401, 403):
            how = ("the stored credentials were refused: log in again with docker login"
                   if user or identity else
                   "set credentials with docker login or in ~/.docker/config.json")
            raise RegistryAuthError(f"registry {ep.host}: the token server {token_host} answered "
                                    f"{resp.status} for {what}: unauthorized: {how}")
        if resp.status != 200:
            raise RegistryAuthError(f"registry {ep.host}: the token server {token_host} answered "
                                    f"{resp.status}: {data[:200]!r}")
        try:
            doc = json.loads(data)
            return doc.get("token") or doc["access_token"]
        except (ValueError, KeyError, AttributeError):
            raise RegistryAuthError(f"registry {ep.host}: the token server {token_host} answered "
                                    "without a token or access_token") from None

    def _load_config(self) -> dict:
        if self._config is None:
            self._config = {}
            if self.docker_config and self.docker_config.is_file():
                try:
                    self._config = json.loads(self.docker_config.read_text())
                except ValueError as e:
                    raise RegistryAuthError(f"{self.docker_config} is not valid JSON ({e}): fix "
                                            "or remove it") from None
        return self._config

    def _credentials(self, ep: _Endpoint) -> tuple[str | None, str | None, str | None] | None:
        """(user, password, identity token) for the endpoint's host, or None."""
        key = _auth_key(ep.host if ep.host != DOCKER_HUB_API else DOCKER_HUB)
        if key in self._creds:
            return self._creds[key]
        cfg = self._load_config()
        creds = None
        helper = {_auth_key(k): v for k, v in (cfg.get("credHelpers") or {}).items()}.get(key)
        if helper:
            creds = self._run_helper(helper, key, "credHelpers")
        else:
            for k, entry in (cfg.get("auths") or {}).items():
                if _auth_key(k) != key or not isinstance(entry, dict):
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

    # ---- pulling ----------------------------------------------------------------------

    def _get_manifest(self, ep: _Endpoint, ref: Reference, reference: str, *,
                      expect: str | None = None, size: int | None = None):
        sep = "@" if ":" in reference else ":"
        what = f"manifest {ref.repository}{sep}{reference}"
        r = self._request(ep, "GET", f"/v2/{ref.repository}/manifests/{reference}",
                          scope=_scope(ref, push=False), what=what, headers={"Accept": ACCEPT})
        body = r.body
        announced = r.headers.get("Docker-Content-Digest")
        algo = _split_digest(expect)[0] if expect else "sha256"
        digest = _sha(body, algo)
        if announced:
            a_algo = _split_digest(announced)[0]
            if _sha(body, a_algo) != announced:
                raise VerificationError(
                    f"{what} from {ep.host}: the body hashes to {_sha(body, a_algo)} but the "
                    f"registry announced Docker-Content-Digest {announced}: the transfer was "
                    "corrupted or the registry is broken; retry")
        if expect and digest != expect:
            raise VerificationError(
                f"{what} from {ep.host}: the manifest hashes to {digest}, not the requested "
                f"{expect}: the registry served different content; check the digest in the "
                "reference")
        if size is not None and len(body) != size:
            raise VerificationError(f"{what} from {ep.host}: {len(body)} bytes, but its "
                                    f"descriptor says {size}")
        try:
            doc = json.loads(body)
        except ValueError:
            raise VerificationError(f"{what} from {ep.host} is not JSON") from None
        if doc.get("schemaVersion") == 1:
            raise UnsupportedError(f"{what} from {ep.host} is a Docker schema-1 manifest, which "
                                   "this client does not support: re-push the image with a "
                                   "current Docker, buildah or skopeo")
        ctype = (r.headers.get("Content-Type") or "").split(";")[0].strip()
        media = doc.get("mediaType") or (ctype if ctype in INDEX_TYPES | MANIFEST_TYPES else "") \
            or (OCI_INDEX if "manifests" in doc else OCI_MANIFEST)
        if media not in INDEX_TYPES | MANIFEST_TYPES:
            raise UnsupportedError(f"{what} from {ep.host} has media type {media!r}, which is "
                                   "neither an image manifest nor an index")
        return body, media, _sha(body), doc, what

    def _platform_manifest(self, ep: _Endpoint, ref: Reference, platform: str):
        """(top-level manifest, platform manifest, platform descriptor or None)."""
        top = self._get_manifest(ep, ref, ref.reference, expect=ref.digest)
        if top[1] not in INDEX_TYPES:
            return top, top, None
        desc = _select_platform(top[3].get("manifests") or [], platform, top[4], ep.host)
        man = self._get_manifest(ep, ref, desc["digest"], expect=desc["digest"],
                                 size=desc.get("size"))
        if man[1] in INDEX_TYPES:
            raise UnsupportedError(f"{man[4]}: an index nested in an index is not supported")
        return top, man, desc

    def resolve(self, ref: Reference | str, platform: str = "linux/amd64") -> Resolved:
        """The digest a reference names now, and the manifest chosen for `platform`."""
        ref = _as_ref(ref)

        def one(ep):
            top, man, _ = self._platform_manifest(ep, ref, platform)
            index = top[2] if top[1] in INDEX_TYPES else None
            return Resolved(top[2], man[2], top[1], index)
        return self._each_endpoint(ref.registry, True, one)

    def pull(self, ref: Reference | str, layout_dir: Path | str, *,
             platform: str = "linux/amd64", progress: Progress | None = None) -> PullResult:
        """Fetch and verify one platform's image into an OCI layout at `layout_dir`
        (replaced if it is already an OCI layout or empty)."""
        ref = _as_ref(ref)
        dest = Path(layout_dir)
        if dest.exists() and not (dest.is_dir() and (not any(dest.iterdir())
                                                     or (dest / "oci-layout").exists())):
            raise LayoutError(f"cannot pull {ref} into {dest}: it exists and is not an OCI "
                              "layout; choose another directory or remove it")
        return self._each_endpoint(ref.registry, True,
                                   lambda ep: self._pull_from(ep, ref, dest, platform, progress))

    def _pull_from(self, ep, ref, dest: Path, platform, progress) -> PullResult:
        top, man, desc = self._platform_manifest(ep, ref, platform)
        body, media, digest, doc, what = man
        try:
            config, layers = doc["config"], list(doc.get("layers") or [])
            for d in [config, *layers]:
                _split_digest(d["digest"])
                int(d["size"])
        except (KeyError, TypeError, ValueError):
            raise VerificationError(f"{what} from {ep.host} lacks a valid config or layer "
                                    "descriptor") from None
        if any("zstd" in (d.get("mediaType") or "") for d in layers) \
                and importlib.util.find_spec("zstandard") is None:
            raise UnsupportedError(f"{what} has zstd-compressed layers and the Python module "
                                   "'zstandard' is not installed: pip install zstandard")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.pull-", dir=dest.parent))
        try:
            _write_blob(tmp, digest, body)
            unique = {d["digest"]: d for d in layers}
            tracker = _Tracker(config["size"] + sum(d["size"] for d in unique.values()), progress)
            tracker.add(0)
            self._fetch_blob(ep, ref, config, tmp, tracker)
            config_path = tmp / "blobs" / Path(*_split_digest(config["digest"]))
            try:
                diff_ids = json.loads(config_path.read_bytes())["rootfs"]["diff_ids"]
            except (ValueError, KeyError, TypeError):
                raise VerificationError(f"config {config['digest']} of {what} has no "
                                        "rootfs.diff_ids") from None
            if len(diff_ids) != len(layers):
                raise VerificationError(f"{what}: {len(layers)} layers but the config lists "
                                        f"{len(diff_ids)} diff_ids")
            expected = {}
            for d, diff_id in zip(layers, diff_ids):
                if expected.setdefault(d["digest"], diff_id) != diff_id:
                    raise VerificationError(f"layer {d['digest']} of {what} appears twice with "
                                            "different diff_ids in the config")
            with ThreadPoolExecutor(self.max_workers, thread_name_prefix="pull") as pool:
                futures = [pool.submit(self._fetch_blob, ep, ref, d, tmp, tracker,
                                       expected[d["digest"]]) for d in unique.values()]
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = [f for f in done if f.exception()]
                if failed:
                    for f in futures:
                        f.cancel()
                    raise failed[0].exception()
            name = ref.tag or str(ref)
            entry = {"mediaType": media, "digest": digest, "size": len(body),
                     "annotations": {REF_NAME: name}}
            if desc and desc.get("platform"):
                entry["platform"] = desc["platform"]
            (tmp / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
            (tmp / "index.json").write_text(json.dumps(
                {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}, indent=2))
            _install(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        index = top[2] if top[1] in INDEX_TYPES else None
        return PullResult(ref, dest, top[2], digest, index, config["digest"],
                          tuple(d["digest"] for d in layers), ep.host, tracker.done)

    def _fetch_blob(self, ep, ref, desc, layout: Path, tracker: _Tracker,
                    diff_id: str | None = None) -> None:
        digest, size = desc["digest"], int(desc["size"])
        algo, hexpart = _split_digest(digest)
        what = f"blob {digest}"
        final = layout / "blobs" / algo / hexpart
        final.parent.mkdir(parents=True, exist_ok=True)
        part = final.with_name(hexpart + ".partial")
        for attempt in range(self.retries + 1):
            r = self._request(ep, "GET", f"/v2/{ref.repository}/blobs/{digest}",
                              scope=_scope(ref, push=False), what=what, stream=True)
            h, got = hashlib.new(algo), 0
            unpack = _Decompressor(digest) if diff_id else None
            uh = hashlib.sha256()
            broken = None
            try:
                with part.open("wb") as f:
                    while True:
                        try:
                            chunk = r.stream.read(1 << 20)
                        except (OSError, http.client.HTTPException) as e:
                            broken = e
                            break
                        if not chunk:
                            break
                        f.write(chunk)
                        h.update(chunk)
                        got += len(chunk)
                        tracker.add(len(chunk))
                        if got > size:
                            raise VerificationError(f"{what} from {ep.host} is longer than the "
                                                    f"{size} bytes its descriptor says")
                        if unpack:
                            for piece in unpack.feed(chunk):
                                uh.update(piece)
            finally:
                r.close()
            if broken is not None or got < size:
                tracker.add(-got)
                if attempt < self.retries:
                    self._sleep(attempt)
                    continue
                why = f" ({broken})" if broken is not None else ""
                raise VerificationError(f"{what} from {ep.host} is truncated: got {got} of "
                                        f"{size} bytes{why}; retry, or re-push the image if the "
                                        "registry's copy is damaged")
            break
        if f"{algo}:{h.hexdigest()}" != digest:
            raise VerificationError(f"{what} from {ep.host}: the content hashes to "
                                    f"{algo}:{h.hexdigest()}, not {digest}: the registry's copy "
                                    "is corrupt or the transfer was altered")
        if unpack:
            for piece in unpack.finish():
                uh.update(piece)
            if f"sha256:{uh.hexdigest()}" != diff_id:
                raise VerificationError(f"layer {digest}: its uncompressed content hashes to "
                                        f"sha256:{uh.hexdigest()}, but the config's diff_id is "
                                        f"{diff_id}: the image is inconsistent; rebuild it")
        os.replace(part, final)

    # ---- pushing ----------------------------------------------------------------------

    def push(self, layout_dir: Path | str, ref: Reference | str) -> str:
        """Push the image of an OCI layout and return the manifest digest the registry
        reports. The layout's entry named `ref.tag` (`org.opencontainers.image.ref.name`)
        is pushed, else its only entry; several unnamed entries are pushed as one index."""
        ref = _as_ref(ref)
        layout = Path(layout_dir)
        try:
            index = json.loads((layout / "index.json").read_bytes())
            descs = list(index["manifests"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LayoutError(f"{layout} is not an OCI image layout (index.json: {e}): build or "
                              "pull an image into it first") from None
        named = [d for d in descs if (d.get("annotations") or {}).get(REF_NAME) == ref.tag]
        ep = self._endpoint(ref.registry, ref.registry)
        if len(named) == 1 or len(descs) == 1:
            desc = named[0] if len(named) == 1 else descs[0]
            body = _read_blob(layout, desc)
            media = desc.get("mediaType") or json.loads(body).get("mediaType") or OCI_MANIFEST
        elif descs:
            children = []
            for d in descs:
                d = dict(d)
                ann = {k: v for k, v in (d.pop("annotations", None) or {}).items() if k != REF_NAME}
                children.append({**d, **({"annotations": ann} if ann else {})})
            media = OCI_INDEX
            body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                               "manifests": children}, separators=(",", ":")).encode()
        else:
            raise LayoutError(f"{layout}/index.json lists no manifests: nothing to push")
        if ref.digest and _sha(body) != ref.digest:
            raise VerificationError(f"the image in {layout} has digest {_sha(body)}, not the "
                                    f"{ref.digest} named by {ref}")
        return self._push_manifest(ep, ref, layout, body, media, ref.tag or _sha(body))

    def _push_manifest(self, ep, ref, layout: Path, body: bytes, media: str, target: str) -> str:
        doc = json.loads(body)
        if media in INDEX_TYPES:
            for d in doc.get("manifests") or []:
                child = _read_blob(layout, d)
                self._push_manifest(ep, ref, layout, child,
                                    d.get("mediaType") or json.loads(child).get("mediaType")
                                    or OCI_MANIFEST, d["digest"])
        elif media in MANIFEST_TYPES:
            blobs = {d["digest"]: d for d in [doc["config"], *(doc.get("layers") or [])]}
            with ThreadPoolExecutor(self.max_workers, thread_name_prefix="push") as pool:
                for f in [pool.submit(self._push_blob, ep, ref, layout, d)
                          for d in blobs.values()]:
                    f.result()
        else:
            raise UnsupportedError(f"cannot push media type {media!r}: not a manifest or index")
        sep = "@" if ":" in target else ":"
        r = self._request(ep, "PUT", f"/v2/{ref.repository}/manifests/{target}",
                          scope=_scope(ref, push=True), ok=(200, 201),
                          what=f"manifest {ref.repository}{sep}{target}",
                          headers={"Content-Type": media}, body=body)
        sent = _sha(body)
        reported = r.headers.get("Docker-Content-Digest") or sent
        if reported != sent:
            raise VerificationError(f"registry {ep.host} stored manifest {ref.repository}{sep}"
                                    f"{target} as {reported}, but the bytes sent hash to {sent}")
        return reported

    def _push_blob(self, ep, ref, layout: Path, desc: dict) -> None:
        digest, size = desc["digest"], int(desc["size"])
        scope, what = _scope(ref, push=True), f"blob {digest}"
        head = self._request(ep, "HEAD", f"/v2/{ref.repository}/blobs/{digest}", scope=scope,
                             what=what, ok=(200, 404))
        if head.status == 200:
            return
        path = layout / "blobs" / Path(*_split_digest(digest))
        if not path.is_file():
            raise LayoutError(f"{layout} lacks {what} that its manifest needs "
                              f"(expected {path}): the layout is incomplete")
        h, n = hashlib.new(_split_digest(digest)[0]), 0
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
        if n != size or f"{h.name}:{h.hexdigest()}" != digest:
            raise LayoutError(f"{path} is {n} bytes hashing to {h.name}:{h.hexdigest()}, but its "
                              f"descriptor says {size} bytes, {digest}: the layout is corrupt")
        post = self._request(ep, "POST", f"/v2/{ref.repository}/blobs/uploads/", scope=scope,
                             what=f"upload of {what}", ok=(202,), body=b"")
        location = post.headers.get("Location")
        if not location:
            raise RegistryError(f"registry {ep.host} started an upload of {what} without a "
                                "Location header")
        u = urlsplit(urljoin(f"{ep.base}/v2/{ref.repository}/blobs/uploads/", location))
        query = (u.query + "&" if u.query else "") + urlencode({"digest": digest})
        url = u._replace(query=query).geturl()
        put = self._request(ep, "PUT", url, scope=scope, what=f"upload of {what}", ok=(201,),
                            headers={"Content-Type": "application/octet-stream"}, body=path)
        stored = put.headers.get("Docker-Content-Digest")
        if stored and stored != digest:
            raise VerificationError(f"registry {ep.host} stored {what} as {stored}")


def _as_ref(ref: Reference | str) -> Reference:
    return ref if isinstance(ref, Reference) else Reference.parse(ref)


def _scope(ref: Reference, push: bool) -> str:
    return f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"


def _basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def _auth_key(server: str) -> str:
    """Normalise a config.json key or registry name: no scheme, no path, Hub as docker.io."""
    host = server.split("://", 1)[-1].split("/", 1)[0].lower()
    return DOCKER_HUB if host in ("index.docker.io", DOCKER_HUB_API, DOCKER_HUB) else host


def _select_platform(manifests: list[dict], platform: str, what: str, host: str) -> dict:
    want = platform.split("/")
    if len(want) not in (2, 3) or not all(want):
        raise PlatformNotFoundError(f"platform {platform!r} is not os/architecture[/variant], "
                                    "e.g. linux/amd64 or linux/arm/v7")
    os_, arch, variant = want[0], want[1], want[2] if len(want) == 3 else None

    def norm(v, a):
        return None if a == "arm64" and v == "v8" else v
    found = []
    for d in manifests:
        p = d.get("platform") or {}
        if p.get("os") == os_ and p.get("architecture") == arch:
            if variant is None or norm(p.get("variant"), arch) == norm(variant, arch):
                found.append(d)
    if not found:
        have = sorted({"/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant"))
                                if x)
                       for p in (d.get("platform") or {} for d in manifests)} - {""})
        raise PlatformNotFoundError(f"{what} from {host} is an index without a {platform} image;"
                                    f" it has: {', '.join(have) or 'no platforms'}; pass one "
                                    "of those as the platform")
    found.sort(key=lambda d: (d.get("platform") or {}).get("variant") is not None)
    return found[0]


def _write_blob(layout: Path, digest: str, data: bytes) -> None:
    path = layout / "blobs" / Path(*_split_digest(digest))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _read_blob(layout: Path, desc: dict) -> bytes:
    try:
        digest = desc["digest"]
        data = (layout / "blobs" / Path(*_split_digest(digest))).read_bytes()
    except (KeyError, TypeError, OSError) as e:
        raise LayoutError(f"{layout}: cannot read the manifest a descriptor points to ({e}): the "
                          "layout is incomplete") from None
    if _sha(data, _split_digest(digest)[0]) != digest:
        raise LayoutError(f"{layout}: blob {digest} does not hash to its name: the layout is "
                          "corrupt")
    return data


def _install(tmp: Path, dest: Path) -> None:
    """Move a complete layout into place, replacing an older layout there."""
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        old.rmdir()
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)
