"""Image layer tarballs: safe extraction, merging and reproducible rewriting.

An image layer (OCI image-spec `layer.md`) is a tar archive, plain or gzip-compressed
(zstd when the `zstandard` module happens to be importable), holding the changes a layer
makes to the filesystem below it. Deletions are written as *whiteouts*: an empty entry
`dir/.wh.<name>` removes `dir/<name>` (and everything under it) as earlier layers left
it, and `dir/.wh..wh..opq` makes `dir` opaque: everything earlier layers put in it is
hidden, while entries of the same layer stay. Whiteouts never affect their own layer.

Member names are relative to the image root; a leading `/` or `./` is noise and is
dropped. A name with a `..` component is an attack and is refused, as are symlinks whose
relative target climbs above the root, and hardlinks to anything that is not already
inside the tree. Absolute symlink targets are kept as they are: they mean "from the image
root" when the image runs. Paths are resolved the way a chroot would: a symlink met in a
parent component is followed *inside* the destination, so nothing is ever written outside
it, and device nodes are never created on the host.

Archives written here are reproducible: entries sorted by path components (a directory
just before its contents), one fixed mtime, no user or group names, PAX format with only
the extended headers that carry meaning (long names, `SCHILY.xattr.*`), and gzip at level
6 without file name or timestamp. Hardlinked files are written once, as the first path in
that order, the other names linking to it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

MEDIA_TYPE_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_XATTR_PREFIXES = ("SCHILY.xattr.", "LIBARCHIVE.xattr.")
_MAX_SYMLINK_HOPS = 40  # Linux's own limit (MAXSYMLINKS)
_CHUNK = 1 << 20

Source = BinaryIO | str | os.PathLike


class UnsafeLayerError(Exception):
    """A layer member would escape the destination or cannot be applied safely."""


@dataclass(frozen=True)
class LayerInfo:
    """What an OCI manifest and config need to know about a written layer."""

    digest: str  # sha256 of the bytes as stored (compressed or not)
    size: int
    diff_id: str  # sha256 of the uncompressed tar: what config rootfs.diff_ids lists
    media_type: str

    def descriptor(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


# ---- decompression -------------------------------------------------------------------

class _Prefixed(io.RawIOBase):
    """A non-seekable stream whose first bytes were already read to sniff its type."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n], self._head = self._head[:n], self._head[n:]
            return n
        data = self._rest.read(len(b))
        b[:len(data)] = data
        return len(data)


def compression_of(head: bytes) -> str:
    """`gzip`, `zstd` or `none`, from the first bytes of a blob."""
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "none"


def open_decompressed(fileobj: BinaryIO) -> BinaryIO:
    """A readable stream of `fileobj`'s uncompressed bytes (gzip, zstd or plain)."""
    if fileobj.seekable():
        pos = fileobj.tell()
        head = fileobj.read(4)
        fileobj.seek(pos)
    else:
        head = fileobj.read(4)
        fileobj = io.BufferedReader(_Prefixed(head, fileobj))
    kind = compression_of(head)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=fileobj, mode="rb")
    if kind == "zstd":
        try:
            import zstandard  # optional: not in the standard library before 3.14
        except ImportError:
            raise UnsafeLayerError("zstd-compressed layer, but the zstandard module "
                                   "is not installed (pip install zstandard)") from None
        return zstandard.ZstdDecompressor().stream_reader(fileobj)
    return fileobj


def _open_source(src: Source) -> tuple[BinaryIO, bool]:
    if isinstance(src, (str, os.PathLike)):
        return open(src, "rb"), True
    return src, False


def _open_random(src: Source, keep: list) -> tarfile.TarFile:
    """A TarFile allowing `extractfile` in any order; compressed input is spooled."""
    f, owned = _open_source(src)
    if owned:
        keep.append(f)
    stream = open_decompressed(f)
    if stream is not f or not f.seekable():
        spool = tempfile.TemporaryFile()
        keep.append(spool)
        shutil.copyfileobj(stream, spool, _CHUNK)
        spool.seek(0)
        stream = spool
    tf = tarfile.open(fileobj=stream, mode="r:")
    keep.append(tf)
    return tf


# ---- names and chroot-like resolution -----------------------------------------------

def _parts(name: str, member: str) -> list[str]:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayerError(f"{member!r}: a '..' component would escape the root")
    return parts


