"""The remote-execution client against a real BuildGrid on 127.0.0.1: the Command and
input root it uploads (read back from BuildGrid's CAS), FindMissingBlobs sparing what is
there, and every way the farm can fail costing a warning and a local run (or a clear
failure with --no-remote-local-fallback). The end-to-end tests with workers are in
test_remote_builds.py."""

from __future__ import annotations

import hashlib
import socket

import pytest

from buildgrid_fixture import buildgrid  # noqa: F401 (fixture)
from test_http import N_ACTIONS, count, make, outputs

from forge.cache import Cache
from forge.model import Action, Artifact
from forge.labels import parse_label
from forge.remote import inputs as rin
from forge.remote.proto import remote_execution_pb2 as re_pb
from forge.remote.results import digest_of
from forge.remote.settings import executor_from_config

pytestmark = pytest.mark.real


def _action(**kw) -> Action:
    return Action(parse_label("//p:x"), "Genrule", "genrule@1",
                  (Artifact("p/in.txt"), Artifact("forge-out/q/gen.txt", source=False)),
                  (Artifact("forge-out/p/out.txt", source=False),),
                  argv=("bash", "-c", "cat p/in.txt forge-out/q/gen.txt > forge-out/p/out.txt"),
                  env=(("FOO", "bar"),), remote=True, **kw)


def test_command_carries_argv_env_outputs_and_properties():
    a = _action(exec_properties=(("docker", "1"), ("OSFamily", "linux")), timeout=90.5)
    cmd = rin.command(a)
    assert list(cmd.arguments) == list(a.argv)
    env = {v.name: v.value for v in cmd.environment_variables}
    assert env["FOO"] == "bar" and env["SOURCE_DATE_EPOCH"] == "315532800" and "HOME" not in env
    assert [v.name for v in cmd.environment_variables] == sorted(env)
    assert list(cmd.output_paths) == ["forge-out/p/out.txt"] == list(cmd.output_files)
    blobs = rin.Blobs()
    root = rin.input_root([], blobs)
    d = rin.action(a, "k" * 32, root, blobs)
    msg = re_pb.Action.FromString(blobs.items[d.hash][1])
    assert [(p.name, p.value) for p in msg.platform.properties] == [("OSFamily", "linux"),
                                                                   ("docker", "1")]
    assert msg.timeout.seconds == 90 and msg.timeout.nanos == 500_000_000
    assert msg.salt.endswith(b"k" * 32)
    assert not msg.do_not_cache
    # Another key (other host tools) is another Action: never a shared result.
    assert rin.action(a, "j" * 32, root, rin.Blobs()) != d
    blobs = rin.Blobs()
    d = rin.action(a, "k" * 32, root, blobs, do_not_cache=True)
    assert re_pb.Action.FromString(blobs.items[d.hash][1]).do_not_cache


def test_genrule_declares_remote_properties_and_tags(tmp_path):
    from conftest import Workspace
    from forge.session import Session
    from forge.workspace import find_workspace
    ws = Workspace(tmp_path / "ws", tmp_path / "cache")
    ws.write({"forge.toml": "", "p/BUILD": '''
genrule(name = "plain", outs = ["a"], cmd = "echo > $@")
genrule(name = "docker", outs = ["b"], cmd = "echo > $@", exec_properties = {"docker": "1"})
genrule(name = "here", outs = ["c"], cmd = "echo > $@", tags = ["no-remote"])
genrule(name = "fresh", outs = ["d"], cmd = "echo > $@", tags = ["no-remote-cache"])
'''})
    plan = Session(find_workspace(ws.root), cache_dir=str(ws.cache)).plan(["//p:all"])
    by = {str(a.owner): a for a in plan.actions}
    assert by["//p:plain"].remote and by["//p:plain"].exec_properties == ()
    assert by["//p:docker"].exec_properties == (("docker", "1"),)
    assert not by["//p:here"].remote
    assert by["//p:fresh"].remote and by["//p:fresh"].do_not_cache


def test_input_root_is_uploaded_once_and_reads_back(tmp_path, buildgrid):
    from forge.remote.exec_client import RemoteExecutor
    ws = tmp_path / "ws"
    (ws / "p").mkdir(parents=True)
    (ws / "p" / "in.txt").write_text("source\n")
    cache = Cache(tmp_path / "cache")
    gen = cache.put_bytes(b"generated\n")
    from forge.cache import OutputFile
    generated = {"forge-out/q/gen.txt": OutputFile("forge-out/q/gen.txt", gen, 10, False)}
    ex = executor_from_config({"remote": {"executor": buildgrid.url, "instance": "main"}})
    rex = RemoteExecutor(ex, cache, ws, warn=print)
    try:
        a = _action()
        blobs = rin.Blobs()
        entries = rex._inputs(a, {"p/in.txt": "xx-source"}, generated, blobs)
        root = rin.input_root(entries, blobs)
        rin.action(a, "k" * 32, root, blobs)
        rex._upload(blobs)
        first = dict(rex.stats)
        assert first["blobs_up"] == len(blobs.items) == 8  # 2 files, 4 dirs (root, p, forge-out, forge-out/q), Command, Action
        assert rex.store.find_missing([d for d, _ in blobs.items.values()]) == []
        # Read the tree back from BuildGrid: the workspace's layout, sources and outputs.
        top = re_pb.Directory.FromString(rex.store.read_batch([root])[root.hash])
        assert [d.name for d in top.directories] == ["forge-out", "p"]
        p = re_pb.Directory.FromString(_read(rex, top.directories[1].digest))
        assert p.files[0].name == "in.txt"
        assert p.files[0].digest.hash == hashlib.sha256(b"source\n").hexdigest()
        # A second action over the same inputs: FindMissingBlobs spares every blob.
        rex.present.clear()
        rex._upload(blobs)
        assert rex.stats["blobs_up"] == first["blobs_up"]
        assert rex.stats["blobs_saved"] == len(blobs.items)
    finally:
        rex.close()


