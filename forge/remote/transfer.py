"""What both backends share: errors, retries with backoff, and the sink that checks a
downloaded blob against its sha256 while writing it (and computing forge's own xxh3)."""

from __future__ import annotations

import hashlib
import os
import random
import time
import uuid
from pathlib import Path

import xxhash

from forge.leftovers import owner
from forge.remote.results import Digest


class RemoteError(Exception):
    """A request that failed. `retry`: worth another try (timeouts, 5xx, cut bodies);
    `down`: the server cannot be reached at all (no point asking again this build)."""

    def __init__(self, message: str, *, retry: bool = False, down: bool = False):
        super().__init__(message)
        self.retry = retry
        self.down = down


class CorruptBlob(RemoteError):
    """The server sent bytes that do not hash to the digest asked for."""


ATTEMPTS = 4
BACKOFF = 0.1  # seconds before the second try; doubled for each later one


def with_retries(call, what: str, cancel=None):
    """`call()` again after retryable errors, waiting 0.1, 0.2, 0.4 s (plus jitter)."""
    delay = BACKOFF
    for attempt in range(ATTEMPTS):
        try:
            return call()
        except RemoteError as e:
            if not e.retry or attempt == ATTEMPTS - 1 or (cancel is not None and cancel.is_set()):
                raise
            time.sleep(delay * (1 + random.random() / 2))
            delay *= 2
    raise AssertionError("unreachable")


IN_MEMORY = 1 << 20  # smaller blobs are collected in memory: a temp file costs more syscalls


class Sink:
    """A blob being downloaded: `write()` chunks, then `finish()`. Large blobs go to a
    file in `tmp_dir` (`.path`), small ones stay in memory (`.data`)."""

    def __init__(self, tmp_dir: Path, digest: Digest):
        self.digest = digest
        self.path: Path | None = None
        self.data: bytearray | None = None
        if digest.size <= IN_MEMORY:
            self.data = bytearray()
            self._f = None
        else:
            self.path = tmp_dir / f"remote-{owner()}-{uuid.uuid4().hex}"
            self._f = open(self.path, "wb")
        self._sha = hashlib.sha256()
        self._xx = xxhash.xxh3_128()
        self.size = 0

    def write(self, data) -> None:
        self._sha.update(data)
        self._xx.update(data)
        if self._f is None:
            self.data += data
        else:
            self._f.write(data)
        self.size += len(data)

    def restart(self) -> None:
        """Forget what arrived (a retry starts the body again)."""
        if self.size == 0:
            return
        if self._f is None:
            self.data = bytearray()
        else:
            self._f.seek(0)
            self._f.truncate()
        self._sha = hashlib.sha256()
        self._xx = xxhash.xxh3_128()
        self.size = 0

    def finish(self) -> str:
        """Check the bytes against the digest; returns their xxh3 (the local CAS name).
        On a mismatch the sink stays open, so the caller may `restart()` and try again."""
        if self.size != self.digest.size or self._sha.hexdigest() != self.digest.hash:
            raise CorruptBlob(f"blob {self.digest.hash[:16]}... came back with "
                              f"{self.size} bytes that do not match its digest", retry=True)
        if self._f is not None:
            self._f.close()
        return self._xx.hexdigest()

    def store(self, cache, executable: bool, xxh: str) -> None:
        """Move the verified blob into the local CAS under its xxh3 name."""
        if self.data is not None:
            cache.put_bytes(bytes(self.data), executable)
        else:
            cache.put_file(self.path, executable, digest=xxh)

    def read(self) -> bytes:
        return bytes(self.data) if self.data is not None else Path(self.path).read_bytes()

    def discard(self) -> None:
        if self._f is None:
            self.data = None
            return
        if not self._f.closed:
            self._f.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
