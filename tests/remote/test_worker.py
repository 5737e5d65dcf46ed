"""`forge worker` against a real BuildGrid (PostgreSQL-backed scheduler, Bots service).

The client side is played by the test itself: it uploads the Command, Action and input
root with forge's REAPI store and calls Execution.Execute by its full name.
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from google.longrunning import operations_proto_pb2 as ops_pb

from buildgrid_exec_fixture import exec_grid, start_worker, wait_until  # noqa: F401 (fixture)
from forge.remote.proto import remote_execution_pb2 as re_pb
from forge.remote.reapi import GrpcStore
from forge.remote.results import Digest
from forge.remote.settings import from_config

pytestmark = [pytest.mark.real, pytest.mark.slow]

EXECUTE = "/build.bazel.remote.execution.v2.Execution/Execute"


def store_for(grid) -> GrpcStore:
    return GrpcStore(from_config({}, url=grid.url, instance=grid.instance, upload=True))


def _put(store: GrpcStore, data: bytes | object) -> re_pb.Digest:
    if not isinstance(data, bytes):
        data = data.SerializeToString()
    d = Digest(hashlib.sha256(data).hexdigest(), len(data))
    store.write(d, data)
    return d.proto()


def upload_action(store, argv, *, files=None, outputs=(), timeout=None, platform=None,
                  cache=False, salt=None) -> re_pb.Digest:
    """An Action whose input root holds `files` ({"src/a.txt": b"..."}, one level deep)."""
    subdirs: dict[str, re_pb.Directory] = {}
    root = re_pb.Directory()
    for path, data in sorted((files or {}).items()):
        parent, _, name = path.rpartition("/")
        where = subdirs.setdefault(parent, re_pb.Directory()) if parent else root
        where.files.add(name=name, digest=_put(store, data), is_executable=False)
    for name, sub in sorted(subdirs.items()):
        root.directories.add(name=name, digest=_put(store, sub))
    command = re_pb.Command(arguments=argv, output_paths=sorted(outputs))
    command.environment_variables.add(name="PATH", value="/usr/bin:/bin")
    for k, v in sorted((platform or {}).items()):
        command.platform.properties.add(name=k, value=v)
    action = re_pb.Action(command_digest=_put(store, command), input_root_digest=_put(store, root),
                          do_not_cache=not cache, salt=(salt or str(time.time_ns())).encode())
    action.platform.CopyFrom(command.platform)
    if timeout:
        action.timeout.FromSeconds(timeout)
    return _put(store, action)


def execute(store, grid, action_digest, *, seconds=120) -> re_pb.ExecuteResponse:
    request = re_pb.ExecuteRequest(instance_name=grid.instance, action_digest=action_digest,
                                   skip_cache_lookup=True)
    call = store.channel.unary_stream(EXECUTE, request_serializer=request.SerializeToString,
                                      response_deserializer=ops_pb.Operation.FromString)
    for op in call(request, timeout=seconds):
        if op.done:
            assert not op.HasField("error"), op.error
            response = re_pb.ExecuteResponse()
            op.response.Unpack(response)
            return response
    raise AssertionError("the operation stream ended before the operation was done")


def start_execute(store, grid, action_digest, *, seconds=120):
    """Execute without waiting: returns the stream (the operation runs on the server)."""
    request = re_pb.ExecuteRequest(instance_name=grid.instance, action_digest=action_digest,
                                   skip_cache_lookup=True)
    call = store.channel.unary_stream(EXECUTE, request_serializer=request.SerializeToString,
                                      response_deserializer=ops_pb.Operation.FromString)
    return call(request, timeout=seconds)


def finish(stream) -> re_pb.ExecuteResponse:
    for op in stream:
        if op.done:
            response = re_pb.ExecuteResponse()
            op.response.Unpack(response)
            return response
    raise AssertionError("the operation stream ended before the operation was done")


def blob(store, d: re_pb.Digest) -> bytes:
    return store.read_batch([Digest(d.hash, d.size_bytes)])[d.hash]


def test_the_grid_queues_an_action_when_no_worker_is_there(exec_grid):  # noqa: F811
    store = store_for(exec_grid)
    # docker=2: a property no worker of these tests offers, so it stays queued.
    digest = upload_action(store, ["/bin/true"], platform={"docker": "2"})
    stream = start_execute(store, exec_grid, digest, seconds=30)
    first = next(stream)
    stream.cancel()
    meta = re_pb.ExecuteOperationMetadata()
    first.metadata.Unpack(meta)
    assert not first.done
    assert meta.stage in (re_pb.ExecutionStage.CACHE_CHECK, re_pb.ExecutionStage.QUEUED)


@pytest.fixture(scope="module")
def plain_worker(exec_grid, tmp_path_factory):  # noqa: F811
    w = start_worker(exec_grid, tmp_path_factory.mktemp("plain") / "w", concurrency=2,
                     name="plain-worker")
    yield w
    w.kill()


def test_a_lease_runs_end_to_end(exec_grid, plain_worker):  # noqa: F811
    store = store_for(exec_grid)
    digest = upload_action(store, ["/bin/sh", "-c", "mkdir -p out/d && tr a-z A-Z < src/in.txt "
                                   "> out/up.txt && echo nested > out/d/n && echo to-stderr >&2 "
                                   "&& echo to-stdout"],
                           files={"src/in.txt": b"hello worker\n"}, outputs=["out/up.txt", "out/d"])
    r = execute(store, exec_grid, digest)
    assert r.status.code == 0, (r.status, plain_worker.log())
    result = r.result
    assert result.exit_code == 0
    assert result.execution_metadata.worker == "plain-worker"
    files = {f.path: f for f in result.output_files}
    assert blob(store, files["out/up.txt"].digest) == b"HELLO WORKER\n"
    assert blob(store, result.stdout_digest) == b"to-stdout\n"
    assert blob(store, result.stderr_digest) == b"to-stderr\n"
    (tree_out,) = result.output_directories
    assert tree_out.path == "out/d"
    tree = re_pb.Tree()
    tree.ParseFromString(blob(store, tree_out.tree_digest))
    (n,) = tree.root.files
    assert n.name == "n" and blob(store, n.digest) == b"nested\n"
    # the lease's directory is gone; the inputs stay in the worker's CAS cache
    wait_until(lambda: not any((plain_worker.work_dir / "leases").iterdir()), 10,
               "the lease directory to be removed")
    assert any(p.name == hashlib.sha256(b"hello worker\n").hexdigest()
               for p in (plain_worker.work_dir / "cas").rglob("*"))


def test_a_failing_command_and_a_timeout_are_reported(exec_grid, plain_worker):  # noqa: F811
    store = store_for(exec_grid)
    r = execute(store, exec_grid, upload_action(store, ["/bin/sh", "-c", "echo no >&2; exit 3"]))
    assert r.status.code == 0 and r.result.exit_code == 3
    assert blob(store, r.result.stderr_digest) == b"no\n"
    r = execute(store, exec_grid, upload_action(store, ["/bin/sleep", "30"], timeout=1))
    assert r.status.code == 4, r.status  # DEADLINE_EXCEEDED
    assert "timeout" in r.status.message


def test_the_result_goes_to_the_action_cache(exec_grid, plain_worker):  # noqa: F811
    store = store_for(exec_grid)
    digest = upload_action(store, ["/bin/sh", "-c", "echo cached > o"], outputs=["o"], cache=True)
    r = execute(store, exec_grid, digest)
    assert r.result.exit_code == 0
    cached = store.get_action_result(Digest(digest.hash, digest.size_bytes))
    assert cached is not None and blob(store, cached.output_files[0].digest) == b"cached\n"


def test_missing_input_blob_is_a_failed_precondition(exec_grid, plain_worker):  # noqa: F811
    store = store_for(exec_grid)
    root = re_pb.Directory()
    root.files.add(name="ghost", digest=re_pb.Digest(hash="0" * 64, size_bytes=5))
    command = re_pb.Command(arguments=["/bin/cat", "ghost"])
    action = re_pb.Action(command_digest=_put(store, command), input_root_digest=_put(store, root),
                          do_not_cache=True, salt=str(time.time_ns()).encode())
    r = execute(store, exec_grid, _put(store, action))
    assert r.status.code == 9, r.status  # FAILED_PRECONDITION
    assert "0000000000000000" in r.status.message


def test_docker_actions_go_only_to_a_worker_that_declares_it(exec_grid, plain_worker,  # noqa: F811
                                                             tmp_path):
    store = store_for(exec_grid)
    stream = start_execute(store, exec_grid, upload_action(
        store, ["/bin/sh", "-c", "echo in-docker-worker"], platform={"docker": "1"}))
    time.sleep(4)  # the plain worker is idle all along: it must not take this one
    docker = start_worker(exec_grid, tmp_path / "docker", platform={"docker": "1"},
                          name="docker-worker")
    try:
        r = finish(stream)
        assert r.status.code == 0, (r.status, docker.log())
        assert r.result.execution_metadata.worker == "docker-worker"
        # an action without the property may go to either
        r = execute(store, exec_grid, upload_action(store, ["/bin/true"]))
        assert r.result.execution_metadata.worker in ("docker-worker", "plain-worker")
    finally:
        docker.kill()
    assert "in-docker-worker" not in plain_worker.log()


def _started(worker) -> bool:
    return " started" in worker.log()


def test_a_worker_killed_mid_action_loses_the_lease_to_another(exec_grid, tmp_path):  # noqa: F811
    store = store_for(exec_grid)
    doomed = start_worker(exec_grid, tmp_path / "doomed", platform={"pool": "kill"},
                          name="doomed")
    stream = start_execute(store, exec_grid, upload_action(
        store, ["/bin/sh", "-c", "sleep 3; echo survived > o"], outputs=["o"],
        platform={"pool": "kill"}), seconds=180)
    wait_until(lambda: _started(doomed), 60, "the first worker to take the lease", doomed.log)
    doomed.kill()  # SIGKILL: no goodbye, BuildGrid learns from the missing heartbeats
    rescuer = start_worker(exec_grid, tmp_path / "rescuer", platform={"pool": "kill"},
                           name="rescuer")
    try:
        r = finish(stream)
        assert r.status.code == 0, (r.status, rescuer.log())
        assert r.result.exit_code == 0
        assert r.result.execution_metadata.worker == "rescuer"
        assert blob(store, r.result.output_files[0].digest) == b"survived\n"
    finally:
        rescuer.kill()


def test_a_restarted_worker_cleans_what_the_killed_one_left(exec_grid, tmp_path):  # noqa: F811
    import os

    store = store_for(exec_grid)
    first = start_worker(exec_grid, tmp_path / "w", platform={"pool": "again"}, name="again")
    stream = start_execute(store, exec_grid, upload_action(
        store, ["/bin/sh", "-c", "sleep 6; echo twice > o"], outputs=["o"],
        platform={"pool": "again"}), seconds=180)
    marks = tmp_path / "w" / "procs"
    wait_until(lambda: any(marks.glob("*/*")), 60, "the worker to start the command", first.log)
    (mark,) = marks.glob("*/*")
    orphan = int(mark.name.partition(".")[0])
    first.kill()  # the command runs on in its own session; its lease directory stays
    os.kill(orphan, 0)  # still there
    assert any((tmp_path / "w" / "leases").iterdir())
    # The same bot id again: BuildGrid requeues the old session's lease at once, and the
    # new worker stops the old command and removes its directory before anything else.
    second = start_worker(exec_grid, tmp_path / "w", platform={"pool": "again"}, name="again")
    try:
        def orphan_gone():
            try:
                os.kill(orphan, 0)
            except ProcessLookupError:
                return True
            # a zombie until its parent (the killed worker's, already gone) is reaped by init
            return "State:\tZ" in open(f"/proc/{orphan}/status").read()
        wait_until(orphan_gone, 4, "the old command to be stopped", second.log)
        r = finish(stream)
        assert r.status.code == 0 and r.result.exit_code == 0, (r.status, second.log())
        assert "removed what a killed worker left" in second.log()
        wait_until(lambda: not any((tmp_path / "w" / "leases").iterdir()), 10,
                   "the lease directories to be gone", second.log)
    finally:
        second.kill()


def test_sigterm_drains_the_running_lease_then_exits(exec_grid, tmp_path):  # noqa: F811
    store = store_for(exec_grid)
    w = start_worker(exec_grid, tmp_path / "drain", platform={"pool": "drain"}, name="drainer")
    stream = start_execute(store, exec_grid, upload_action(
        store, ["/bin/sh", "-c", "sleep 3; echo finished > o"], outputs=["o"],
        platform={"pool": "drain"}), seconds=180)
    wait_until(lambda: _started(w), 60, "the worker to take the lease", w.log)
    assert w.terminate(timeout=60) == 0, w.log()
    r = finish(stream)
    assert r.status.code == 0 and r.result.exit_code == 0, (r.status, w.log())
    assert r.result.execution_metadata.worker == "drainer"
    assert blob(store, r.result.output_files[0].digest) == b"finished\n"
    assert "draining" in w.log()
    status = json.loads((tmp_path / "drain" / "status.json").read_text())
    assert status["state"] == "stopped" and status["completed"] == 1 and not status["running"]
    assert not any((tmp_path / "drain" / "leases").iterdir())


def test_a_worker_rides_out_a_server_restart(exec_grid, tmp_path):  # noqa: F811
    store = store_for(exec_grid)
    w = start_worker(exec_grid, tmp_path / "r", platform={"pool": "restart"}, name="steady")
    try:
        r = execute(store, exec_grid, upload_action(store, ["/bin/true"],
                                                    platform={"pool": "restart"}))
        assert r.result.exit_code == 0
        exec_grid.restart()
        wait_until(lambda: "server unavailable" in w.log(), 30, "the worker to notice", w.log)
        store = store_for(exec_grid)
        r = execute(store, exec_grid, upload_action(
            store, ["/bin/sh", "-c", "echo after-restart"], platform={"pool": "restart"}),
            seconds=120)
        assert r.status.code == 0, (r.status, w.log())
        assert r.result.execution_metadata.worker == "steady"
        assert blob(store, r.result.stdout_digest) == b"after-restart\n"
        assert w.proc.poll() is None
    finally:
        w.kill()


def test_a_lease_running_while_the_server_restarts_still_finishes(exec_grid, tmp_path):  # noqa: F811
    wait_execution = "/build.bazel.remote.execution.v2.Execution/WaitExecution"
    store = store_for(exec_grid)
    w = start_worker(exec_grid, tmp_path / "m", platform={"pool": "mid"}, name="midway")
    try:
        stream = start_execute(store, exec_grid, upload_action(
            store, ["/bin/sh", "-c", "sleep 4; echo across-restart"], platform={"pool": "mid"}),
            seconds=180)
        name = next(stream).name
        wait_until(lambda: _started(w), 60, "the worker to take the lease", w.log)
        exec_grid.restart()  # the client's stream breaks; the operation lives in PostgreSQL
        store = store_for(exec_grid)
        request = re_pb.WaitExecutionRequest(name=name)
        call = store.channel.unary_stream(wait_execution,
                                          request_serializer=request.SerializeToString,
                                          response_deserializer=ops_pb.Operation.FromString)
        r = finish(call(request, timeout=120))
        assert r.status.code == 0 and r.result.exit_code == 0, (r.status, w.log())
        assert r.result.execution_metadata.worker == "midway"
        assert blob(store, r.result.stdout_digest) == b"across-restart\n"
        assert w.proc.poll() is None
    finally:
        w.kill()


def test_a_worker_for_an_unknown_instance_says_so(exec_grid, tmp_path):  # noqa: F811
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "forge", "worker", "--executor", exec_grid.url,
                        "--instance", "no-such-instance", "--work-dir", str(tmp_path / "w")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "no-such-instance" in r.stderr and "--instance" in r.stderr
