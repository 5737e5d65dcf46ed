"""Content digests and the stat cache that avoids re-reading unchanged files.

The local digest is xxh3-128 (memory speed); sha256 is computed only where a
protocol demands it. The stat cache maps a path to (size, mtime_ns, inode,
digest): a file whose stat is unchanged is not read again. It is a plain dict
pickled into the workspace's records, written only when something changed.
"""

from __future__ import annotations

import os
import pickle
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


class StatCache:
    VERSION = 1

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, tuple[int, int, int, str]] = {}
        self.dirty = False
        try:
            with open(path, "rb") as f:
                version, entries = pickle.load(f)
            if version == self.VERSION:
                self.entries = entries
        except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError):
            pass  # a missing or unreadable cache only costs re-reading files

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
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with open(tmp, "wb") as f:
            pickle.dump((self.VERSION, self.entries), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, self.path)
        self.dirty = False
