"""Scheduling: walk the action graph in parallel, producers before consumers.

The scheduler owns the ready queue, the job slots, the resource pools, the lookup and
worker threads, cancellation and the results; it knows nothing of keys, caches or
sandboxes. What one action needs is asked of an `ActionExecutor` (the seam below):
forge.executor.LocalExecutor runs actions on this machine; a remote-execution client
implements the same five calls.

The main thread owns all bookkeeping: it calls `prepare` and `record`, so a cache hit
costs no round trip to a worker. Lookups in a shared cache run on their own threads,
without taking a job slot; workers only `execute`. Results come back on one queue.
"""

from __future__ import annotations

import queue
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from forge.cache import OutputFile
from forge.model import Action

DONE = ("executed", "cached", "remote")  # the statuses whose outputs dependents can use


@dataclass
class ActionResult:
    action: Action
    status: str  # executed | cached | remote | failed | skipped
    key: str = ""
    duration: float = 0.0
    start: float = 0.0  # seconds after the executor's epoch
    outputs: list[OutputFile] = field(default_factory=list)
    error: str = ""  # what went wrong, ready to show
    reasons: list[str] = field(default_factory=list)
    worker: int = 0  # the job slot (1..jobs), jobs + 1 for the shared cache's lookups
    cancelled: bool = False
    linked: tuple | None = None  # set when the workspace already holds these outputs
    ran_on: str = ""  # where it executed: "local", "remote <worker>", "remote cache"
    watched: bool = False  # known up to date from what the watch saw (forge/uptodate.py)


@dataclass
class BuildSummary:
    results: list[ActionResult]
    interrupted: bool = False
    remote: dict | None = None  # the remote cache's counters (ActionExecutor.finish)

    def count(self, status: str) -> int:
        counts = self.__dict__.get("_counts")
        if counts is None or counts[0] != len(self.results):  # once: 10,000 results each time
            counts = self.__dict__["_counts"] = (len(self.results),
                                                 Counter(r.status for r in self.results))
        return counts[1][status]

    @property
    def ok(self) -> bool:
        return not self.interrupted and sum(self.count(s) for s in DONE) == len(self.results)


class Reporter:
    """Progress callbacks; the CLI supplies one that draws, tests use this silent one."""

    def started(self, action: Action) -> None: ...
    def finished(self, result: ActionResult) -> None: ...
    def warning(self, text: str) -> None: ...
    def set_total(self, n: int) -> None: ...
    def transfer(self, action: Action, done: int, total: int) -> None: ...


class ActionExecutor(Protocol):
    """Everything the scheduler asks about one action. Calls marked "main thread" are
    never concurrent with each other; the others may run on many threads at once."""

    epoch: float  # the time.perf_counter() that ActionResult.start counts from

    def prepare(self, action: Action, static: str | None) -> ActionResult | Any:
        """Main thread, when the action's inputs are ready. A finished ActionResult (a
        cache hit, or "failed" when it cannot start), or else a ticket, any other object,
        that `lookup` and `execute` get back. `static` is keys.static_digest, if known."""

    def lookups(self) -> int:
        """Main thread, after a miss: how many `lookup`s may run at once; 0 when there is
        no shared cache to ask (none configured, or it went down)."""

    def lookup(self, action: Action, ticket: Any) -> ActionResult | None:
        """A lookup thread: the action's result from a shared cache, or None to run it.
        Never raises: a broken cache is a miss."""

    def execute(self, action: Action, ticket: Any, worker: int) -> ActionResult:
        """A worker thread, in job slot `worker`: run the action and store its outputs.
        Never raises: failures are results."""

    def record(self, result: ActionResult) -> None:
        """Main thread, for every result with a DONE status: its outputs become inputs of
        the actions that depend on it, and are remembered for the next build."""

    def interrupt(self) -> None:
        """Ctrl-C: stop running steps and lookups soon (called from the main thread)."""

    def finish(self, interrupted: bool) -> dict | None:
        """Main thread, once, after every thread stopped: save what is pending and close
        connections. Returns the shared cache's counters, if one was used."""


def dependency_graph(actions: list[Action]) -> tuple[list[list[int]], list[int]]:
    """For each action (by index), the actions using its outputs, and how many actions
    produce its inputs."""
    n = len(actions)
    producer = {o.path: i for i, a in enumerate(actions) for o in a.outputs}
    waiting = [0] * n
    dependents: list[list[int]] = [[] for _ in range(n)]
    for i, a in enumerate(actions):
        ups = {producer[x.path] for x in a.inputs if not x.source and x.path in producer}
        waiting[i] = len(ups)
        for u in ups:
            dependents[u].append(i)
    return dependents, waiting