def _resolve(parts: list[str], readlink: Callable[[str], str | None], member: str) -> list[str]:
    """Follow symlinks met in `parts` as if the root were `/` (`..` stops at the root)."""
    done: list[str] = []
    todo = list(parts)
    hops = 0
    while todo:
        comp = todo.pop(0)
        if comp in ("", "."):
            continue
        if comp == "..":
            if done:
                done.pop()
            continue
        target = readlink("/".join(done + [comp]))
        if target is None:
            done.append(comp)
            continue
        hops += 1
        if hops > _MAX_SYMLINK_HOPS:
            raise UnsafeLayerError(f"{member!r}: too many levels of symbolic links")
        if target.startswith("/"):
            done = []
        todo = target.split("/") + todo
    return done


def _symlink_escapes(where: list[str], target: str) -> bool:
    if target.startswith("/"):
        return False  # resolved from the image root when the image runs
    depth = len(where)
    for comp in target.split("/"):
        if comp == "..":
            depth -= 1
            if depth < 0:
                return True
        elif comp not in ("", "."):
            depth += 1
    return False


def _under(path: str, root: str) -> bool:
    return root == "" or path == root or path.startswith(root + "/")


def _sort_key(path: str) -> list[str]:
    return path.split("/")


# ---- extraction to disk -------------------------------------------------------------

class _Extractor:
    def __init__(self, dest: Path, strip_devices: bool):
        self.dest = os.path.realpath(dest)
        self.strip_devices = strip_devices
        self.root = os.geteuid() == 0
        self.skipped: list[str] = []

    def host(self, rel: str) -> str:
        return os.path.join(self.dest, rel) if rel else self.dest

    def readlink(self, rel: str) -> str | None:
        # Every prefix of `rel` was already resolved to a real directory, so lstat
        # never traverses a symlink on the host.
        p = self.host(rel)
        try:
            return os.readlink(p) if stat.S_ISLNK(os.lstat(p).st_mode) else None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def layer(self, src: Source) -> None:
        f, owned = _open_source(src)
        try:
            with tarfile.open(fileobj=open_decompressed(f), mode="r|") as tf:
                self._members(tf)
        finally:
            if owned:
                f.close()

    def _members(self, tf: tarfile.TarFile) -> None:
        written: set[str] = set()
        dirs: dict[str, tarfile.TarInfo] = {}
        for m in tf:
            parts = _parts(m.name, m.name)
            if not parts:
                continue  # the root itself: its attributes belong to the caller's dest
            parent = "/".join(_resolve(parts[:-1], self.readlink, m.name))
            base = parts[-1]
            if base.startswith(_WHITEOUT):
                self._whiteout(parent, base, written, m.name)
                continue
            rel = f"{parent}/{base}" if parent else base
            self._mkparents(parent, m.name)
            if m.ischr() or m.isblk() or m.isfifo():
                if self.strip_devices:
                    self.skipped.append(m.name)
                    continue
                if not m.isfifo():
                    raise UnsafeLayerError(f"{m.name!r}: device nodes are never created")
            elif not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
                self.skipped.append(m.name)
                continue
            self._write(tf, m, rel, parent)
            if m.isdir():
                dirs[rel] = m
            written.update(self._prefixes(rel))
        # Directories last, deepest first: writing into them moved their mtimes, and a
        # read-only mode would have blocked the writes.
        for rel in sorted(dirs, key=_sort_key, reverse=True):
            p = self.host(rel)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, dirs[rel].mode & 0o7777)
                os.utime(p, (dirs[rel].mtime, dirs[rel].mtime))

    @staticmethod
    def _prefixes(rel: str) -> list[str]:
        parts = rel.split("/")
        return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]

    def _mkparents(self, parent: str, member: str) -> None:
        cur = ""
        for comp in parent.split("/") if parent else []:
            cur = f"{cur}/{comp}" if cur else comp
            p = self.host(cur)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                os.mkdir(p, 0o755)
                os.chmod(p, 0o755)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafeLayerError(f"{member!r}: parent {cur!r} is not a directory")

    def _remove(self, rel: str, keep_dir: bool = False) -> None:
        p = self.host(rel)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if not keep_dir:
                shutil.rmtree(p)
        else:
            os.unlink(p)

    def _whiteout(self, parent: str, base: str, written: set[str], member: str) -> None:
        if base == _OPAQUE:
            self._mkparents(parent, member)
            self._clear(parent, written)
        elif not base.startswith(_OPAQUE[:8]):  # other .wh..wh.* are aufs bookkeeping
            rel = f"{parent}/{base[len(_WHITEOUT):]}" if parent else base[len(_WHITEOUT):]
            if rel not in written:
                self._remove(rel)

    def _clear(self, rel: str, written: set[str]) -> None:
        for name in os.listdir(self.host(rel)):
            child = f"{rel}/{name}" if rel else name
            if child not in written:
                self._remove(child)
            elif os.path.isdir(self.host(child)) and not os.path.islink(self.host(child)):
                self._clear(child, written)

    def _write(self, tf: tarfile.TarFile, m: tarfile.TarInfo, rel: str, parent: str) -> None:
        p = self.host(rel)
        if m.issym() and _symlink_escapes(parent.split("/") if parent else [], m.linkname):
            raise UnsafeLayerError(
                f"{m.name!r}: symlink target {m.linkname!r} points outside the root")
        if m.islnk():
            self._hardlink(m, p)
            return  # a hardlink shares its target's inode and metadata
        self._remove(rel, keep_dir=m.isdir())
        if m.isdir():
            if not os.path.isdir(p):
                os.mkdir(p, 0o700)
        elif m.issym():
            os.symlink(m.linkname, p)
        elif m.isfifo():
            os.mkfifo(p, 0o600)
        else:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(tf.extractfile(m), out, _CHUNK)
        self._attributes(m, p)

    def _hardlink(self, m: tarfile.TarInfo, p: str) -> None:
        tparts = _parts(m.linkname, m.name)
        tparent = _resolve(tparts[:-1], self.readlink, m.name)
        target = self.host("/".join(tparent + tparts[-1:]))
        if not tparts or not os.path.lexists(target) or \
                os.path.isdir(target) and not os.path.islink(target):
            raise UnsafeLayerError(f"{m.name!r}: hardlink target {m.linkname!r} is not "
                                   "a file already extracted inside the root")
        if os.path.lexists(p) and os.path.samestat(os.lstat(p), os.lstat(target)):
            return
        self._remove(os.path.relpath(p, self.dest))
        os.link(target, p, follow_symlinks=False)

    def _attributes(self, m: tarfile.TarInfo, p: str) -> None:
        if self.root:
            os.lchown(p, m.uid, m.gid)
            for key, value in m.pax_headers.items():
                for prefix in _XATTR_PREFIXES:
                    if key.startswith(prefix):
                        try:
                            os.setxattr(p, key[len(prefix):],
                                        value.encode("utf-8", "surrogateescape"),
                                        follow_symlinks=False)
                        except OSError:
                            pass  # the host filesystem may not support this namespace
        if m.issym():
            os.utime(p, (m.mtime, m.mtime), follow_symlinks=False)
        elif not m.isdir():
            # After chown, which clears setuid/setgid bits.
            os.chmod(p, m.mode & 0o7777)
            os.utime(p, (m.mtime, m.mtime))


