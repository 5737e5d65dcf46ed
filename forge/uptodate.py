"""What the resident server knows is up to date, so that a build checks only what changed.

After a build, the server keeps (plan, results) for that command line (argv, cwd and
environment). The next identical command asks the watcher (forge/watch.py) what changed:
- nothing that any action reads or writes: the answer is the last build's, as a no-op;
- files rewritten in place: only the actions reading or producing them, and what depends
  on those, are checked again (the scheduler's `known`); the rest keep their results;
- anything that can change the plan (a BUILD, .bzl, forge.toml or forge.lock file, an
  entry created or removed in a directory the loader looked at, .git's HEAD or refs), a
  host tool that changed, or a watch that lost events: the full check, by stat.
Actions reading files outside the workspace (Action.local) are checked every time: no
watch sees those files. Any other command forgets what is known.
"""

from __future__ import annotations

import os
from pathlib import Path

from forge.plan import Plan
from forge.scheduler import DONE, ActionResult, BuildSummary
from forge.watch import Changes, watcher

_MEMO: dict[str, "Known"] = {}  # workspace root -> what its last build left up to date
REQUEST: tuple | None = None  # the server's current command (argv, cwd, env), hashable
_GIT = (".git/HEAD", ".git/refs/", ".git/packed-refs")


class Known:
    def __init__(self, request, plan: Plan, plan_inputs, summary: BuildSummary, code: int,
                 tools: dict[str, str]):
        self.request, self.plan, self.code, self.tools = request, plan, code, tools
        self.inputs, self.dirs = set(plan_inputs[0]), set(plan_inputs[1])
        self.remote = summary.remote
        acts = plan.actions
        self.results: list[ActionResult | None] = [
            r if r.status in DONE else None for r in summary.results]
        self.producer: dict[str, int] = {}
        self.readers: dict[str, list[int]] = {}
        self.dependents: list[list[int]] = [[] for _ in acts]
        self.always = [i for i, a in enumerate(acts) if a.local]
        for i, a in enumerate(acts):
            for o in a.outputs:
                self.producer[o.path] = i
        for i, a in enumerate(acts):
            ups = set()
            for x in a.inputs:
                if x.source:
                    self.readers.setdefault(x.path, []).append(i)
                elif x.path in self.producer:
                    ups.add(self.producer[x.path])
            for u in ups:
                self.dependents[u].append(i)

    def replans(self, ch: Changes) -> str:
        """Why these changes need the full check ("" when they do not)."""
        for p in ch.paths:
            if p in self.inputs:
                return f"{p} changed"
            if p.startswith(_GIT):
                return "git moved HEAD"
        for p in ch.structural:
            if os.path.dirname(p) in self.dirs or p in self.dirs:
                return f"{os.path.dirname(p) or '.'} has entries created or removed"
        return ""

    def stale(self, paths: set[str]) -> tuple[set[int], set[int]]:
        """The actions to check again (those reading or producing a changed path, and
        their dependents), and of those the ones whose output tree changed inside."""
        hit: set[int] = set(self.always)
        inside: set[int] = set()
        for p in paths:
            q, nested = p, False
            while True:
                for i in self.readers.get(q, ()):
                    hit.add(i)
                i = self.producer.get(q)
                if i is not None:
                    hit.add(i)
                    if nested:
                        inside.add(i)
                if not q:
                    break
                q, nested = os.path.dirname(q), True
        todo = list(hit)
        while todo:
            for d in self.dependents[todo.pop()]:
                if d not in hit:
                    hit.add(d)
                    todo.append(d)
        return hit, inside

    def noop_results(self) -> list[ActionResult | None]:
        """The last build's results as a no-op reports them: cached, already linked."""
        out: list[ActionResult | None] = []
        for r in self.results:
            if r is None:
                out.append(None)
                continue
            c = ActionResult(r.action, "cached", r.key, 0.0, 0.0, r.outputs, worker=r.worker)
            c.linked = r.linked or ()  # recorded in the state when it was built
            c.watched = True
            out.append(c)
        return out

    def noop(self) -> BuildSummary:
        return BuildSummary(self.noop_results(), remote=self.remote)


class Check:
    """What a served build may skip: `known` results by action index (None: check all)."""

    def __init__(self, plan: Plan | None = None, known: dict[int, ActionResult] | None = None,
                 noop: BuildSummary | None = None, why: str = ""):
        self.plan, self.known, self.noop, self.why = plan, known, noop, why


