"""The shared HTTP client against loopback servers with scripted faults (tests/http_origin.py):
resumed and restarted downloads (digest-checked), retries honouring Retry-After, timeouts,
connection reuse counted on the server's side, and the CLI's messages for wire errors."""

from __future__ import annotations

import email.utils
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from forge.formats.http.client import HttpClient
from forge.formats.http.response import parse_retry_after
from forge.formats.http.errors import (ConnectError, HttpTimeoutError, NotFoundError,
                                       StatusError, TlsError)
from http_origin import Origin

BIG = os.urandom(3 << 20)  # 3 MiB: several chunks, so a cut lands mid-body
SHA = hashlib.sha256(BIG).hexdigest()


class Sink:
    def __init__(self):
        self.data, self.restarts = bytearray(), 0

    def write(self, chunk):
        self.data += chunk

    def restart(self):
        self.data, self.restarts = bytearray(), self.restarts + 1


@pytest.fixture
def origin():
    o = Origin({"/big.bin": BIG, "/small.txt": b"hello\n"})
    yield o
    o.close()


def client(**kw) -> HttpClient:
    return HttpClient(**{"env": {}, "backoff": 0.01, "timeout": 5, **kw})


def test_a_download_cut_half_way_resumes_with_range(origin):
    origin.faults["/big.bin"] = ["cut"]
    sink = Sink()
    assert client().download(origin.url("/big.bin"), sink) == len(BIG)
    assert hashlib.sha256(sink.data).hexdigest() == SHA and sink.restarts == 0
    first, second = origin.requests("/big.bin")
    assert "Range" not in first.headers
    assert second.headers["Range"] == f"bytes={len(BIG) // 2}-"  # exactly where the cut was
    assert second.headers["If-Range"].startswith('"')  # the strong ETag of the first answer


def test_a_server_that_ignores_range_is_read_again_from_the_start(origin):
    origin.faults["/big.bin"] = ["cut", "ignore-range"]
    sink = Sink()
    client().download(origin.url("/big.bin"), sink)
    assert hashlib.sha256(sink.data).hexdigest() == SHA and sink.restarts == 1
    assert len(origin.requests("/big.bin")) == 2


def test_a_wrong_content_range_falls_back_to_a_full_download(origin):
    origin.faults["/big.bin"] = ["cut", "bad-range"]
    sink = Sink()
    client().download(origin.url("/big.bin"), sink)
    assert hashlib.sha256(sink.data).hexdigest() == SHA and sink.restarts == 1
    ranges = [s.headers.get("Range") for s in origin.requests("/big.bin")]
    assert ranges == [None, f"bytes={len(BIG) // 2}-", None]


def test_a_body_that_stalls_resumes_after_the_timeout(origin):
    origin.faults["/big.bin"] = ["stall-body"]
    sink = Sink()
    t0 = time.monotonic()
    client(timeout=0.5).download(origin.url("/big.bin"), sink)
    assert hashlib.sha256(sink.data).hexdigest() == SHA
    assert 0.4 < time.monotonic() - t0 < 5


def test_a_download_cut_every_time_is_an_error_naming_the_url(origin):
    origin.faults["/big.bin"] = ["cut"] * 10
    with pytest.raises(Exception, match=r"GET http://127.0.0.1:\d+/big.bin: the download was "
                                        r"cut 3 times .*retry later"):
        client(retries=2).download(origin.url("/big.bin"), Sink())


def test_503_and_429_are_retried_after_the_time_retry_after_asks(origin):
    date = email.utils.formatdate(time.time() + 3, usegmt=True)  # asked for about 1 s later
    origin.faults["/small.txt"] = ["503:1", f"429:{date}"]
    assert client().get(origin.url("/small.txt")) == b"hello\n"
    a, b, c = origin.requests("/small.txt")
    assert 0.95 < b.at - a.at < 1.6  # Retry-After: 1, not the 0.01 s backoff
    assert 0.8 < c.at - b.at < 2.6  # the date was about 2 s ahead then (1 s resolution)


def test_retry_after_is_capped(origin):
    origin.faults["/small.txt"] = ["503:3600"]
    t0 = time.monotonic()
    assert client(max_wait=0.3).get(origin.url("/small.txt")) == b"hello\n"
    assert 0.25 < time.monotonic() - t0 < 2