def safe_extract(src: Source, dest: Path, *, strip_devices: bool = True) -> list[str]:
    """Extract one layer into `dest`, applying its whiteouts to what is already there.

    Returns the names of members not created: device nodes and fifos (when
    `strip_devices`; otherwise fifos are made and a device node is an error) and entry
    types with no meaning on disk. Raises UnsafeLayerError naming the member.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    ex = _Extractor(dest, strip_devices)
    ex.layer(src)
    return ex.skipped


def apply_layers(layer_paths: Iterable[Source], dest: Path, *,
                 strip_devices: bool = True) -> list[str]:
    """Extract layers bottom to top into `dest`; returns every skipped member."""
    skipped: list[str] = []
    for layer in layer_paths:
        skipped += safe_extract(layer, dest, strip_devices=strip_devices)
    return skipped


# ---- merging and writing without touching the disk ---------------------------------

class _Data:
    """The bytes of one regular file; hardlinked names share one instance."""

    def __init__(self, size: int, open_: Callable[[], BinaryIO]):
        self.size, self.open = size, open_


@dataclass
class _Entry:
    info: tarfile.TarInfo
    data: _Data | None = None


def _clean_info(m: tarfile.TarInfo, mtime: int | None) -> tarfile.TarInfo:
    t = tarfile.TarInfo()
    t.type = tarfile.REGTYPE if m.type in (tarfile.AREGTYPE, tarfile.CONTTYPE) else m.type
    t.mode, t.uid, t.gid = m.mode & 0o7777, m.uid, m.gid
    t.mtime = int(m.mtime if mtime is None else mtime)
    t.linkname, t.devmajor, t.devminor = m.linkname, m.devmajor, m.devminor
    t.pax_headers = {k: v for k, v in m.pax_headers.items() if k.startswith(_XATTR_PREFIXES)}
    return t


def _tar_data(tf: tarfile.TarFile, m: tarfile.TarInfo) -> _Data:
    return _Data(m.size, lambda: tf.extractfile(m))


class _HashWriter:
    def __init__(self, out: BinaryIO):
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        self.out.write(b)
        return len(b)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.out.flush()


def _write_tar(entries: dict[str, _Entry], out: BinaryIO, *, compress: bool) -> LayerInfo:
    stored = _HashWriter(out)
    gz = gzip.GzipFile(filename="", mode="wb", fileobj=stored, compresslevel=6, mtime=0) \
        if compress else None
    raw = _HashWriter(gz or stored)
    first_name: dict[int, str] = {}
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(entries, key=_sort_key):
            e = entries[name]
            info = e.info
            info.name, info.uname, info.gname = name, "", ""
            if e.data is not None and id(e.data) in first_name:
                info.type, info.linkname, info.size = tarfile.LNKTYPE, first_name[id(e.data)], 0
                tf.addfile(info)
            elif e.data is not None:
                first_name[id(e.data)] = name
                info.type, info.linkname, info.size = tarfile.REGTYPE, "", e.data.size
                with e.data.open() as f:
                    tf.addfile(info, f)
            else:
                info.size = 0
                tf.addfile(info)
    if gz is not None:
        gz.close()  # writes the trailer; leaves `out` open
    return LayerInfo(digest=f"sha256:{stored.sha.hexdigest()}", size=stored.size,
                     diff_id=f"sha256:{raw.sha.hexdigest()}",
                     media_type=MEDIA_TYPE_TAR_GZIP if compress else MEDIA_TYPE_TAR)


def normalise(in_fileobj: Source, out_fileobj: BinaryIO, *, mtime: int,
              compress: bool) -> LayerInfo:
    """Rewrite a layer reproducibly (see the module docstring); whiteouts are kept."""
    keep: list = []
    try:
        tf = _open_random(in_fileobj, keep)
        entries: dict[str, _Entry] = {}
        for m in tf:
            name = "/".join(_parts(m.name, m.name))
            if not name:
                continue
            e = _Entry(_clean_info(m, mtime))
            if m.isreg():
                e.data = _tar_data(tf, m)
            elif m.islnk():
                target = entries.get("/".join(_parts(m.linkname, m.name)))
                if target is not None and target.data is not None:
                    e = _Entry(_clean_info(target.info, mtime), target.data)
                else:  # links to a lower layer's file: keep as a link
                    e.info.linkname = "/".join(_parts(m.linkname, m.name))
            entries[name] = e
        return _write_tar(entries, out_fileobj, compress=compress)
    finally:
        for obj in reversed(keep):
            obj.close()


class _Merger:
    """Applies layers to an in-memory index exactly as _Extractor applies them to disk."""

    def __init__(self, implicit_mtime: int):
        self.index: dict[str, _Entry] = {}
        self.implicit_mtime = implicit_mtime

    def readlink(self, rel: str) -> str | None:
        e = self.index.get(rel)
        return e.info.linkname if e is not None and e.info.issym() else None

    def drop(self, rel: str, keep: set[str] | None = None, self_too: bool = True) -> None:
        for k in [k for k in self.index if _under(k, rel) and (self_too or k != rel)]:
            if keep is None or k not in keep:
                del self.index[k]

    def layer(self, tf: tarfile.TarFile, mtime: int | None) -> None:
        written: set[str] = set()
        for m in tf:
            parts = _parts(m.name, m.name)
            if not parts:
                continue
            parent = "/".join(_resolve(parts[:-1], self.readlink, m.name))
            base = parts[-1]
            rel = f"{parent}/{base}" if parent else base
            if base == _OPAQUE:
                self._mkparents(parent, m.name, written)
                self.drop(parent, keep=written, self_too=False)
                continue
            if base.startswith(_WHITEOUT):
                gone = rel[:-len(base)] + base[len(_WHITEOUT):]
                if not base.startswith(_OPAQUE[:8]) and gone not in written:
                    self.drop(gone)
                continue
            self._mkparents(parent, m.name, written)
            e = _Entry(_clean_info(m, mtime))
            old = self.index.get(rel)
            if m.isdir():
                if old is None or not old.info.isdir():
                    self.drop(rel)
            else:
                self.drop(rel)
            if m.isreg():
                e.data = _tar_data(tf, m)
            elif m.issym() and _symlink_escapes(parent.split("/") if parent else [], m.linkname):
                raise UnsafeLayerError(
                    f"{m.name!r}: symlink target {m.linkname!r} points outside the root")
            elif m.islnk():
                tparts = _parts(m.linkname, m.name)
                tparent = _resolve(tparts[:-1], self.readlink, m.name)
                target = self.index.get("/".join(tparent + tparts[-1:]))
                if target is None or target.info.isdir():
                    raise UnsafeLayerError(f"{m.name!r}: hardlink target {m.linkname!r} is not "
                                           "a file already present inside the root")
                e = _Entry(_clean_info(target.info, None), target.data)
            self.index[rel] = e
            written.update(_Extractor._prefixes(rel))

    def _mkparents(self, parent: str, member: str, written: set[str]) -> None:
        cur = ""
        for comp in parent.split("/") if parent else []:
            cur = f"{cur}/{comp}" if cur else comp
            e = self.index.get(cur)
            if e is None:
                info = tarfile.TarInfo()
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, self.implicit_mtime
                self.index[cur] = _Entry(info)
            elif not e.info.isdir():
                raise UnsafeLayerError(f"{member!r}: parent {cur!r} is not a directory")


def flatten(layer_paths: Iterable[Source], out_fileobj: BinaryIO, *, mtime: int | None = None,
            compress: bool = False) -> LayerInfo:
    """Merge layers bottom to top into one sorted tar, without extracting anything.

    Whiteouts are applied (and not written), later layers override earlier ones, device
    nodes stay as headers. `mtime` set on every entry, or None to keep each entry's own
    (directories implied by a path but never listed get 0).
    """
    keep: list = []
    try:
        merger = _Merger(mtime or 0)
        for layer in layer_paths:
            merger.layer(_open_random(layer, keep), mtime)
        return _write_tar(merger.index, out_fileobj, compress=compress)
    finally:
        for obj in reversed(keep):
            obj.close()


def layer_from_dir(src_dir: Path, out_fileobj: BinaryIO, *, prefix: str = "", uid: int = 0,
                   gid: int = 0, mtime: int, compress: bool = True,
                   mode_override: int | None = None) -> LayerInfo:
    """A reproducible layer holding the tree under `src_dir`, placed under `prefix`.

    Ownership comes from `uid`/`gid`, never from the host; `mode_override` (like
    `COPY --chmod`) replaces the mode of files and directories. Neither `src_dir` itself
    nor the directories of `prefix` get entries, so the layer never changes the mode of
    a directory that a lower layer owns (such as /tmp). Symlinks are stored, not followed;
    files hardlinked together stay hardlinked; sockets are left out.
    """
    src_dir = Path(src_dir)
    base = "/".join(_parts(prefix, prefix))
    entries: dict[str, _Entry] = {}
    inodes: dict[tuple[int, int], _Data] = {}
    for top, dirnames, filenames in os.walk(src_dir):
        dirnames.sort()
        for name in dirnames + sorted(filenames):
            path = os.path.join(top, name)
            rel = os.path.relpath(path, src_dir).replace(os.sep, "/")
            st = os.lstat(path)
            info = tarfile.TarInfo()
            info.mode, info.uid, info.gid, info.mtime = stat.S_IMODE(st.st_mode), uid, gid, mtime
            e = _Entry(info)
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
            elif stat.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                e.data = inodes.get(key) or _Data(st.st_size, lambda p=path: open(p, "rb"))
                inodes[key] = e.data
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
                info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            elif stat.S_ISFIFO(st.st_mode):
                info.type = tarfile.FIFOTYPE
            else:
                continue
            if mode_override is not None and (info.isdir() or e.data is not None):
                info.mode = mode_override
            entries[f"{base}/{rel}" if base else rel] = e
    return _write_tar(entries, out_fileobj, compress=compress)
