"""The OCI distribution client against the real Debian docker-registry (and skopeo)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest

from conftest import require
from forge.formats.image.errors import InvalidReferenceError, LayoutError
from forge.formats.image.layout import verify_layout
from forge.formats.image.reference import Reference
from forge.formats.image.spec import OCI_INDEX, OCI_MANIFEST, REF_NAME
from forge.formats.registry.auth import Challenge, parse_www_authenticate
from forge.formats.registry.client import RegistryClient
from forge.formats.registry.errors import (NotFoundError, PlatformNotFoundError, RegistryAuthError,
                                           VerificationError)
from registry_fixture import registry, start_registry  # noqa: F401  (fixture)

# ---- building images by hand -------------------------------------------------------------


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_layer(files: dict[str, bytes]) -> tuple[bytes, str]:
    """A gzip-compressed tar layer and its diff_id (sha256 of the uncompressed tar)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, mtime=0), sha(tar_bytes)


def put_blob(layout: Path, data: bytes) -> dict:
    digest = sha(data)
    path = layout / "blobs" / "sha256" / digest.split(":")[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def build_image(layout: Path, layers: list[dict[str, bytes]], *, arch: str = "amd64",
                bad_diff_id: bool = False) -> dict:
    """Write config, layers and manifest blobs; return the manifest's descriptor."""
    descs, diff_ids = [], []
    for files in layers:
        blob, diff_id = make_layer(files)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                      **put_blob(layout, blob)})
        diff_ids.append(diff_id)
    if bad_diff_id:
        diff_ids[-1] = sha(b"something else")
    config = json.dumps({"architecture": arch, "os": "linux",
                         "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   **put_blob(layout, config)},
        "layers": descs}, indent=1).encode()  # indented: digests must be of the exact bytes
    return {"mediaType": OCI_MANIFEST, **put_blob(layout, manifest),
            "platform": {"architecture": arch, "os": "linux"}}


def write_layout(layout: Path, manifests: list[dict], tag: str | None = None) -> Path:
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    if tag:
        manifests = [{**m, "annotations": {REF_NAME: tag}} for m in manifests]
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))
    return layout


def simple_image(tmp_path: Path, name: str = "src", tag: str = "v1", **kw) -> tuple[Path, dict]:
    layout = tmp_path / name
    desc = build_image(layout, [{"etc/os-release": b"ID=forge\n"},
                                {"bin/hello": b"#!/bin/sh\necho hello\n" * 1000}], **kw)
    return write_layout(layout, [desc], tag), desc


def client() -> RegistryClient:
    return RegistryClient(docker_config=None, retries=1, backoff=0.01)


def blobs_of(layout: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}


def index_of(layout: Path) -> dict:
    return json.loads((layout / "index.json").read_text())


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if name in p.name]


# ---- references and challenges (no registry needed) ------------------------------------

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, registry_, repo, tag, digest", [
    ("alpine", "docker.io", "library/alpine", "latest", None),
    ("alpine:3.20", "docker.io", "library/alpine", "3.20", None),
    ("user/app", "docker.io", "user/app", "latest", None),
    ("index.docker.io/alpine", "docker.io", "library/alpine", "latest", None),
    ("docker.io/library/alpine:edge", "docker.io", "library/alpine", "edge", None),
    (f"alpine@{D}", "docker.io", "library/alpine", None, D),
    (f"alpine:3.20@{D}", "docker.io", "library/alpine", "3.20", D),
    ("localhost:5000/x", "localhost:5000", "x", "latest", None),
    ("localhost/x:1", "localhost", "x", "1", None),
    ("127.0.0.1:5000/team/app:v1.2_rc-3", "127.0.0.1:5000", "team/app", "v1.2_rc-3", None),
    ("ghcr.example/org/sub/app", "ghcr.example", "org/sub/app", "latest", None),
    ("[::1]:5000/x", "[::1]:5000", "x", "latest", None),
    ("a__b/c.d-e--f", "docker.io", "a__b/c.d-e--f", "latest", None),
])
def test_reference_parse(text, registry_, repo, tag, digest):
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry_, repo, tag, digest)
    assert Reference.parse(str(ref)) == ref
    assert str(Reference.parse(str(ref))) == str(ref)


