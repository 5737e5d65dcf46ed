"""Builds with --remote-executor against the real thing: PostgreSQL, BuildGrid's
scheduler and `forge worker` processes on loopback (tests/buildgrid_exec_fixture.py).
Where each action ran comes from the build events (`ran_on`), which name the worker."""

from __future__ import annotations

import threading
import time

import pytest

from buildgrid_exec_fixture import exec_grid, start_worker, wait_until  # noqa: F401 (fixture)
from test_http import make

pytestmark = pytest.mark.real

N = 120  # genrules in the big graph


def chain_graph(n: int = N) -> dict[str, str]:
    """n genrules: 20 roots from sources, each later one reading an earlier one, so the
    graph has depth and fan-in; the bytes depend on every input."""
    lines = []
    for i in range(n):
        if i < 20:
            lines.append(f'genrule(name = "g{i}", srcs = ["s{i % 5}.txt"], outs = ["g{i}.txt"], '
                         f'cmd = "(cat $<; echo {i}; sha256sum $<) > $@")')
        else:
            lines.append(f'genrule(name = "g{i}", srcs = [":g{i - 20}", ":g{i // 2}"], '
                         f'outs = ["g{i}.txt"], cmd = "(cat $(SRCS) | sha256sum; echo {i}) > $@")')
    files = {"forge.toml": "", "big/BUILD": "\n".join(lines) + "\n"}
    for k in range(5):
        files[f"big/s{k}.txt"] = f"source {k}\n" * (k + 1)
    return files


def outs(ws, n: int = N) -> dict[str, bytes]:
    return {i: (ws.root / f"forge-out/big/g{i}.txt").read_bytes() for i in range(n)}


def ran_on(r) -> list[str]:
    return [e.get("ran_on", "") for e in r.event_list if e["type"] == "action"]


def rex(grid, *more):
    return ("--remote-executor", grid.url, "--remote-instance-name", grid.instance, *more)


DOCKER = {"forge.toml": "[remote]\nqueue_timeout = 4\n", "d/BUILD": '''
genrule(name = "needs_docker", outs = ["d.txt"], cmd = "echo docker > $@",
        exec_properties = {"docker": "1"})
'''}


def test_an_action_no_worker_can_take_runs_here(tmp_path, exec_grid):
    ws = make(tmp_path, "a", DOCKER)
    r = ws.build("//...", *rex(exec_grid))
    assert r.code == 0, r.err
    assert ran_on(r) == ["local"], r.err
    assert "no worker started it within 4 s" in r.err and "running it here" in r.err
    assert (ws.root / "forge-out/d/d.txt").read_text() == "docker\n"


def test_an_action_no_worker_can_take_fails_clearly_without_fallback(tmp_path, exec_grid):
    ws = make(tmp_path, "a", DOCKER)
    r = ws.build("//...", *rex(exec_grid, "--no-remote-local-fallback"))
    assert r.code == 1, r.err
    assert "no worker started it within 4 s" in r.err
    assert "platform properties" in r.err and "internal error" not in r.err
    assert not (ws.root / "forge-out/d/d.txt").exists()


@pytest.fixture(scope="module")
def two_workers(exec_grid, tmp_path_factory):
    base = tmp_path_factory.mktemp("workers")
    ws = [start_worker(exec_grid, base / f"w{i}", concurrency=8, name=f"bench-w{i}")
          for i in range(2)]
    yield ws
    for w in ws:
        w.kill()
        exec_grid.workers.remove(w)


def test_a_big_graph_runs_on_workers_then_comes_from_the_action_cache(tmp_path, exec_grid,
                                                                       two_workers):
    graph = chain_graph()
    here = make(tmp_path, "local", graph)
    r = here.build("//...", "-j", "2")
    assert r.code == 0, r.err
    expected = outs(here)

    a = make(tmp_path, "a", graph)
    r = a.build("//...", "-j", "16", *rex(exec_grid), timeout=900)
    assert r.code == 0, r.err + "\n".join(w.log()[-2000:] for w in two_workers)
    where = ran_on(r)
    assert len(where) == N and all(w.startswith("remote ") and w != "remote cache"
                                   for w in where), (set(where), r.err)
    names = {w.name for w in two_workers}
    assert all(any(n in w for n in names) for w in where), set(where)
    assert "WARNING" not in r.err, r.err
    assert outs(a) == expected
    stats = r.event_list[-1]["remote_cache"]["executor"]
    assert stats["executed"] == N and stats["blobs_up"] > 0
    assert stats["blobs_saved"] > 0  # the shared sources and outputs of earlier actions

    # Another checkout at another path, an empty local cache: every action is a hit.
    b = make(tmp_path / "elsewhere" / "deeper", "b", graph)
    r = b.build("//...", "-j", "16", *rex(exec_grid), timeout=600)
    assert r.code == 0, r.err
    assert [e["status"] for e in r.event_list if e["type"] == "action"] == ["remote"] * N, r.err
    assert set(ran_on(r)) == {"remote cache"}
    assert outs(b) == expected
    e = b.forge("explain")
    assert "fetched from the remote cache" in e.out