def _read(rex, d):
    dg = digest_of(b"")._replace(hash=d.hash, size=d.size_bytes)
    return rex.store.read_batch([dg])[d.hash]


def flags(url, *more):
    return ("--remote-executor", url, "--remote-instance", "main", *more)


def test_a_cache_only_server_costs_a_warning_and_local_runs(tmp_path, buildgrid):
    ws = make(tmp_path, "a")
    r = ws.build("//...", *flags(buildgrid.url))
    assert r.code == 0, r.err
    assert count(r, "executed") == N_ACTIONS, r.err
    assert "serves no REAPI Execution service" in r.err
    assert r.err.count("remote executor") == 1, r.err  # given up once, not per action
    assert {e["ran_on"] for e in r.event_list if e["type"] == "action"} == {"local"}
    assert outputs(ws)["app/sorted.txt"] == b"ALPHA\nBRAVO\nCHARLIE\nDELTA\n"


def test_no_fallback_fails_clearly(tmp_path, buildgrid):
    ws = make(tmp_path, "a")
    r = ws.build("//...", *flags(buildgrid.url, "--no-remote-local-fallback"))
    assert r.code == 1, r.err
    assert f"remote execution on {buildgrid.url} failed" in r.err
    assert "--remote-local-fallback" in r.err and "internal error" not in r.err


def test_an_executor_that_is_down_costs_a_warning(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    ws = make(tmp_path, "a")
    r = ws.build("//...", *flags(f"grpc://127.0.0.1:{port}", "--remote-timeout", "5"))
    assert r.code == 0, r.err
    assert count(r, "executed") == N_ACTIONS
    assert "WARNING" in r.err and "internal error" not in r.err


def test_bad_executor_urls_are_usage_errors(tmp_path):
    ws = make(tmp_path, "a")
    r = ws.build("//...", "--remote-executor", "http://farm:8080")
    assert r.code == 2 and "grpc:// or grpcs://" in r.err, r.err


def test_a_pool_maps_to_platform_properties_when_sent_remote():
    from forge.remote.exec_client import as_sent
    s = executor_from_config({"remote": {"executor": "grpc://farm:8980", "pool_properties": {
        "docker": {"docker": "1"}, "qemu": {"kvm": "1", "OSFamily": "linux"}}}})
    docker = as_sent(_action(pool="docker"), s)
    assert docker.exec_properties == (("docker", "1"),)
    # The action's own exec_properties join its pool's and win over them.
    both = as_sent(_action(pool="qemu", exec_properties=(("kvm", "0"), ("ISA", "x86-64"))), s)
    assert both.exec_properties == (("ISA", "x86-64"), ("OSFamily", "linux"), ("kvm", "0"))
    # No pool, or a pool with no entry: sent as it is.
    plain = _action(exec_properties=(("a", "b"),))
    assert as_sent(plain, s) is plain and as_sent(_action(pool="network"), s).exec_properties == ()
    # The properties reach the REAPI Action and Command (what BuildGrid matches workers on).
    blobs = rin.Blobs()
    d = rin.action(docker, "k" * 32, rin.input_root([], blobs), blobs)
    msg = re_pb.Action.FromString(blobs.items[d.hash][1])
    assert [(p.name, p.value) for p in msg.platform.properties] == [("docker", "1")]
    assert [(p.name, p.value) for p in rin.command(docker).platform.properties] == [("docker", "1")]
    assert executor_from_config({"remote": {"executor": "grpc://farm:8980"}}).pool_properties == ()


@pytest.mark.parametrize("table", [["docker"], {"docker": "1"}, {"docker": {"docker": 1}},
                                   {"docker": {"": "1"}}])
def test_bad_pool_properties_are_usage_errors(table):
    from forge.errors import UsageError
    with pytest.raises(UsageError, match="pool_properties"):
        executor_from_config({"remote": {"executor": "grpc://farm:8980", "pool_properties": table}})


def test_bad_pool_properties_in_forge_toml_exit_2(tmp_path):
    ws = make(tmp_path, "a")
    (ws.root / "forge.toml").write_text('[remote]\nexecutor = "grpc://127.0.0.1:1"\n'
                                        'pool_properties = {docker = "1"}\n')
    r = ws.build("//...")
    assert r.code == 2 and "pool_properties" in r.err and "internal error" not in r.err, r.err
