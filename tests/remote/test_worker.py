"""`forge worker` against a real BuildGrid (PostgreSQL-backed scheduler, Bots service).

The client side is played by the test itself: it uploads the Command, Action and input
root with forge's REAPI store and calls Execution.Execute by its full name.
"""

from __future__ import annotations

import pytest

from buildgrid_exec_fixture import exec_grid  # noqa: F401 (fixture)
from forge.remote.proto import remote_execution_pb2 as re_pb
from forge.remote.reapi import GrpcStore
from forge.remote.results import Digest
from forge.remote.settings import from_config

pytestmark = [pytest.mark.real, pytest.mark.slow]

EXECUTE = "/build.bazel.remote.execution.v2.Execution/Execute"


def store_for(grid) -> GrpcStore:
    return GrpcStore(from_config({}, url=grid.url, instance=grid.instance, upload=True))


def test_the_grid_queues_an_action_when_no_worker_is_there(exec_grid):  # noqa: F811
    from google.longrunning import operations_proto_pb2 as ops_pb

    store = store_for(exec_grid)
    command = re_pb.Command(arguments=["/bin/true"])
    action = re_pb.Action(command_digest=_put(store, command), input_root_digest=_put(
        store, re_pb.Directory()), do_not_cache=True)
    request = re_pb.ExecuteRequest(instance_name=exec_grid.instance,
                                   action_digest=_put(store, action), skip_cache_lookup=True)
    call = store.channel.unary_stream(EXECUTE, request_serializer=request.SerializeToString,
                                      response_deserializer=ops_pb.Operation.FromString)
    stream = call(request, timeout=30)
    first = next(stream)
    stream.cancel()
    meta = re_pb.ExecuteOperationMetadata()
    first.metadata.Unpack(meta)
    assert not first.done
    assert meta.stage in (re_pb.ExecutionStage.CACHE_CHECK, re_pb.ExecutionStage.QUEUED)


def _put(store: GrpcStore, message) -> re_pb.Digest:
    import hashlib

    data = message.SerializeToString()
    d = Digest(hashlib.sha256(data).hexdigest(), len(data))
    store.write_batch([(d, data)])
    return d.proto()
