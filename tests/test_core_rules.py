"""Core rules: planned actions (analysis only) and http_file against a real local server."""

from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial
from pathlib import Path

import pytest

from forge.labels import Label
from forge.workspace import Workspace


def analyse(root: Path, label: str):
    from forge.analysis import Analyzer
    from forge.labels import parse_pattern
    an = Analyzer(Workspace(root))  # the installed rule families
    roots = an.expand([parse_pattern(label)])
    return an.analyze(roots)


def test_genrule_plans_one_bash_action(ws):
    ws.write({"p/a.txt": "", "p/b.txt": "", "p/BUILD": '''
        genrule(name = "g", srcs = ["a.txt", "b.txt"], outs = ["o1", "o2"],
                cmd = "cat $(SRCS) > $(OUTS) $$HOME $(RULEDIR)")
    '''})
    plan = analyse(ws.root, "//p:g")
    (a,) = plan.actions
    assert a.mnemonic == "Genrule" and a.rule == "genrule@1"
    assert a.argv == ("bash", "-c", "cat p/a.txt p/b.txt > forge-out/p/o1 forge-out/p/o2 $HOME forge-out/p")
    assert [i.path for i in a.inputs] == ["p/a.txt", "p/b.txt"]
    assert [o.path for o in a.outputs] == ["forge-out/p/o1", "forge-out/p/o2"]
    assert "bash" in a.tools


def test_filegroup_forwards_files_without_actions(ws):
    ws.write({"p/a.txt": "", "p/BUILD": '''
        genrule(name = "g", outs = ["g.txt"], cmd = "echo > $@")
        filegroup(name = "fg", srcs = ["a.txt", ":g"])
    '''})
    plan = analyse(ws.root, "//p:fg")
    assert [f.path for f in plan.infos[Label("p", "fg")].files] == ["p/a.txt", "forge-out/p/g.txt"]
    assert [a.owner for a in plan.actions] == [Label("p", "g")]


def test_sh_test_is_a_test_with_runfiles(ws):
    ws.write({"t/t.sh": "", "t/d.txt": "", "t/BUILD": 'sh_test(name = "t", srcs = ["t.sh"], data = ["d.txt"])'})
    plan = analyse(ws.root, "//t:t")
    info = plan.infos[Label("t", "t")]
    assert plan.tests == [Label("t", "t")]
    assert info.executable.path == "forge-out/t/t" and [r.path for r in info.runfiles] == ["t/d.txt"]


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_http_file_verifies_sha256(ws, http_server):
    www, base = http_server
    (www / "blob.bin").write_bytes(b"payload\n")
    good = hashlib.sha256(b"payload\n").hexdigest()
    ws.write({"d/BUILD": f'''
        http_file(name = "ok", url = "{base}/blob.bin", sha256 = "{good}")
        http_file(name = "bad", url = "{base}/blob.bin", sha256 = "{'0' * 64}", downloaded_file_path = "bad.bin")
    '''})
    r = ws.build("//d:ok")
    assert r.code == 0, r.err
    assert (ws.root / "forge-out/d/blob.bin").read_bytes() == b"payload\n"
    r = ws.build("//d:bad")
    assert r.code == 1
    assert f"sha256 mismatch for {base}/blob.bin: expected {'0' * 64}, got {good}" in r.err
    assert not (ws.root / "forge-out/d/bad.bin").exists()
    # Nothing was cached for the failure: it fails again rather than hitting.
    assert ws.build("//d:bad").code == 1
    # The good one is a hit without touching the server.
    (www / "blob.bin").unlink()
    (ws.root / "forge-out/d/blob.bin").unlink()
    assert ws.build("//d:ok").err.strip().endswith("0 executed, 1 cached")


def test_http_file_rejects_a_malformed_sha(ws):
    ws.write({"d/BUILD": 'http_file(name = "x", url = "http://127.0.0.1:1/x", sha256 = "abc")'})
    r = ws.forge("build", "//d:x")
    assert r.code == 2 and "sha256 must be 64 hex digits" in r.err and "d/BUILD:1:" in r.err
