"""The resident server watches its workspace (forge/watch.py, forge/uptodate.py): a build
after nothing changed is answered from memory, after an edit only what depends on it is
checked again, and every way a change can happen is seen."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forge.watch import Watcher

FORGE = Path(sys.executable).parent / "forge"

CHAIN = {
    "p/a.txt": "a\n", "p/c.txt": "c\n",
    "p/BUILD": 'genrule(name = "a", srcs = ["a.txt"], outs = ["a.out"], cmd = "cat $< > $@")\n'
               'genrule(name = "b", srcs = [":a"], outs = ["b.out"], cmd = "cat $< $< > $@")\n'
               'genrule(name = "c", srcs = ["c.txt"], outs = ["c.out"], cmd = "cat $< > $@")\n'
               'genrule(name = "d", srcs = [":b", ":c"], outs = ["d.out"], cmd = "cat $(SRCS) > $@")\n',
}


class Served:
    def __init__(self, ws, run_dir: Path, env: dict):
        self.ws, self.run_dir, self.env = ws, run_dir, env
        self.events = ws.root.parent / "events.jsonl"

    def build(self, *patterns: str, env: dict | None = None):
        p = subprocess.run([str(FORGE), "build", *(patterns or ("//...",)), "--cache-dir",
                            str(self.ws.cache), "--build-events", str(self.events),
                            "--progress", "none"], cwd=self.ws.root,
                           env={**self.env, **(env or {})}, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr
        lines = [json.loads(x) for x in self.events.read_text().splitlines()]
        self.events.unlink()
        return {e["label"]: e for e in lines[:-1]}, lines[-1]

    def warm(self, *patterns: str):
        """Builds until the server answers from what it watched: the first build runs
        in-process and starts the server, the second one teaches it the plan."""
        self.build(*patterns)
        self.wait()
        self.build(*patterns)
        acts, end = self.build(*patterns)
        assert end["checked"] == "watch", end
        return acts

    def wait(self) -> None:
        deadline = time.time() + 30
        while not list(self.run_dir.rglob("*.sock")) and time.time() < deadline:
            time.sleep(0.05)
        assert list(self.run_dir.rglob("*.sock")), "the server did not start"

    def stop(self) -> None:
        for pid in self.run_dir.rglob("*.pid"):
            try:
                os.kill(int(pid.read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        deadline = time.time() + 30
        while list(self.run_dir.rglob("*.sock")) and time.time() < deadline:
            time.sleep(0.05)


@pytest.fixture
def served(ws, tmp_path):
    if not FORGE.exists():
        pytest.skip(f"the forge console script is not installed next to {sys.executable}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = dict(os.environ, FORGE_SERVER="1", XDG_RUNTIME_DIR=str(run_dir))
    env.pop("FORGE_CACHE_DIR", None)
    s = Served(ws, run_dir, env)
    yield s
    s.stop()


def ran(acts: dict) -> list[str]:
    return sorted(label for label, e in acts.items() if e["status"] == "executed")


def checked(acts: dict) -> list[str]:
    """The actions the build looked at (the others it knew to be up to date)."""
    return sorted(label for label, e in acts.items() if e.get("checked") != "watch")


def test_noop_is_answered_from_what_the_watch_saw(ws, served):
    ws.write(CHAIN)
    acts = served.warm()
    assert ran(acts) == [] and checked(acts) == []
    assert ws.out("p/d.out") == "a\na\nc\n"


def test_an_edit_checks_only_its_dependents(ws, served):
    ws.write(CHAIN)
    served.warm()
    (ws.root / "p/a.txt").write_text("A\n")
    acts, end = served.build()
    assert end["checked"] == "watch"
    assert ran(acts) == ["//p:a", "//p:b", "//p:d"]
    assert checked(acts) == ["//p:a", "//p:b", "//p:d"]  # //p:c is not looked at
    assert ws.out("p/d.out") == "A\nA\nc\n"
    acts, end = served.build()  # the outputs it wrote are not changes
    assert end["checked"] == "watch" and checked(acts) == []


def test_an_edited_output_is_restored(ws, served):
    ws.write(CHAIN)
    served.warm()
    out = ws.root / "forge-out/p/b.out"
    out.chmod(0o644)
    out.write_text("spoiled\n")
    acts, _ = served.build()
    assert "//p:b" in checked(acts) and "//p:c" not in checked(acts)
    assert ws.out("p/b.out") == "a\na\n"


def test_a_change_while_the_server_was_stopped(ws, served):
    ws.write(CHAIN)
    served.warm()
    served.stop()
    (ws.root / "p/c.txt").write_text("C\n")
    acts, end = served.build()  # in-process again, starting a new server
    assert ran(acts) == ["//p:c", "//p:d"] and "checked" not in end
    served.wait()
    acts, end = served.build()  # the new server knows nothing yet: checks everything
    assert end["checked"] != "watch" and ran(acts) == []
    assert ws.out("p/d.out") == "a\na\nC\n"


def test_a_file_replaced_by_rename(ws, served):
    ws.write(CHAIN)
    served.warm()
    tmp = ws.root / "p/.c.txt.new"
    tmp.write_text("R\n")
    os.replace(tmp, ws.root / "p/c.txt")
    acts, _ = served.build()
    assert ran(acts) == ["//p:c", "//p:d"]
    assert ws.out("p/c.out") == "R\n"


def test_a_clock_gone_backwards(ws, served):
    """Same size and the very mtime it had: only the watch can tell it changed."""
    ws.write(CHAIN)
    served.warm()
    src = ws.root / "p/c.txt"
    st = src.stat()
    src.write_text("z\n")
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    acts, end = served.build()
    assert ran(acts) == ["//p:c", "//p:d"], (end.get("checked"), checked(acts))
    assert ws.out("p/c.out") == "z\n"
    src.write_text("y\n")
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns - 10**12))  # and earlier still
    acts, _ = served.build()
    assert ran(acts) == ["//p:c", "//p:d"] and ws.out("p/c.out") == "y\n"


def test_build_and_bzl_edits(ws, served):
    ws.write({**CHAIN, "p/defs.bzl": 'SUFFIX = "1"\n',
              "p/BUILD": 'load(":defs.bzl", "SUFFIX")\n' + CHAIN["p/BUILD"]
              + 'genrule(name = "e", outs = ["e.out"], cmd = "echo " + SUFFIX + " > $@")\n'})
    served.warm()
    (ws.root / "p/defs.bzl").write_text('SUFFIX = "2"\n')
    acts, end = served.build()
    assert end["checked"] != "watch" and ran(acts) == ["//p:e"]
    assert ws.out("p/e.out") == "2\n"
    with open(ws.root / "p/BUILD", "a") as f:
        f.write('genrule(name = "f", outs = ["f.out"], cmd = "echo f > $@")\n')
    acts, end = served.build()
    assert end["checked"] != "watch" and ran(acts) == ["//p:f"]


def test_a_forge_toml_edit(ws, served):
    ws.write(CHAIN)
    served.warm()
    (ws.root / "forge.toml").write_text('salt = "other"\n')
    acts, end = served.build()
    assert end["checked"] != "watch"
    assert ran(acts) == ["//p:a", "//p:b", "//p:c", "//p:d"]


def test_a_git_checkout_of_another_branch(ws, served):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    ws.write(CHAIN)
    subprocess.run([*git, "init", "-q"], cwd=ws.root, check=True)
    (ws.root / ".gitignore").write_text("forge-out/\n")
    subprocess.run([*git, "add", "-A"], cwd=ws.root, check=True)
    subprocess.run([*git, "commit", "-qm", "one"], cwd=ws.root, check=True)
    subprocess.run([*git, "checkout", "-qb", "other"], cwd=ws.root, check=True)
    (ws.root / "p/a.txt").write_text("b\n")
    (ws.root / "p/BUILD").write_text(CHAIN["p/BUILD"].replace("cat $< $< > $@", "cat $< > $@"))
    subprocess.run([*git, "commit", "-qam", "two"], cwd=ws.root, check=True)
    subprocess.run([*git, "checkout", "-q", "main"], cwd=ws.root, check=True)
    served.warm()
    subprocess.run([*git, "checkout", "-q", "other"], cwd=ws.root, check=True)
    acts, end = served.build()
    assert end["checked"] != "watch"
    assert ws.out("p/d.out") == "b\nc\n"


def test_too_many_changes_fall_back_to_stat(ws, served):
    served.env["FORGE_WATCH_MAX_PATHS"] = "2"  # read by the server when it starts
    ws.write(CHAIN)
    served.warm()
    for name in ("a", "c"):
        (ws.root / f"p/{name}.txt").write_text(name * 3 + "\n")
    (ws.root / "p/unrelated.txt").write_text("x\n")
    acts, end = served.build()
    assert end["checked"] == "more than 2 paths changed"
    assert ran(acts) == ["//p:a", "//p:b", "//p:c", "//p:d"]
    assert ws.out("p/d.out") == "aaa\naaa\nccc\n"


def test_without_the_watch_every_build_checks_everything(ws, served):
    ws.write(CHAIN)
    served.build()
    served.wait()
    for _ in range(2):
        acts, end = served.build(env={"FORGE_WATCH": "0"})
        assert "checked" not in end or end["checked"] != "watch"
        assert checked(acts) == ["//p:a", "//p:b", "//p:c", "//p:d"]


def test_lost_events_mean_a_full_check(tmp_path):
    """watchdog reports the kernel queue's overflow as EventsLostEvent."""
    from watchdog.events import EventsLostEvent
    (tmp_path / "forge-out").mkdir()
    w = Watcher(tmp_path, tmp_path / "forge-out")
    try:
        assert w.drain().full  # what happened before the watch started is unknown
        (tmp_path / "x").write_text("1")
        ch = w.drain()
        assert not ch.full and ch.paths == {"x"}
        (tmp_path / "y").write_text("1")
        w._event(EventsLostEvent(str(tmp_path)))
        ch = w.drain()
        assert ch.full and ch.why == "the inotify queue overflowed"
        assert not w.drain().full
    finally:
        w.stop()


def test_a_change_inside_a_directory_output_maps_to_its_producer():
    from forge.labels import Label
    from forge.model import Action, Artifact
    from forge.plan import Plan
    from forge.scheduler import ActionResult, BuildSummary
    from forge.uptodate import Known
    tree = Artifact("forge-out/p/tree", source=False, directory=True)
    use = Artifact("forge-out/p/use", source=False)
    other = Artifact("forge-out/p/other", source=False)
    lab = Label("p", "t")
    acts = [Action(lab, "Tree", "r@1", (Artifact("p/in"),), (tree,), ("true",)),
            Action(lab, "Use", "r@1", (tree,), (use,), ("true",)),
            Action(lab, "Other", "r@1", (Artifact("p/o"),), (other,), ("true",))]
    plan = Plan([lab], {}, {}, acts, [])
    summary = BuildSummary([ActionResult(a, "executed") for a in acts])
    k = Known(None, plan, ({}, {}), summary, 0, {})
    assert k.stale({"forge-out/p/tree/sub/file"}) == ({0, 1}, {0})
    assert k.stale({"forge-out/p/tree"}) == ({0, 1}, set())
    assert k.stale({"p/o"}) == ({2}, set())
    assert k.stale({"forge-out/p/unrelated"}) == (set(), set())