class Scheduler:
    def __init__(self, executor: ActionExecutor, *, jobs: int, keep_going: bool = False,
                 reporter: Reporter | None = None, pools: Mapping[str, int] | None = None):
        self.executor = executor
        self.jobs = max(1, jobs)
        self.keep_going = keep_going
        self.reporter = reporter or Reporter()
        # Read when an action is dispatched, so a rule set that the executor loads on its
        # first miss (forge.ruleset) fills it in time. A pool not named here has size 1.
        self.pools = pools if pools is not None else {}
        self._done: queue.Queue = queue.Queue()
        self._lookups: ThreadPoolExecutor | None = None

    @property
    def epoch(self) -> float:
        return self.executor.epoch

    def run(self, actions: list[Action], statics: list[str] | None = None,
            known: Mapping[int, ActionResult] | None = None,
            graph: tuple[list[list[int]], list[int]] | None = None) -> BuildSummary:
        """`known`: results, by index, of actions known to be up to date (forge/uptodate.py):
        recorded as they are, never prepared. `graph`: (dependents, number of producers)
        by index, as `dependency_graph` makes them, when the caller kept them."""
        # Everything is indexed by position: hashing frozen dataclasses or rebuilding
        # ids per lookup dominates a no-op build of 10,000 actions otherwise.
        n = len(actions)
        ex = self.executor
        dependents, waiting = graph or dependency_graph(actions)
        waiting = list(waiting)
        results: list[ActionResult | None] = [None] * n
        if known:
            record_known = getattr(ex, "record_known", None)
            if record_known is not None:
                record_known(known.values())
            for i, r in known.items():
                results[i] = r
                if record_known is None:
                    ex.record(r)
                for d in dependents[i]:
                    waiting[d] -= 1
        ready = deque(i for i in range(n) if waiting[i] == 0 and results[i] is None)
        runnable: deque = deque()  # missed every cache: waiting for a worker
        tickets: dict[int, Any] = {}
        running: set[int] = set()
        looking = 0  # lookups under way
        in_pool: Counter = Counter()
        free_workers = list(range(self.jobs, 0, -1))
        stop = False
        self.reporter.set_total(n)
        for r in (known or {}).values():
            self.reporter.finished(r)
        workers = ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="forge-worker")

        def complete(i: int, r: ActionResult) -> None:
            nonlocal stop
            results[i] = r
            self.reporter.finished(r)
            if r.status in DONE:
                ex.record(r)
                for d in dependents[i]:
                    waiting[d] -= 1
                    if waiting[d] == 0:
                        ready.append(d)
                return
            if not self.keep_going:
                stop = True
            stack = list(dependents[i])  # a failure's dependents can never run
            while stack:
                d = stack.pop()
                if results[d] is None:
                    results[d] = ActionResult(actions[d], "skipped")
                    stack.extend(dependents[d])

        try:
            while ready or runnable or running or looking:
                while ready and not stop:
                    i = ready.popleft()
                    p = ex.prepare(actions[i], statics[i] if statics else None)
                    if isinstance(p, ActionResult):
                        complete(i, p)
                        continue
                    tickets[i] = p
                    if not actions[i].local and self._can_look_up():
                        looking += 1
                        self._lookups.submit(self._lookup, i, actions[i], p)
                    else:
                        runnable.append(i)
                while runnable and not stop and len(running) < self.jobs:
                    i = self._pick(actions, runnable, in_pool)
                    if i is None:
                        break
                    a = actions[i]
                    running.add(i)
                    in_pool[a.pool] += 1
                    self.reporter.started(a)
                    workers.submit(self._work, i, a, tickets.pop(i), free_workers.pop())
                if not running and not looking:
                    if stop:
                        break
                    continue
                kind, i, r = self._wait()
                if kind == "raised":
                    raise r
                if kind == "lookup":
                    looking -= 1
                    if r is None:
                        runnable.append(i)
                    else:
                        tickets.pop(i, None)
                        complete(i, r)
                    continue
                running.discard(i)
                in_pool[r.action.pool] -= 1
                free_workers.append(r.worker)
                complete(i, r)
        except KeyboardInterrupt:
            ex.interrupt()
            if self._lookups is not None:
                self._lookups.shutdown(wait=False, cancel_futures=True)
            workers.shutdown(wait=True)
            while not self._done.empty():
                _kind, i, r = self._done.get()
                if r is None:
                    continue
                results[i] = r
                if r.status in DONE:
                    ex.record(r)
            return BuildSummary([r for r in results if r is not None], interrupted=True,
                                remote=ex.finish(interrupted=True))
        workers.shutdown(wait=True)
        if self._lookups is not None:
            self._lookups.shutdown(wait=True)
        return BuildSummary([r or ActionResult(a, "skipped") for a, r in zip(actions, results)],
                            remote=ex.finish(interrupted=False))

    def _can_look_up(self) -> bool:
        slots = self.executor.lookups()
        if slots and self._lookups is None:
            self._lookups = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="forge-lookup")
        return slots > 0

    def _lookup(self, i: int, a: Action, ticket) -> None:
        try:
            r = self.executor.lookup(a, ticket)
        except BaseException as e:  # raised again on the main thread: never a lost result
            self._done.put(("raised", i, e))
            return
        if r is not None:
            r.worker = self.jobs + 1  # the trace's row for the shared cache
        self._done.put(("lookup", i, r))

    def _work(self, i: int, a: Action, ticket, worker: int) -> None:
        try:
            r = self.executor.execute(a, ticket, worker)
        except BaseException as e:  # a full disk while recording, a bug: the main thread
            self._done.put(("raised", i, e))  # raises it, instead of waiting for ever
            return
        self._done.put(("work", i, r))

    def _wait(self) -> tuple[str, int, ActionResult | None]:
        while True:
            try:
                return self._done.get(timeout=0.2)
            except queue.Empty:
                continue

    def _pick(self, actions, ready: deque, in_pool: Counter) -> int | None:
        for k, i in enumerate(ready):
            p = actions[i].pool
            if p is None or in_pool[p] < self.pools.get(p, 1):
                del ready[k]
                return i
        return None