def test_a_failing_action_fails_with_its_own_output(tmp_path, exec_grid, two_workers):
    ws = make(tmp_path, "a", {"forge.toml": "", "f/BUILD": '''
genrule(name = "bad", outs = ["x.txt"], cmd = "echo this went wrong >&2; exit 3")
'''})
    r = ws.build("//...", *rex(exec_grid))
    assert r.code == 1, r.err
    assert "exit code 3 on" in r.err and "this went wrong" in r.err, r.err
    assert "running it here" not in r.err  # an action's own failure is not the farm's


def test_explain_names_the_worker(tmp_path, exec_grid, two_workers):
    ws = make(tmp_path, "a", {"forge.toml": "", "e/BUILD": '''
genrule(name = "one", outs = ["one.txt"], cmd = "echo %s > $@")
''' % time.time_ns()})
    assert ws.build("//...", *rex(exec_grid)).code == 0
    text = ws.forge("explain").out
    assert "ran on remote bench-w" in text, text


def test_the_executor_killed_mid_build_costs_a_warning(tmp_path, exec_grid, two_workers):
    n = 40
    salt = time.time_ns()
    rules = "\n".join(f'genrule(name = "s{i}", outs = ["s{i}.txt"], '
                      f'cmd = "sleep 0.5; echo {i} {salt} > $@")' for i in range(n))
    ws = make(tmp_path, "a", {"forge.toml": "[remote]\ntimeout = 5\n", "k/BUILD": rules})
    result = {}
    t = threading.Thread(target=lambda: result.update(r=ws.build("//...", "-j", "4",
                                                                *rex(exec_grid), timeout=600)))
    t.start()
    try:
        wait_until(lambda: len(list((ws.root / "forge-out/k").glob("*.txt"))) >= 4, 120,
                   "the first actions done on workers")  # more are under way
        exec_grid.kill()
        t.join(600)
    finally:
        exec_grid.start()
    r = result["r"]
    assert r.code == 0, r.err
    assert "remote executor" in r.err and "running actions here" in r.err, r.err
    where = ran_on(r)
    assert "local" in where and any(w.startswith("remote bench-w") for w in where), where
    for i in range(n):
        assert (ws.root / f"forge-out/k/s{i}.txt").read_text() == f"{i} {salt}\n"


def test_a_dropped_stream_is_followed_again(tmp_path, exec_grid, two_workers):
    """BuildGrid restarted while a worker runs the action: its operation lives in
    PostgreSQL, WaitExecution finds it again, the action is not run here."""
    salt = time.time_ns()
    ws = make(tmp_path, "a", {"forge.toml": "[remote]\ntimeout = 90\n", "r/BUILD": f'''
genrule(name = "slow", outs = ["slow.txt"], cmd = "sleep 8; echo {salt} > $@")
'''})
    def started():
        return sum(w.log().count(" started") for w in two_workers)
    before = started()
    result = {}
    t = threading.Thread(target=lambda: result.update(r=ws.build("//...", *rex(exec_grid),
                                                                timeout=300)))
    t.start()
    try:
        wait_until(lambda: started() > before, 60, "a worker to take the action")
        time.sleep(1)
        exec_grid.restart()
    finally:
        t.join(300)
    r = result["r"]
    assert r.code == 0, r.err
    assert ran_on(r)[0].startswith("remote bench-w"), (ran_on(r), r.err)
    assert "running it here" not in r.err, r.err
    assert (ws.root / "forge-out/r/slow.txt").read_text() == f"{salt}\n"
