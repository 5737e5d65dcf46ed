"""The REAPI gRPC backend against a real BuildGrid on 127.0.0.1: the same proofs as the
HTTP backend's (tests/remote/test_http.py), plus instances, large blobs through
ByteStream, TLS and bearer tokens."""

from __future__ import annotations

import hashlib
import subprocess
import threading
import time

import pytest

from buildgrid_fixture import buildgrid, start_buildgrid  # noqa: F401 (fixture)
from conftest import require
from test_http import N_ACTIONS, count, make, outputs, statuses

pytestmark = pytest.mark.real


def flags(bg, *more):
    return ("--remote-cache", bg.url, "--remote-instance", bg.instance, *more)


def test_second_workspace_downloads_everything(tmp_path, buildgrid):
    a, b = make(tmp_path, "a"), make(tmp_path / "deeper", "b")
    r = a.build("//...", *flags(buildgrid, "--remote-upload"))
    assert r.code == 0, r.err
    assert count(r, "executed") == N_ACTIONS and "WARNING" not in r.err, r.err
    r = b.build("//...", *flags(buildgrid))
    assert r.code == 0, r.err
    assert count(r, "executed") == 0 and count(r, "remote") == N_ACTIONS, r.err
    assert outputs(b) == outputs(a)
    assert b.build("//...", *flags(buildgrid)).event_list[-1]["cached"] == N_ACTIONS


def test_large_blobs_go_through_bytestream(tmp_path, buildgrid):
    big = {"forge.toml": "", "p/BUILD": '''
genrule(name = "big", outs = ["big.bin"], cmd = "head -c 9000000 /dev/urandom > $@")
genrule(name = "copy", srcs = [":big"], outs = ["copy.bin"], cmd = "cat $< $< > $@")
'''}
    a, b = make(tmp_path, "a", big), make(tmp_path, "b", big)
    assert a.build("//...", *flags(buildgrid, "--remote-upload")).code == 0
    r = b.build("//...", *flags(buildgrid))
    assert r.code == 0 and count(r, "remote") == 2, r.err
    for name in ("big.bin", "copy.bin"):
        assert (b.root / "forge-out/p" / name).read_bytes() == (a.root / "forge-out/p" / name).read_bytes()


def test_instances_are_apart(tmp_path, buildgrid):
    a, b = make(tmp_path, "a"), make(tmp_path, "b")
    assert a.build("//...", *flags(buildgrid, "--remote-upload")).code == 0
    r = b.build("//...", "--remote-cache", buildgrid.url, "--remote-instance", "other")
    assert r.code == 0 and count(r, "executed") == N_ACTIONS, r.err
    assert "WARNING: remote cache" in r.err  # BuildGrid has no instance "other"


def test_read_only_uploads_nothing(tmp_path, buildgrid):
    a, b = make(tmp_path, "a"), make(tmp_path, "b")
    a.write({"forge.toml": f'[remote]\ncache = "{buildgrid.url}"\ninstance = "main"\n'})
    assert a.build("//...").code == 0
    assert [p for p in (buildgrid.base / "cas").rglob("*") if p.is_file()] == []
    r = b.build("//...", *flags(buildgrid))
    assert count(r, "executed") == N_ACTIONS


def test_corrupt_blob_on_the_server_is_rebuilt(tmp_path, buildgrid):
    a, b = make(tmp_path, "a"), make(tmp_path, "b")
    assert a.build("//...", *flags(buildgrid, "--remote-upload")).code == 0
    sha = hashlib.sha256((a.root / "forge-out/app/big.bin").read_bytes()).hexdigest()
    blob = buildgrid.blob_path(sha)
    data = bytearray(blob.read_bytes())
    data[1000] ^= 0xFF
    blob.write_bytes(bytes(data))
    r = b.build("//...", *flags(buildgrid))
    assert r.code == 0, r.err
    assert statuses(r)["//app:pair"] == "executed" and count(r, "remote") == N_ACTIONS - 1, r.err
    assert "do not match its digest" in r.err
    assert outputs(b) == outputs(a)