def test_retry_after_parsing():
    now = 1_700_000_000.0
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == 30.0
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_a_failing_server_gives_up_with_the_status_and_attempts(origin):
    origin.faults["/small.txt"] = ["500"] * 5
    c = client(retries=2)
    with pytest.raises(StatusError, match=r"GET http://127.0.0.1:\d+/small.txt: HTTP 500 .*"
                                          r"failing after 3 attempts"):
        c.check(c.request("GET", origin.url("/small.txt")), "GET")
    assert len(origin.requests("/small.txt")) == 3
    with pytest.raises(NotFoundError, match="no such file .*HTTP 404"):
        c.get(origin.url("/missing"))
    assert len(origin.requests("/missing")) == 1  # 4xx is never retried


def test_a_stalled_server_hits_the_timeout_with_a_clear_error(origin):
    origin.faults["/small.txt"] = ["stall", "stall"]
    t0 = time.monotonic()
    with pytest.raises(HttpTimeoutError, match=r"GET http://127.0.0.1:\d+/small.txt: no answer "
                                               r"within 0.4 s \(2 attempt\(s\)\).*raise the "
                                               "timeout"):
        client(timeout=0.4, retries=1).get(origin.url("/small.txt"))
    assert time.monotonic() - t0 < 3


def test_refused_connections_are_explained():
    from registry_fixture import free_port
    with pytest.raises(ConnectError, match=r"cannot connect \(.*Connection refused; 2 "
                                           r"attempt\(s\)\): check that it is running"):
        client(retries=1).get(f"http://127.0.0.1:{free_port()}/x")


def test_n_requests_to_one_host_use_one_connection(origin):
    c = client()
    for _ in range(50):
        assert c.get(origin.url("/small.txt")) == b"hello\n"
    sink = Sink()
    c.download(origin.url("/big.bin"), sink)
    assert len(origin.requests()) == 51 and origin.connections == 1


def test_threads_share_a_bounded_pool(origin):
    c = client(pool_size=4)
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: c.get(origin.url("/small.txt")), range(200))) == \
            [b"hello\n"] * 200
    assert origin.connections <= 4


def test_a_bad_ca_bundle_is_explained(tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(TlsError, match=f"the CA bundle {bad} cannot be loaded"):
        HttpClient(ca_bundle=bad)


# ---- through the CLI ----------------------------------------------------------------------

def test_http_file_resumes_a_cut_download_in_a_build(ws, origin):
    origin.faults["/big.bin"] = ["cut"]
    ws.write({"d/BUILD": f'http_file(name = "big", url = "{origin.url("/big.bin")}", '
                         f'sha256 = "{SHA}")\n'})
    r = ws.build("//d:big")
    assert r.code == 0, r.err
    assert hashlib.sha256((ws.root / "forge-out/d/big.bin").read_bytes()).hexdigest() == SHA
    assert [s.headers.get("Range") for s in origin.requests("/big.bin")] == \
        [None, f"bytes={len(BIG) // 2}-"]


def test_wire_errors_fail_the_build_with_a_message_not_a_traceback(ws, origin):
    origin.faults["/small.txt"] = ["503"] * 10
    ws.write({"d/BUILD": f'http_file(name = "s", url = "{origin.url("/small.txt")}", '
                         f'sha256 = "{"0" * 64}")\n'})
    r = ws.build("//d:s")
    assert r.code == 1, r.err
    assert f"{origin.url('/small.txt')}: HTTP 503" in r.err and "failing after 4 attempts" in r.err
    assert "Traceback" not in r.err


def test_a_sink_that_fails_is_not_a_cut(origin):
    class Full(Sink):
        def write(self, chunk):
            raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space left"):
        client().download(origin.url("/big.bin"), Full())
    assert len(origin.requests("/big.bin")) == 1  # not retried, not resumed
    assert client().get(origin.url("/small.txt")) == b"hello\n"


def test_a_dead_proxy_fails_the_build_saying_which_proxy(ws, origin):
    from registry_fixture import free_port
    proxy = f"http://127.0.0.1:{free_port()}"
    ws.write({"d/BUILD": f'http_file(name = "s", url = "{origin.url("/small.txt")}", '
                         f'sha256 = "{"0" * 64}")\n'})
    r = ws.build("//d:s", env={"http_proxy": proxy, "no_proxy": "", "NO_PROXY": ""})
    assert r.code == 1, r.err
    assert f"GET {origin.url('/small.txt')}: the proxy {proxy} failed" in r.err
    assert "NO_PROXY" in r.err and "Traceback" not in r.err
    assert origin.requests() == []
