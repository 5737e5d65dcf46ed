"""Interruptions and concurrency: SIGKILL at random points, Ctrl-C, two processes
sharing one cache. After any of them the next build succeeds with correct outputs."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest


def slow_graph(ws, n=12, sleep=0.05):
    rules = [f'genrule(name = "s{i}", srcs = ["in.txt"], outs = ["s{i}.txt"], '
             f'cmd = "sleep {sleep}; cat $< > $@; echo {i} >> $@")' for i in range(n)]
    rules.append('genrule(name = "all", srcs = [' + ", ".join(f'":s{i}"' for i in range(n))
                 + '], outs = ["all.txt"], cmd = "cat $(SRCS) > $@")')
    ws.write({"p/in.txt": "input\n", "p/BUILD": "\n".join(rules) + "\n"})
    return "".join(f"input\n{i}\n" for i in range(n))


def start(ws, *args):
    env = {k: v for k, v in os.environ.items() if k != "FORGE_CACHE_DIR"}
    return subprocess.Popen([sys.executable, "-m", "forge", "build", *args, "--cache-dir",
                             str(ws.cache), "--progress", "none"], cwd=ws.root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_at_random_points_leaves_a_valid_cache(ws):
    expected = slow_graph(ws)
    rng = random.Random(1234)
    for attempt in range(6):
        # Change the input so every round has real work to interrupt.
        (ws.root / "p/in.txt").write_text("input\n")
        if attempt % 2:
            (ws.root / "p/in.txt").write_text("other\n")
        p = start(ws, "//p:all", "-j", "2")
        time.sleep(rng.uniform(0.2, 1.2))
        p.kill()
        p.wait()
    (ws.root / "p/in.txt").write_text("input\n")
    r = ws.build("//p:all")
    assert r.code == 0, r.err
    assert ws.out("p/all.txt") == expected
    for i in range(12):
        assert ws.out(f"p/s{i}.txt") == f"input\n{i}\n"
    # And the cache agrees with itself: a second build is a no-op.
    assert ws.build("//p:all").err.strip().endswith("0 executed, 13 cached")


def test_ctrl_c_stops_commands_and_exits_8(ws):
    ws.write({"p/BUILD": '''
        genrule(name = "long", outs = ["long.txt"], cmd = "echo $$$$ > /tmp/forge-test-long.pid; sleep 30; echo > $@")
        genrule(name = "quick", outs = ["quick.txt"], cmd = "echo quick > $@")
    '''})
    p = start(ws, "//p:all", "-j", "2")
    deadline = time.time() + 20
    while not os.path.exists("/tmp/forge-test-long.pid") and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    pid = int(open("/tmp/forge-test-long.pid").read())
    os.unlink("/tmp/forge-test-long.pid")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 8, err
    assert "interrupted" in err
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the command's process is gone
    assert not (ws.root / "forge-out/p/long.txt").exists()
    # The finished action was kept; the interrupted one reruns.
    r = ws.build("//p:quick")
    assert r.code == 0 and r.err.strip().endswith("0 executed, 1 cached")


def test_two_processes_share_one_cache(tmp_path):
    from conftest import Workspace
    cache = tmp_path / "shared-cache"
    spaces = []
    for name in ("one", "two"):
        root = tmp_path / name
        root.mkdir()
        (root / "forge.toml").write_text("")
        w = Workspace(root, cache)
        slow_graph(w, n=20)
        spaces.append(w)
    procs = [start(w, "//p:all", "-j", "2") for w in spaces]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    for w in spaces:
        assert w.out("p/all.txt") == "".join(f"input\n{i}\n" for i in range(20))
    # Both wrote the same keys; a third workspace is served entirely from the cache.
    root = tmp_path / "three"
    root.mkdir()
    (root / "forge.toml").write_text("")
    w3 = Workspace(root, cache)
    slow_graph(w3, n=20)
    r = w3.build("//p:all")
    assert r.code == 0 and r.err.strip().endswith("0 executed, 21 cached")


def test_same_workspace_twice_waits_for_the_lock(ws):
    slow_graph(ws, n=6, sleep=0.5)
    a = start(ws, "//p:all", "-j", "1")
    deadline = time.time() + 30
    while not list(ws.cache.glob("tmp/sb-*")) and time.time() < deadline:
        time.sleep(0.02)  # until the first build is running an action
    b = start(ws, "//p:all", "-j", "1")
    _, err_a = a.communicate(timeout=60)
    _, err_b = b.communicate(timeout=60)
    assert a.returncode == 0 and b.returncode == 0, err_a + err_b
    assert "waiting" in err_b
    assert err_b.strip().endswith("0 executed, 7 cached")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_killed_build_leaves_nothing_running_or_behind(ws, tmp_path):
    """SIGKILL cannot be caught: the next build stops the dead one's commands (each runs
    in a session of its own, so it outlives forge) and removes its scratch directories.
    (ctx.run, which in-process steps use for mmdebstrap, shares the recording: bench/faults
    kills builds inside mmdebstrap.)"""
    pidfile = tmp_path / "pid"
    ws.write({"p/BUILD": f'genrule(name = "long", outs = ["long.txt"], '
                         f'cmd = "echo $$$$ > {pidfile}; sleep 60; echo > $@")\n'})
    p = start(ws, "//p:long")
    deadline = time.time() + 20
    while not pidfile.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    child = int(pidfile.read_text())
    assert list(ws.cache.glob("tmp/sb-*")) and list(ws.cache.glob("tmp/procs/*/*"))
    p.kill()
    p.wait()
    assert _alive(child)  # an orphan, still running
    (ws.root / "p/BUILD").write_text('genrule(name = "other", outs = ["o.txt"], cmd = "echo o > $@")\n')
    r = ws.build("//p:other")
    assert r.code == 0, r.err
    time.sleep(0.2)
    assert not _alive(child)
    left = [p.name for p in ws.cache.glob("tmp/*") if p.name != "procs"]
    assert left == [] and not list(ws.cache.glob("tmp/procs/*"))


def test_a_failed_actions_kept_scratch_survives_the_next_build(ws):
    ws.write({"p/BUILD": 'genrule(name = "bad", outs = ["b.txt"], cmd = "echo no; exit 3")\n'
                         'genrule(name = "ok", outs = ["o.txt"], cmd = "echo o > $@")\n'})
    r = ws.build("//p:bad")
    assert r.code == 1
    kept = r.err.split("scratch directory kept at ")[1].split()[0]
    assert "/kept-" in kept
    assert ws.build("//p:ok").code == 0
    assert os.path.isdir(kept)


def test_what_a_killed_build_left_beside_its_outputs_is_swept(ws):
    """A build killed while it put an output in place leaves `.<name>.forge-tmp-*` beside
    it; the next build that links into that directory removes it (bench/faults found one
    inside an image's stages directory)."""
    import subprocess
    ws.write({"p/BUILD": 'genrule(name = "a", outs = ["a.txt"], cmd = "echo a > $@")\n'})
    assert ws.build("//p:a").code == 0
    dead = subprocess.Popen(["true"])
    dead.wait()
    from forge import leftovers
    ident = f"{dead.pid}.1"  # a process that is gone
    stale = ws.root / "forge-out/p" / f".a.txt.forge-tmp-{ident}-0123abcd"
    stale.mkdir()
    (stale / "blob").write_text("half\n")
    mine = ws.root / "forge-out/p" / f".b.txt.forge-tmp-{leftovers.owner()}-0123abcd"
    mine.write_text("a running forge's\n")
    (ws.root / "p/BUILD").write_text('genrule(name = "a", outs = ["a.txt"], cmd = "echo A > $@")\n')
    assert ws.build("//p:a").code == 0
    assert not stale.exists() and mine.exists()