def test_reference_str_is_fully_qualified():
    assert str(Reference.parse("alpine")) == "docker.io/library/alpine:latest"
    assert str(Reference.parse(f"alpine:3@{D}")) == f"docker.io/library/alpine:3@{D}"
    assert str(Reference.parse("localhost:5000/x")) == "localhost:5000/x:latest"


@pytest.mark.parametrize("text, why", [
    ("", "[registry[:port]/]repository"),
    ("Alpine", "must be lowercase"),
    ("docker.io/Library/alpine", "must be lowercase"),
    ("alpine:", "not a valid tag"),
    ("alpine:-x", "not a valid tag"),
    ("alpine@sha256:abc", "64 lowercase hex"),
    ("alpine@nonsense", "not a digest"),
    ("a//b", "not a valid repository name"),
    ("x/", "not a valid repository name"),
    (" alpine", "[registry[:port]/]repository"),
    ("-a.b/x", "not a valid registry"),
])
def test_reference_rejects(text, why):
    with pytest.raises(InvalidReferenceError) as e:
        Reference.parse(text)
    assert why in str(e.value)
    assert "a reference looks like" in str(e.value)


def test_www_authenticate_bearer():
    h = ('Bearer realm="https://auth.example/token",service="registry.example",'
         'scope="repository:library/alpine:pull,push"')
    assert parse_www_authenticate(h) == [Challenge("bearer", {
        "realm": "https://auth.example/token", "service": "registry.example",
        "scope": "repository:library/alpine:pull,push"})]


def test_www_authenticate_variants():
    assert parse_www_authenticate('Basic realm="Registry Realm"') == \
        [Challenge("basic", {"realm": "Registry Realm"})]
    assert parse_www_authenticate('bearer Realm=http://t/x , service = s') == \
        [Challenge("bearer", {"realm": "http://t/x", "service": "s"})]
    two = parse_www_authenticate('Bearer realm="a,b",error="invalid_token", Basic realm="r"')
    assert two == [Challenge("bearer", {"realm": "a,b", "error": "invalid_token"}),
                   Challenge("basic", {"realm": "r"})]
    assert parse_www_authenticate(r'Bearer realm="q\"uote"')[0].params["realm"] == 'q"uote'
    assert parse_www_authenticate("") == []


def test_credentials_from_docker_config(tmp_path, monkeypatch):
    import base64
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({
        "auths": {"https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()},
                  "http://reg.example:5000/v2/": {"username": "u", "password": "p"}},
        "credHelpers": {"helped.example": "forgetest"}}))
    c = RegistryClient(docker_config=cfg)
    hub, reg = c.transport.endpoint("docker.io", "docker.io"), c.transport.endpoint("reg.example:5000", "x")
    assert c.transport.auth.credentials(hub.host) == ("hub", "pw", None)
    assert c.transport.auth.credentials(reg.host) == ("u", "p", None)
    helper = tmp_path / "bin" / "docker-credential-forgetest"
    helper.parent.mkdir()
    helper.write_text('#!/bin/sh\nread server\n[ "$1" = get ] || exit 3\n'
                      'printf \'{"ServerURL":"%s","Username":"<token>","Secret":"idt-%s"}\' '
                      '"$server" "$server"\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper.parent}:{os.environ['PATH']}")
    assert c.transport.auth.credentials(c.transport.endpoint("helped.example", "x").host) == \
        (None, None, "idt-helped.example")


def test_missing_credential_helper_is_explained(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"credsStore": "forge-absent-helper"}))
    c = RegistryClient(docker_config=cfg)
    with pytest.raises(RegistryAuthError, match="docker-credential-forge-absent-helper .*credsStore"
                       ".* is not installed"):
        c.transport.auth.credentials(c.transport.endpoint("reg.example", "reg.example").host)


def test_schemes_follow_docker():
    c = RegistryClient(insecure=["reg.lan:5000", "10.1.0.0/16"], docker_config=None)
    scheme = lambda h: c.transport.endpoint(h, h).scheme  # noqa: E731
    assert scheme("localhost:5000") == scheme("127.0.0.5:80") == scheme("[::1]:5000") == "http"
    assert scheme("reg.lan:5000") == scheme("10.1.2.3:5000") == "http"
    assert scheme("reg.lan:5001") == scheme("quay.example") == "https"
    assert c.transport.endpoint("docker.io", "docker.io").host == "registry-1.docker.io"


