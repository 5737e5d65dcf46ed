"""REAPI Execution over gRPC: `Execute` an action digest, follow its operation.

`Execute` answers with a stream of `google.longrunning.Operation`s whose metadata says
the stage (CACHE_CHECK, QUEUED, EXECUTING, COMPLETED); the last one is `done` and packs
an `ExecuteResponse`. The stream is read in slices of `SLICE` seconds: when a slice
ends, or the connection drops, forge asks again with `WaitExecution(name)` (for as long
as `[remote] timeout` while the server does not answer); a server that forgot the
operation gets the `Execute` again, which is safe because an
action is a pure function of its digest. An action no worker takes within the queue
timeout (no worker has the platform properties it needs, or the farm is saturated) is
given up, so the caller can run it here.
"""

from __future__ import annotations

import time

import grpc

from forge.remote.proto import remote_execution_pb2 as re_pb
from forge.remote.reapi import RE, SHA256, GrpcStore, rpc_error
from forge.remote.results import Digest
from forge.remote.transfer import RemoteError

SLICE = 10.0  # seconds per streaming call: how often an idle wait looks at Ctrl-C
_STAGES = re_pb.ExecutionStage.Value
WAITING = {_STAGES.Value(n) for n in ("UNKNOWN", "QUEUED", "CACHE_CHECK")}


class QueueTimeout(RemoteError):
    """No worker started the action in time."""


class Execution:
    def __init__(self, store: GrpcStore, queue_timeout: float):
        self.store = store
        self.queue_timeout = queue_timeout
        ch = store.channel
        self._execute = ch.unary_stream(RE + "Execution/Execute",
                                        request_serializer=re_pb.ExecuteRequest.SerializeToString,
                                        response_deserializer=_operation().FromString)
        self._wait = ch.unary_stream(RE + "Execution/WaitExecution",
                                     request_serializer=re_pb.WaitExecutionRequest.SerializeToString,
                                     response_deserializer=_operation().FromString)

    def run(self, digest: Digest, cancel=None, skip_cache: bool = False) -> re_pb.ExecuteResponse:
        """Execute and wait: the response, or RemoteError when the executor failed."""
        s = self.store.s
        request = re_pb.ExecuteRequest(instance_name=s.instance, action_digest=digest.proto(),
                                       skip_cache_lookup=skip_cache, digest_function=SHA256)
        name = None
        drops = 0
        dropped_at = 0.0  # when the executor stopped answering
        stage = _STAGES.Value("UNKNOWN")
        queued_since = time.monotonic()
        while True:
            if cancel is not None and cancel.is_set():
                raise RemoteError("interrupted")
            call = self._execute(request, timeout=SLICE, metadata=self.store.metadata) if name is None \
                else self._wait(re_pb.WaitExecutionRequest(name=name), timeout=SLICE,
                                metadata=self.store.metadata)
            try:
                for op in call:
                    name = op.name or name
                    drops = 0
                    meta = re_pb.ExecuteOperationMetadata()
                    if op.metadata.Unpack(meta) and meta.stage != stage:
                        stage = meta.stage
                        if stage in WAITING:
                            queued_since = time.monotonic()
                    if op.done:
                        return _response(op, s)
                    if cancel is not None and cancel.is_set():
                        call.cancel()
                        raise RemoteError("interrupted")
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    pass  # the slice ended: look at the queue and ask again
                elif code == grpc.StatusCode.NOT_FOUND and name is not None:
                    name = None  # the server forgot the operation: execute again
                    continue
                elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                              grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                              grpc.StatusCode.ABORTED):
                    # Dropped: ask again until it has not answered for the remote timeout
                    # (a restarting BuildGrid keeps its operations in its database).
                    if drops == 0:
                        dropped_at = time.monotonic()
                    drops += 1
                    if time.monotonic() - dropped_at > s.timeout:
                        raise RemoteError(f"the executor stopped answering for {s.timeout:g} s "
                                          f"({code.name}: {e.details()})", down=True) from None
                    time.sleep(min(2.0, 0.1 * 2 ** drops))
                    continue
                elif code == grpc.StatusCode.UNIMPLEMENTED:
                    raise RemoteError(f"{s.url} serves no REAPI Execution service (instance "
                                      f"{s.instance!r}): is it a cache only?", down=True) from None
                else:
                    raise rpc_error(e, "Execute", s) from None
            if stage in WAITING and \
                    time.monotonic() - queued_since > self.queue_timeout:
                raise QueueTimeout(f"no worker started it within {self.queue_timeout:g} s "
                                   "(is there a worker with the platform properties it needs?)")


def _operation():
    from google.longrunning import operations_proto_pb2
    return operations_proto_pb2.Operation


def _response(op, s) -> re_pb.ExecuteResponse:
    if op.HasField("error"):
        raise RemoteError(f"the executor failed the operation (status {op.error.code}: "
                          f"{op.error.message})", retry=False)
    resp = re_pb.ExecuteResponse()
    if not op.response.Unpack(resp):
        raise RemoteError("the executor's answer is not an ExecuteResponse")
    return resp
