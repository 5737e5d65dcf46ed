"""A worker's side of the CAS: its local blob cache, staging an input root, collecting outputs.

The local cache is a directory of verified blobs named by sha256 (`ab/abcd...`, with a
`.x` twin for executables, since hard links share the mode bits). An input root is
fetched once per blob, whatever number of actions use it, and staged into the lease's
directory as hard links. Every blob that arrives is checked against its digest before it
is kept. Outputs go up the other way: files are hashed, FindMissingBlobs says which the
server lacks, and only those are sent (small ones batched, large ones through ByteStream).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import uuid
from pathlib import Path

from forge.remote.proto import remote_execution_pb2 as re_pb
from forge.remote.results import Digest
from forge.remote.transfer import CorruptBlob, RemoteError, Sink

HASH_CHUNK = 1 << 20


class StagingError(Exception):
    """The action cannot be staged as sent: a missing blob, a path escaping the root."""


def digest_of(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest(), len(data))


def file_digest(path: Path) -> Digest:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return Digest(h.hexdigest(), size)


def _key(d) -> Digest:
    return Digest(d.hash.lower(), d.size_bytes) if isinstance(d, re_pb.Digest) else d


class BlobCache:
    def __init__(self, root: Path):
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, d: Digest, executable: bool = False) -> Path:
        return self.root / d.hash[:2] / (d.hash + (".x" if executable else ""))

    def has(self, d: Digest) -> bool:
        return self.path(d).exists() or self.path(d, True).exists()

    def put(self, d: Digest, data: bytes) -> None:
        got = digest_of(data)
        if got != d:
            raise CorruptBlob(f"blob {d.hash[:16]}... came back as {got.size} bytes that do "
                              "not match its digest", retry=True)
        tmp = self.tmp / uuid.uuid4().hex
        tmp.write_bytes(data)
        self._install(d, tmp)

    def put_file(self, d: Digest, src: Path) -> None:
        self._install(d, src)

    def _install(self, d: Digest, src: Path) -> None:
        dst = self.path(d)
        dst.parent.mkdir(exist_ok=True)
        os.chmod(src, 0o444)  # read-only: a staged link is the cached blob itself
        os.replace(src, dst)

    def read(self, d: Digest) -> bytes:
        return self.path(d).read_bytes()

    def link(self, d: Digest, dst: Path, executable: bool) -> None:
        src = self.path(d, executable)
        if executable and not src.exists():
            tmp = self.tmp / uuid.uuid4().hex
            shutil.copyfile(self.path(d), tmp)
            os.chmod(tmp, 0o555)
            os.replace(tmp, src)
        try:
            os.link(src, dst)
        except OSError:  # another file system, or too many links
            shutil.copyfile(src, dst)
            os.chmod(dst, 0o755 if executable else 0o644)

    def evict(self, d: Digest) -> None:
        for p in (self.path(d), self.path(d, True)):
            try:
                os.unlink(p)
            except OSError:
                pass


def fetch(store, cache: BlobCache, digests, cancel=None) -> None:
    """Bring the blobs into the local cache (verified), asking only for the absent ones."""
    want = {}
    for d in map(_key, digests):
        if d.size and not cache.has(d):
            want[d] = None
    small = [d for d in want if d.size <= store.batch_limit // 8]
    large = [d for d in want if d.size > store.batch_limit // 8]
    batch: list[Digest] = []
    total = 0

    def flush():
        if not batch:
            return
        got = store.read_batch(list(batch), cancel)
        for d in batch:
            data = got.get(d.hash)
            if data is None:
                raise StagingError(f"blob {d.hash}/{d.size} is not in the CAS")
            cache.put(d, data)
        batch.clear()

    for d in small:
        if total + d.size > store.batch_limit // 2:
            flush()
            total = 0
        batch.append(d)
        total += d.size
    flush()
    for d in large:
        sink = Sink(cache.tmp, d)
        try:
            if store.read(d, sink, cancel) is None:
                raise StagingError(f"blob {d.hash}/{d.size} is not in the CAS")
            if sink.path is not None:
                cache.put_file(d, sink.path)
            else:
                cache.put(d, bytes(sink.data))
        finally:
            sink.discard()
    if (empty := Digest(hashlib.sha256(b"").hexdigest(), 0)) in map(_key, digests):
        if not cache.has(empty):
            cache.put(empty, b"")


def _safe(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise StagingError(f"the input tree holds an entry named {name!r}")
    return name


def stage_tree(store, cache: BlobCache, root: re_pb.Digest, dest: Path, cancel=None) -> list[Path]:
    """Materialise the input root under `dest`; returns the staged files (hard links)."""
    dirs: dict[Digest, re_pb.Directory] = {}
    level = [_key(root)]
    while level:
        fetch(store, cache, level, cancel)
        nxt = []
        for d in level:
            if d in dirs:
                continue
            msg = re_pb.Directory()
            msg.ParseFromString(cache.read(d) if d.size else b"")
            dirs[d] = msg
            nxt += [_key(c.digest) for c in msg.directories if _key(c.digest) not in dirs]
        level = list(dict.fromkeys(nxt))
    fetch(store, cache, [f.digest for m in dirs.values() for f in m.files], cancel)
    staged: list[Path] = []

    def place(d: Digest, at: Path) -> None:
        at.mkdir(parents=True, exist_ok=True)
        msg = dirs[d]
        for f in msg.files:
            target = at / _safe(f.name)
            cache.link(_key(f.digest), target, f.is_executable)
            staged.append(target)
        for s in msg.symlinks:
            os.symlink(s.target, at / _safe(s.name))
        for c in msg.directories:
            place(_key(c.digest), at / _safe(c.name))

    place(_key(root), dest)
    return staged


def inside(base: Path, rel: str) -> Path:
    p = os.path.normpath(os.path.join(base, rel))
    if p != str(base) and not p.startswith(str(base) + os.sep):
        raise StagingError(f"the path {rel!r} leaves the input root")
    return Path(p)


class Outputs:
    """Collects what an action wrote into an ActionResult, gathering the blobs to upload."""

    def __init__(self):
        self.blobs: dict[Digest, Path | bytes] = {}
        self.result = re_pb.ActionResult()

    def _file(self, path: Path) -> Digest:
        d = file_digest(path)
        self.blobs.setdefault(d, path)
        return d

    def _message(self, msg) -> Digest:
        data = msg.SerializeToString(deterministic=True)
        d = digest_of(data)
        self.blobs.setdefault(d, data)
        return d

    def add_bytes(self, data: bytes) -> re_pb.Digest:
        d = digest_of(data)
        self.blobs.setdefault(d, data)
        return d.proto()

    def _directory(self, path: Path, children: list) -> re_pb.Directory:
        msg = re_pb.Directory()
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                msg.symlinks.add(name=entry.name, target=os.readlink(entry.path))
            elif stat.S_ISDIR(st.st_mode):
                sub = self._directory(Path(entry.path), children)
                children.append(sub)
                msg.directories.add(name=entry.name, digest=self._message(sub).proto())
            elif stat.S_ISREG(st.st_mode):
                msg.files.add(name=entry.name, digest=self._file(Path(entry.path)).proto(),
                              is_executable=bool(st.st_mode & 0o111))
        return msg

    def add(self, rel: str, path: Path, *, want_dir: bool | None) -> None:
        """One declared output: `want_dir` None for output_paths (whatever it is)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return  # a declared output the command did not make is simply absent
        r = self.result
        if stat.S_ISLNK(st.st_mode):
            link = re_pb.OutputSymlink(path=rel, target=os.readlink(path))
            if want_dir is None:
                r.output_symlinks.append(link)
            elif want_dir:
                r.output_directory_symlinks.append(link)
            else:
                r.output_file_symlinks.append(link)
        elif stat.S_ISDIR(st.st_mode):
            if want_dir is False:
                raise StagingError(f"the output file {rel!r} is a directory")
            children: list = []
            root = self._directory(path, children)
            tree = re_pb.Tree(root=root, children=children)
            r.output_directories.add(path=rel, tree_digest=self._message(tree).proto())
        elif stat.S_ISREG(st.st_mode):
            if want_dir:
                raise StagingError(f"the output directory {rel!r} is a file")
            r.output_files.add(path=rel, digest=self._file(path).proto(),
                               is_executable=bool(st.st_mode & 0o111))

    def upload(self, store, cancel=None) -> int:
        """Send the blobs the server does not have; returns how many were sent."""
        missing = store.find_missing(list(self.blobs), cancel) if self.blobs else []
        batch: list[tuple[Digest, bytes]] = []
        total = 0
        for d in missing:
            src = self.blobs[d]
            if d.size > store.batch_limit // 8:
                store.write(d, src, cancel)
                continue
            data = src if isinstance(src, (bytes, bytearray)) else Path(src).read_bytes()
            if total + d.size > store.batch_limit // 2 and batch:
                store.write_batch(batch, cancel)
                batch, total = [], 0
            batch.append((d, data))
            total += d.size
        if batch:
            store.write_batch(batch, cancel)
        return len(missing)


__all__ = ["BlobCache", "Outputs", "RemoteError", "StagingError", "fetch", "inside", "stage_tree"]
