"""The Bazel HTTP cache backend against a real nginx (WebDAV) on 127.0.0.1.

Every test builds in two workspaces at different paths with separate local caches that
share one remote, through the real CLI.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from conftest import Workspace
from nginx_fixture import FaultProxy, nginx  # noqa: F401 (fixture)

pytestmark = pytest.mark.real

SOURCES = {
    "forge.toml": "",
    "app/words.txt": "delta\nalpha\ncharlie\nbravo\n",
    "app/BUILD": '''
genrule(name = "upper", srcs = ["words.txt"], outs = ["upper.txt"], cmd = "tr a-z A-Z < $< > $@")
genrule(name = "sorted", srcs = [":upper"], outs = ["sorted.txt"], cmd = "sort $< > $@")
genrule(name = "count", srcs = [":sorted"], outs = ["count.txt"], cmd = "wc -l < $< > $@")
genrule(name = "tool", outs = ["tool.sh"], executable = True,
        cmd = "printf '#!/bin/sh\\\\necho hi\\\\n' > $@")
genrule(name = "pair", srcs = [":sorted", ":count"], outs = ["a.txt", "big.bin"],
        cmd = "cat $(SRCS) > $(location a.txt); seq 1 200000 > $(location big.bin)")
genrule(name = "empty", outs = ["empty.txt"], cmd = ": > $@")
''',
}
OUTPUTS = ["app/upper.txt", "app/sorted.txt", "app/count.txt", "app/tool.sh", "app/a.txt",
           "app/big.bin", "app/empty.txt"]
N_ACTIONS = 6


def make(tmp_path: Path, name: str, sources=SOURCES) -> Workspace:
    root = tmp_path / name / "checkout" / "ws"  # different depths: paths must not matter
    root.mkdir(parents=True)
    ws = Workspace(root, tmp_path / name / "cache")
    ws.write(sources)
    return ws


def outputs(ws: Workspace) -> dict[str, bytes]:
    return {p: (ws.root / "forge-out" / p).read_bytes() for p in OUTPUTS}


def statuses(r) -> dict[str, str]:
    return {e["label"]: e["status"] for e in r.event_list if e["type"] == "action"}


def count(r, status: str) -> int:
    return sum(1 for e in r.event_list if e.get("status") == status)


def test_second_workspace_downloads_everything(tmp_path, nginx):
    a = make(tmp_path, "a")
    old = os.umask(0o077)  # b's checkout and build: another umask, another path
    try:
        b = make(tmp_path / "deeper", "b")
    finally:
        os.umask(old)
    r = a.build("//...", "--remote-cache", nginx.url, "--remote-upload")
    assert r.code == 0, r.err
    assert count(r, "executed") == N_ACTIONS
    puts = [q for q in nginx.requests() if q[0] == "PUT"]
    assert len([q for q in puts if "/ac/" in q[1]]) == N_ACTIONS
    assert all(status in (201, 204) for _, _, status in puts)
    # What nginx holds is what the protocol says: the CAS names are the content's sha256.
    for blob in nginx.blobs("cas"):
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name

    old = os.umask(0o077)
    try:
        r = b.build("//...", "--remote-cache", nginx.url)
    finally:
        os.umask(old)
    assert r.code == 0, r.err
    assert count(r, "executed") == 0 and count(r, "remote") == N_ACTIONS, r.err
    assert r.err.strip().splitlines()[-1] == f"forge: {N_ACTIONS} actions: 0 executed, 0 cached, " \
                                             f"{N_ACTIONS} remote"
    assert outputs(b) == outputs(a)
    tool = b.root / "forge-out/app/tool.sh"
    assert tool.stat().st_mode & 0o111 and not tool.stat().st_mode & 0o222
    # Linked out of b's local cache like any local output: a second build is a local no-op.
    r = b.build("//...", "--remote-cache", nginx.url)
    assert count(r, "cached") == N_ACTIONS
    stats = b.forge("cache", "stats")
    assert "local hit rate 100%" in stats.out


def test_remote_hits_are_reported(tmp_path, nginx):
    a, b = make(tmp_path, "a"), make(tmp_path, "b")
    a.write({"forge.toml": f'[remote]\ncache = "{nginx.url}"\nupload = true\n'})
    b.write({"forge.toml": f'[remote]\ncache = "{nginx.url}"\n'})
    assert a.build("//...").code == 0
    b.write({"app/words.txt": "changed\n"})  # upper, sorted, count, pair miss; tool, empty hit
    r = b.build("//...")
    assert r.code == 0, r.err
    assert statuses(r) == {"//app:upper": "executed", "//app:sorted": "executed",
                           "//app:count": "executed", "//app:pair": "executed",
                           "//app:tool": "remote", "//app:empty": "remote"}
    done = r.event_list[-1]
    assert done["remote"] == 2 and done["remote_cache"]["hits"] == 2
    stats = b.forge("cache", "stats").out
    assert "2 of the 6 local misses fetched (remote hit rate 33%), 4 executed" in stats, stats
    assert "read-only" in stats
    explain = b.forge("explain", "//app:tool").out
    assert "fetched from the remote cache" in explain


def test_read_only_uploads_nothing(tmp_path, nginx):
    a, b = make(tmp_path, "a"), make(tmp_path, "b")
    a.write({"forge.toml": f'[remote]\ncache = "{nginx.url}"\n'})  # upload defaults to false
    r = a.build("//...")
    assert r.code == 0, r.err
    assert count(r, "executed") == N_ACTIONS
    methods = {m for m, _, _ in nginx.requests()}
    assert methods == {"GET"}, nginx.requests()
    assert nginx.blobs("cas") == [] and nginx.blobs("ac") == []
    r = b.build("//...", "--remote-cache", nginx.url)
    assert count(r, "executed") == N_ACTIONS


def test_corrupt_blob_on_the_server_is_rebuilt(tmp_path, nginx):
    a, b = make(tmp_path, "a"), make(tmp_path, "b")
    assert a.build("//...", "--remote-cache", nginx.url, "--remote-upload").code == 0
    sha = hashlib.sha256((a.root / "forge-out/app/big.bin").read_bytes()).hexdigest()
    blob = nginx.store / "cas" / sha
    data = bytearray(blob.read_bytes())
    data[1000] ^= 0xFF  # same size, one byte off: only the digest check can tell
    blob.write_bytes(bytes(data))
    r = b.build("//...", "--remote-cache", nginx.url)
    assert r.code == 0, r.err
    assert statuses(r)["//app:pair"] == "executed"
    assert count(r, "remote") == N_ACTIONS - 1
    assert "do not match its digest" in r.err
    assert outputs(b) == outputs(a)
    # Nothing of the bad blob entered b's cache: a clean rebuild from it is right too.
    b.forge("clean")
    assert b.build("//...").code == 0 and outputs(b) == outputs(a)


def test_entry_whose_blob_is_gone_is_a_miss(tmp_path, nginx):
    a, b = make(tmp_path, "a"), make(tmp_path, "b")
    assert a.build("//...", "--remote-cache", nginx.url, "--remote-upload").code == 0
    sha = hashlib.sha256((a.root / "forge-out/app/sorted.txt").read_bytes()).hexdigest()
    (nginx.store / "cas" / sha).unlink()  # as an evicting cache would
    r = b.build("//...", "--remote-cache", nginx.url)
    assert r.code == 0, r.err
    assert statuses(r)["//app:sorted"] == "executed"
    assert count(r, "remote") == N_ACTIONS - 1
    assert "no longer has" in r.err
    assert outputs(b) == outputs(a)


def test_unreachable_remote_costs_a_warning(tmp_path, nginx):
    a = make(tmp_path, "a")
    nginx.kill()
    t0 = time.monotonic()
    r = a.build("//...", "--remote-cache", nginx.url, "--remote-upload")
    assert r.code == 0, r.err
    assert count(r, "executed") == N_ACTIONS
    assert r.err.count("is not usable") == 1, r.err
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("fault", ["503", "truncate"])
def test_passing_faults_are_retried(tmp_path, nginx, fault):
    a, b = make(tmp_path, "a"), make(tmp_path, "b")
    assert a.build("//...", "--remote-cache", nginx.url, "--remote-upload").code == 0
    proxy = FaultProxy(nginx.port)
    try:
        proxy.faults = [fault] * 3  # the first connections fail; retries get through
        r = b.build("//...", "--remote-cache", proxy.url())
        assert r.code == 0, r.err
        assert count(r, "remote") == N_ACTIONS, r.err
        assert outputs(b) == outputs(a)
    finally:
        proxy.close()


@pytest.mark.parametrize("fault", ["503", "truncate", "stall"])
def test_a_failing_remote_never_fails_the_build(tmp_path, nginx, fault):
    a, b = make(tmp_path, "a"), make(tmp_path, "b")
    assert a.build("//...", "--remote-cache", nginx.url, "--remote-upload").code == 0
    proxy = FaultProxy(nginx.port, mode=fault)
    try:
        t0 = time.monotonic()
        r = b.build("//...", "--remote-cache", proxy.url(), "--remote-timeout", "0.5",
                    "--remote-upload")
        assert r.code == 0, r.err
        assert count(r, "executed") == N_ACTIONS, r.err
        assert "WARNING: remote cache" in r.err
        assert outputs(b) == outputs(a)
        assert time.monotonic() - t0 < 40
    finally:
        proxy.close()


def test_server_killed_in_the_middle_of_a_build(tmp_path, nginx):
    chain = {"forge.toml": "", "c/src.txt": "0\n", "c/BUILD": "\n".join(
        f'genrule(name = "s{i}", srcs = ["{"src.txt" if i == 0 else f":s{i - 1}"}"], '
        f'outs = ["s{i}.txt"], cmd = "cat $< > $@; echo {i} >> $@")' for i in range(12))}
    a, b = make(tmp_path, "a", chain), make(tmp_path, "b", chain)
    assert a.build("//...", "--remote-cache", nginx.url, "--remote-upload").code == 0
    proxy = FaultProxy(nginx.port, mode="delay:0.3")  # each request takes a while
    done = threading.Event()

    def kill_after_first_download():
        while not done.is_set():
            if any(m == "GET" and "/cas/" in p and st == 200 for m, p, st in nginx.requests()):
                nginx.kill()
                return
            time.sleep(0.02)
    killer = threading.Thread(target=kill_after_first_download, daemon=True)
    killer.start()
    try:
        r = b.build("//...", "--remote-cache", proxy.url(), "--remote-timeout", "2")
    finally:
        done.set()
        proxy.close()
    assert r.code == 0, r.err
    st = statuses(r)
    assert st["//c:s0"] == "remote" and st["//c:s11"] == "executed", r.err
    assert "is not usable" in r.err
    assert (b.root / "forge-out/c/s11.txt").read_text() == (a.root / "forge-out/c/s11.txt").read_text()


def test_bad_url_is_a_usage_error(tmp_path):
    a = make(tmp_path, "a")
    r = a.forge("build", "//...", "--remote-cache", "ftp://x/y")
    assert r.code == 2 and "is not a URL forge can use" in r.err and "Traceback" not in r.err


def test_ci_reports_with_a_remote(tmp_path, nginx):
    """`forge test --junit`, `--build-events` and `--profile` on a build fed by the remote."""
    sources = {**SOURCES, "app/check.sh": "#!/bin/sh\ngrep -q ALPHA forge-out/app/sorted.txt\n"}
    sources["app/BUILD"] += ('sh_test(name = "check", srcs = ["check.sh"], '
                             'data = [":sorted"])\n')
    a, b = make(tmp_path, "a", sources), make(tmp_path, "b", sources)
    assert a.build("//...", "--remote-cache", nginx.url, "--remote-upload").code == 0
    junit, profile, events = tmp_path / "junit.xml", tmp_path / "trace.json", tmp_path / "ev.jsonl"
    r = b.forge("test", "//...", "--remote-cache", nginx.url, "--junit", str(junit),
                "--profile", str(profile), "--build-events", str(events))
    assert r.code == 0, r.err
    assert 'testcase name="//app:check"' in junit.read_text() and "<failure" not in junit.read_text()
    import json
    trace = json.loads(profile.read_text())["traceEvents"]
    assert {e["cat"] for e in trace if e.get("ph") == "X" and e["cat"] != "phase"} == {"remote"}
    lines = [json.loads(x) for x in events.read_text().splitlines()]
    assert lines[-1]["remote"] == lines[-1]["remote_cache"]["hits"] > 0
    assert all(x["status"] == "remote" for x in lines[:-1])


def test_ci_writes_developers_read(tmp_path):
    """nginx lets only the CI user PUT; a developer without credentials reads."""
    from nginx_fixture import start_nginx
    with start_nginx(tmp_path / "nginx", writer=("ci", "s3cret")) as n:
        ci, dev, anon = make(tmp_path, "ci"), make(tmp_path, "dev"), make(tmp_path, "anon")
        r = anon.build("//...", "--remote-cache", n.url, "--remote-upload")
        assert r.code == 0 and "HTTP 401" in r.err and "check the credentials" in r.err, r.err
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1 login ci password s3cret\n")
        r = ci.build("//...", "--remote-cache", n.url, "--remote-upload",
                     env={"NETRC": str(netrc)})
        assert r.code == 0 and "WARNING" not in r.err, r.err
        r = dev.build("//...", "--remote-cache", n.url)
        assert r.code == 0 and count(r, "remote") == N_ACTIONS, r.err
        assert outputs(dev) == outputs(ci)


def test_local_hits_never_ask_the_remote(tmp_path, nginx):
    a = make(tmp_path, "a")
    assert a.build("//...", "--remote-cache", nginx.url, "--remote-upload").code == 0
    before = len(nginx.requests())
    a.forge("clean")  # not even the workspace state: hits come from the local action cache
    r = a.build("//...", "--remote-cache", nginx.url)
    assert r.code == 0 and count(r, "cached") == N_ACTIONS
    assert len(nginx.requests()) == before