# ---- against the real registry ---------------------------------------------------------


@pytest.mark.real
def test_push_pull_round_trip(registry, tmp_path):
    src, desc = simple_image(tmp_path)
    c = client()
    ref = f"{registry.host}/forge/app:v1"
    digest = c.push(src, ref)
    assert digest == desc["digest"]

    by_tag = c.pull(ref, tmp_path / "by-tag")
    assert by_tag.manifest_digest == by_tag.digest == digest and by_tag.index_digest is None
    assert blobs_of(by_tag.layout) == blobs_of(src)
    (entry,) = index_of(by_tag.layout)["manifests"]
    assert entry["digest"] == digest and entry["annotations"][REF_NAME] == "v1"
    assert json.loads((by_tag.layout / "oci-layout").read_text())["imageLayoutVersion"]

    by_digest = c.pull(f"{registry.host}/forge/app@{digest}", tmp_path / "by-digest")
    assert blobs_of(by_digest.layout) == blobs_of(src)
    both = c.pull(f"{registry.host}/forge/app:v1@{digest}", tmp_path / "by-digest")
    assert both.digest == digest  # an existing layout is replaced
    assert c.resolve(ref).digest == digest
    assert leftovers(tmp_path, ".by-") == []


@pytest.mark.real
def test_progress_is_reported(registry, tmp_path):
    src, _ = simple_image(tmp_path)
    c = client()
    c.push(src, f"{registry.host}/p:v1")
    calls = []
    result = c.pull(f"{registry.host}/p:v1", tmp_path / "out",
                    progress=lambda done, total: calls.append((done, total)))
    total = calls[0][1]
    assert calls[-1] == (total, total) == (result.bytes_fetched, total)
    manifest = json.loads(blobs_of(src)[result.manifest_digest.split(":")[1]])
    assert total == manifest["config"]["size"] + sum(d["size"] for d in manifest["layers"])
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))


@pytest.mark.real
def test_multi_platform_index(registry, tmp_path):
    layout = tmp_path / "multi"
    amd = build_image(layout, [{"arch": b"amd64\n"}], arch="amd64")
    arm = build_image(layout, [{"arch": b"arm64\n"}], arch="arm64")
    write_layout(layout, [amd, arm])  # several entries, no names: pushed as an index
    c = client()
    index_digest = c.push(layout, f"{registry.host}/multi:1")

    r = c.resolve(f"{registry.host}/multi:1")
    assert (r.digest, r.index_digest, r.manifest_digest, r.media_type) == \
        (index_digest, index_digest, amd["digest"], OCI_INDEX)
    assert c.resolve(f"{registry.host}/multi:1", platform="linux/arm64").manifest_digest == \
        arm["digest"]

    default = c.pull(f"{registry.host}/multi:1", tmp_path / "amd")
    assert default.manifest_digest == amd["digest"] and default.index_digest == index_digest
    (entry,) = index_of(default.layout)["manifests"]
    assert entry["digest"] == amd["digest"] and entry["platform"]["architecture"] == "amd64"
    arm_pull = c.pull(f"{registry.host}/multi@{index_digest}", tmp_path / "arm",
                      platform="linux/arm64")
    assert arm_pull.manifest_digest == arm["digest"]
    assert not (arm_pull.layout / "blobs/sha256" / amd["digest"].split(":")[1]).exists()
    with pytest.raises(PlatformNotFoundError, match="linux/amd64, linux/arm64"):
        c.pull(f"{registry.host}/multi:1", tmp_path / "s390x", platform="linux/s390x")
    assert not (tmp_path / "s390x").exists()


@pytest.mark.real
def test_index_blob_layout_is_pushed_with_its_children(registry, tmp_path):
    layout = tmp_path / "idx"
    amd = build_image(layout, [{"a": b"1"}], arch="amd64")
    arm = build_image(layout, [{"a": b"2"}], arch="arm64")
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                        "manifests": [amd, arm]}).encode()
    write_layout(layout, [{"mediaType": OCI_INDEX, **put_blob(layout, index)}], tag="x")
    c = client()
    assert c.push(layout, f"{registry.host}/idx:x") == sha(index)
    assert c.pull(f"{registry.host}/idx:x", tmp_path / "o",
                  platform="linux/arm64").manifest_digest == arm["digest"]


