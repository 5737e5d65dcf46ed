"""Remote execution as forge/executor.py sees it: `run` one action on the farm.

For an action that missed every cache and may run remotely (Action.remote): build its
Command and input root (forge/remote/inputs.py), upload what FindMissingBlobs says the
executor's CAS lacks, Execute and follow the operation (forge/remote/execution.py), then
download and verify the outputs into the local CAS exactly as a remote-cache hit is
(forge/remote/cache_client.py). The ActionResult is also written under forge's own
remote key (results.action_digest), so a later build, here or on another machine, finds
it with a plain cache lookup.

Two kinds of failure stay apart: the action failed (its exit code and output, as for a
local run) and the farm failed (`Unavailable`: down, overloaded, no worker for its
properties, blobs lost); the caller runs the second kind locally. After a connection
failure or three farm failures in a row the executor is left alone for the build.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import grpc

from forge import trees
from forge.cache import Cache, OutputFile
from forge.model import Action
from forge.remote import inputs as rin
from forge.remote.cache_client import RemoteCache, batch_groups
from forge.remote.proto import remote_execution_pb2 as re_pb
from forge.remote.results import Digest, ShapeError, action_digest, check_shape, from_proto
from forge.remote.settings import ExecutorSettings
from forge.remote.transfer import RemoteError, Sink

FAILURES_BEFORE_GIVING_UP = 3
OUTPUT_TAIL = 4000


class Unavailable(Exception):
    """The farm could not run the action (not: the action failed)."""


class Ran(NamedTuple):
    outputs: list[OutputFile] | None  # None: the action failed
    failure: str  # what to show when it failed
    worker: str  # who ran it ("" when the executor's cache answered)
    cached: bool  # the executor's action cache had it


class RemoteExecutor:
    def __init__(self, settings: ExecutorSettings, cache: Cache, root: Path, warn, cancel=None):
        from forge.remote.execution import Execution
        from forge.remote.reapi import GrpcStore
        self.settings = settings
        self.cache = cache
        self.root = root
        self.cancel = cancel
        self._warn = warn
        self.store = GrpcStore(settings.remote)
        self.execution = Execution(self.store, settings.queue_timeout)
        # Downloads go the way remote-cache hits do (verified, into the local CAS).
        self.fetcher = RemoteCache(settings.remote, cache, warn, cancel, store=self.store)
        self.sha = rin.Sha256s()
        self.present: set[str] = set()  # blobs the executor's CAS is known to hold
        self.down = False
        self.stats: Counter = Counter()
        self._lock = threading.Lock()
        self._fails = 0
        self._aliases: list = []

    @property
    def url(self) -> str:
        return self.settings.remote.url

    def run(self, a: Action, key: str, source_digests: dict[str, str],
            generated: dict[str, OutputFile]) -> Ran:
        """Run `a` remotely. Raises Unavailable when the farm failed."""
        if self.down:
            raise Unavailable(f"remote executor {self.url} was given up earlier in this build")
        try:
            t0 = time.perf_counter()
            a = as_sent(a, self.settings)
            blobs = rin.Blobs()
            root = rin.input_root(self._inputs(a, source_digests, generated, blobs), blobs)
            digest = rin.action(a, key, root, blobs, do_not_cache=a.do_not_cache)
            t1 = time.perf_counter()
            self._upload(blobs)
            t2 = time.perf_counter()
            resp = self.execution.run(digest, self.cancel)
            t3 = time.perf_counter()
            if resp.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]:
                # Blobs the CAS dropped since it told us it had them: upload all, once more.
                self.present.clear()
                self._upload(blobs)
                resp = self.execution.run(digest, self.cancel)
            ran = self._result(a, key, resp)
            self._ok()
            with self._lock:  # where the time goes (bench/remote-exec)
                self.stats["ms_inputs"] += round((t1 - t0) * 1000, 3)
                self.stats["ms_upload"] += round((t2 - t1) * 1000, 3)
                self.stats["ms_execute"] += round((t3 - t2) * 1000, 3)
                self.stats["ms_outputs"] += round((time.perf_counter() - t3) * 1000, 3)
            return ran
        except (RemoteError, ShapeError) as e:
            self._failed(e)
            raise Unavailable(str(e)) from None

    # --- inputs ---------------------------------------------------------------------------

    def _inputs(self, a: Action, source_digests, generated, blobs: rin.Blobs) -> list[tuple]:
        out = []
        for i in a.inputs:
            if i.source:
                path = self.root / i.path
                d = self.sha.of(source_digests[i.path], path)
                blobs.add_file(d, path)
                out.append((i.path, "f", d, bool(os.stat(path).st_mode & 0o100)))
                continue
            f = generated[i.path]
            if not f.tree:
                path = self.cache.blob_path(f.digest, f.executable)
                d = self.sha.of(f.digest, path)
                blobs.add_file(d, path)
                out.append((i.path, "f", d, f.executable))
                continue
            out.append((i.path, "d", None, False))
            for e in trees.entries(self.cache, f):
                rel = f"{i.path}/{e[0]}"
                if e[1] == "f":
                    path = self.cache.blob_path(e[2], e[4])
                    d = self.sha.of(e[2], path)
                    blobs.add_file(d, path)
                    out.append((rel, "f", d, e[4]))
                else:
                    out.append((rel, e[1], e[2] if e[1] == "l" else None, False))
        return out

    def _upload(self, blobs: rin.Blobs) -> None:
        store = self.store
        asked = [d for d, _ in blobs.items.values() if d.hash not in self.present and d.size]
        missing = store.find_missing(asked, self.cancel) if asked else []
        small = [d for d in missing if d.size <= store.batch_limit // 8]
        large = [d for d in missing if d.size > store.batch_limit // 8]
        for d in large:
            store.write(d, blobs.items[d.hash][1], self.cancel)
        for group in batch_groups([(None, d) for d in small], store.batch_limit):
            store.write_batch([(d, _bytes(blobs.items[d.hash][1])) for _, d in group], self.cancel)
        with self._lock:
            self.present.update(d.hash for d, _ in blobs.items.values())
            self.stats["blobs_checked"] += len(asked)
            self.stats["blobs_up"] += len(missing)
            self.stats["bytes_up"] += sum(d.size for d in missing)
            gone = {d.hash for d in missing}
            self.stats["blobs_saved"] += len(asked) - len(missing)
            self.stats["bytes_saved"] += sum(d.size for d in asked if d.hash not in gone)

    # --- results ----------------------------------------------------------------------------

    def _result(self, a: Action, key: str, resp: re_pb.ExecuteResponse) -> Ran:
        result = resp.result
        worker = result.execution_metadata.worker or "a remote worker"
        code = resp.status.code
        if code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]:
            return Ran(None, f"command failed (timed out after {a.timeout:g} s on {worker}):\n  "
                       f"{_show_argv(a.argv)}" + self._output(result), worker, False)
        if code != 0:
            raise RemoteError(f"the executor could not run it (status {code}: "
                              f"{resp.status.message})")
        if result.exit_code != 0:
            return Ran(None, f"command failed (exit code {result.exit_code} on {worker}):\n  "
                       f"{_show_argv(a.argv)}" + self._output(result), worker, False)
        declared = {o.path for o in a.outputs}
        made = {f.path for f in result.output_files} | {d.path for d in result.output_directories}
        if declared - made:
            missing = sorted(declared - made)
            return Ran(None, "declared output" + ("s " if len(missing) > 1 else " ")
                       + ", ".join(missing) + f" not created by the action (on {worker})",
                       worker, False)
        check_shape(result, {o.path for o in a.outputs if not o.directory},
                    {o.path for o in a.outputs if o.directory})
        outs = self.fetcher.fetch(a, result)
        if outs is None:
            raise RemoteError("the executor's CAS lost outputs it had just reported")
        with self._lock:
            self.stats["cached" if resp.cached_result else "executed"] += 1
            m = result.execution_metadata
            if not resp.cached_result and m.HasField("worker_start_timestamp"):
                self.stats["ms_on_worker"] += _ms(m.worker_start_timestamp, m.worker_completed_timestamp)
                self.stats["ms_command"] += _ms(m.execution_start_timestamp,
                                                m.execution_completed_timestamp)
        if not a.do_not_cache:
            self._alias(key, result)
        return Ran(outs, "", "" if resp.cached_result else worker, resp.cached_result)

    def _alias(self, key: str, result: re_pb.ActionResult) -> None:
        """The result under forge's remote key, in the background; refusal costs nothing
        but later lookups going through Execute."""
        clean = re_pb.ActionResult()
        clean.CopyFrom(result)
        clean.ClearField("stdout_raw")
        clean.ClearField("stderr_raw")
        for f in clean.output_files:
            f.ClearField("contents")

        def write():
            try:
                self.store.update_action_result(action_digest(key), clean, self.cancel)
            except RemoteError:
                pass
        self._aliases.append(self.fetcher.upload_pool.submit(write))

    def _output(self, result: re_pb.ActionResult) -> str:
        text = b""
        for raw, digest in ((result.stdout_raw, result.stdout_digest),
                            (result.stderr_raw, result.stderr_digest)):
            if raw:
                text += raw
            elif digest.size_bytes:
                text += self._read(from_proto(digest))
        out = text[-OUTPUT_TAIL:].decode(errors="replace").rstrip()
        if not out:
            return "\n(no output)"
        lines = out.splitlines()[-40:]
        return "\noutput (last lines):\n" + "\n".join("  " + ln for ln in lines)

    def _read(self, d: Digest) -> bytes:
        sink = Sink(self.cache.tmp, d)
        try:
            if self.store.read(d, sink, self.cancel) is None:
                return b"(its output is no longer in the executor's CAS)\n"
            return sink.read()
        except RemoteError as e:
            return f"(its output could not be read: {e})\n".encode()
        finally:
            sink.discard()

    # --- bookkeeping ----------------------------------------------------------------------

    def _ok(self) -> None:
        with self._lock:
            self._fails = 0

    def _failed(self, e: Exception) -> None:
        with self._lock:
            self.stats["errors"] += 1
            self._fails += 1
            if (getattr(e, "down", False) or self._fails >= FAILURES_BEFORE_GIVING_UP) \
                    and not self.down:
                self.down = True
                give_up = True
            else:
                give_up = False
        if give_up:
            self._warn(f"remote executor {self.url} is not usable ({e}); running actions "
                       "here for the rest of this build")

    def finish(self) -> dict:
        for f in self._aliases:
            try:
                f.result()
            except Exception:
                pass
        self._aliases.clear()
        return {"url": self.url, "down": self.down, **self.stats,
                "bytes_down": self.fetcher.stats.get("bytes_down", 0),
                "blobs_down": self.fetcher.stats.get("blobs_down", 0)}

    def close(self) -> None:
        self.fetcher.close()


def as_sent(a: Action, settings: ExecutorSettings) -> Action:
    """`a` with the platform properties it is executed with: its pool's
    (`[remote] pool_properties`) and its own."""
    props = settings.platform(a.pool, a.exec_properties)
    return a if props == a.exec_properties else dataclasses.replace(a, exec_properties=props)


def _ms(start, end) -> float:
    return round(max(0.0, (end.ToNanoseconds() - start.ToNanoseconds()) / 1e6), 3)


def _bytes(source) -> bytes:
    return source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()


def _show_argv(argv) -> str:
    if len(argv) == 3 and argv[0] == "bash" and argv[1] == "-c":
        return "bash -c " + repr(argv[2])
    import shlex
    return shlex.join(argv)
