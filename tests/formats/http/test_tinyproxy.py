"""Through a real proxy (tinyproxy on loopback, tests/proxy_fixture.py) to origins that
answer only the proxy's outgoing address: plain HTTP, HTTPS by CONNECT with a private CA,
a forge build, a registry push and pull; and NO_PROXY going around it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest

from conftest import require
from forge.formats.http.client import HttpClient
from forge.formats.http.errors import StatusError, TlsError
from http_origin import Origin
from proxy_fixture import OUTGOING, tinyproxy  # noqa: F401 (fixture)
from registry_fixture import registry  # noqa: F401,F811 (fixture)

pytestmark = pytest.mark.real

BIG = os.urandom(2 << 20)
SHA = hashlib.sha256(BIG).hexdigest()
FILES = {"/small.txt": b"hello\n", "/big.bin": BIG}


@pytest.fixture
def hidden():
    """An origin on 127.0.0.2 that refuses every peer but the proxy's outgoing address."""
    o = Origin(FILES, host="127.0.0.2", only_from=OUTGOING)
    yield o
    o.close()


def _registry_tests():
    """tests/formats/registry/test_registry.py, for its image builders."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parents[1] / "registry" / "test_registry.py"
    spec = importlib.util.spec_from_file_location("registry_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Sink:
    def __init__(self):
        self.data = bytearray()

    def write(self, chunk):
        self.data += chunk

    def restart(self):
        self.data = bytearray()


def test_an_origin_only_the_proxy_reaches(tinyproxy, hidden):
    with pytest.raises(StatusError, match="HTTP 403"):
        HttpClient(env={}).get(hidden.url("/small.txt"))  # directly: refused
    assert tinyproxy.requests() == []
    c = HttpClient(env={"http_proxy": tinyproxy.url}, backoff=0.01)
    assert c.get(hidden.url("/small.txt")) == b"hello\n"
    hidden.faults["/big.bin"] = ["cut"]  # the cut and the resume both cross the proxy
    sink = Sink()
    c.download(hidden.url("/big.bin"), sink)
    assert hashlib.sha256(sink.data).hexdigest() == SHA
    assert [s.headers.get("Range") for s in hidden.requests("/big.bin")] == \
        [None, f"bytes={len(BIG) // 2}-"]
    assert [s.peer for s in hidden.requests()] == ["127.0.0.1"] + [OUTGOING] * 3  # direct, then proxied
    assert tinyproxy.requests() == [f"GET {hidden.url('/small.txt')} HTTP/1.1",
                                    f"GET {hidden.url('/big.bin')} HTTP/1.1",
                                    f"GET {hidden.url('/big.bin')} HTTP/1.1"]


def test_no_proxy_goes_around_the_proxy(tinyproxy):
    o = Origin(FILES, host="127.0.0.2")
    try:
        env = {"http_proxy": tinyproxy.url, "NO_PROXY": "example.com,127.0.0.2"}
        assert HttpClient(env=env).get(o.url("/small.txt")) == b"hello\n"
        assert [s.peer for s in o.requests()] == ["127.0.0.1"]
        assert tinyproxy.requests() == []
    finally:
        o.close()


def test_https_through_the_proxy_with_a_private_ca(tinyproxy, tmp_path):
    require(shutil.which("openssl") is not None, "openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", key, "-out", cert, "-subj", "/CN=forge test origin",
                    "-addext", "subjectAltName=IP:127.0.0.2"], check=True, capture_output=True)
    o = Origin(FILES, host="127.0.0.2", only_from=OUTGOING, tls=(cert, key))
    try:
        env = {"https_proxy": tinyproxy.url}
        with pytest.raises(TlsError, match="certificate verify failed.*add that CA"):
            HttpClient(env=env, retries=0).get(o.url("/small.txt"))
        c = HttpClient(env=env, ca_bundle=cert)
        assert [c.get(o.url("/small.txt")) for _ in range(3)] == [b"hello\n"] * 3
        port = o.host.rsplit(":", 1)[1]
        # CONNECT: the proxy relays bytes it cannot read; one tunnel for the three requests
        lines = tinyproxy.requests()
        assert len(lines) == 2 and all(x.startswith(f"CONNECT 127.0.0.2:{port} ") for x in lines)
    finally:
        o.close()


def test_a_build_fetches_through_the_proxy(ws, tinyproxy, hidden):
    ws.write({"d/BUILD": f'http_file(name = "big", url = "{hidden.url("/big.bin")}", '
                         f'sha256 = "{SHA}")\n'})
    direct = ws.build("//d:big", env={"http_proxy": "", "HTTP_PROXY": "", "ALL_PROXY": "",
                                      "all_proxy": ""})
    assert direct.code == 1 and "HTTP 403" in direct.err and "Traceback" not in direct.err
    r = ws.build("//d:big", env={"http_proxy": tinyproxy.url, "HTTPS_PROXY": tinyproxy.url,
                                 "no_proxy": "", "NO_PROXY": ""})
    assert r.code == 0, r.err
    assert hashlib.sha256((ws.root / "forge-out/d/big.bin").read_bytes()).hexdigest() == SHA
    assert tinyproxy.requests() == [f"GET {hidden.url('/big.bin')} HTTP/1.1"]


def test_registry_push_and_pull_through_the_proxy(tinyproxy, registry, tmp_path):
    from forge.formats.registry.client import RegistryClient
    simple_image = _registry_tests().simple_image
    src, desc = simple_image(tmp_path)
    env = {"http_proxy": tinyproxy.url}
    c = RegistryClient(docker_config=None, retries=1, backoff=0.01, env=env)
    assert c.push(src, f"{registry.host}/app:v1") == desc["digest"]
    pulled = c.pull(f"{registry.host}/app:v1", tmp_path / "pulled")
    assert pulled.digest == desc["digest"]
    lines = tinyproxy.requests()
    assert f"GET http://{registry.host}/v2/app/manifests/v1 HTTP/1.1" in lines
    assert any(line.startswith(f"PUT http://{registry.host}/v2/app/manifests/v1") for line in lines)
    blobs = f"GET http://{registry.host}/v2/app/blobs/sha256:"
    assert sum(line.startswith(blobs) for line in lines) == 3  # the config and two layers
    before = len(lines)
    bypassing = RegistryClient(docker_config=None, env={**env, "no_proxy": "127.0.0.1"})
    assert bypassing.resolve(f"{registry.host}/app:v1").digest == desc["digest"]
    assert len(tinyproxy.requests()) == before


def test_a_debian_package_build_goes_through_the_proxy(ws, tinyproxy, tmp_path):
    from debian_archive import Keys, Server, build_archive
    from package_builders import make_deb
    keys = Keys()
    srv = Server(tmp_path / "www")
    try:
        build_archive(tmp_path / "www", [make_deb(tmp_path, "hello", "1.0-1")], keys.key("archive"))
        (ws.root / "forge.toml").write_text(f'[debian]\nmirror = "{srv.url}/debian"\n')
        ws.write({"p/BUILD": 'deb_package(name = "hello", package = "hello", '
                             'keyring = "archive.gpg")\n'})
        keys.key("archive").export(ws.root / "p/archive.gpg")
        r = ws.build("//p:hello", env={"http_proxy": tinyproxy.url, "no_proxy": "",
                                       "NO_PROXY": ""})
        assert r.code == 0, r.err
    finally:
        srv.close()
        keys.close()
    lines = tinyproxy.requests()
    assert f"GET {srv.url}/debian/dists/bookworm/InRelease HTTP/1.1" in lines
    assert any("/binary-amd64/" in line for line in lines)  # the Packages index
    assert any(line.endswith(".deb HTTP/1.1") for line in lines)  # the package itself
