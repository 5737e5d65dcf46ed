"""Directory outputs through a remote cache: stored as REAPI Trees, rebuilt into the same
forge manifest (so downstream keys match) on the other side. Drives the executor
directly with in-process actions, against both real servers."""

from __future__ import annotations

import os

import pytest

from buildgrid_fixture import start_buildgrid
from forge.cache import Cache
from forge.executor import LocalExecutor
from forge.records import Records
from forge.remote.settings import from_config
from forge.scheduler import Scheduler
from nginx_fixture import start_nginx
from test_executor import CALLS, RULES, tree_actions

pytestmark = pytest.mark.real


class Warnings:
    def __init__(self):
        self.seen = []

    def warning(self, text):
        self.seen.append(text)

    def __getattr__(self, name):
        return lambda *a, **k: None


def build(base, name, settings, actions):
    root = base / name / "ws"
    root.mkdir(parents=True, exist_ok=True)
    cache = Cache(base / name / "cache")
    rep = Warnings()
    local = LocalExecutor(root, cache, Records(base / name / "records"), remote=settings,
                          reporter=rep, rules=RULES)
    summary = Scheduler(local, jobs=2).run(actions)
    cache.close()
    return summary, root, rep.seen


@pytest.fixture(params=["http", "grpc"])
def remote(request, tmp_path):
    if request.param == "http":
        with start_nginx(tmp_path / "nginx") as n:
            yield {"cache": n.url}
    else:
        with start_buildgrid(tmp_path / "bg") as bg:
            yield {"cache": bg.url, "instance": bg.instance}


def test_tree_outputs_cross_machines(tmp_path, remote):
    writer = from_config({"remote": {**remote, "upload": True}})
    reader = from_config({"remote": remote})
    CALLS.clear()
    s, a_root, warned = build(tmp_path, "a", writer, tree_actions("one"))
    assert s.ok and CALLS == ["tree:one", "read"] and not warned, warned
    CALLS.clear()
    s, b_root, warned = build(tmp_path, "b", reader, tree_actions("one"))
    assert s.ok and not warned, warned
    assert CALLS == [] and [r.status for r in s.results] == ["remote", "remote"]
    layout_a, layout_b = a_root / "forge-out/p/layout", b_root / "forge-out/p/layout"
    files = sorted(p.relative_to(layout_a).as_posix() for p in layout_a.rglob("*"))
    assert files == sorted(p.relative_to(layout_b).as_posix() for p in layout_b.rglob("*"))
    for rel in files:
        pa, pb = layout_a / rel, layout_b / rel
        if pa.is_symlink():
            assert os.readlink(pa) == os.readlink(pb)
        elif pa.is_file():
            assert pa.read_bytes() == pb.read_bytes()
    # The manifest digest (what downstream keys see) is the one the writer made.
    assert s.results[0].outputs[0].digest == build(tmp_path, "a", writer, tree_actions("one"))[0] \
        .results[0].outputs[0].digest


def test_a_local_only_action_is_neither_uploaded_nor_fetched(tmp_path):
    """An action marked `local` (its result depends on this machine, e.g. a file from the
    user's home) stays out of the shared cache both ways; its dependents still share."""
    import dataclasses
    with start_nginx(tmp_path / "nginx") as n:
        writer = from_config({"remote": {"cache": n.url, "upload": True}})
        reader = from_config({"remote": {"cache": n.url}})
        tree, read = tree_actions("local")
        actions = [dataclasses.replace(tree, local="reads /home/u/.ssh/id_rsa.pub"), read]
        CALLS.clear()
        s, _, warned = build(tmp_path, "a", writer, actions)
        assert s.ok and CALLS == ["tree:local", "read"] and not warned, warned
        CALLS.clear()
        s, _, warned = build(tmp_path, "b", reader, actions)
        # The local one ran again on the other machine; the one after it came from the cache
        assert s.ok and CALLS == ["tree:local"], CALLS
        assert [r.status for r in s.results] == ["executed", "remote"]
        # Unmarked, the same action is shared: so the above is the mark's doing.
        CALLS.clear()
        build(tmp_path, "c", writer, [tree, read])
        CALLS.clear()
        s, _, _ = build(tmp_path, "d", reader, [tree, read])
        assert CALLS == [] and [r.status for r in s.results] == ["remote", "remote"]
