"""Which proxy a URL goes through: forge's reading of the proxy variables, checked case by
case against the real curl (a proxy on a closed port: curl fails when it uses it)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import require
from forge.formats.http.proxy import ProxySettings, bypass
from http_origin import Origin
from registry_fixture import free_port


@pytest.fixture(scope="module")
def origin():
    o = Origin({"/": b"ok\n"})
    yield o
    o.close()


def curl_uses_proxy(env: dict, url: str) -> bool:
    require(shutil.which("curl") is not None, "curl is not installed (apt-get install curl)")
    p = subprocess.run(["curl", "-s", "-o", "/dev/null", "--max-time", "5", url],
                       env={"PATH": os.environ["PATH"], **env}, capture_output=True)
    assert p.returncode in (0, 7), p
    return p.returncode == 7  # 7: could not connect, i.e. to the closed proxy port


def forge_uses_proxy(env: dict, url: str) -> bool:
    return ProxySettings.from_env(env).proxy_for(url) is not None


P = "http://127.0.0.1:{closed}"
CASES = [  # (environment, host of the URL)
    ({"http_proxy": P}, "127.0.0.1"),  # loopback is not bypassed implicitly
    ({"http_proxy": P}, "localhost"),
    ({"http_proxy": P, "NO_PROXY": "127.0.0.1"}, "127.0.0.1"),
    ({"http_proxy": P, "no_proxy": "127.0.0.1", "NO_PROXY": "example.com"}, "127.0.0.1"),
    ({"http_proxy": P, "no_proxy": "example.com", "NO_PROXY": "127.0.0.1"}, "127.0.0.1"),
    ({"http_proxy": P, "no_proxy": "", "NO_PROXY": "127.0.0.1"}, "127.0.0.1"),  # empty: unset
    ({"http_proxy": P, "NO_PROXY": "127.0.0.0/8"}, "127.0.0.1"),
    ({"http_proxy": P, "NO_PROXY": "10.0.0.0/8"}, "127.0.0.1"),
    ({"http_proxy": P, "NO_PROXY": "*"}, "127.0.0.1"),
    ({"http_proxy": P, "NO_PROXY": "example.com,*"}, "127.0.0.1"),  # '*' only alone
    ({"http_proxy": P, "NO_PROXY": "example.com, 127.0.0.1"}, "127.0.0.1"),
    ({"http_proxy": P, "NO_PROXY": "example.com 127.0.0.1"}, "127.0.0.1"),
    ({"http_proxy": P, "NO_PROXY": "localhost"}, "localhost"),
    ({"http_proxy": P, "NO_PROXY": ".localhost"}, "localhost"),
    ({"http_proxy": P, "NO_PROXY": "LOCALHOST."}, "localhost"),
    ({"http_proxy": P, "NO_PROXY": "calhost"}, "localhost"),  # a suffix, not a domain
    ({"http_proxy": P, "NO_PROXY": "127.0.0.1"}, "localhost"),  # names are not resolved
    ({"ALL_PROXY": P}, "127.0.0.1"),
    ({"all_proxy": P, "NO_PROXY": "127.0.0.1"}, "127.0.0.1"),
    ({"https_proxy": P}, "127.0.0.1"),  # an http:// URL ignores https_proxy
    ({"http_proxy": P.replace("http://", "")}, "127.0.0.1"),  # no scheme: http://
]


@pytest.mark.real
@pytest.mark.parametrize("env,host", CASES, ids=[f"{sorted(e.items())}-{h}" for e, h in CASES])
def test_forge_chooses_as_curl_does(origin, env, host):
    closed = free_port()
    env = {k: v.format(closed=closed) for k, v in env.items()}
    url = f"http://{host}:{origin.host.rsplit(':', 1)[1]}/"
    assert forge_uses_proxy(env, url) == curl_uses_proxy(env, url)


@pytest.mark.real
def test_the_two_documented_departures_from_curl(origin):
    port = origin.host.rsplit(":", 1)[1]
    url = f"http://127.0.0.1:{port}/"
    proxy = f"http://127.0.0.1:{free_port()}"
    upper = {"HTTP_PROXY": proxy}  # curl reads only http_proxy for http:// URLs
    assert not curl_uses_proxy(upper, url) and forge_uses_proxy(upper, url)
    assert not forge_uses_proxy({**upper, "REQUEST_METHOD": "GET"}, url)  # as a CGI: not read
    with_port = {"http_proxy": proxy, "NO_PROXY": f"127.0.0.1:{port}"}  # curl ignores ports
    assert curl_uses_proxy(with_port, url) and not forge_uses_proxy(with_port, url)


def test_no_proxy_entries():
    entries = ["example.com", ".corp.lan", "10.0.0.0/8", "fd00::/8", "registry:5000",
               "[::1]:8080", "192.168.1.7"]
    assert bypass("example.com", 443, entries) and bypass("www.EXAMPLE.com.", 80, entries)
    assert not bypass("notexample.com", 80, entries)
    assert bypass("corp.lan", 80, entries) and bypass("a.b.corp.lan", 80, entries)
    assert bypass("10.1.2.3", 80, entries) and not bypass("11.1.2.3", 80, entries)
    assert bypass("fd00::1", 80, entries) and not bypass("fe80::1", 80, entries)
    assert bypass("registry", 5000, entries) and not bypass("registry", 5001, entries)
    assert bypass("::1", 8080, entries) and not bypass("::1", 80, entries)
    assert bypass("192.168.1.7", 80, entries) and not bypass("192.168.1.70", 80, entries)
    assert not bypass("", 80, ["*"]) and bypass("anything", 1, ["*"])


def test_https_urls_use_https_proxy_and_credentials_stay_out_of_messages():
    s = ProxySettings.from_env({"HTTPS_PROXY": "http://u:secret@proxy.lan:3128",
                                "http_proxy": "http://plain.lan:3128"})
    assert s.proxy_for("https://example.com/x") == "http://u:secret@proxy.lan:3128"
    assert s.proxy_for("http://example.com/x") == "http://plain.lan:3128"
    from forge.formats.http.client import HttpClient
    from forge.formats.http.errors import ConnectError
    c = HttpClient(env={"https_proxy": "socks5://proxy.lan:1080"})
    with pytest.raises(ConnectError, match="proxy socks5://proxy.lan:1080 .* cannot be used"):
        c.request("GET", "https://example.com/")


def test_the_shared_client_follows_the_environment(monkeypatch):
    """The forge server runs each command with that command's environment."""
    from forge.formats.http.client import default_client
    monkeypatch.setenv("http_proxy", "http://one.lan:3128")
    first = default_client()
    assert default_client() is first  # same settings: same pools
    monkeypatch.setenv("http_proxy", "http://two.lan:3128")
    assert default_client().proxies.http == "http://two.lan:3128"