@pytest.mark.real
def test_wrong_digest_in_reference_is_rejected(registry, tmp_path):
    src, desc = simple_image(tmp_path)
    c = client()
    c.push(src, f"{registry.host}/app:v1")
    wrong = "sha256:" + "0" * 64
    with pytest.raises(NotFoundError, match="no manifest with this digest"):
        c.pull(f"{registry.host}/app:v1@{wrong}", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    with pytest.raises(NotFoundError) as e:
        c.pull(f"{registry.host}/app:nope", tmp_path / "dest")
    assert str(e.value).startswith(f"registry {registry.host} answered 404 for manifest app:nope:"
                                   " the tag does not exist")
    # A registry serving other bytes under the requested digest is caught.
    data = registry.blob_path(desc["digest"])
    data.write_bytes(data.read_bytes().replace(b'"schemaVersion"', b'"schemaVersion" '))
    with pytest.raises(VerificationError, match=desc["digest"]):
        c.pull(f"{registry.host}/app@{desc['digest']}", tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and leftovers(tmp_path, "dest") == []


@pytest.mark.real
def test_truncated_blob_is_rejected_and_nothing_is_left(registry, tmp_path):
    src, desc = simple_image(tmp_path)
    c = client()
    c.push(src, f"{registry.host}/app:v1")
    manifest = json.loads((src / "blobs/sha256" / desc["digest"].split(":")[1]).read_bytes())
    layer = manifest["layers"][1]["digest"]
    data = registry.blob_path(layer)
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(VerificationError) as e:
        c.pull(f"{registry.host}/app:v1", tmp_path / "dest")
    assert layer in str(e.value) and "truncated" in str(e.value)
    assert not (tmp_path / "dest").exists() and leftovers(tmp_path, "dest") == []


@pytest.mark.real
def test_corrupt_blob_is_rejected(registry, tmp_path):
    src, desc = simple_image(tmp_path)
    c = client()
    c.push(src, f"{registry.host}/app:v1")
    config = json.loads((src / "blobs/sha256" / desc["digest"].split(":")[1]).read_bytes())["config"]
    data = registry.blob_path(config["digest"])
    data.write_bytes(data.read_bytes().replace(b"amd64", b"arm64"))  # same size, other bytes
    with pytest.raises(VerificationError, match=f"hashes to sha256:.*not {config['digest']}"):
        c.pull(f"{registry.host}/app:v1", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


@pytest.mark.real
def test_diff_id_mismatch_is_rejected(registry, tmp_path):
    src, _ = simple_image(tmp_path, bad_diff_id=True)
    c = client()
    c.push(src, f"{registry.host}/bad:v1")
    with pytest.raises(VerificationError, match="uncompressed content hashes to .* diff_id"):
        c.pull(f"{registry.host}/bad:v1", tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and leftovers(tmp_path, "dest") == []


@pytest.mark.real
def test_second_push_uploads_nothing(registry, tmp_path):
    src, desc = simple_image(tmp_path)
    c = client()
    assert c.push(src, f"{registry.host}/app:v1") == desc["digest"]
    assert c.requests["POST"] == 3  # config + 2 layers
    c.requests.clear()
    assert c.push(src, f"{registry.host}/app:v1") == desc["digest"]
    assert c.requests["POST"] == 0 and c.requests["PUT"] == 1 and c.requests["HEAD"] == 3


@pytest.mark.real
def test_mirror_is_tried_first_then_the_registry(registry, tmp_path):
    src, desc = simple_image(tmp_path)
    with start_registry(tmp_path / "mirror") as mirror:
        client().push(src, f"{registry.host}/app:v1")
        c = RegistryClient(docker_config=None, retries=0, mirrors={registry.host: [mirror.host]})
        assert c.pull(f"{registry.host}/app:v1", tmp_path / "a").source == registry.host
        client().push(src, f"{mirror.host}/app:v1")
        assert c.pull(f"{registry.host}/app:v1", tmp_path / "b").source == mirror.host
        c.push(src, f"{registry.host}/app:v2")  # pushing never goes to a mirror
        with pytest.raises(NotFoundError):
            client().resolve(f"{mirror.host}/app:v2")


@pytest.mark.real
def test_unreachable_registry_is_explained(tmp_path):
    from registry_fixture import free_port
    c = RegistryClient(docker_config=None, retries=1, backoff=0.01)
    with pytest.raises(Exception, match="cannot reach registry 127.0.0.1:.* check that it is "
                                        "running"):
        c.resolve(f"127.0.0.1:{free_port()}/x:1")


def test_push_of_a_non_layout_is_explained(tmp_path):
    with pytest.raises(LayoutError, match="is not an OCI image layout"):
        client().push(tmp_path, "127.0.0.1:1/x:1")


# ---- skopeo cross-check ------------------------------------------------------------------


@pytest.mark.real
def test_skopeo_agrees(registry, tmp_path):
    require(shutil.which("skopeo") is not None, "skopeo is not installed (apt-get install skopeo)")
    src, desc = simple_image(tmp_path)
    c = client()
    c.push(src, f"{registry.host}/ours:v1")
    out = subprocess.run(["skopeo", "inspect", "--tls-verify=false",
                          f"docker://{registry.host}/ours:v1"],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    assert info["Digest"] == desc["digest"] and info["Architecture"] == "amd64"
    assert len(info["Layers"]) == 2
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{registry.host}/ours:v1"],
                         capture_output=True, check=True).stdout
    assert sha(raw) == desc["digest"]

    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{src}:v1",
                    f"docker://{registry.host}/theirs:v1"], capture_output=True, check=True)
    pulled = c.pull(f"{registry.host}/theirs:v1", tmp_path / "theirs")
    assert set(json.loads(blobs_of(pulled.layout)[pulled.config_digest.split(":")[1]])) >= \
        {"rootfs", "architecture"}
    # skopeo pulls what we pushed, into its own OCI layout, with identical layers.
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false",
                    f"docker://{registry.host}/ours:v1", f"oci:{tmp_path / 'sk'}:v1"],
                   capture_output=True, check=True)
    ours = c.pull(f"{registry.host}/ours:v1", tmp_path / "ours")
    for layer in ours.layers:
        assert (tmp_path / "sk/blobs/sha256" / layer.split(":")[1]).exists()


