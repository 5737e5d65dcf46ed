"""Content digests and the stat cache that avoids re-reading unchanged files.

The local digest is xxh3-128 (memory speed); sha256 is computed only where a
protocol demands it. The stat cache maps a path to (size, mtime_ns, inode,
digest): a file whose stat is unchanged is not read again. It is a plain dict
pickled into the workspace's records, written only when something changed.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import xxhash

CHUNK = 1 << 20


def digest_file(path: str | os.PathLike) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def digest_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


# What this process read or wrote, by file: a resident forge (forge/server.py) reuses it
# while the file keeps the stat it had then, instead of unpickling it for every command.
# Off in a one-shot process, which reads each file once anyway.
_LOADED: dict[str, tuple[tuple, object]] = {}
MEMO = False


def file_sig(path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def load_pickle(path: Path, default):
    """The object pickled at `path` (as this process last saw it), or `default`."""
    sig = file_sig(path)
    memo = _LOADED.get(str(path))
    if sig is not None and memo is not None and memo[0] == sig:
        return memo[1]
    try:
        import gc
        gc.disable()  # many small objects: collecting meanwhile would only cost
        try:
            with open(path, "rb") as f:
                value = pickle.load(f)
        finally:
            gc.enable()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            ImportError):
        return default  # a missing or unreadable record only costs time
    if sig is not None and MEMO:
        _LOADED[str(path)] = (sig, value)
    return value


# The resident server sets a list: records are then written after it answered the
# command (run_deferred), off the client's wait. Before the next command, so in order.
DEFERRED: list | None = None


def later(job) -> None:
    if DEFERRED is None:
        job()
    else:
        DEFERRED.append(job)


def run_deferred() -> None:
    while DEFERRED:
        job = DEFERRED.pop(0)
        try:
            job()
        except OSError as e:  # a record not written costs time, never correctness
            print(f"forge server: writing a record failed: {e}", file=sys.stderr)


def save_pickle(path: Path, value) -> None:
    later(lambda: _save_pickle(path, value))


def _save_pickle(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    sig = file_sig(path) if MEMO else None
    if sig is not None:
        _LOADED[str(path)] = (sig, value)


class StatCache:
    VERSION = 1

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, tuple[int, int, int, str]] = {}
        self.dirty = False
        loaded = load_pickle(path, None)
        if isinstance(loaded, tuple) and len(loaded) == 2 and loaded[0] == self.VERSION:
            self.entries = loaded[1]

    def digest(self, path: str) -> str:
        """The digest of the file at absolute `path`; raises OSError if it is gone."""
        st = os.stat(path)
        e = self.entries.get(path)
        if e is not None and e[0] == st.st_size and e[1] == st.st_mtime_ns and e[2] == st.st_ino:
            return e[3]
        d = digest_file(path)
        self.entries[path] = (st.st_size, st.st_mtime_ns, st.st_ino, d)
        self.dirty = True
        return d

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_pickle(self.path, (self.VERSION, self.entries))
        self.dirty = False
