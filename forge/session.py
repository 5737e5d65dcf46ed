"""A forge invocation's state: workspace, cache, records, and the plan cache.

The plan cache keeps the result of loading and analysis for a set of patterns,
valid while every BUILD/.bzl/config file and every directory it looked at has
the stat it had then. A no-op build then costs stats and key checks, not a
Starlark evaluation of every package.
"""

from __future__ import annotations

import os
import pickle
import zlib
from pathlib import Path

import xxhash

import forge
from forge.cache import Cache
from forge.errors import LoadError
from forge.labels import parse_pattern
from forge.records import Records
from forge.ruleset import installed
from forge.workspace import CONFIG_NAME, Workspace

PLAN_VERSION = 3  # 3: Action.origins


# Plans read in this process, by file: a resident forge (forge/server.py) reuses them
# while the file is unchanged instead of unpickling it for every command.
_PLANS: dict[str, tuple] = {}


class Session:
    def __init__(self, ws: Workspace, cache_dir: str | None = None):
        self.ws = ws
        self.cache = Cache(ws.cache_dir(cache_dir))
        self.records = Records(ws.records_dir(self.cache.root))
        self.plan_inputs: tuple[dict, dict] | None = None  # the plan's BUILD files and dirs

    def cwd_package(self, cwd: Path | None = None) -> str:
        cwd = (cwd or Path.cwd()).absolute()
        try:
            rel = cwd.relative_to(self.ws.root).as_posix()
        except ValueError:
            return ""
        return "" if rel == "." else rel

    def plan(self, pattern_texts: list[str], *, cwd: Path | None = None, use_cache: bool = True,
             include_manual: bool = False, offline: bool = False, refresh_lock: bool = False,
             dry: bool = False):
        from forge.plan import Plan
        cwd_pkg = self.cwd_package(cwd)
        patterns = [parse_pattern(p, cwd_pkg) for p in pattern_texts]
        # Steps that compress carry their compressor's version in their params, which the
        # plan holds (rules/compressors.py). zstandard changes with an install, and so
        # with sys.path's mtimes (code_fingerprint); zlib is the system's, named here.
        fingerprint = repr((PLAN_VERSION, forge.__version__, [str(p) for p in patterns],
                            include_manual, installed().code_fingerprint(self.records.dir),
                            zlib.ZLIB_RUNTIME_VERSION))
        path = self.records.dir / "plans" / (xxhash.xxh3_64_hexdigest(fingerprint.encode()) + ".pickle")
        if use_cache and not refresh_lock:
            plan = self._cached_plan(path, fingerprint)
            if plan is not None:
                return plan
        from forge.analysis import Analyzer
        rules = installed().load()
        from forge.lockfile import Lockfile
        lock = Lockfile(self.ws.root, self.ws.config, rules, offline=offline, refresh=refresh_lock,
                        dry=dry)
        an = Analyzer(self.ws, rules, lock=lock)
        an.loader.remember(self.ws.root / CONFIG_NAME)
        try:
            roots = an.expand(patterns, include_manual=include_manual)
            if not roots:
                raise LoadError("no targets match " + " ".join(pattern_texts),
                                hint="forge query //... lists every target")
            plan = an.analyze(roots)
        finally:
            lock.save()  # what was resolved stays resolved, even if analysis failed later
        if lock.path.exists():
            an.loader.remember(lock.path)
        if use_cache and not lock.used_placeholder:
            # Building needs only the actions and the roots' infos; the full target
            # graph (for query) would make every no-op build unpickle it.
            from forge.keys import static_digest
            plan = Plan(plan.roots, {}, {r: plan.infos[r] for r in plan.roots}, plan.actions,
                        plan.tests, [static_digest(a, rules.functions) for a in plan.actions])
            self._save_plan(path, fingerprint, plan, an.loader.inputs, an.loader.dirs)
            self.plan_inputs = (an.loader.inputs, an.loader.dirs)
        return plan

    def _cached_plan(self, path: Path, fingerprint: str):
        memo = _PLANS.get(str(path))
        try:
            if memo is None or memo[4] != path.stat().st_mtime_ns:
                memo = None
                import gc
                gc.disable()  # tens of thousands of new objects: collecting would only cost
                try:
                    with open(path, "rb") as f:
                        fp, inputs, dirs, plan = pickle.load(f)
                finally:
                    gc.enable()
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError,
                ImportError):
            return None
        if memo is not None:
            fp, inputs, dirs, plan = memo[:4]
        else:
            try:
                _PLANS[str(path)] = (fp, inputs, dirs, plan, path.stat().st_mtime_ns)
            except OSError:
                pass
        if fp != fingerprint:
            return None
        root = self.ws.root
        for rel, (size, mtime, mode) in inputs.items():
            try:
                st = os.stat(root / rel)
            except OSError:
                return None
            if st.st_size != size or st.st_mtime_ns != mtime or st.st_mode != mode:
                return None
        for rel, mtime in dirs.items():
            try:
                if os.stat(root / rel if rel else root).st_mtime_ns != mtime:
                    return None
            except OSError:
                return None
        self.plan_inputs = (inputs, dirs)  # what forge/uptodate.py watches for a new plan
        return plan

    def _save_plan(self, path, fingerprint, plan, inputs, dirs) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        with open(tmp, "wb") as f:
            pickle.dump((fingerprint, inputs, dirs, plan), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)

    def scheduler(self, *, jobs: int, keep_going: bool = False, reporter=None,
                  offline: bool = False, remote=None, executor=None):
        """A scheduler running this workspace's actions here (`jobs`: Workspace.jobs)."""
        from forge.executor import LocalExecutor
        from forge.scheduler import Reporter, Scheduler
        reporter = reporter or Reporter()
        rules = installed()
        local = LocalExecutor(self.ws.root, self.cache, self.records, rules=rules,
                              salt=self.ws.salt, config=self.ws.config, offline=offline,
                              reporter=reporter, remote=remote, executor=executor)
        return Scheduler(local, jobs=jobs, keep_going=keep_going, reporter=reporter,
                         pools=rules.pools)

    def close(self) -> None:
        self.cache.close()
