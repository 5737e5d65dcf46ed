"""The shared cache as forge/executor.py sees it: `lookup` an action's outputs,
`upload` them.

Nothing here can fail a build. A remote that is down, slow or broken costs a warning
and the action runs locally; after a connection failure or three failed operations in
a row the remote is left alone for the rest of the build. Every blob is verified
against its sha256 before it enters the local cache, and an entry whose blobs are gone
is a miss.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from forge import trees
from forge.cache import Cache, OutputFile
from forge.model import Action
from forge.remote.proto import remote_execution_pb2 as re_pb
from forge.remote.results import (Digest, digest_of_file, ShapeError, action_digest, action_message, check_shape,
                                  digest_of, from_proto, tree_files, tree_from_entries)
from forge.remote.settings import RemoteSettings
from forge.remote.transfer import CorruptBlob, RemoteError, Sink

FAILURES_BEFORE_GIVING_UP = 3


def make_store(s: RemoteSettings):
    if s.grpc:
        from forge.remote.reapi import GrpcStore
        return GrpcStore(s)
    from forge.remote.http import HttpStore
    return HttpStore(s)


class RemoteCache:
    def __init__(self, settings: RemoteSettings, cache: Cache, warn, cancel=None, store=None):
        self.settings = settings
        self.cache = cache
        self._warn = warn
        self.cancel = cancel
        self.store = store or make_store(settings)
        self.pool = ThreadPoolExecutor(settings.jobs, thread_name_prefix="forge-remote")
        self.upload_pool = ThreadPoolExecutor(2, thread_name_prefix="forge-upload")
        self._uploads: list = []
        self.down = False
        self.stats: Counter = Counter()
        self._lock = threading.Lock()
        self._fails = 0
        self._warned: set[str] = set()
        self._sha: dict[tuple[str, bool], Digest] = {}  # (xxh3, executable) -> sha256 digest
        self._xxh: dict[tuple[str, bool], str] = {}  # (sha256, executable) -> xxh3

    # --- reading ------------------------------------------------------------------------

    def lookup(self, key: str, action: Action) -> list[OutputFile] | None:
        """The action's outputs, in the local cache, if the remote has them all; else None."""
        if self.down:
            return None
        self._count("lookups")
        try:
            result = self.store.get_action_result(
                action_digest(key), self.cancel, [o.path for o in action.outputs if not o.directory])
            if result is None:
                self._ok("misses")
                return None
            check_shape(result, {o.path for o in action.outputs if not o.directory},
                        {o.path for o in action.outputs if o.directory})
            outs = self._fetch(action, result)
        except ShapeError as e:
            self._note(f"the remote entry of {action.description} is unusable ({e}); building it")
            return None
        except RemoteError as e:
            self._failed(e, f"building {action.description} locally")
            return None
        if outs is None:
            self._ok("incomplete")
            self._note(f"the remote entry of {action.description} points at blobs the remote "
                       "cache no longer has; building it", once="incomplete")
            return None
        self._ok("hits")
        return outs

    def fetch(self, action: Action, result: re_pb.ActionResult) -> list[OutputFile] | None:
        """The outputs an ActionResult names, verified into the local CAS; None when the
        remote lacks one of their blobs (also what remote execution downloads with)."""
        return self._fetch(action, result)

    def _fetch(self, action: Action, result: re_pb.ActionResult) -> list[OutputFile] | None:
        want: dict[tuple[str, bool], Digest] = {}
        inline: dict[tuple[str, bool], bytes] = {}
        for f in result.output_files:
            d = from_proto(f.digest)
            if f.contents and digest_of(f.contents) == d:  # inlined, and verified too
                inline[(d.hash, f.is_executable)] = f.contents
                self._count("inlined", bytes_down=d.size)
            want[(d.hash, f.is_executable)] = d
        walked = {}
        for od in result.output_directories:
            data = self._read_bytes(from_proto(od.tree_digest))
            if data is None:
                return None
            try:
                tree = re_pb.Tree.FromString(data)
            except Exception:
                raise ShapeError("its tree is not a REAPI Tree message") from None
            walked[od.path] = tree_files(tree)
            for _, kind, d, exe in walked[od.path]:
                if kind == "f":
                    want[(d.hash, exe)] = d
        got = self._download(want, inline)
        if got is None:
            return None
        outs = []
        by_path = {f.path: f for f in result.output_files}
        for o in action.outputs:
            if not o.directory:
                f = by_path[o.path]
                if f.is_executable != (o.path in action.executable):
                    raise ShapeError(f"the executable bit of {o.path} is not the declared one")
                d = from_proto(f.digest)
                outs.append(OutputFile(o.path, got[(d.hash, f.is_executable)], d.size,
                                       f.is_executable))
                continue
            outs.append(self._tree_output(o.path, walked[o.path], got))
        return outs

    def _tree_output(self, path: str, walked, got) -> OutputFile:
        from forge.formats.common.treepath import symlink_escapes
        entries, total = [], 0
        for rel, kind, d, exe in walked:
            if kind == "d":
                entries.append([rel, "d"])
            elif kind == "l":
                if d.startswith("/") or symlink_escapes(rel.split("/")[:-1], d):
                    raise ShapeError(f"its tree holds a symlink {rel} -> {d} leading outside it")
                entries.append([rel, "l", d])
            else:
                entries.append([rel, "f", got[(d.hash, exe)], d.size, exe])
                total += d.size
        entries.sort(key=lambda e: e[0])
        return OutputFile(path, self.cache.put_bytes(trees.encode(entries)), total, False, True)

    def _read_bytes(self, d: Digest) -> bytes | None:
        sink = Sink(self.cache.tmp, d)
        try:
            if self.store.read(d, sink, self.cancel) is None:
                return None
            self._count("blobs_down", bytes_down=d.size)
            return sink.read()
        finally:
            sink.discard()

    def _download(self, want: dict, inline: dict) -> dict | None:
        """Fetch every (sha256, executable) blob into the local CAS: their xxh3 digests,
        or None when one is missing on the remote."""
        got: dict[tuple[str, bool], str] = {}
        todo = []
        for k, d in want.items():
            known = self._xxh.get(k)
            if known is not None and self.cache.blob_ok(OutputFile("", known, d.size, k[1])):
                got[k] = known
            elif k in inline:
                got[k] = self.cache.put_bytes(inline[k], k[1])
            else:
                todo.append((k, d))
        small = [t for t in todo if 0 < self.store.batch_limit and t[1].size <= self.store.batch_limit // 8]
        large = [t for t in todo if t not in small]
        calls = [(self._one, k, d) for k, d in large]
        calls += [(self._batch, group) for group in batch_groups(small, self.store.batch_limit)]
        # The common case, one blob, is fetched on this thread: a hand-off to the pool
        # and back costs more than the request on a fast network.
        jobs = [self.pool.submit(*c) for c in calls[1:]]
        missing = False
        error = None
        for j in ([_Done(calls[0])] if calls else []) + jobs:
            try:
                for k, xx in j.result():
                    if xx is None:
                        missing = True
                    else:
                        got[k] = xx
                        self._xxh[k] = xx
            except RemoteError as e:
                error = e
        if error is not None:
            raise error
        return None if missing else got

    def _one(self, k, d: Digest):
        if d.size == 0:
            return [(k, self.cache.put_bytes(b"", k[1]))]
        sink = Sink(self.cache.tmp, d)
        try:
            xx = self.store.read(d, sink, self.cancel)
            if xx is not None:
                sink.store(self.cache, k[1], xx)
                self._count("blobs_down", bytes_down=d.size)
            return [(k, xx)]
        finally:
            sink.discard()

    def _batch(self, group):
        data = self.store.read_batch([d for _, d in group], self.cancel)
        out = []
        for k, d in group:
            blob = data.get(d.hash)
            if blob is not None and digest_of(blob) != d:
                raise CorruptBlob(f"blob {d.hash[:16]}... came back with bytes that do not "
                                  "match its digest")
            out.append((k, None if blob is None else self.cache.put_bytes(blob, k[1])))
            if blob is not None:
                self._count("blobs_down", bytes_down=d.size)
        return out

    # --- writing ------------------------------------------------------------------------

    def upload(self, key: str, action: Action, outputs: list[OutputFile]) -> None:
        """Queue the result of an action that ran here; `finish()` waits for the queue."""
        if self.settings.upload and not self.down:
            self._uploads.append(self.upload_pool.submit(self._upload, key, action, outputs))

    def _upload(self, key: str, action: Action, outputs: list[OutputFile]) -> None:
        if self.down:
            return
        try:
            blobs: dict[str, tuple[Digest, Path | bytes]] = {}
            result = re_pb.ActionResult(exit_code=0)
            for o in outputs:
                if o.tree:
                    tree = tree_from_entries(trees.entries(self.cache, o),
                                             lambda xx, exe: self._sha_of(xx, exe, blobs))
                    data = tree.SerializeToString(deterministic=True)
                    td = digest_of(data)
                    blobs[td.hash] = (td, data)
                    result.output_directories.add(path=o.path, tree_digest=td.proto())
                else:
                    d = self._sha_of(o.digest, o.executable, blobs)
                    result.output_files.add(path=o.path, digest=d.proto(),
                                            is_executable=o.executable)
            am = action_message(key)
            blobs[digest_of(am).hash] = (digest_of(am), am)
            # The empty blob is always present (REAPI), and is never asked for (lookup).
            missing = [d for d in self.store.find_missing(
                [d for d, _ in blobs.values() if d.size], self.cancel)]
            small = [d for d in missing if 0 < self.store.batch_limit and d.size <= self.store.batch_limit // 8]
            large = [d for d in missing if d not in small]
            jobs = [self.pool.submit(self.store.write, d, blobs[d.hash][1], self.cancel) for d in large]
            jobs += [self.pool.submit(self.store.write_batch,
                                      [(d, _bytes(blobs[d.hash][1])) for _, d in group], self.cancel)
                     for group in batch_groups([(None, d) for d in small], self.store.batch_limit)]
            for j in jobs:
                j.result()
            self.store.update_action_result(action_digest(key), result, self.cancel)
            self._count("uploads", blobs_up=len(missing), bytes_up=sum(d.size for d in missing))
            self._ok(None)
        except RemoteError as e:
            self._failed(e, f"the result of {action.description} was not uploaded")
        except (OSError, ValueError, trees.TreeError) as e:  # a local blob vanished (gc)
            self._note(f"the result of {action.description} was not uploaded: {e}")
        except Exception as e:  # a bug here must not fail a build that succeeded
            self._note(f"the result of {action.description} was not uploaded: "
                       f"{type(e).__name__}: {e}")

    def _sha_of(self, xx: str, exe: bool, blobs: dict) -> Digest:
        d = self._sha.get((xx, exe))
        path = self.cache.blob_path(xx, exe)
        if d is None:
            d = self._sha[(xx, exe)] = digest_of_file(path)
            self._xxh[(d.hash, exe)] = xx
        blobs[d.hash] = (d, path)
        return d

    def finish(self) -> None:
        """Wait for queued uploads; then close connections."""
        for f in self._uploads:
            try:
                f.result()
            except Exception as e:  # cancelled, or a bug: the build itself succeeded
                self._note(f"an upload to the remote cache failed: {type(e).__name__}: {e}")
        self._uploads.clear()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.upload_pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    # --- bookkeeping --------------------------------------------------------------------

    def _count(self, what: str, **amounts) -> None:
        with self._lock:
            self.stats[what] += 1
            for k, v in amounts.items():
                self.stats[k] += v

    def _ok(self, what: str | None) -> None:
        with self._lock:
            if what:
                self.stats[what] += 1
            self._fails = 0

    def _failed(self, e: RemoteError, consequence: str) -> None:
        with self._lock:
            self.stats["errors"] += 1
            self._fails += 1
            give_up = (e.down or self._fails >= FAILURES_BEFORE_GIVING_UP) and not self.down
            if give_up:
                self.down = True
        if give_up:
            self._note(f"remote cache {self.settings.url} is not usable ({e}); building without "
                       "it for the rest of this build")
        elif not self.down:
            self._note(f"remote cache: {e}; {consequence}")

    def _note(self, text: str, once: str | None = None) -> None:
        with self._lock:
            if once is not None:
                if once in self._warned:
                    return
                self._warned.add(once)
        self._warn(text)


class _Done:
    """A call made here, with the interface of a Future."""

    def __init__(self, call):
        try:
            self._value, self._error = call[0](*call[1:]), None
        except Exception as e:
            self._value, self._error = None, e

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value


def batch_groups(items: list, limit: int):
    """Split (key, Digest) pairs into batches of at most `limit` bytes in all."""
    group, total = [], 0
    for item in items:
        if group and total + item[1].size > limit:
            yield group
            group, total = [], 0
        group.append(item)
        total += item[1].size
    if group:
        yield group


def _bytes(source) -> bytes:
    return source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
