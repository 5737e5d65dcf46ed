"""A forge invocation's state: workspace, cache, records, and the plan cache.

The plan cache keeps the result of loading and analysis for a set of patterns,
valid while every BUILD/.bzl/config file and every directory it looked at has
the stat it had then. A no-op build then costs stats and key checks, not a
Starlark evaluation of every package.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import xxhash

import forge
from forge.cache import Cache
from forge.errors import ForgeError, LoadError
from forge.labels import parse_pattern
from forge.records import Records
from forge.workspace import CONFIG_NAME, Workspace

PLAN_VERSION = 2
_rules_loaded = False


def load_rules() -> None:
    """Import every rule family registered under the `forge.rules` entry points."""
    global _rules_loaded
    if _rules_loaded:
        return
    from importlib import import_module
    from importlib.metadata import entry_points
    for ep in entry_points(group="forge.rules"):
        try:
            import_module(ep.value)
        except Exception as e:  # a broken plugin must not hide the others' errors
            raise ForgeError(f"cannot load rule family '{ep.name}' ({ep.value}): {e}") from e
    _rules_loaded = True


# Plans read in this process, by file: a resident forge (forge/server.py) reuses them
# while the file is unchanged instead of unpickling it for every command.
_PLANS: dict[str, tuple] = {}


def _rule_fingerprint(records_dir: Path) -> list:
    """What the rule families are, without importing them: the `forge.rules` entry points
    and the mtime of every Python file in their packages. A plan made by other rule code
    is not reused (even when a rule's author forgot to bump its version), and a no-op
    build served from the plan cache never imports a rule module.

    Listing entry points scans every installed distribution; the answer is kept beside
    the plans and reused while no directory of sys.path has changed (an install or
    uninstall changes its site-packages directory)."""
    import sys
    memo = records_dir / "rules.pickle"
    paths = []
    for p in sys.path:
        try:
            paths.append((p, os.stat(p or ".").st_mtime_ns))
        except OSError:
            pass
    try:
        with open(memo, "rb") as f:
            saved_paths, eps, dirs = pickle.load(f)
        if saved_paths != paths:
            raise ValueError("sys.path changed")
    except (OSError, EOFError, ValueError, pickle.UnpicklingError, TypeError):
        import importlib.util
        from importlib.metadata import entry_points
        eps = sorted((ep.name, ep.value) for ep in entry_points(group="forge.rules"))
        dirs = []
        for _, value in eps:
            spec = importlib.util.find_spec(value.split(".")[0])
            dirs += list(spec.submodule_search_locations or []) if spec else []
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".rules.{os.getpid()}")
        with open(tmp, "wb") as f:
            pickle.dump((paths, eps, dirs), f)
        os.replace(tmp, memo)
    out: list = list(eps)
    for d in sorted(set(dirs)):
        for f in sorted(os.listdir(d)):
            if f.endswith(".py"):
                out.append((f, os.stat(os.path.join(d, f)).st_mtime_ns))
    return out


class Session:
    def __init__(self, ws: Workspace, cache_dir: str | None = None):
        self.ws = ws
        self.cache = Cache(ws.cache_dir(cache_dir))
        self.records = Records(ws.records_dir(self.cache.root))

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
        fingerprint = repr((PLAN_VERSION, forge.__version__, [str(p) for p in patterns],
                            include_manual, _rule_fingerprint(self.records.dir)))
        path = self.records.dir / "plans" / (xxhash.xxh3_64_hexdigest(fingerprint.encode()) + ".pickle")
        if use_cache and not refresh_lock:
            plan = self._cached_plan(path, fingerprint)
            if plan is not None:
                return plan
        from forge.analysis import Analyzer
        load_rules()
        from forge.lockfile import Lockfile
        lock = Lockfile(self.ws.root, self.ws.config, offline=offline, refresh=refresh_lock, dry=dry)
        an = Analyzer(self.ws, lock=lock)
        an.loader._remember(self.ws.root / CONFIG_NAME)
        try:
            roots = an.expand(patterns, include_manual=include_manual)
            if not roots:
                raise LoadError("no targets match " + " ".join(pattern_texts),
                                hint="forge query //... lists every target")
            plan = an.analyze(roots)
        finally:
            lock.save()  # what was resolved stays resolved, even if analysis failed later
        if lock.path.exists():
            an.loader._remember(lock.path)
        if use_cache and not lock.used_placeholder:
            # Building needs only the actions and the roots' infos; the full target
            # graph (for query) would make every no-op build unpickle it.
            from forge.keys import static_digest
            plan = Plan(plan.roots, {}, {r: plan.infos[r] for r in plan.roots}, plan.actions,
                        plan.tests, [static_digest(a) for a in plan.actions])
            self._save_plan(path, fingerprint, plan, an.loader.inputs, an.loader.dirs)
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
        for rel, (size, mtime) in inputs.items():
            try:
                st = os.stat(root / rel)
            except OSError:
                return None
            if st.st_size != size or st.st_mtime_ns != mtime:
                return None
        for rel, mtime in dirs.items():
            try:
                if os.stat(root / rel if rel else root).st_mtime_ns != mtime:
                    return None
            except OSError:
                return None
        return plan

    def _save_plan(self, path, fingerprint, plan, inputs, dirs) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        with open(tmp, "wb") as f:
            pickle.dump((fingerprint, inputs, dirs, plan), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)

    def executor(self, **kw):
        from forge.executor import Executor
        if kw.get("jobs") is None and self.ws.config.get("jobs"):
            kw["jobs"] = int(self.ws.config["jobs"])
        return Executor(self.ws.root, self.cache, self.records, salt=self.ws.salt,
                        config=self.ws.config, before_work=load_rules, **kw)

    def close(self) -> None:
        self.cache.close()
