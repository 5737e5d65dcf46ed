"""How forge's action keys and outputs map onto REAPI v2 messages.

The remote key of an action: forge's key is an xxh3-128 over a preimage that already
holds everything the action depends on (forge/keys.py), but the shared caches index by
sha256. The remote key is the sha256 digest of a serialized REAPI `Action` whose only
field is `salt = "forge/<KEY_FORMAT> <forge key>"`: a real Action message, so servers
that check what an action digest names are satisfied, derived from the key alone, so
every machine that computes the same forge key asks for the same entry. The Action blob
itself is uploaded to the CAS with the outputs.

The value is an `ActionResult` (exit code 0) listing
  - each file output as an `OutputFile`: workspace-relative path (`forge-out/pkg/x`),
    sha256 digest, executable bit;
  - each directory output as an `OutputDirectory` whose `tree_digest` names a `Tree`
    message (root `Directory` plus every descendant, entries sorted by name, files by
    sha256 digest, symlinks with their relative target).
It is built from the outputs alone, so two writers of the same result write the same bytes.
A reader rebuilds forge's tree manifest (forge/trees.py) from the Tree and the xxh3
digests of the downloaded files; the manifest digest comes out the same on every machine.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

from forge.keys import KEY_FORMAT
from forge.remote.proto import remote_execution_pb2 as re_pb


class Digest(NamedTuple):
    hash: str  # sha256, lowercase hex
    size: int

    def proto(self) -> re_pb.Digest:
        return re_pb.Digest(hash=self.hash, size_bytes=self.size)


EMPTY = Digest(hashlib.sha256(b"").hexdigest(), 0)


def digest_of(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest(), len(data))


def digest_of_file(path) -> Digest:
    """The REAPI digest of a file, read in 1 MiB pieces."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return Digest(h.hexdigest(), size)


def from_proto(d: re_pb.Digest) -> Digest:
    return Digest(d.hash.lower(), d.size_bytes)


def action_message(key: str) -> bytes:
    return re_pb.Action(salt=f"forge/{KEY_FORMAT} {key}".encode()).SerializeToString()


def action_digest(key: str) -> Digest:
    return digest_of(action_message(key))


class ShapeError(Exception):
    """An ActionResult that does not describe this action's declared outputs."""


def check_shape(result: re_pb.ActionResult, files: set[str], dirs: set[str]) -> None:
    got_files = {f.path for f in result.output_files}
    got_dirs = {d.path for d in result.output_directories}
    if result.exit_code != 0:
        raise ShapeError(f"it records a failed run (exit code {result.exit_code})")
    if got_files != files or got_dirs != dirs or len(result.output_files) != len(files) \
            or len(result.output_directories) != len(dirs):
        raise ShapeError("its outputs are not the ones the action declares")
    if result.output_symlinks or result.output_file_symlinks or result.output_directory_symlinks:
        raise ShapeError("it holds output symlinks, which forge never writes")


# --- trees ------------------------------------------------------------------------------

def tree_from_entries(entries: list[list], sha256_of) -> re_pb.Tree:
    """The REAPI Tree of a forge manifest; `sha256_of(xxh3, exe)` gives a file's Digest."""
    root: dict = {}
    for e in entries:
        *parents, name = e[0].split("/")
        node = root
        for p in parents:
            node = node.setdefault(p, {})
        if e[1] == "d":
            node.setdefault(name, {})
        elif e[1] == "l":
            node[name] = ("l", e[2])
        else:
            node[name] = ("f", sha256_of(e[2], e[4]), e[4])
    children: dict[str, re_pb.Directory] = {}

    def directory(node: dict) -> re_pb.Directory:
        d = re_pb.Directory()
        for name in sorted(node):
            v = node[name]
            if isinstance(v, dict):
                sub = directory(v)
                data = sub.SerializeToString(deterministic=True)
                dg = digest_of(data)
                children.setdefault(dg.hash, sub)
                d.directories.add(name=name, digest=dg.proto())
            elif v[0] == "l":
                d.symlinks.add(name=name, target=v[1])
            else:
                d.files.add(name=name, digest=v[1].proto(), is_executable=v[2])
        return d

    top = directory(root)
    return re_pb.Tree(root=top, children=[children[h] for h in sorted(children)])


def tree_files(tree: re_pb.Tree) -> list[tuple[str, str, Digest, bool]] | list[tuple]:
    """Walk a Tree: (path, kind, digest or target, executable) in forge's entry order.
    Raises ShapeError when a directory it names is not in the message or a name is unsafe."""
    by_digest = {}
    for c in tree.children:
        by_digest[digest_of(c.SerializeToString(deterministic=True)).hash] = c
    out: list[tuple] = []

    def walk(d: re_pb.Directory, prefix: str, depth: int) -> None:
        if depth > 256:
            raise ShapeError("its tree is nested too deeply")
        for f in d.files:
            out.append((_join(prefix, f.name), "f", from_proto(f.digest), f.is_executable))
        for s in d.symlinks:
            out.append((_join(prefix, s.name), "l", s.target, False))
        for sub in d.directories:
            child = by_digest.get(sub.digest.hash.lower())
            if child is None:
                raise ShapeError("its tree lacks a directory it names")
            path = _join(prefix, sub.name)
            out.append((path, "d", None, False))
            walk(child, path, depth + 1)

    walk(tree.root, "", 0)
    return out


def _join(prefix: str, name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ShapeError(f"its tree holds an unsafe name {name!r}")
    return f"{prefix}/{name}" if prefix else name
