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

import json
import os
from pathlib import Path

from forge.digest import file_sig, later
from forge.plan import Plan
from forge.scheduler import DONE, ActionResult, BuildSummary, dependency_graph
from forge.watch import Changes, watcher

_MEMO: dict[str, "Known"] = {}  # workspace root -> what its last build left up to date
_PREVIOUS: dict[str, "Known"] = {}  # the memo the build under way started from
_LAST: dict[str, tuple] = {}  # last.json -> (its stat, the plan) when it holds that no-op
REQUEST: tuple | None = None  # the server's current command (argv, cwd, env), hashable
_INSIDE: dict[tuple, str | None] = {}  # (cache dir, root) -> the cache's path in the root
_GIT = (".git/HEAD", ".git/refs/", ".git/packed-refs")


class Known:
    def __init__(self, request, plan: Plan, plan_inputs, summary: BuildSummary, code: int,
                 tools: dict[str, str], previous: "Known | None" = None):
        self.request, self.plan, self.code, self.tools = request, plan, code, tools
        self.tools_checked = False  # set when a build started from it found them unchanged
        self.remote = summary.remote
        # A no-op's summary is already in the form the next no-op reports.
        self._noop = summary if previous is not None and summary is previous._noop else None
        self.results: list[ActionResult | None] = summary.results if self._noop else [
            r if r.status in DONE else None for r in summary.results]
        self.complete = self._noop is not None or \
            sum(summary.count(s) for s in DONE) == len(summary.results)
        if previous is not None and previous.plan is plan:  # the graph is the plan's: kept
            for name in ("inputs", "dirs", "producer", "readers", "graph", "always",
                         "frags"):
                setattr(self, name, getattr(previous, name))
            return
        self.inputs, self.dirs = set(plan_inputs[0]), set(plan_inputs[1])
        acts = plan.actions
        self.frags: list[tuple[str, str] | None] = [None] * len(acts)  # last.json's lines
        self.producer = {o.path: i for i, a in enumerate(acts) for o in a.outputs}
        self.readers: dict[str, list[int]] = {}
        for i, a in enumerate(acts):
            for x in a.inputs:
                if x.source:
                    self.readers.setdefault(x.path, []).append(i)
        self.graph = dependency_graph(acts)  # the scheduler's, kept with the plan
        self.always = [i for i, a in enumerate(acts) if a.local]

    @property
    def dependents(self) -> list[list[int]]:
        return self.graph[0]

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
        if self._noop is None:
            self._noop = BuildSummary(self.noop_results(), remote=self.remote)
        return self._noop

    def last_line(self, i: int, r: ActionResult) -> str:
        """Action `i`'s entry of last.json, for a result known up to date."""
        f = self.frags[i]
        if f is None or f[0] != r.key:
            a = r.action
            f = self.frags[i] = (r.key, json.dumps({
                "id": a.id, "label": str(a.owner), "mnemonic": a.mnemonic,
                "description": a.description, "status": "cached", "key": r.key, "reasons": []}))
        return f[1]


class Check:
    """What a served build may skip: `known` results by action index (None: check all)."""

    def __init__(self, plan: Plan | None = None, known: dict[int, ActionResult] | None = None,
                 noop: BuildSummary | None = None, why: str = ""):
        self.plan, self.known, self.noop, self.why = plan, known, noop, why
        self.graph: tuple | None = None  # the plan's dependency graph, when kept
        self.always: list[int] = []  # the plan's actions reading files outside the workspace


def begin(ws, session) -> Check | None:
    """Before a served build: what the watch allows it to skip. None when not served."""
    w = watcher(ws.root, ws.out_dir)
    if w is None:
        return None
    ch = w.drain()
    memo = _MEMO.pop(str(ws.root), None)  # taken: a failed build must not leave it behind
    _PREVIOUS.pop(str(ws.root), None)
    if memo is not None:
        _PREVIOUS[str(ws.root)] = memo  # its graph serves the next memo of the same plan
    if memo is not None and memo.request != REQUEST:
        memo = None
    if ch.full or memo is None:
        return Check(why=ch.why or "nothing known for this command yet")
    _ignore_cache(ws, session, ch)
    _own_writes(memo, session.records.state, str(ws.root), ch)
    why = memo.replans(ch) or _tools_changed(session, memo)
    if why:
        return Check(why=why)
    memo.tools_checked = True
    stale, inside = memo.stale(ch.paths)
    session.plan_inputs = (memo.inputs, memo.dirs)
    cache, root = session.records.stat_cache, str(ws.root)
    for p in ch.paths:  # seen changed: read again even if its stat looks the same
        if cache.entries.pop(os.path.join(root, p), None) is not None:
            cache.dirty = True
    for i in inside:  # the state's stat covers a tree's root only: re-link it from the cache
        session.records.state.pop(memo.plan.actions[i].id, None)
    if not stale and memo.code == 0 and memo.complete:
        c = Check(memo.plan, noop=memo.noop(), why="watch")
    else:
        noop = memo.noop().results if memo.complete else memo.noop_results()
        c = Check(memo.plan, known={i: r for i, r in enumerate(noop)
                                    if r is not None and i not in stale}, why="watch")
    c.always, c.graph = memo.always, memo.graph
    return c