# ---- token authentication against the real registry --------------------------------------


def _b64url(data: bytes) -> str:
    import base64
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture
def token_registry(tmp_path):
    """docker-registry with `auth: token`, and a token server issuing RS256 JWTs signed by
    a key made with the openssl CLI; the token server wants Basic forge:secret."""
    import base64
    import threading
    import time as _time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlsplit

    require(shutil.which("openssl") is not None, "openssl is not installed")
    d = tmp_path / "token"
    d.mkdir()
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "2", "-subj", "/CN=forge-token"],
                   check=True, capture_output=True)
    der = subprocess.run(["openssl", "x509", "-in", cert, "-outform", "DER"],
                         check=True, capture_output=True).stdout
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            q = parse_qs(urlsplit(self.path).query)
            seen.append({"query": q, "auth": self.headers.get("Authorization")})
            if self.headers.get("Authorization") != "Basic " + base64.b64encode(
                    b"forge:secret").decode():
                self.send_response(401)
                self.end_headers()
                return
            access = []
            for scope in q.get("scope", []):
                kind, name, actions = scope.split(":")
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
            now = int(_time.time())
            header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
            claims = {"iss": "forge-issuer", "sub": "forge", "aud": q["service"][0],
                      "exp": now + 300, "nbf": now - 10, "iat": now, "jti": str(now),
                      "access": access}
            signing = (_b64url(json.dumps(header).encode()) + "." +
                       _b64url(json.dumps(claims).encode()))
            sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key],
                                 input=signing.encode(), capture_output=True, check=True).stdout
            body = json.dumps({"access_token": signing + "." + _b64url(sig)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    realm = f"http://127.0.0.1:{server.server_address[1]}/token"
    extra = (f"auth:\n  token:\n    realm: {realm}\n    service: forge-registry\n"
             f"    issuer: forge-issuer\n    rootcertbundle: {cert}\n")
    try:
        with start_registry(tmp_path / "registry", extra, ready_status=401) as reg:
            reg.token_requests = seen
            yield reg
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.real
def test_token_auth_push_and_pull(token_registry, tmp_path):
    import base64
    cfg = tmp_path / "docker-config.json"
    cfg.write_text(json.dumps({"auths": {f"http://{token_registry.host}": {
        "auth": base64.b64encode(b"forge:secret").decode()}}}))
    src, desc = simple_image(tmp_path)
    c = RegistryClient(docker_config=cfg, retries=0)
    assert c.push(src, f"{token_registry.host}/sec/app:v1") == desc["digest"]
    pulled = RegistryClient(docker_config=cfg).pull(f"{token_registry.host}/sec/app:v1",
                                                    tmp_path / "out")
    assert blobs_of(pulled.layout) == blobs_of(src)
    scopes = {s for r in token_registry.token_requests for s in r["query"].get("scope", [])}
    assert scopes >= {"repository:sec/app:pull", "repository:sec/app:pull,push"}
    assert {r["query"]["service"][0] for r in token_registry.token_requests} == {"forge-registry"}
    # Tokens are cached per scope: one token per scope and client, not one per request.
    assert len(token_registry.token_requests) <= 3

    anonymous = RegistryClient(docker_config=None, retries=0)
    with pytest.raises(RegistryAuthError, match="unauthorized: set credentials with docker login"):
        anonymous.pull(f"{token_registry.host}/sec/app:v1", tmp_path / "anon")
    assert not (tmp_path / "anon").exists()


# ---- protocol corners, against a scripted fake registry -----------------------------------


class FakeRegistry:
    """A scripted HTTP server: `routes[(method, path)]` is a list of (status, headers, body)
    answers consumed in order (the last one repeats); every request is recorded."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        self.routes: dict[tuple[str, str], list] = {}
        self.seen: list[tuple[str, str, dict, bytes]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                fake.seen.append((self.command, self.path, dict(self.headers), body))
                answers = fake.routes.get((self.command, self.path.split("?")[0])) or \
                    [(404, {}, b'{"errors":[{"code":"NOT_FOUND","message":"nope"}]}')]
                status, headers, data = answers.pop(0) if len(answers) > 1 else answers[0]
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, *_ in self.seen if m == method and p.split("?")[0] == path)


@pytest.fixture
def fake():
    f = FakeRegistry()
    yield f
    f.server.shutdown()
    f.server.server_close()


def manifest_answer(body: bytes, digest: str | None = None):
    return (200, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": digest or sha(body)}, body)


def test_5xx_is_retried_and_4xx_is_not(fake):
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {},
                       "layers": []}).encode()
    fake.routes[("GET", "/v2/a/manifests/1")] = [(503, {}, b""), (502, {}, b""),
                                                 manifest_answer(body)]
    c = RegistryClient(docker_config=None, retries=3, backoff=0.01)
    assert c.resolve(f"{fake.host}/a:1").digest == sha(body)
    assert fake.count("GET", "/v2/a/manifests/1") == 3
    with pytest.raises(NotFoundError, match="answered 404 for manifest b:1"):
        c.resolve(f"{fake.host}/b:1")
    assert fake.count("GET", "/v2/b/manifests/1") == 1
    fake.routes[("GET", "/v2/c/manifests/1")] = [(500, {}, b"")]
    with pytest.raises(Exception, match="answered 500 .* after 4 attempts"):
        c.resolve(f"{fake.host}/c:1")
    assert fake.count("GET", "/v2/c/manifests/1") == 4


def test_accept_header_and_digest_checks(fake, tmp_path):
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {},
                       "layers": []}).encode()
    fake.routes[("GET", f"/v2/a/manifests/{D}")] = [manifest_answer(body)]
    c = RegistryClient(docker_config=None, retries=0)
    with pytest.raises(VerificationError, match=f"hashes to {sha(body)}, not the requested {D}"):
        c.pull(f"{fake.host}/a@{D}", tmp_path / "x")
    accept = fake.seen[-1][2]["Accept"]
    assert all(t in accept for t in (OCI_INDEX, OCI_MANIFEST, "manifest.list.v2+json",
                                     "manifest.v2+json")) and "v1" not in accept.replace(
        "index.v1", "").replace("manifest.v1", "")
    fake.routes[("GET", "/v2/a/manifests/lie")] = [manifest_answer(body, D)]
    with pytest.raises(VerificationError, match=f"announced Docker-Content-Digest {D}"):
        c.resolve(f"{fake.host}/a:lie")
    old = json.dumps({"schemaVersion": 1, "name": "a", "fsLayers": []}).encode()
    fake.routes[("GET", "/v2/a/manifests/old")] = [manifest_answer(old)]
    with pytest.raises(Exception, match="schema-1 manifest"):
        c.resolve(f"{fake.host}/a:old")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("location", ["/upload/u1?_state=s", "upload-rel/u2",
                                      "http://{host}/upload/u3"])
def test_push_follows_upload_locations_and_basic_auth(fake, tmp_path, location):
    import base64
    src, desc = simple_image(tmp_path)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {fake.host: {"username": "u", "password": "p"}}}))
    basic = "Basic " + base64.b64encode(b"u:p").decode()
    fake.routes[("POST", "/v2/app/blobs/uploads/")] = [
        (401, {"WWW-Authenticate": 'Basic realm="fake"'}, b""),
        (202, {"Location": location.format(host=fake.host)}, b"")]
    for path in ("/upload/u1", "/v2/app/blobs/uploads/upload-rel/u2", "/upload/u3"):
        fake.routes[("PUT", path)] = [(201, {}, b"")]
    fake.routes[("PUT", "/v2/app/manifests/v1")] = [(201, {"Docker-Content-Digest":
                                                          desc["digest"]}, b"")]
    c = RegistryClient(docker_config=cfg, retries=0, max_workers=1)
    assert c.push(src, f"{fake.host}/app:v1") == desc["digest"]
    puts = [(p, h, b) for m, p, h, b in fake.seen if m == "PUT" and "/manifests/" not in p]
    assert len(puts) == 3
    for path, headers, body in puts:
        assert "digest=sha256%3A" in path and ("_state=s&digest=" in path) == ("u1" in location)
        assert headers["Authorization"] == basic and sha(body) in path.replace("%3A", ":")
    manifest_put = [(h, b) for m, p, h, b in fake.seen if p == "/v2/app/manifests/v1"]
    assert manifest_put[0][0]["Content-Type"] == OCI_MANIFEST and sha(manifest_put[0][1]) == \
        desc["digest"]


@pytest.mark.real
@pytest.mark.parametrize("name", ["zstd-two-frames", "zstd-T2-long", "pzstd", "gzip-cat",
                                  "pigz"])
def test_layers_of_several_members_or_frames_pull_with_their_diff_ids(registry, tmp_path, name):
    """The pull hashes each layer's uncompressed bytes on the way in: every gzip member
    and zstd frame the real tools write counts, and a diff_id of only the first fails."""
    from compressed_streams import big_tar, compressed_by_tools
    data = big_tar(files=24)
    blob = compressed_by_tools(data, tmp_path / "tools")[name]
    media = ("application/vnd.oci.image.layer.v1.tar+zstd" if "zstd" in name else
             "application/vnd.oci.image.layer.v1.tar+gzip")
    first_member = io.BytesIO()
    if "zstd" in name:
        import zstandard
        d = zstandard.ZstdDecompressor().decompressobj()
        first_member.write(d.decompress(blob))
    else:
        first_member.write(zlib.decompressobj(31).decompress(blob))
    several = name not in ("zstd-T2-long", "pigz")  # those two write one frame or member
    assert (first_member.getvalue() != data) == several
    cases = [(sha(data), True)] + [(sha(first_member.getvalue()), False)] * several
    for diff_id, ok in cases:
        layout = tmp_path / f"src-{ok}"
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       **put_blob(layout, config)},
            "layers": [{"mediaType": media, **put_blob(layout, blob)}]}).encode()
        write_layout(layout, [{"mediaType": OCI_MANIFEST, **put_blob(layout, manifest)}])
        ref = f"{registry.host}/forge/frames-{name.lower()}:{'good' if ok else 'bad'}"
        client().push(layout, ref)
        if ok:
            pulled = client().pull(ref, tmp_path / "pulled")
            verify_layout(pulled.layout)
        else:
            with pytest.raises(VerificationError, match="uncompressed content hashes to"):
                client().pull(ref, tmp_path / "bad")
