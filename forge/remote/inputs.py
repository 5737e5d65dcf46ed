"""An action as REAPI messages: its `Command` and its input root.

The input root mirrors forge's scratch directory (forge/sandbox.py): sources at
`pkg/file`, generated files at `forge-out/pkg/file`, tree artifacts spread out as their
files, so a worker that stages it and runs the same argv with the same relative paths
makes the same bytes. Each directory is a `Directory` message (entries sorted by name,
serialized deterministically) named by its sha256; the root's digest goes into the
`Action`, which also carries forge's key as its salt: two actions with the same command
and inputs but different host tools (their identities are in the key) never share a
remote result.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import duration_pb2

from forge.keys import KEY_FORMAT
from forge.model import Action
from forge.remote.proto import remote_execution_pb2 as re_pb
from forge.remote.results import Digest, digest_of, digest_of_file
from forge.sandbox import KEY_ENV


class Blobs:
    """The blobs an action's messages name, by sha256: bytes or a file to read."""

    def __init__(self):
        self.items: dict[str, tuple[Digest, Path | bytes]] = {}

    def add_bytes(self, data: bytes) -> Digest:
        d = digest_of(data)
        self.items.setdefault(d.hash, (d, data))
        return d

    def add_file(self, d: Digest, path: Path) -> None:
        self.items.setdefault(d.hash, (d, path))


class Sha256s:
    """sha256 digests of local files, remembered by (forge's xxh3 digest, executable):
    a blob that feeds many actions is read once per build."""

    def __init__(self):
        self._known: dict[str, Digest] = {}

    def of(self, xxh: str, path: Path) -> Digest:
        d = self._known.get(xxh)
        if d is None:
            d = self._known[xxh] = digest_of_file(path)
        return d


def command(a: Action) -> re_pb.Command:
    """The command as a worker runs it: forge's fixed environment plus the action's (HOME
    and TMPDIR are the worker's scratch directory, set by the worker)."""
    env = {**KEY_ENV, **dict(a.env)}
    files = sorted(o.path for o in a.outputs if not o.directory)
    dirs = sorted(o.path for o in a.outputs if o.directory)
    return re_pb.Command(
        arguments=list(a.argv),
        environment_variables=[re_pb.Command.EnvironmentVariable(name=k, value=env[k])
                               for k in sorted(env)],
        # REAPI 2.1 reads output_paths; older servers the two lists: both are sent.
        output_paths=sorted(files + dirs), output_files=files, output_directories=dirs,
        working_directory="", platform=platform(a))  # servers before 2.2 read it here


def platform(a: Action) -> re_pb.Platform:
    # REAPI wants properties sorted by name, then value.
    return re_pb.Platform(properties=[re_pb.Platform.Property(name=k, value=v)
                                      for k, v in sorted(a.exec_properties)])


def input_root(entries: list[tuple], blobs: Blobs) -> Digest:
    """The Merkle tree of (path, kind, digest or symlink target, executable) entries,
    kind "f", "d" or "l" (forge/trees.py's); returns the root's digest."""
    root: dict = {}
    for path, kind, payload, exe in entries:
        *parents, name = path.split("/")
        node = root
        for p in parents:
            node = node.setdefault(p, {})
        if kind == "d":
            node.setdefault(name, {})
        else:
            node[name] = (kind, payload, exe)

    def directory(node: dict) -> Digest:
        msg = re_pb.Directory()
        for name in sorted(node):
            v = node[name]
            if isinstance(v, dict):
                msg.directories.add(name=name, digest=directory(v).proto())
            elif v[0] == "l":
                msg.symlinks.add(name=name, target=v[1])
            else:
                msg.files.add(name=name, digest=v[1].proto(), is_executable=v[2])
        return blobs.add_bytes(msg.SerializeToString(deterministic=True))

    return directory(root)


def action(a: Action, key: str, root: Digest, blobs: Blobs, do_not_cache: bool = False) -> Digest:
    """The `Action` to execute (its Command and input root added to `blobs`)."""
    cmd = blobs.add_bytes(command(a).SerializeToString(deterministic=True))
    msg = re_pb.Action(command_digest=cmd.proto(), input_root_digest=root.proto(),
                       do_not_cache=do_not_cache, platform=platform(a),
                       salt=f"forge-exec/{KEY_FORMAT} {key}".encode())
    if a.timeout:
        msg.timeout.CopyFrom(duration_pb2.Duration(seconds=int(a.timeout),
                                                   nanos=int(a.timeout % 1 * 1e9)))
    return blobs.add_bytes(msg.SerializeToString(deterministic=True))