def _ignore_cache(ws, session, ch: Changes) -> None:
    """A cache directory inside the workspace changes with every build: not a source."""
    where = (str(session.cache.root), str(ws.root))
    rel = _INSIDE.get(where, False)
    if rel is False:
        try:
            rel = Path(where[0]).resolve().relative_to(Path(where[1]).resolve()).as_posix()
        except ValueError:
            rel = None
        _INSIDE[where] = rel
    if rel is None:
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
    """After a served build: keep what it left up to date (once the command was answered:
    the server runs it before the next one)."""
    w = watcher(ws.root, ws.out_dir)
    if w is None or summary is None or summary.interrupted or REQUEST is None:
        return
    request = REQUEST
    later(lambda: _remember(ws, session, plan, summary, code, request))


def _remember(ws, session, plan: Plan, summary: BuildSummary, code: int, request) -> None:
    inputs = getattr(session, "plan_inputs", None)
    if inputs is None or len(summary.results) != len(plan.actions):
        return  # not from the plan cache (a lockfile placeholder): nothing to keep
    previous = _PREVIOUS.get(str(ws.root))
    if previous is not None and previous.plan is plan and previous.tools_checked:
        tools = previous.tools  # begin() just checked them
    else:
        from forge.keys import ToolIds
        ids = ToolIds(session.records.stat_cache)
        try:
            tools = {t: ids(t) for t in dict.fromkeys(t for a in plan.actions for t in a.tools)}
        except Exception:  # a tool gone since: the next build finds out by itself
            return
    # What this build wrote raised events that the next one drains: _own_writes drops them.
    _MEMO[str(ws.root)] = Known(request, plan, inputs, summary, code, tools, previous)


def _own_writes(memo: Known, state: dict, root: str, ch: Changes) -> None:
    """Drop the outputs that are as the last build recorded them: its own writes."""
    drop = []
    for p in ch.paths:
        i = memo.producer.get(p)
        if i is None or p in memo.readers or p in memo.inputs:
            continue
        st = state.get(memo.plan.actions[i].id)
        if st is not None and _as_recorded(root, p, st[1]):
            drop.append(p)
    ch.paths.difference_update(drop)
    ch.structural.difference_update(drop)


def _as_recorded(root: str, path: str, linked) -> bool:
    for p, _digest, size, _x, tree, ino, mtime in linked:
        if p == path:
            try:
                st = os.stat(os.path.join(root, p))
            except OSError:
                return False
            return st.st_ino == ino and st.st_mtime_ns == mtime and (tree or st.st_size == size)
    return False


def write_last(ws, records, summary: BuildSummary) -> bool:
    """Write last.json from what is known (False: not served, the caller writes it). A
    no-op's last.json is the previous no-op's: left as it is."""
    if watcher(ws.root, ws.out_dir) is None or REQUEST is None:
        return False
    later(lambda: _write_last(ws, records, summary))
    return True


def _write_last(ws, records, summary: BuildSummary) -> None:
    memo = _MEMO.get(str(ws.root))
    if memo is None or len(summary.results) != len(memo.frags):
        records.write_last([{"id": r.action.id, "label": str(r.action.owner),
                             "mnemonic": r.action.mnemonic, "description": r.action.description,
                             "status": r.status, "key": r.key, "reasons": r.reasons}
                            for r in summary.results], remote=summary.remote)
        return
    path = records.dir / "last.json"
    noop = summary is memo._noop  # the one way a no-op is answered from memory
    seen = _LAST.get(str(path))
    if noop and seen is not None and seen[1] is memo.plan and seen[0] == file_sig(path):
        return
    lines = []
    for i, r in enumerate(summary.results):
        if r.watched:
            lines.append(memo.last_line(i, r))
        else:
            a = r.action
            lines.append(json.dumps({"id": a.id, "label": str(a.owner), "mnemonic": a.mnemonic,
                                     "description": a.description, "status": r.status,
                                     "key": r.key, "reasons": r.reasons}))
    _LAST.pop(str(path), None)

    def written():
        if noop:
            _LAST[str(path)] = (file_sig(path), memo.plan)
    records.write_last_lines(lines, summary.remote, on_written=written)


def forget() -> None:
    _MEMO.clear()
    _PREVIOUS.clear()
