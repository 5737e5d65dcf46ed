"""Running one command action in a scratch directory holding only its inputs.

The scratch directory mirrors the workspace (`pkg/src.txt`, `forge-out/pkg/x`),
so commands use the same relative paths Bazel users expect. The environment is
clean and fixed: nothing of the user's shell leaks into an action or its key.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from forge import leftovers

SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# 1980-01-01: the earliest time every archive format (FAT and zip included) can store.
SOURCE_DATE_EPOCH = "315532800"
OUTPUT_TAIL = 4000


def base_env(scratch: Path) -> dict[str, str]:
    return {
        "PATH": SANDBOX_PATH, "TZ": "UTC", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8",
        # HOME and TMPDIR are the scratch directory itself: anything written there is
        # undeclared and discarded, and no extra directories cost time per action.
        "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH, "HOME": str(scratch), "TMPDIR": str(scratch),
    }


# The fixed part of every command's environment, as it enters keys (paths vary).
KEY_ENV = {"PATH": SANDBOX_PATH, "TZ": "UTC", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8",
           "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}


@dataclass
class RunResult:
    returncode: int
    output: bytes  # the tail of stdout+stderr
    log: Path
    cancelled: bool = False
    timed_out: bool = False


def new_scratch(tmp_root: Path, hint: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in hint)[-60:]
    d = tmp_root / f"sb-{leftovers.owner()}-{safe}-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    return d


def stage(scratch: Path, rel: str, src: Path) -> tuple[int, int]:
    """Put `src` at `scratch/rel`: a hard link when possible, else a copy. Returns
    (size, mtime) so the caller can tell afterwards whether the command wrote to it."""
    dst = scratch / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    st = dst.stat()
    return st.st_size, st.st_mtime_ns


def modified(scratch: Path, staged: dict[str, tuple[int, int]]) -> list[str]:
    """Inputs whose content a command changed (hard links share it with their origin)."""
    out = []
    for rel, before in staged.items():
        try:
            st = os.stat(scratch / rel)
        except OSError:
            continue  # deleting its own link harms nobody
        if (st.st_size, st.st_mtime_ns) != before:
            out.append(rel)
    return out


def run(argv: list[str], scratch: Path, env: dict[str, str], *, timeout: float | None,
        cancel: threading.Event, log: Path | None = None,
        groups: leftovers.ProcessGroups | None = None, err: Path | None = None) -> RunResult:
    """Run `argv` in `scratch` in its own process group, so Ctrl-C and timeouts can
    stop the whole tree of processes it starts. Output goes to `log` (a worker
    reuses one file: creating and deleting one per action costs measurable time).
    `groups` records the group while it runs, for the next build to stop should this
    forge be killed. `err`: stderr to a file of its own (a remote worker reports both)."""
    log = log or scratch.with_name(scratch.name + ".log")
    with open(log, "wb") as out, (open(err, "wb") if err else nullcontext()) as err_out:
        proc = subprocess.Popen(argv, cwd=scratch, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err_out or subprocess.STDOUT,
                                start_new_session=True)
        mark = groups.started(proc.pid) if groups is not None else None
        cancelled = timed_out = False
        waited = 0.0
        while True:
            try:
                proc.wait(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                waited += 0.05
                if cancel.is_set():
                    cancelled = True
                elif timeout is not None and waited > timeout:
                    timed_out = True
                else:
                    continue
                kill_group(proc)
                break
    leftovers.ProcessGroups.ended(mark)
    return RunResult(proc.returncode, tail(log), log, cancelled, timed_out)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    except ProcessLookupError:
        proc.wait()


def tail(path: Path, limit: int = OUTPUT_TAIL) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read()
    except OSError:
        return b""


def remove(scratch: Path, files=()) -> None:
    """Delete a scratch directory. Unlinking the files we know of and removing the
    emptied directories bottom-up is several times cheaper than a generic rmtree,
    which only runs when the command left something behind."""
    try:
        dirs = set()
        for rel in files:
            os.unlink(os.path.join(scratch, rel))
            d = os.path.dirname(rel)
            while d:
                dirs.add(d)
                d = os.path.dirname(d)
        for d in sorted(dirs, key=len, reverse=True):
            os.rmdir(os.path.join(scratch, d))
        os.rmdir(scratch)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