def test_entry_whose_blob_is_gone_is_a_miss(tmp_path, buildgrid):
    a, b = make(tmp_path, "a"), make(tmp_path, "b")
    assert a.build("//...", *flags(buildgrid, "--remote-upload")).code == 0
    sha = hashlib.sha256((a.root / "forge-out/app/sorted.txt").read_bytes()).hexdigest()
    buildgrid.blob_path(sha).unlink()
    r = b.build("//...", *flags(buildgrid))
    assert r.code == 0, r.err
    assert statuses(r)["//app:sorted"] == "executed" and count(r, "remote") == N_ACTIONS - 1, r.err
    assert outputs(b) == outputs(a)


def test_server_killed_in_the_middle_of_a_build(tmp_path, buildgrid):
    chain = {"forge.toml": "", "c/src.txt": "0\n", "c/BUILD": "\n".join(
        f'genrule(name = "s{i}", srcs = ["{"src.txt" if i == 0 else f":s{i - 1}"}"], '
        f'outs = ["s{i}.txt"], cmd = "cat $< > $@; echo {i} >> $@; sleep 0.1")' for i in range(12))}
    a, b = make(tmp_path, "a", chain), make(tmp_path, "b", chain)
    assert a.build("//...", *flags(buildgrid, "--remote-upload")).code == 0
    b.write({"c/src.txt": "1\n"})  # b runs the chain itself, uploading as it goes
    before = len(list((buildgrid.base / "cas").rglob("*")))
    done = threading.Event()

    def kill_after_first_upload():  # b's first result reached the server: pull the plug
        while not done.is_set():
            if len(list((buildgrid.base / "cas").rglob("*"))) > before:
                buildgrid.kill()
                return
            time.sleep(0.02)
    threading.Thread(target=kill_after_first_upload, daemon=True).start()
    try:
        r = b.build("//...", *flags(buildgrid, "--remote-upload", "--remote-timeout", "2"))
    finally:
        done.set()
    assert r.code == 0, r.err
    assert count(r, "executed") == 12
    assert buildgrid.proc.poll() is not None and "is not usable" in r.err, r.err
    assert (b.root / "forge-out/c/s11.txt").read_text() == "1\n" + "".join(f"{i}\n" for i in range(12))


def test_unreachable_server(tmp_path, buildgrid):
    a = make(tmp_path, "a")
    buildgrid.kill()
    r = a.build("//...", *flags(buildgrid, "--remote-upload", "--remote-timeout", "1"))
    assert r.code == 0 and count(r, "executed") == N_ACTIONS, r.err
    assert r.err.count("is not usable") == 1, r.err


def test_tls_and_bearer_token(tmp_path):
    require(subprocess.run(["which", "openssl"], capture_output=True).returncode == 0,
            "openssl is not installed")
    jwt = pytest.importorskip("jwt")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    secret = "forge-test-secret-of-at-least-32-bytes"
    with start_buildgrid(tmp_path / "bg", tls=(cert, key), jwt_secret=secret) as bg:
        a, b, c = make(tmp_path, "a"), make(tmp_path, "b"), make(tmp_path, "c")
        for ws in (a, b, c):
            ws.write({"forge.toml": f'[remote]\ncache = "{bg.url}"\ninstance = "main"\n'
                                    f'ca_cert = "{cert}"\n'})
        token = jwt.encode({"sub": "ci", "exp": 4102444800}, secret, algorithm="HS256")
        r = a.build("//...", "--remote-upload")  # no token: refused, built locally
        assert r.code == 0 and count(r, "executed") == N_ACTIONS, r.err
        assert "check the credentials" in r.err, r.err
        r = c.build("//...", "--remote-upload", env={"FORGE_REMOTE_TOKEN": token})
        assert r.code == 0 and "WARNING" not in r.err, r.err
        r = b.build("//...", env={"FORGE_REMOTE_TOKEN": token})
        assert r.code == 0 and count(r, "remote") == N_ACTIONS, r.err
        assert outputs(b) == outputs(a)
