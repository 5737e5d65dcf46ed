"""`forge worker`: a bot of the Remote Workers API (BuildGrid's Bots service) that runs actions.

The session: CreateBotSession declares the bot (its id, `capacity` = --concurrency, the
platform properties on its primary device), then UpdateBotSession is called in a loop. It
long-polls: the server holds it until it has a lease for the bot or its wait runs out,
and the call carries the leases the bot holds (ACTIVE while running, then COMPLETED with
the ActionResult packed in `result` and the outcome in `status`); that is also the
heartbeat that keeps the leases the bot's. When a lease finishes, the poll in flight is
cancelled so the result goes out at once.

A lease's payload is the Action (or its digest). Its Command and input root come from
the CAS through the local blob cache (forge/remote/staging.py) into a directory of its
own under --work-dir, the command runs in forge's sandbox with the action's timeout,
outputs and stdout/stderr go up to the CAS, and the directory is removed. BuildGrid's
scheduler writes the ActionResult into the action cache (unless the action says
do_not_cache) when it takes the lease back.

Failures: the server going away (restart, network) is waited out with backoff, and the
same session is carried on if the server still knows it, else a new one is created (the
server requeued what the old one held). SIGTERM drains: the bot reports BOT_TERMINATING
so it gets no new lease (one the server had already given it is still run), finishes and
reports the running ones, then exits; a second
SIGTERM (or Ctrl-C) cancels them. A status line per change goes to stderr and
`<work-dir>/status.json` says what the bot is doing.
"""

from __future__ import annotations

import json
import os
import platform as host_platform
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2, status_pb2

from forge import leftovers, sandbox
from forge.errors import UsageError
from forge.remote.proto import bots_pb2
from forge.remote.proto import remote_execution_pb2 as re_pb
from forge.remote.proto import worker_pb2
from forge.remote.reapi import GrpcStore
from forge.remote.settings import RemoteSettings
from forge.remote.staging import (BlobCache, Outputs, StagingError, fetch, file_digest, inside,
                                  stage_tree)
from forge.remote.transfer import RemoteError

BOTS = "/google.devtools.remoteworkers.v1test2.Bots/"
POLL = 30.0  # seconds an UpdateBotSession may wait on the server for work
HEARTBEAT = 30.0  # seconds between keepalives at most, while every slot is busy
DEFAULT_TIMEOUT = 3600.0  # an action that names no timeout
BACKOFF_MAX = 5.0
OUTAGE = 120.0  # seconds a finished lease's upload waits for a server that went away
# BuildGrid's answers for a session it no longer has (expired, closed, unknown).
GONE = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION}
# A first CreateBotSession refused this way is the command line's fault: retrying will not help.
REFUSED = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
           grpc.StatusCode.UNIMPLEMENTED}


@dataclass
class WorkerConfig:
    remote: RemoteSettings
    work_dir: Path
    concurrency: int = 1
    platform: dict[str, list[str]] = field(default_factory=dict)
    name: str = ""
    max_timeout: float = DEFAULT_TIMEOUT


def default_platform() -> dict[str, list[str]]:
    """What every forge worker is: BuildGrid matches OSFamily and ISA if an action names them."""
    isa = {"x86_64": "x86-64", "amd64": "x86-64", "aarch64": "aarch64", "arm64": "aarch64"}
    machine = host_platform.machine()
    return {"OSFamily": ["linux"], "ISA": [isa.get(machine.lower(), machine.lower())]}


def now() -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.GetCurrentTime()
    return t


class Lease:
    def __init__(self, proto: bots_pb2.Lease):
        self.proto = proto
        self.proto.state = bots_pb2.ACTIVE
        self.cancel = threading.Event()
        self.done = False
        self.thread: threading.Thread | None = None


