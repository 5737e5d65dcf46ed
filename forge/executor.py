"""Execution: walk the action graph in parallel, skipping every action whose key
is already known.

The main thread owns all bookkeeping (keys, records, the ready queue); worker
threads only run commands or in-process steps and move outputs into the CAS.
Cache hits are handled on the main thread without a round trip to a worker.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from forge import sandbox, trees
from forge.cache import Cache, OutputFile
from forge.contexts import ExecContext
from forge.errors import ForgeError
from forge.keys import ToolError, ToolIds, explain_diff, key_from, preimage, static_digest
from forge.model import Action
from forge.records import Records
from forge.ruleset import RuleSet


@dataclass
class ActionResult:
    action: Action
    status: str  # executed | cached | remote | failed | skipped
    key: str = ""
    duration: float = 0.0
    start: float = 0.0
    outputs: list[OutputFile] = field(default_factory=list)
    error: str = ""  # what went wrong, ready to show
    reasons: list[str] = field(default_factory=list)
    worker: int = 0
    cancelled: bool = False
    linked: tuple | None = None  # set when the workspace already holds these outputs


@dataclass
class BuildSummary:
    results: list[ActionResult]
    interrupted: bool = False
    remote: dict | None = None  # the remote cache's counters (forge.remote.client)

    def count(self, status: str) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(r.status in ("executed", "cached", "remote")
                                            for r in self.results)


class Reporter:
    """Progress callbacks; the CLI supplies one that draws, tests use this silent one."""

    def started(self, action: Action) -> None: ...
    def finished(self, result: ActionResult) -> None: ...
    def warning(self, text: str) -> None: ...
    def set_total(self, n: int) -> None: ...
    def transfer(self, action: Action, done: int, total: int) -> None: ...


class Executor:
    def __init__(self, root: Path, cache: Cache, records: Records, *, jobs: int | None = None,
                 keep_going: bool = False, salt: str = "", reporter: Reporter | None = None,
                 config: dict | None = None, offline: bool = False,
                 rules: RuleSet | None = None, remote=None):
        self.root = root
        self._root_str = str(root)
        self.cache = cache
        self.records = records
        self.jobs = max(1, jobs or os.cpu_count() or 1)
        self.keep_going = keep_going
        self.salt = salt
        self.config = config or {}
        # Loaded before the first action runs (its in-process steps and pools): a build
        # whose every action is cached never imports a rule family.
        self.rules = rules if rules is not None else RuleSet()
        self.offline = offline
        self.reporter = reporter or Reporter()
        self.tools = ToolIds(records.stat_cache)
        self.cancel = threading.Event()
        self._done: queue.Queue = queue.Queue()
        self._digests: dict[str, OutputFile] = {}  # generated path -> its blob
        self._epoch = time.perf_counter()
        self._pending: dict[str, tuple[str, dict]] = {}  # action id -> (key, preimage)
        self._tool_ids: dict[tuple, dict] = {}  # an action's tools -> their identities
        # The shared cache (forge.remote.settings.RemoteSettings), connected on the first
        # local miss: a build whose every action is a local hit never touches it.
        self._remote_settings = None if offline else remote
        self._remote = None
        self._lookups: ThreadPoolExecutor | None = None
        self._fetched: list[tuple] = []  # (key, outputs) fetched, not yet in the local cache

    # --- the walk -------------------------------------------------------------------

    def run(self, actions: list[Action], statics: list[str] | None = None) -> BuildSummary:
        # Everything is indexed by position: hashing frozen dataclasses or rebuilding
        # ids per lookup dominates a no-op build of 10,000 actions otherwise.
        n = len(actions)
        statics = statics or [static_digest(a, self.rules.functions) for a in actions]
        producer = {o.path: i for i, a in enumerate(actions) for o in a.outputs}
        waiting = [0] * n
        dependents: list[list[int]] = [[] for _ in range(n)]
        for i, a in enumerate(actions):
            ups = {producer[x.path] for x in a.inputs if not x.source and x.path in producer}
            waiting[i] = len(ups)
            for u in ups:
                dependents[u].append(i)
        ready = deque(i for i in range(n) if waiting[i] == 0)
        runnable: deque = deque()  # missed every cache: waiting for a worker
        results: list[ActionResult | None] = [None] * n
        running: set[int] = set()
        looking = 0  # remote lookups under way
        pools: Counter = Counter()
        free_workers = list(range(self.jobs, 0, -1))
        stop = False
        self.reporter.set_total(n)
        pool = ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="forge-worker")

        def complete(i: int, r: ActionResult) -> None:
            nonlocal stop
            results[i] = r
            self.reporter.finished(r)
            if r.status in ("executed", "cached", "remote"):
                self._record(r)
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
                    a = actions[i]
                    r = self._prepare(a, statics[i])
                    if r is not None:
                        complete(i, r)
                    elif self._remote_usable():
                        looking += 1
                        self._lookups.submit(self._lookup, i, a, self._pending[a.id])
                    else:
                        runnable.append(i)
                while runnable and not stop and len(running) < self.jobs:
                    i = self._pick(actions, runnable, pools)
                    if i is None:
                        break
                    a = actions[i]
                    running.add(i)
                    pools[a.pool] += 1
                    self.reporter.started(a)
                    pool.submit(self._work, i, a, self._pending.pop(a.id), free_workers.pop())
                if not running and not looking:
                    if stop:
                        break
                    continue
                kind, i, r = self._wait()
                if kind == "lookup":
                    looking -= 1
                    if r is None:
                        runnable.append(i)
                    else:
                        # Recorded here in batches, not on the lookup threads: SQLite
                        # writers in one process wait for each other with sleeps.
                        self._fetched.append((r.key, r.outputs))
                        if len(self._fetched) >= 256:
                            self._save_fetched()
                        self._pending.pop(r.action.id, None)
                        complete(i, r)
                    continue
                running.discard(i)
                pools[r.action.pool] -= 1
                free_workers.append(r.worker)
                complete(i, r)
        except KeyboardInterrupt:
            self.cancel.set()
            if self._lookups is not None:
                self._lookups.shutdown(wait=False, cancel_futures=True)
            pool.shutdown(wait=True)
            while not self._done.empty():
                _kind, i, r = self._done.get()
                if r is None:
                    continue
                results[i] = r
                if r.status != "failed":
                    self._record(r)
                if r.status == "remote":
                    self._fetched.append((r.key, r.outputs))
            self._save_fetched()
            self.records.save()
            self._close_remote(wait=False)
            return BuildSummary([r for r in results if r is not None], interrupted=True,
                                remote=self._remote_stats())
        pool.shutdown(wait=True)
        self._save_fetched()
        self._close_remote(wait=True)
        self.records.save()
        for w in range(1, self.jobs + 1):
            try:
                os.unlink(self.cache.tmp / f"log-{os.getpid()}-{w}")
            except OSError:
                pass
        return BuildSummary([r or ActionResult(a, "skipped") for a, r in zip(actions, results)],
                            remote=self._remote_stats())

    def _wait(self) -> tuple[str, int, ActionResult | None]:
        while True:
            try:
                return self._done.get(timeout=0.2)
            except queue.Empty:
                continue

    def _pick(self, actions, ready: deque, pools: Counter) -> int | None:
        for k, i in enumerate(ready):
            p = actions[i].pool
            if p is None or pools[p] < self.rules.pools.get(p, 1):
                del ready[k]
                return i
        return None

    # --- keys and cache hits (main thread) -------------------------------------------

    def _prepare(self, a: Action, static: str) -> ActionResult | None:
        """A finished result for a hit or an action that cannot start; None to run it."""
        t0 = time.perf_counter()
        inputs: dict[str, str] = {}
        root = self._root_str
        try:
            for i in a.inputs:
                if i.source:
                    inputs[i.path] = self.records.stat_cache.digest(os.path.join(root, i.path))
                else:
                    f = self._digests[i.path]
                    inputs[i.path] = f.digest + ("+x" if f.executable else "")
            tools = self._tool_ids.get(a.tools)
            if tools is None:
                tools = self._tool_ids[a.tools] = {t: self.tools(t) for t in a.tools}
        except FileNotFoundError as e:
            return ActionResult(a, "failed", error=f"could not start: input file {e.filename} is missing")
        except ToolError as e:
            return ActionResult(a, "failed", error=f"could not start: {e}")
        key = key_from(static, tools, inputs, self.salt)
        aid = a.id
        state = self.records.state.get(aid)
        if state is not None and state[0] == key and self._still_linked(state[1]):
            outs = [OutputFile(*o[:5]) for o in state[1]]
            r = self._hit(a, key, outs, t0, pre=None)
            r.linked = state[1]  # already recorded as it is
            return r
        pre = preimage(a, self.rules.functions, inputs, tools, self.salt)
        outs = self.cache.get_record(key)
        if outs is not None:
            if all(self._present(o) for o in outs) and self._link_all(outs):
                return self._hit(a, key, outs, t0, pre)
            for o in outs:
                if not o.tree and not self.cache.blob_ok(o):
                    self.cache.drop_blob(o)
            self.reporter.warning(f"cache record of {a.description} points at missing or corrupt "
                                  "blobs; rebuilding it")
            self.cache.drop_record(key)
        self.rules.load()
        self._pending[aid] = (key, pre)
        return None

    def _hit(self, a, key, outs, t0, pre) -> ActionResult:
        r = ActionResult(a, "cached", key, time.perf_counter() - t0, t0 - self._epoch, outs)
        if pre is not None:  # restored from the cache: say what differs from the last build
            r.reasons = self._remember_preimage(a, pre, reasons=True)
        return r

    def _still_linked(self, outs) -> bool:
        root = self._root_str
        for path, _digest, size, _x, tree, ino, mtime in outs:
            try:
                st = os.stat(os.path.join(root, path))
            except OSError:
                return False
            if st.st_ino != ino or st.st_mtime_ns != mtime or (not tree and st.st_size != size):
                return False
        return True

    def _present(self, o: OutputFile) -> bool:
        return trees.blobs_ok(self.cache, o, verify=False) if o.tree else self.cache.blob_ok(o)

    def _link_all(self, outs: list[OutputFile]) -> bool:
        for o in outs:
            if o.tree:
                if not trees.blobs_ok(self.cache, o, verify=True):
                    return False
                trees.materialise(self.cache, o, self.root / o.path)
                continue
            if not self.cache.verify(o):
                self.cache.drop_blob(o)
                return False
            self.cache.link_out(o, self.root / o.path)
        return True

    def _record(self, r: ActionResult) -> None:
        if r.linked is not None:
            for o in r.outputs:
                self._digests[o.path] = o
            return
        linked = []
        for o in r.outputs:
            self._digests[o.path] = o
            try:
                st = os.stat(self.root / o.path)
                linked.append((o.path, o.digest, o.size, o.executable, o.tree, st.st_ino,
                               st.st_mtime_ns))
            except OSError:
                pass
        self.records.set_state(r.action.id, (r.key, tuple(linked)))

    def _remember_preimage(self, a: Action, pre: dict, reasons: bool) -> list[str]:
        old = self.records.preimages.get(a.id)
        why = explain_diff(old, pre) if reasons else []
        if old != pre:
            self.records.put_preimage(a.id, pre)
        return why

    # --- the remote cache (lookups run on their own threads) ---------------------------

    def _remote_usable(self) -> bool:
        if self._remote_settings is None:
            return False
        if self._remote is None:
            try:
                from forge.remote.client import RemoteCache
                self._remote = RemoteCache(self._remote_settings, self.cache,
                                           self.reporter.warning, self.cancel)
            except Exception as e:  # e.g. grpc missing or a bad CA file: build locally
                self.reporter.warning(f"remote cache {self._remote_settings.url} cannot be "
                                      f"used: {e}; building locally")
                self._remote_settings = None
                return False
            self._lookups = ThreadPoolExecutor(max_workers=self._remote_settings.jobs,
                                               thread_name_prefix="forge-lookup")
        return not self._remote.down

    def _lookup(self, index: int, a: Action, pending) -> None:
        key, pre = pending
        t0 = time.perf_counter()
        r = None
        try:
            outs = self._remote.lookup(key, a)
            if outs is not None and not self.cancel.is_set():
                self._link_out(outs)
                r = ActionResult(a, "remote", key, time.perf_counter() - t0, t0 - self._epoch,
                                 outs, worker=self.jobs + 1)
                r.reasons = self._remember_preimage(a, pre, reasons=True)
        except Exception as e:  # whatever goes wrong, the action can still run here
            self.reporter.warning(f"fetching {a.description} from the remote cache failed "
                                  f"({type(e).__name__}: {e}); building it")
            r = None
        self._done.put(("lookup", index, r))

    def _save_fetched(self) -> None:
        if self._fetched:
            self.cache.put_records(self._fetched)
            self._fetched = []

    def _link_out(self, outs: list[OutputFile]) -> None:
        for o in outs:
            if o.tree:
                trees.materialise(self.cache, o, self.root / o.path)
            else:
                self.cache.link_out(o, self.root / o.path)

    def _close_remote(self, wait: bool) -> None:
        if self._remote is None:
            return
        if self._lookups is not None:
            self._lookups.shutdown(wait=wait, cancel_futures=not wait)
        if wait:
            self._remote.finish()
        self._remote.close()

    def _remote_stats(self) -> dict | None:
        if self._remote is None:
            return None
        return {"url": self._remote.settings.url, "upload": self._remote.settings.upload,
                "down": self._remote.down, **self._remote.stats}

    # --- running (worker threads) ---------------------------------------------------

    def _work(self, index: int, a: Action, pending, worker: int) -> None:
        key, pre = pending
        t0 = time.perf_counter()
        try:
            r = self._execute(a, key, worker)
        except ForgeError as e:
            r = ActionResult(a, "failed", key, error=e.message)
        except Exception as e:  # a bug in a rule's step, not the user's input
            r = ActionResult(a, "failed", key, error=f"internal error in {a.mnemonic}: {e}\n"
                             + traceback.format_exc(limit=-3))
        r.key, r.worker = key, worker
        r.start, r.duration = t0 - self._epoch, time.perf_counter() - t0
        if r.status == "executed":
            r.reasons = self._remember_preimage(a, pre, reasons=True)
        self._done.put(("work", index, r))

    def _execute(self, a: Action, key: str, worker: int) -> ActionResult:
        scratch = sandbox.new_scratch(self.cache.tmp, a.mnemonic)
        keep = False
        try:
            staged = {}
            known: dict[int, tuple] = {}  # inode -> (blob, mtime), for blobs passed through
            for i in a.inputs:
                if i.source:
                    src = self.root / i.path
                else:
                    f = self._digests[i.path]
                    if f.tree:
                        trees.build(self.cache, f, scratch / i.path, known)
                        continue
                    src = self.cache.blob_path(f.digest, f.executable)
                    if not src.exists():  # collected by gc; the workspace copy was verified
                        src = self.root / i.path
                staged[i.path] = sandbox.stage(scratch, i.path, src)
            for o in a.outputs:  # directory outputs exist up front, as in Bazel
                (scratch / o.path).mkdir(parents=True) if o.directory else \
                    (scratch / o.path).parent.mkdir(parents=True, exist_ok=True)
            failure = self._run_step(a, scratch, worker)
            changed = sandbox.modified(scratch, staged)
            if changed:
                for path in changed:
                    if path in self._digests:  # a cache blob shares that content: drop it
                        self.cache.drop_blob(self._digests[path])
                failure = ("the command wrote to its input" + ("s " if len(changed) > 1 else " ")
                           + ", ".join(changed) + "; inputs are hard links to your sources and "
                           "the cache, so write to a copy instead"
                           + (f"\n{failure}" if failure else ""))
            if failure is None:
                missing = [o.path for o in a.outputs if not (
                    (scratch / o.path).is_dir() if o.directory else (scratch / o.path).is_file())]
                if missing:
                    failure = ("declared output" + ("s " if len(missing) > 1 else " ")
                               + ", ".join(missing) + " not created by the action")
            if failure is not None:
                keep = not self.cancel.is_set()
                where = f"\nscratch directory kept at {scratch}" if keep else ""
                return ActionResult(a, "failed", key, error=failure + where,
                                    cancelled=self.cancel.is_set())
            outs = []
            for o in a.outputs:
                if o.directory:
                    outs.append(trees.store(self.cache, scratch / o.path, o.path, known))
                    continue
                f = self.cache.put_file(scratch / o.path, o.path in a.executable)
                outs.append(OutputFile(o.path, f.digest, f.size, f.executable))
            self.cache.put_record(key, outs)  # after its blobs: never a dangling record
            self._link_out(outs)
            if self._remote is not None:
                self._remote.upload(key, a, outs)
            return ActionResult(a, "executed", key, outputs=outs)
        finally:
            if not keep:
                sandbox.remove(scratch, [i.path for i in a.inputs] + [o.path for o in a.outputs])

    def _run_step(self, a: Action, scratch: Path, worker: int) -> str | None:
        if a.argv is not None:
            env = sandbox.base_env(scratch)
            env.update(dict(a.env))
            log = self.cache.tmp / f"log-{os.getpid()}-{worker}"
            res = sandbox.run(list(a.argv), scratch, env, timeout=a.timeout, cancel=self.cancel,
                              log=log)
            if res.cancelled:
                return "interrupted"
            if res.returncode == 0 and not res.timed_out:
                return None
            why = f"timed out after {a.timeout:g} s" if res.timed_out else f"exit code {res.returncode}"
            out = res.output.decode(errors="replace").rstrip()
            return (f"command failed ({why}):\n  {_show_argv(a.argv)}"
                    + (f"\noutput (last lines):\n{_indent(out)}" if out else "\n(no output)"))
        fn = self.rules.functions.get(a.function)
        if fn is None:
            return f"no in-process step named '{a.function}' is registered"
        logs: list[str] = []
        ctx = ExecContext(a.params, scratch, [i.path for i in a.inputs],
                          [o.path for o in a.outputs], log=logs.append, config=self.config,
                          offline=self.offline, cancel=self.cancel,
                          progress=lambda done, total: self.reporter.transfer(a, done, total))
        try:
            fn.fn(ctx)
        except ForgeError as e:
            log = "\n".join(logs[-40:])
            return (e.message + (f"\nhint: {e.hint}" if e.hint else "")
                    + (f"\nlog (last lines):\n{_indent(log)}" if log else ""))
        return None


def _show_argv(argv) -> str:
    if len(argv) == 3 and argv[0] == "bash" and argv[1] == "-c":
        return "bash -c " + repr(argv[2])
    import shlex
    return shlex.join(argv)


def _indent(text: str, n: int = 40) -> str:
    lines = text.splitlines()[-n:]
    return "\n".join("  " + ln for ln in lines)
