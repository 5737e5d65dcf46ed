"""Running one action on this machine, in a fresh scratch directory: stage its inputs
(hard links to sources and CAS blobs), run its command or in-process step, check what it
did, and move its outputs into the CAS. Called on worker threads by
forge.executor.LocalExecutor, which records the result.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from forge import leftovers, sandbox, trees
from forge.cache import Cache, OutputFile
from forge.contexts import ExecContext
from forge.errors import ForgeError, disk_full, free_bytes, human_size, is_disk_full
from forge.formats.errors import FormatError
from forge.model import Action
from forge.ruleset import RuleSet


class Scratch:
    def __init__(self, root: Path, cache: Cache, rules: RuleSet, *, config: dict,
                 offline: bool, cancel: threading.Event, reporter):
        self.root = root
        self.cache = cache
        self.rules = rules
        self.config = config
        self.offline = offline
        self.cancel = cancel
        self.reporter = reporter
        self.groups = leftovers.ProcessGroups(cache.tmp)

    def log_path(self, worker: int) -> Path:
        """Where the commands of job slot `worker` write their output (reused per slot)."""
        return self.cache.tmp / f"log-{leftovers.owner()}-{worker}"

    def run(self, a: Action, worker: int, generated: dict[str, OutputFile]
            ) -> tuple[list[OutputFile] | None, str, bool]:
        """(outputs stored in the CAS, "", False), or (None, why it failed, cancelled).
        `generated`: the blob of every generated input, by path."""
        try:
            scratch = sandbox.new_scratch(self.cache.tmp, a.mnemonic)
        except OSError as e:
            if is_disk_full(e):
                return None, _full(self.cache.root), False
            raise
        keep = False
        try:
            staged = {}
            known: dict[int, tuple] = {}  # inode -> (blob, mtime), for blobs passed through
            for i in a.inputs:
                if i.source:
                    src = self.root / i.path
                else:
                    f = generated[i.path]
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
                    if path in generated:  # a cache blob shares that content: drop it
                        self.cache.drop_blob(generated[path])
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
            if failure is not None and _out_of_space(self.cache.tmp):
                # Most likely why it failed; its partial outputs would only keep the disk full.
                written = _tree_size(scratch)
                return None, _full(self.cache.root, f"; the action had written {human_size(written)} "
                                   "when it failed"), False
            if failure is not None:
                keep = not self.cancel.is_set()
                if keep:  # kept for the user to look at: no longer this process's to reap
                    scratch = _disown(scratch)
                where = f"\nscratch directory kept at {scratch}" if keep else ""
                return None, failure + where, self.cancel.is_set()
            outs = []
            for o in a.outputs:
                if o.directory:
                    outs.append(trees.store(self.cache, scratch / o.path, o.path, known))
                    continue
                f = self.cache.put_file(scratch / o.path, o.path in a.executable)
                outs.append(OutputFile(o.path, f.digest, f.size, f.executable))
            return outs, "", False
        except OSError as e:
            if not is_disk_full(e):
                raise
            return None, _full(self.cache.root), False
        finally:
            if not keep:
                sandbox.remove(scratch, [i.path for i in a.inputs] + [o.path for o in a.outputs])

    def _run_step(self, a: Action, scratch: Path, worker: int) -> str | None:
        if a.argv is not None:
            env = sandbox.base_env(scratch)
            env.update(dict(a.env))
            res = sandbox.run(list(a.argv), scratch, env, timeout=a.timeout, cancel=self.cancel,
                              groups=self.groups,
                              log=self.log_path(worker))
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
                          offline=self.offline, cancel=self.cancel, groups=self.groups,
                          progress=lambda done, total: self.reporter.transfer(a, done, total))
        try:
            fn.fn(ctx)
        except ForgeError as e:
            return _failure(e.message, e.hint, logs)
        except FormatError as e:  # input the step was given is refused: bad input, not a bug
            return _failure(str(e), getattr(e, "hint", None), logs)
        return None


def _failure(message: str, hint: str | None, logs: list[str]) -> str:
    log = "\n".join(logs[-40:])
    return (message + (f"\nhint: {hint}" if hint else "")
            + (f"\nlog (last lines):\n{_indent(log)}" if log else ""))


def _out_of_space(path: Path) -> bool:
    free = free_bytes(path)
    return free is not None and free < (1 << 20)


def _tree_size(root: Path) -> int:
    total = 0
    for d, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(d, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _full(cache_root: Path, more: str = "") -> str:
    e = disk_full(cache_root)
    return _failure(e.message + more, e.hint, [])


def _disown(scratch: Path) -> Path:
    kept = scratch.with_name("kept-" + scratch.name.split("-", 2)[2])
    try:
        scratch.rename(kept)
        return kept
    except OSError:
        return scratch


def _show_argv(argv) -> str:
    if len(argv) == 3 and argv[0] == "bash" and argv[1] == "-c":
        return "bash -c " + repr(argv[2])
    import shlex
    return shlex.join(argv)


def _indent(text: str, n: int = 40) -> str:
    lines = text.splitlines()[-n:]
    return "\n".join("  " + ln for ln in lines)
