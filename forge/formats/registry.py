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

import hashlib
import http.client
import importlib.util
import ipaddress
import json
import os
import shutil
import ssl
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urljoin, urlsplit

from forge.formats.reference import DOCKER_HUB, Reference
from forge.formats.registry_blobs import (  # noqa: F401  (registry_push uses these from here)
    _Decompressor, _install, _read_blob, _select_platform, _sha, _split_digest, _write_blob)
from forge.formats.registry_push import _Push
from forge.formats.registry_auth import (  # noqa: F401  (errors and auth are part of this API)
    USER_AGENT, Challenge, LayoutError, NotFoundError, PlatformNotFoundError, RegistryAuthError,
    RegistryError, RegistryUnavailableError, UnsupportedError, VerificationError, _Auth, _auth_key,
    _basic, parse_www_authenticate, DOCKER_HUB_API)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
REF_NAME = "org.opencontainers.image.ref.name"

Progress = Callable[[int, int], None]


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


def _is_loopback(host: str) -> bool:
    name = urlsplit(f"//{host}").hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class RegistryClient(_Auth, _Push):
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

def _as_ref(ref: Reference | str) -> Reference:
    return ref if isinstance(ref, Reference) else Reference.parse(ref)


def _scope(ref: Reference, push: bool) -> str:
    return f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"
