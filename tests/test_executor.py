"""The scheduler with fake in-process actions: call counters, pools, parallelism."""

from __future__ import annotations

import os
import threading
import time

from forge.api import Action, Artifact, action_function, pool
from forge.cache import Cache
from forge.executor import LocalExecutor
from forge.labels import Label
from forge.records import Records
from forge.ruleset import RuleSet
from forge.scheduler import Scheduler

CALLS: list[str] = []
ACTIVE = {"now": 0, "max": 0, "pool_now": 0, "pool_max": 0}
LOCK = threading.Lock()


@action_function("TestFake", version=1)
def fake(ctx):
    with LOCK:
        CALLS.append(ctx.params["name"])
        ACTIVE["now"] += 1
        ACTIVE["max"] = max(ACTIVE["max"], ACTIVE["now"])
        if ctx.params.get("pooled"):
            ACTIVE["pool_now"] += 1
            ACTIVE["pool_max"] = max(ACTIVE["pool_max"], ACTIVE["pool_now"])
    time.sleep(ctx.params.get("sleep", 0.05))
    data = "".join(ctx.path(i).read_text() for i in ctx.inputs) + ctx.params["name"] + "\n"
    ctx.path(ctx.outputs[0]).write_text(data)
    with LOCK:
        ACTIVE["now"] -= 1
        if ctx.params.get("pooled"):
            ACTIVE["pool_now"] -= 1


def act(name, deps=(), **params) -> Action:
    return Action(Label("p", name), "Fake", "test@1",
                  tuple(Artifact(f"forge-out/p/{d}", source=False) for d in deps),
                  (Artifact(f"forge-out/p/{name}", source=False),),
                  function="TestFake", params={"name": name, **params},
                  pool="single" if params.get("pooled") else None)


def run(tmp_path, actions, jobs=4):
    root = tmp_path / "ws"
    root.mkdir(exist_ok=True)
    cache = Cache(tmp_path / "cache")
    local = LocalExecutor(root, cache, Records(tmp_path / "records"), rules=RULES)
    summary = Scheduler(local, jobs=jobs, pools=RULES.pools).run(actions)
    cache.close()
    return summary


def test_parallel_then_nothing_then_exactly_the_changed(tmp_path):
    CALLS.clear()
    wide = [act(f"w{i}") for i in range(8)]
    top = act("top", deps=[f"w{i}" for i in range(8)])
    s = run(tmp_path, wide + [top], jobs=4)
    assert s.ok and sorted(CALLS) == sorted([f"w{i}" for i in range(8)] + ["top"])
    assert CALLS[-1] == "top"
    assert ACTIVE["max"] >= 2  # independent actions overlapped
    CALLS.clear()
    s = run(tmp_path, wide + [top], jobs=4)
    assert CALLS == [] and s.count("cached") == 9
    # A changed parameter changes one key; identical output would stop there.
    wide[3] = act("w3", sleep=0.01)
    s = run(tmp_path, wide + [top], jobs=4)
    assert CALLS == ["w3"] and s.count("executed") == 1


def test_pool_limits_concurrency(tmp_path):
    ACTIVE.update(pool_now=0, pool_max=0)
    actions = [act(f"q{i}", pooled=True, sleep=0.1) for i in range(4)] + [act(f"f{i}") for i in range(4)]
    s = run(tmp_path, actions, jobs=4)
    assert s.ok
    assert ACTIVE["pool_max"] == 1


@action_function("TestTree", version=1)
def make_tree(ctx):
    out = ctx.path(ctx.outputs[0])
    (out / "blobs/sha256").mkdir(parents=True)
    (out / "blobs/sha256/aa").write_text(ctx.params["content"])
    (out / "index.json").write_text("{}")
    os.symlink("blobs/sha256/aa", out / "latest")
    CALLS.append("tree:" + ctx.params["content"])


@action_function("TestReadTree", version=1)
def read_tree(ctx):
    tree = ctx.path(ctx.inputs[0])
    ctx.path(ctx.outputs[0]).write_text((tree / "latest").read_text() + "|" + ",".join(
        sorted(p.name for p in tree.rglob("*"))))
    CALLS.append("read")


def tree_actions(content):
    tree = Artifact("forge-out/p/layout", source=False, directory=True)
    out = Artifact("forge-out/p/read.txt", source=False)
    return [Action(Label("p", "tree"), "Tree", "test@1", (), (tree,), function="TestTree",
                   params={"content": content}),
            Action(Label("p", "read"), "Read", "test@1", (tree,), (out,), function="TestReadTree",
                   params={})]


def test_directory_outputs_are_cached_and_staged(tmp_path):
    CALLS.clear()
    s = run(tmp_path, tree_actions("one"))
    assert s.ok, [r.error for r in s.results]
    assert CALLS == ["tree:one", "read"]
    ws = tmp_path / "ws"
    assert (ws / "forge-out/p/read.txt").read_text() == "one|aa,blobs,index.json,latest,sha256"
    assert os.readlink(ws / "forge-out/p/layout/latest") == "blobs/sha256/aa"
    CALLS.clear()
    assert run(tmp_path, tree_actions("one")).count("cached") == 2 and CALLS == []
    # Removed from the workspace: restored from the cache without running.
    from forge.leftovers import force_rmtree
    force_rmtree(ws / "forge-out/p/layout")
    s = run(tmp_path, tree_actions("one"))
    assert CALLS == [] and (ws / "forge-out/p/layout/index.json").exists()
    s = run(tmp_path, tree_actions("two"))
    assert CALLS == ["tree:two", "read"]
    assert (ws / "forge-out/p/read.txt").read_text().startswith("two|")


# The fakes' own rule set: nothing registers by being imported.
RULES = RuleSet()
RULES.add(fake, make_tree, read_tree, pool("single", 1))
