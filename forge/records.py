"""One workspace's records inside the cache directory.

    workspaces/<id>/lock          held while a build of this workspace runs
    workspaces/<id>/state.pickle  action id -> (key, materialised outputs with their
                                  stat): lets a no-op build skip the action cache
    workspaces/<id>/stat.pickle   the source stat cache (forge.digest)
    workspaces/<id>/preimages/    diskcache: action id -> readable key preimage
    workspaces/<id>/last.json     the last build: each action's status and why it ran
    workspaces/<id>/plans/        pickled analysis results (forge.session)

All of it is an optimisation or a diagnosis: losing any file costs time, never
correctness, so an unreadable record is ignored.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from pathlib import Path

from forge.digest import StatCache, later, load_pickle, save_pickle

STATE_VERSION = 2


class Records:
    def __init__(self, directory: Path):
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.stat_cache = StatCache(directory / "stat.pickle")
        self.state: dict[str, tuple] = {}
        self._state_dirty = False
        self._pre = None
        self._lock_fd: int | None = None
        self._pre_writes: dict[str, dict] = {}
        self._pre_lock = threading.Lock()
        loaded = load_pickle(directory / "state.pickle", None)
        if isinstance(loaded, tuple) and len(loaded) == 2 and loaded[0] == STATE_VERSION:
            self.state = loaded[1]

    def lock(self, wait_message) -> None:
        """One build per workspace at a time; a second one waits."""
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            wait_message()
            fcntl.flock(fd, fcntl.LOCK_EX)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def preimages(self):
        if self._pre is None:
            import diskcache
            self._pre = diskcache.Cache(str(self.dir / "preimages"), size_limit=2 ** 40,
                                        eviction_policy="none", cull_limit=0)
        return self._pre

    def put_preimage(self, action_id: str, pre: dict) -> None:
        """Queued and written in one transaction by save(): one SQLite commit per
        action would cost more than many of the actions themselves."""
        with self._pre_lock:
            self._pre_writes[action_id] = pre

    def set_state(self, action_id: str, value: tuple) -> None:
        if self.state.get(action_id) != value:
            self.state[action_id] = value
            self._state_dirty = True

    def save(self) -> None:
        self.stat_cache.save()
        if self._state_dirty:
            save_pickle(self.dir / "state.pickle", (STATE_VERSION, self.state))
            self._state_dirty = False
        if self._pre_writes:
            with self._pre_lock:
                writes, self._pre_writes = self._pre_writes, {}
            with self.preimages.transact():
                for k, v in writes.items():
                    self.preimages.set(k, v)
        if self._pre is not None:
            self._pre.close()
            self._pre = None

    def write_last(self, actions: list[dict], remote: dict | None = None) -> None:
        tmp = self.dir / f".last.{os.getpid()}"
        tmp.write_text(json.dumps({"time": time.time(), "actions": actions, "remote": remote}))
        os.replace(tmp, self.dir / "last.json")

    def write_last_lines(self, actions: list[str], remote: dict | None = None,
                         on_written=None) -> None:
        """`actions`: each action's entry, as JSON already (forge/uptodate.py keeps them).
        Served, written once the command was answered (forge.digest.later)."""
        text = (f'{{"time": {json.dumps(time.time())}, "actions": [{", ".join(actions)}], '
                f'"remote": {json.dumps(remote)}}}')

        def write():
            tmp = self.dir / f".last.{os.getpid()}"
            tmp.write_text(text)
            os.replace(tmp, self.dir / "last.json")
            if on_written is not None:
                on_written()
        later(write)

    def read_last(self) -> dict | None:
        try:
            return json.loads((self.dir / "last.json").read_text())
        except (OSError, ValueError):
            return None
