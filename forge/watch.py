"""What changed in a workspace since forge last looked, as inotify tells it (watchdog).

The resident server (forge/server.py) runs one Watcher per workspace; forge/uptodate.py
turns what it saw into the actions a build must check again. A watcher that cannot watch
(no inotify, too many watches) or that lost events (the kernel's queue overflowed, or
more changes than MAX_PATHS piled up) says `full`: the build then checks everything by
stat, as a forge without a server does.

`drain` writes a barrier file and waits for its event: inotify delivers events in order,
so every change made before the command was sent has been seen when it returns.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

BARRIER = ".forge-watch"
MAX_PATHS = int(os.environ.get("FORGE_WATCH_MAX_PATHS") or 50_000)  # beyond: a full check
DRAIN_SECONDS = 5.0


class Changes:
    """What a drain returns: `paths` changed (relative, '/'-separated), of which
    `structural` were created, deleted or renamed; `full` when that is not all."""

    def __init__(self, full: bool, paths: set[str], structural: set[str], why: str = ""):
        self.full, self.paths, self.structural, self.why = full, paths, structural, why


class Watcher:
    def __init__(self, root: Path, out_dir: Path):
        self.root = str(root)
        self._prefix = self.root.rstrip("/") + "/"
        self.barrier = out_dir / BARRIER
        self._barrier_rel = os.path.relpath(self.barrier, self.root)
        self._cond = threading.Condition()
        self._paths: set[str] = set()
        self._structural: set[str] = set()
        self._full = "the watch just started"  # what came before it was not seen
        self._seen = ""
        self._token = 0
        self._observer = None
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers.inotify import InotifyObserver
        except ImportError as e:  # the stat fallback: every build checks everything
            self.broken = f"watchdog cannot be imported ({e})"
            return
        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                watcher._event(event)

        try:
            obs = InotifyObserver()
            obs.schedule(Handler(), self.root, recursive=True)
            obs.start()
        except OSError as e:  # e.g. fs.inotify.max_user_watches reached
            self.broken = f"cannot watch {self.root} ({e})"
            return
        self._observer = obs
        self.broken = ""

    def _rel(self, path) -> str | None:
        path = os.fsdecode(path)
        if path == self.root:
            return ""
        return path[len(self._prefix):] if path.startswith(self._prefix) else None

    def _event(self, event) -> None:
        kind = event.event_type
        if kind in ("opened", "closed_no_write"):
            return
        if kind == "overflow" or type(event).__name__ == "EventsLostEvent":
            self.lost("the inotify queue overflowed")
            return
        rels = [self._rel(event.src_path)]
        if getattr(event, "dest_path", ""):
            rels.append(self._rel(event.dest_path))
        with self._cond:
            for rel in rels:
                if rel is None:
                    continue
                if rel == self._barrier_rel:
                    try:
                        self._seen = Path(self.barrier).read_text()
                    except OSError:
                        pass
                    self._cond.notify_all()
                    continue
                if event.is_directory and kind == "modified":
                    continue  # its entries' own events say what changed
                self._paths.add(rel)
                if kind in ("created", "deleted", "moved"):  # not modified, closed, attrib
                    self._structural.add(rel)
            if len(self._paths) > MAX_PATHS:
                self._lose(f"more than {MAX_PATHS} paths changed")

    def lost(self, why: str) -> None:
        with self._cond:
            self._lose(why)

    def _lose(self, why: str) -> None:
        self._full = self._full or why
        self._paths.clear()
        self._structural.clear()

    def drain(self) -> Changes:
        """Everything that changed since the last drain (or since the watch started)."""
        if self._observer is None:
            return Changes(True, set(), set(), self.broken)
        with self._cond:
            self._token += 1
            token = f"{os.getpid()}.{self._token}"
        try:
            self.barrier.parent.mkdir(parents=True, exist_ok=True)
            with open(self.barrier, "w") as f:  # read when closed: a partial read never matches
                f.write(token)
        except OSError as e:
            self.lost(f"cannot write {self.barrier} ({e})")
            token = None
        with self._cond:
            if token is not None and not self._cond.wait_for(lambda: self._seen == token,
                                                              DRAIN_SECONDS):
                self._lose("the watch did not answer in time")
            if not self._observer.is_alive():
                self._lose("the watch stopped")
            out = Changes(bool(self._full), self._paths, self._structural, self._full)
            self._paths, self._structural, self._full = set(), set(), ""
        return out

    def put_back(self, paths: set[str], structural: set[str]) -> None:
        """Changes taken by a drain that the next build must still see."""
        with self._cond:
            if not self._full:
                self._paths |= paths
                self._structural |= structural

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None


_WATCHERS: dict[str, Watcher] = {}
ENABLED = False  # set by the resident server; a one-shot process has nothing to remember


def watcher(root: Path, out_dir: Path) -> Watcher | None:
    """The server's watcher of this workspace (started on first use), None in-process or
    with FORGE_WATCH=0."""
    if not ENABLED or os.environ.get("FORGE_WATCH", "1") == "0":
        return None
    w = _WATCHERS.get(str(root))
    if w is None:
        w = _WATCHERS[str(root)] = Watcher(root, out_dir)
    return w