def begin(ws, session) -> Check | None:
    """Before a served build: what the watch allows it to skip. None when not served."""
    w = watcher(ws.root, ws.out_dir)
    if w is None:
        return None
    ch = w.drain()
    memo = _MEMO.pop(str(ws.root), None)  # taken: a failed build must not leave it behind
    if memo is not None and memo.request != REQUEST:
        memo = None
    if ch.full or memo is None:
        return Check(why=ch.why or "nothing known for this command yet")
    _ignore_cache(ws, session, ch)
    why = memo.replans(ch) or _tools_changed(session, memo)
    if why:
        return Check(why=why)
    stale, inside = memo.stale(ch.paths)
    session.plan_inputs = (memo.inputs, memo.dirs)
    cache, root = session.records.stat_cache, str(ws.root)
    for p in ch.paths:  # seen changed: read again even if its stat looks the same
        if cache.entries.pop(os.path.join(root, p), None) is not None:
            cache.dirty = True
    for i in inside:  # the state's stat covers a tree's root only: re-link it from the cache
        session.records.state.pop(memo.plan.actions[i].id, None)
    if not stale and memo.code == 0 and all(r is not None for r in memo.results):
        return Check(memo.plan, noop=memo.noop(), why="watch")
    noop = memo.noop_results()
    known = {i: r for i, r in enumerate(noop) if r is not None and i not in stale}
    return Check(memo.plan, known=known, why="watch")


def _ignore_cache(ws, session, ch: Changes) -> None:
    """A cache directory inside the workspace changes with every build: not a source."""
    try:
        rel = Path(session.cache.root).resolve().relative_to(Path(ws.root).resolve()).as_posix()
    except ValueError:
        return
    for s in (ch.paths, ch.structural):
        s.difference_update([p for p in s if p == rel or p.startswith(rel + "/")])


def _tools_changed(session, memo: Known) -> str:
    from forge.keys import ToolError, ToolIds
    ids = ToolIds(session.records.stat_cache)
    for name, old in memo.tools.items():
        try:
            if ids(name) != old:
                return f"host tool {name} changed"
        except (ToolError, OSError):
            return f"host tool {name} is gone"
    return ""


def remember(ws, session, plan: Plan, summary: BuildSummary | None, code: int) -> None:
    """After a served build: keep what it left up to date, minus what changed meanwhile."""
    w = watcher(ws.root, ws.out_dir)
    if w is None or summary is None or summary.interrupted or REQUEST is None:
        return
    inputs = getattr(session, "plan_inputs", None)
    if inputs is None or len(summary.results) != len(plan.actions):
        return  # not from the plan cache (a lockfile placeholder): nothing to keep
    from forge.keys import ToolIds
    ids = ToolIds(session.records.stat_cache)
    try:
        tools = {t: ids(t) for t in dict.fromkeys(t for a in plan.actions for t in a.tools)}
    except Exception:  # a tool gone since: the next build finds out by itself
        return
    memo = Known(REQUEST, plan, inputs, summary, code, tools)
    # What this build wrote raised events too: an output still as recorded is its own
    # write and is dropped; anything else (a source edited meanwhile) stays for next time.
    ch = w.drain()
    if ch.full:
        return
    _ignore_cache(ws, session, ch)
    state = session.records.state
    root = str(ws.root)
    keep, keep_structural = set(), set()
    for p in ch.paths:
        i = memo.producer.get(p)
        if i is not None and p not in memo.readers and p not in memo.inputs:
            st = state.get(plan.actions[i].id)
            if st is not None and _as_recorded(root, p, st[1]):
                continue
        elif not (memo.stale({p})[0] - set(memo.always) or memo.replans(Changes(False, {p}, ch.structural & {p}))):
            continue  # read by nothing, written by nothing: a temporary file, a new directory
        keep.add(p)
        if p in ch.structural:
            keep_structural.add(p)
    w.put_back(keep, keep_structural)
    _MEMO[str(ws.root)] = memo


def _as_recorded(root: str, path: str, linked) -> bool:
    for p, _digest, size, _x, tree, ino, mtime in linked:
        if p == path:
            try:
                st = os.stat(os.path.join(root, p))
            except OSError:
                return False
            return st.st_ino == ino and st.st_mtime_ns == mtime and (tree or st.st_size == size)
    return False


def forget() -> None:
    _MEMO.clear()
