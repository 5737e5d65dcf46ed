"""Running one action for the scheduler (forge.scheduler.ActionExecutor), on this machine.

On the main thread, `prepare` computes the action's key (forge.keys) and looks in the
local cache: the workspace may still hold the outputs of that key, or the CAS may. A miss
is looked up in the shared cache, if one is configured, on a lookup thread; then run in a
scratch directory on a worker thread (forge.scratch). Outputs become visible only
complete and hashed, and the action-cache record is written after its blobs, so an
interrupted or killed build leaves the cache valid.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from pathlib import Path
from typing import NamedTuple

from forge import leftovers, trees
from forge.cache import Cache, OutputFile
from forge.errors import ForgeError, disk_full, full_path, is_disk_full
from forge.keys import ToolError, ToolIds, explain_diff, key_from, preimage, static_digest
from forge.model import Action
from forge.records import Records
from forge.ruleset import RuleSet
from forge.scheduler import ActionResult, Reporter
from forge.scratch import Scratch


class Ticket(NamedTuple):
    """A local miss, from `prepare` to `lookup` or `execute`."""

    key: str
    preimage: dict


class LocalExecutor:
    def __init__(self, root: Path, cache: Cache, records: Records, *, rules: RuleSet | None = None,
                 salt: str = "", config: dict | None = None, offline: bool = False,
                 reporter: Reporter | None = None, remote=None, executor=None):
        self.root = root
        self._root_str = str(root)
        self.cache = cache
        self.records = records
        self.salt = salt
        # Loaded before the first action runs (its in-process steps and pools): a build
        # whose every action is cached never imports a rule family.
        self.rules = rules if rules is not None else RuleSet()
        self.reporter = reporter or Reporter()
        self.tools = ToolIds(records.stat_cache)
        self.cancel = threading.Event()
        self.epoch = time.perf_counter()
        # What killed forge processes left (their commands, scratch directories) goes
        # first: a dead build's orphans must not keep running alongside this one.
        leftovers.reap(cache.tmp)
        self.scratch = Scratch(root, cache, self.rules, config=config or {}, offline=offline,
                               cancel=self.cancel, reporter=self.reporter)
        self._digests: dict[str, OutputFile] = {}  # generated path -> its blob
        self._tool_ids: dict[tuple, dict] = {}  # an action's tools -> their identities
        self._slots: set[int] = set()  # job slots that ran a command (their logs)
        self._swept: set[Path] = set()  # output directories cleared of dead builds' leftovers
        # The shared cache (forge.remote.settings.RemoteSettings), connected on the first
        # local miss: a build whose every action is a local hit never touches it.
        self._remote_settings = None if offline else remote
        self._remote = None
        # The remote executor (forge.remote.settings.ExecutorSettings), connected on the first
        # remotable action that misses; its endpoint is also the remote cache when no other
        # is configured (read-only: what runs here is not uploaded unless asked).
        self._rex_settings = None if offline else executor
        self._rex = None
        self._rex_lock = threading.Lock()
        if self._remote_settings is None and self._rex_settings is not None:
            from dataclasses import replace
            self._remote_settings = replace(self._rex_settings.remote, upload=False)
        self._fetched: list[tuple] = []  # (key, outputs) fetched, not yet in the local cache

    # --- keys and the local cache (main thread) ---------------------------------------

    def prepare(self, a: Action, static: str | None) -> ActionResult | Ticket:
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
        if static is None:
            static = static_digest(a, self.rules.functions)
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
        return Ticket(key, pre)

    def _hit(self, a, key, outs, t0, pre) -> ActionResult:
        r = ActionResult(a, "cached", key, time.perf_counter() - t0, t0 - self.epoch, outs)
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
            self._sweep(self.root / o.path)
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

    def record(self, r: ActionResult) -> None:
        if r.status == "remote":
            # Recorded here in batches, not on the lookup threads: SQLite writers in one
            # process wait for each other with sleeps.
            self._fetched.append((r.key, r.outputs))
            if len(self._fetched) >= 256:
                self._save_fetched()
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

    def record_known(self, results) -> None:
        """`record` for results known up to date and linked (forge/uptodate.py), at once."""
        d = self._digests
        for r in results:
            for o in r.outputs:
                d[o.path] = o

    def _remember_preimage(self, a: Action, pre: dict, reasons: bool) -> list[str]:
        old = self.records.preimages.get(a.id)
        why = explain_diff(old, pre) if reasons else []
        if old != pre:
            self.records.put_preimage(a.id, pre)
        return why

    # --- the shared cache (lookups run on their own threads) ---------------------------

    def lookups(self) -> int:
        if self._remote_settings is None:
            return 0
        if self._remote is None:
            try:
                from forge.remote.cache_client import RemoteCache
                self._remote = RemoteCache(self._remote_settings, self.cache,
                                           self.reporter.warning, self.cancel)
            except Exception as e:  # e.g. grpc missing or a bad CA file: build locally
                self.reporter.warning(f"remote cache {self._remote_settings.url} cannot be "
                                      f"used: {e}; building locally")
                self._remote_settings = None
                return 0
        return 0 if self._remote.down else self._remote_settings.jobs

    def lookup(self, a: Action, ticket: Ticket) -> ActionResult | None:
        t0 = time.perf_counter()
        try:
            outs = self._remote.lookup(ticket.key, a)
            if outs is None or self.cancel.is_set():
                return None
            self._link_out(outs)
            r = ActionResult(a, "remote", ticket.key, time.perf_counter() - t0, t0 - self.epoch,
                             outs)
            r.ran_on = "remote cache"
            r.reasons = self._remember_preimage(a, ticket.preimage, reasons=True)
            return r
        except Exception as e:  # whatever goes wrong, the action can still run here
            self.reporter.warning(f"fetching {a.description} from the remote cache failed "
                                  f"({type(e).__name__}: {e}); building it")
            return None

    def _save_fetched(self) -> None:
        if self._fetched:
            self.cache.put_records(self._fetched)
            self._fetched = []

    def _sweep(self, dst: Path) -> None:
        """Clear what a killed build left beside `dst`: once per directory and build."""
        if dst.parent not in self._swept:
            self._swept.add(dst.parent)
            leftovers.sweep_outputs(dst.parent)

    def _link_out(self, outs: list[OutputFile]) -> None:
        for o in outs:
            self._sweep(self.root / o.path)
            if o.tree:
                trees.materialise(self.cache, o, self.root / o.path)
            else:
                self.cache.link_out(o, self.root / o.path)

    # --- running (worker threads) -----------------------------------------------------

    def execute(self, a: Action, ticket: Ticket, worker: int) -> ActionResult:
        key = ticket.key
        t0 = time.perf_counter()
        if a.remote and a.argv is not None and self._rex_settings is not None:
            r = self._execute_remote(a, ticket)
            if r is not None:
                r.worker = worker
                r.start, r.duration = t0 - self.epoch, time.perf_counter() - t0
                if r.status != "failed":
                    r.reasons = self._remember_preimage(a, ticket.preimage, reasons=True)
                return r
        try:
            if a.argv is not None:
                self._slots.add(worker)
            outs, failure, cancelled = self.scratch.run(a, worker, self._digests)
            if outs is None:
                r = ActionResult(a, "failed", key, error=failure, cancelled=cancelled)
            else:
                self.cache.put_record(key, outs)  # after its blobs: never a dangling record
                self._link_out(outs)
                if self._remote is not None and not a.local:
                    self._remote.upload(key, a, outs)
                r = ActionResult(a, "executed", key, outputs=outs)
        except ForgeError as e:
            r = ActionResult(a, "failed", key, error=e.message)
        except Exception as e:
            if not is_disk_full(e):  # a bug in a rule's step, not the user's input
                r = ActionResult(a, "failed", key, error=f"internal error in {a.mnemonic}: {e}\n"
                                 + traceback.format_exc(limit=-3))
            else:
                d = disk_full(full_path(e, self.cache.root))
                r = ActionResult(a, "failed", key, error=f"{d.message}\nhint: {d.hint}")
        r.worker = worker
        r.ran_on = "local"
        r.start, r.duration = t0 - self.epoch, time.perf_counter() - t0
        if r.status == "executed":
            r.reasons = self._remember_preimage(a, ticket.preimage, reasons=True)
        return r

    # --- remote execution (worker threads) -------------------------------------------------

    def _rex_client(self):
        with self._rex_lock:
            if self._rex is None and self._rex_settings is not None:
                try:
                    from forge.remote.exec_client import RemoteExecutor
                    self._rex = RemoteExecutor(self._rex_settings, self.cache, self.root,
                                               self.reporter.warning, self.cancel)
                except Exception as e:  # grpc missing, a bad CA file: run here
                    self.reporter.warning(f"remote executor {self._rex_settings.remote.url} "
                                          f"cannot be used: {e}; running actions here")
                    self._rex_settings = None
            return self._rex

    def _execute_remote(self, a: Action, ticket: Ticket) -> ActionResult | None:
        """The action run by the remote executor, or None to run it here."""
        from forge.remote.exec_client import Unavailable
        rex = self._rex_client()
        if rex is None:
            return None
        try:
            if rex.down:
                raise Unavailable(f"remote executor {rex.url} was given up earlier in this build")
            ran = rex.run(a, ticket.key, ticket.preimage["inputs"], self._digests)
        except Unavailable as e:
            if not self._rex_settings.local_fallback:
                return ActionResult(a, "failed", ticket.key, error=(
                    f"remote execution on {rex.url} failed: {e}\nhint: "
                    "--remote-local-fallback (the default) runs such actions here instead"))
            if not rex.down:
                self.reporter.warning(f"{a.description}: remote execution failed ({e}); "
                                      "running it here")
            return None
        except Exception as e:  # a bug in the client must not fail a build that can run here
            self.reporter.warning(f"{a.description}: remote execution failed "
                                  f"({type(e).__name__}: {e}); running it here")
            return None
        if ran.outputs is None:
            r = ActionResult(a, "failed", ticket.key, error=ran.failure)
            r.ran_on = f"remote {ran.worker}"
            return r
        if ran.cached:  # from the executor's action cache: recorded like a remote-cache hit
            self._link_out(ran.outputs)
            r = ActionResult(a, "remote", ticket.key, outputs=ran.outputs)
            r.ran_on = "remote cache"
            return r
        self.cache.put_record(ticket.key, ran.outputs)
        self._link_out(ran.outputs)
        r = ActionResult(a, "executed", ticket.key, outputs=ran.outputs)
        r.ran_on = f"remote {ran.worker}"
        return r

    # --- the end ------------------------------------------------------------------------

    def interrupt(self) -> None:
        self.cancel.set()

    def finish(self, interrupted: bool) -> dict | None:
        self._save_fetched()
        if interrupted:  # saved first: a Ctrl-C'd build keeps what it did
            self.records.save()
        if self._remote is not None:
            if not interrupted:
                self._remote.finish()  # waits for the uploads under way
            self._remote.close()
        rex_stats = None
        if self._rex is not None:
            rex_stats = self._rex.finish() if not interrupted else None
            self._rex.close()
        if not interrupted:
            self.records.save()
            for w in self._slots:
                try:
                    os.unlink(self.scratch.log_path(w))
                except OSError:
                    pass
        self.scratch.groups.close()
        stats = self._remote_stats()
        if rex_stats is not None:
            stats = {**(stats or {}), "executor": rex_stats}
        return stats

    def _remote_stats(self) -> dict | None:
        if self._remote is None:
            return None
        return {"url": self._remote.settings.url, "upload": self._remote.settings.upload,
                "down": self._remote.down, **self._remote.stats}
