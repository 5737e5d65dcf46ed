"""What a forge process that died without cleaning up (SIGKILL, the OOM killer, a power
cut) left in the cache's tmp/, and its removal by the next build.

Each temporary entry a build makes there carries its owner: the process id and that
process's start time, so that a reused pid is never taken for the process that died.
Scratch directories are `sb-<owner>-...`, partial blobs `blob-<owner>-...`, command logs
`log-<owner>-...`, and `procs/<owner>/<pid>.<start>` names each command's process group
while it runs: commands run in sessions of their own (so that Ctrl-C and timeouts stop
their whole tree), and so outlive a forge that is killed. A build starting kills the
groups of owners that are gone, detaches what their commands mounted inside their
scratch directories, then removes their entries (never through a mount that will not
detach). Entries without an owner
(a failed action's scratch directory, kept for debugging) are left to `forge cache gc`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
from pathlib import Path

_OWNED = re.compile(r"^(?:sb|blob|log|remote)-(\d+\.\d+)-")


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: fields follow the last ')'
    fields = stat[stat.rfind(b")") + 2:].split()
    return fields[19].decode() if len(fields) > 19 else None


def identity(pid: int) -> str | None:
    """`<pid>.<start time>` of a running process, None when it is gone."""
    start = _start_time(pid)
    return None if start is None else f"{pid}.{start}"


_OWNER: dict[int, str] = {}


def owner() -> str:
    """This process's identity, the owner part of the names of its temporary entries."""
    pid = os.getpid()
    if pid not in _OWNER:
        _OWNER[pid] = identity(pid) or f"{pid}.0"
    return _OWNER[pid]


def _alive(ident: str) -> bool:
    pid, _, start = ident.partition(".")
    return _start_time(int(pid)) == start


class ProcessGroups:
    """The process groups this forge's commands run in, recorded while they run."""

    def __init__(self, tmp: Path):
        self.dir = tmp / "procs" / owner()

    def started(self, pid: int) -> Path | None:
        ident = identity(pid)
        if ident is None:
            return None  # already gone
        self.dir.mkdir(parents=True, exist_ok=True)
        mark = self.dir / ident
        mark.touch()
        return mark

    @staticmethod
    def ended(mark: Path | None) -> None:
        if mark is not None:
            try:
                mark.unlink()
            except OSError:
                pass

    def close(self) -> None:
        """At the end of a build, once no command runs."""
        try:
            self.dir.rmdir()
        except OSError:
            pass


def reap(tmp: Path) -> list[str]:
    """Stop the commands and remove the temporary entries of forge processes that are
    gone; returns what was removed, for the debug log. Another running forge's entries
    are never touched."""
    removed: list[str] = []
    procs = tmp / "procs"
    try:
        owners = list(procs.iterdir())
    except OSError:
        owners = []
    for d in owners:
        if _alive(d.name):
            continue
        for mark in _entries(d):
            if _alive(mark.name):  # the same process, not a reused pid
                try:
                    os.killpg(int(mark.name.partition(".")[0]), signal.SIGKILL)
                except OSError:
                    pass
        shutil.rmtree(d, ignore_errors=True)
        removed.append(str(d))
    for p in _entries(tmp):
        m = _OWNED.match(p.name)
        if m and not _alive(m.group(1)):
            if p.is_dir() and not p.is_symlink():
                if not _unmount_below(p):
                    continue  # never remove files through a mount: a host /dev, /proc
                force_rmtree(p)
            else:
                try:
                    p.unlink()
                except OSError:
                    pass
            removed.append(str(p))
    return removed


_STALE_OUTPUT = re.compile(r"^\..+\.forge-(?:tmp|old)-(\d+\.\d+)-[0-9a-f]+$")


def sweep_outputs(d: Path) -> None:
    """Remove what a dead forge left in `d` (a directory of forge-out/) while it put an
    output in place: `.<name>.forge-tmp-<owner>-...` and `.forge-old-` siblings."""
    for p in _entries(d):
        m = _STALE_OUTPUT.match(p.name)
        if m and not _alive(m.group(1)):
            if p.is_dir() and not p.is_symlink():
                force_rmtree(p)
            else:
                p.unlink(missing_ok=True)


def _mounts_below(d: Path) -> list[str]:
    """Mount points at or below `d`, deepest first (/proc/self/mountinfo escapes spaces)."""
    prefix = os.path.realpath(d) + "/"
    try:
        with open("/proc/self/mountinfo") as f:
            points = [ln.split()[4].encode().decode("unicode_escape") for ln in f]
    except OSError:
        return []
    return sorted((m for m in points if (m + "/").startswith(prefix)), key=len, reverse=True)


def _unmount_below(d: Path) -> bool:
    """Detach what a killed command mounted inside its scratch directory (mmdebstrap, as
    root, mounts /proc, /sys and /dev into its chroot); True when nothing is left."""
    for m in _mounts_below(d):
        subprocess.run(["umount", "--lazy", m], capture_output=True)
    return not _mounts_below(d)


def _entries(d: Path) -> list[Path]:
    try:
        return list(d.iterdir())
    except OSError:
        return []


def force_rmtree(path: Path) -> None:
    """Remove a tree whose files and directories may be read-only (outputs linked from
    the cache are)."""
    def onerror(func, p, exc):
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=onerror)