class Worker:
    def __init__(self, cfg: WorkerConfig, log=None):
        self.cfg = cfg
        self.log = log or (lambda text: None)
        self.bot_id = cfg.name or f"{socket.gethostname()}-{os.getpid()}"
        self.store = GrpcStore(cfg.remote)
        self._stub = {m: self.store.channel.unary_unary(
            BOTS + m, request_serializer=req.SerializeToString,
            response_deserializer=bots_pb2.BotSession.FromString)
            for m, req in (("CreateBotSession", bots_pb2.CreateBotSessionRequest),
                           ("UpdateBotSession", bots_pb2.UpdateBotSessionRequest))}
        self.cache = BlobCache(cfg.work_dir / "cas")
        self.leases_dir = cfg.work_dir / "leases"
        self.groups = leftovers.ProcessGroups(cfg.work_dir)
        self.leases: dict[str, Lease] = {}
        self.finished: set[str] = set()  # reported leases: never started again
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.draining = threading.Event()
        self.stopping = threading.Event()
        self.session: bots_pb2.BotSession | None = None
        self.counts = {"completed": 0, "failed": 0, "reconnects": 0}
        self.connected = False  # a session was created once

    # --- the session ----------------------------------------------------------------------

    def _bot(self) -> bots_pb2.BotSession:
        props = {**default_platform(), **self.cfg.platform}
        device = worker_pb2.Device(handle=self.bot_id, properties=[
            worker_pb2.Device.Property(key=k, value=v) for k in sorted(props) for v in props[k]])
        return bots_pb2.BotSession(bot_id=self.bot_id, status=bots_pb2.OK, worker=worker_pb2.Worker(
            devices=[device], configs=[worker_pb2.Worker.Config(
                key="capacity", value=str(self.cfg.concurrency))]))

    def _metadata(self):
        return (("authorization", self.cfg.remote.authorization),) \
            if self.cfg.remote.authorization else ()

    def run(self) -> int:
        # What a killed worker left: the process groups of its commands (they run in
        # sessions of their own, so they outlive it) and its lease directories.
        for gone in leftovers.reap(self.cfg.work_dir) + leftovers.reap(self.leases_dir):
            self._status(f"removed what a killed worker left: {gone}")
        self.leases_dir.mkdir(parents=True, exist_ok=True)
        delay = 0.2
        while not self.stopping.is_set():
            try:
                if self.session is None:
                    self._create()
                else:
                    self._update()
                delay = 0.2
            except grpc.RpcError as e:
                code = e.code()
                if not self.connected and code in REFUSED:
                    self.store.close()
                    raise UsageError(
                        f"{self.cfg.remote.url} refused a bot session for instance "
                        f"{self.cfg.remote.instance!r} ({code.name}: {e.details()})",
                        hint="check --executor (a server with a Bots service), --instance and "
                        "FORGE_REMOTE_TOKEN") from None
                if self.session is not None and code in GONE:
                    self._lost(f"the server dropped the session ({code.name}: {e.details()})")
                    continue
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # a long poll that found nothing
                self._status(f"server unavailable ({code.name}: {e.details()}); retrying in "
                             f"{delay:.1f}s")
                self.counts["reconnects"] += 1
                self.wake.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
            except Exception as e:  # a bug of ours: say so, keep serving
                self._status(f"internal error: {type(e).__name__}: {e}; retrying in {delay:.1f}s")
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
            if self.draining.is_set() and not self._running() and not self._unreported():
                break
        self._cancel_all()
        self.groups.close()
        self._write_status("stopped")
        self.store.close()
        return 0

    def _create(self) -> None:
        bot = self._bot()
        self.session = self._stub["CreateBotSession"](
            bots_pb2.CreateBotSessionRequest(parent=self.cfg.remote.instance, bot_session=bot),
            timeout=POLL, metadata=self._metadata())
        self.connected = True
        self._status(f"session {self.session.name} (bot {self.bot_id}, capacity "
                     f"{self.cfg.concurrency}, platform {self._platform_text()})")
        self._take(self.session)

    def _update(self) -> None:
        with self.lock:
            bot = bots_pb2.BotSession()
            bot.CopyFrom(self.session)
            bot.status = bots_pb2.BOT_TERMINATING if self.draining.is_set() else bots_pb2.OK
            del bot.leases[:]
            bot.leases.extend(lease.proto for lease in self.leases.values())
            sent = {lid for lid, lease in self.leases.items() if lease.done}
        self.wake.clear()
        # Nothing to wait for while draining: the call returns as soon as it is synchronised.
        timeout = 10.0 if self.draining.is_set() else POLL
        future = self._stub["UpdateBotSession"].future(
            bots_pb2.UpdateBotSessionRequest(name=bot.name, bot_session=bot), timeout=timeout,
            metadata=self._metadata())
        while not future.done():
            if self.wake.wait(0.5) and not future.done():
                future.cancel()
        try:
            answer = future.result()  # raises the RpcError
        except grpc.FutureCancelledError:
            return  # our own cancel: the next call carries what changed
        with self.lock:
            for lid in sent:  # reported: the server has them now
                self.leases.pop(lid, None)
                self.finished.add(lid)
        self._take(answer)
        # At capacity the server answers at once (it has nothing to wait for), so the next
        # call is a heartbeat: sent when a lease finishes, or well before the session expires.
        if self._busy():
            self.wake.wait(self._heartbeat(answer))

    def _busy(self) -> bool:
        with self.lock:
            running = sum(not lease.done for lease in self.leases.values())
            unreported = any(lease.done for lease in self.leases.values())
        return not unreported and (running >= self.cfg.concurrency or self.draining.is_set())

    @staticmethod
    def _heartbeat(answer: bots_pb2.BotSession) -> float:
        if not answer.HasField("expire_time"):
            return HEARTBEAT
        left = answer.expire_time.ToNanoseconds() / 1e9 - time.time()
        return min(HEARTBEAT, max(0.5, left / 3))

    def _take(self, answer: bots_pb2.BotSession) -> None:
        with self.lock:
            # Copies first: `answer` may be self.session itself (CreateBotSession's answer),
            # whose leases are cleared below.
            offered = {}
            for lease in answer.leases:
                offered[lease.id] = bots_pb2.Lease()
                offered[lease.id].CopyFrom(lease)
            if answer is not self.session:
                self.session.CopyFrom(answer)
            del self.session.leases[:]
            for lid, held in list(self.leases.items()):
                if lid not in offered and not held.done:
                    # The server took it back (cancelled, or given to another bot).
                    held.cancel.set()
                    self.leases.pop(lid)
                    self._status(f"lease {lid} withdrawn by the server")
            for lid, proto in offered.items():
                if lid in self.leases or lid in self.finished:
                    continue
                if proto.state not in (bots_pb2.PENDING, bots_pb2.ACTIVE):
                    continue
                lease = Lease(proto)
                self.leases[lid] = lease
                lease.thread = threading.Thread(target=self._execute, args=(lease,),
                                                name=f"lease-{lid[:8]}", daemon=True)
                lease.thread.start()
                self._status(f"lease {lid} started")
        self._write_status("draining" if self.draining.is_set() else "ok")

    def _lost(self, why: str) -> None:
        self._status(f"{why}; starting a new session")
        self._cancel_all()
        with self.lock:
            self.leases.clear()
        self.session = None

    def _running(self) -> bool:
        with self.lock:
            return any(not lease.done for lease in self.leases.values())

    def _unreported(self) -> bool:
        with self.lock:
            return any(lease.done for lease in self.leases.values())

    def _cancel_all(self) -> None:
        with self.lock:
            leases = list(self.leases.values())
        for lease in leases:
            lease.cancel.set()
        for lease in leases:
            if lease.thread is not None:
                lease.thread.join(timeout=30)

    def drain(self) -> None:
        """Finish what runs, take nothing new, then stop (SIGTERM)."""
        if self.draining.is_set():
            self.stop()
            return
        self._status("draining: finishing the running leases, accepting no new ones")
        self.draining.set()
        self.wake.set()

    def stop(self) -> None:
        """Cancel the running leases and stop (a second SIGTERM, Ctrl-C)."""
        self.stopping.set()
        with self.lock:
            for lease in self.leases.values():
                lease.cancel.set()
        self.wake.set()

    # --- one lease ------------------------------------------------------------------------

    def _execute(self, lease: Lease) -> None:
        lid = lease.proto.id
        work = sandbox.new_scratch(self.leases_dir, "lease-" + lid)  # sb-<owner>-...: reap()able
        result, status = re_pb.ActionResult(), status_pb2.Status(code=code_pb2.OK)
        try:
            result, status = self._run_lease(lease, work)
        except StagingError as e:
            status = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=str(e))
        except RemoteError as e:
            # INTERNAL: BuildGrid retries the job (on this bot or another).
            status = status_pb2.Status(code=code_pb2.INTERNAL, message=f"CAS: {e}")
        except Exception as e:  # a bug here must not take the bot down with the lease
            status = status_pb2.Status(code=code_pb2.INTERNAL,
                                       message=f"forge worker: {type(e).__name__}: {e}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        with self.lock:
            if lease.cancel.is_set() and lid not in self.leases:
                return  # withdrawn: nobody wants the answer
            lease.proto.state = bots_pb2.COMPLETED
            lease.proto.status.CopyFrom(status)
            lease.proto.result.Pack(result)
            lease.done = True
            ok = status.code == code_pb2.OK and result.exit_code == 0
            self.counts["completed" if ok else "failed"] += 1
        self._status(f"lease {lid} done: "
                     + (f"exit {result.exit_code}" if status.code == code_pb2.OK
                        else f"{code_pb2.Code.Name(status.code)}: {status.message}"))
        self.wake.set()

    def _action(self, lease: Lease) -> re_pb.Action:
        action = re_pb.Action()
        if lease.proto.payload.Is(re_pb.Action.DESCRIPTOR):
            lease.proto.payload.Unpack(action)
            return action
        digest = re_pb.Digest()
        if not lease.proto.payload.Unpack(digest):
            raise StagingError(f"the lease carries a {lease.proto.payload.type_url}, not an Action")
        action.ParseFromString(self._blob(digest))
        return action

    def _blob(self, d: re_pb.Digest) -> bytes:
        fetch(self.store, self.cache, [d])
        return self.cache.read(d) if d.size_bytes else b""

    def _run_lease(self, lease: Lease, work: Path):
        meta = re_pb.ExecutedActionMetadata(worker=self.bot_id)
        meta.worker_start_timestamp.CopyFrom(now())
        meta.input_fetch_start_timestamp.CopyFrom(now())
        action = self._action(lease)
        command = re_pb.Command()
        command.ParseFromString(self._blob(action.command_digest))
        if not command.arguments:
            raise StagingError("the Command has no arguments")
        root = work / "root"
        staged = stage_tree(self.store, self.cache, action.input_root_digest, root, lease.cancel)
        before = {}
        for p in staged:
            st = p.stat()
            before[p] = (st.st_size, st.st_mtime_ns)
        meta.input_fetch_completed_timestamp.CopyFrom(now())
        if os.environ.get("FORGE_WORKER_TRACE"):
            self._status(f"lease {lease.proto.id} staged")
        cwd = inside(root, command.working_directory or ".")
        cwd.mkdir(parents=True, exist_ok=True)
        outputs = self._declared(command)
        for rel, _ in outputs:  # REAPI: the worker makes the outputs' parent directories
            inside(cwd, rel).parent.mkdir(parents=True, exist_ok=True)
        env = sandbox.base_env(work / "tmp")
        (work / "tmp").mkdir()
        env.update({v.name: v.value for v in command.environment_variables})
        timeout = action.timeout.ToTimedelta().total_seconds() if action.HasField("timeout") else 0
        timeout = min(timeout or self.cfg.max_timeout, self.cfg.max_timeout)
        meta.execution_start_timestamp.CopyFrom(now())
        out, err = work / "stdout", work / "stderr"
        ran = sandbox.run(list(command.arguments), cwd, env, timeout=timeout, cancel=lease.cancel,
                          log=out, err=err, groups=self.groups)
        meta.execution_completed_timestamp.CopyFrom(now())
        # A command that wrote through a hard link changed the cached blob: drop it.
        for p, was in before.items():
            try:
                st = p.stat()
            except OSError:
                continue
            if (st.st_size, st.st_mtime_ns) != was:
                self.cache.evict(file_digest(p))
        meta.output_upload_start_timestamp.CopyFrom(now())
        collected = Outputs()
        for rel, want_dir in outputs:
            collected.add(rel, inside(cwd, rel), want_dir=want_dir)
        result = collected.result
        result.exit_code = ran.returncode if not (ran.timed_out or ran.cancelled) else -1
        result.stdout_digest.CopyFrom(collected.add_bytes(out.read_bytes()))
        result.stderr_digest.CopyFrom(collected.add_bytes(err.read_bytes()))
        self._patiently(lambda: collected.upload(self.store, lease.cancel), lease.cancel)
        meta.output_upload_completed_timestamp.CopyFrom(now())
        meta.worker_completed_timestamp.CopyFrom(now())
        result.execution_metadata.CopyFrom(meta)
        if ran.timed_out:
            return result, status_pb2.Status(
                code=code_pb2.DEADLINE_EXCEEDED,
                message=f"the action ran out of its {timeout:g}s timeout and was killed")
        if ran.cancelled:
            return result, status_pb2.Status(code=code_pb2.CANCELLED, message="cancelled")
        return result, status_pb2.Status(code=code_pb2.OK)

    def _patiently(self, call, cancel: threading.Event):
        """`call()` again while the server is away (a restart), for up to OUTAGE seconds:
        the outputs are made, so waiting beats running the action again elsewhere."""
        end = time.monotonic() + OUTAGE
        delay = 0.5
        while True:
            try:
                return call()
            except RemoteError as e:
                if not (e.retry or e.down) or time.monotonic() > end or cancel.is_set():
                    raise
                self._status(f"waiting for the server to take the outputs back: {e}")
                cancel.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    @staticmethod
    def _declared(command: re_pb.Command) -> list[tuple[str, bool | None]]:
        if command.output_paths:
            return [(p, None) for p in command.output_paths]
        return ([(p, False) for p in command.output_files]
                + [(p, True) for p in command.output_directories])

    # --- status ---------------------------------------------------------------------------

    def _platform_text(self) -> str:
        props = {**default_platform(), **self.cfg.platform}
        return ", ".join(f"{k}={v}" for k in sorted(props) for v in props[k])

    def _status(self, text: str) -> None:
        t = time.time()
        stamp = time.strftime("%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}"
        self.log(f"{stamp} forge worker {self.bot_id}: {text}")

    def _write_status(self, state: str) -> None:
        with self.lock:
            doc = {"bot_id": self.bot_id, "state": state,
                   "session": self.session.name if self.session else None,
                   "running": sorted(lid for lid, le in self.leases.items() if not le.done),
                   **self.counts, "time": time.time()}
        tmp = self.cfg.work_dir / "status.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, self.cfg.work_dir / "status.json")
