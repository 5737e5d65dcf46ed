"""Linux initramfs archives: cpio "newc" (magic 070701), written reproducibly.

An initramfs is a cpio archive in the SVR4 "newc" format, plain or compressed, that the
kernel unpacks into its rootfs before running `/init`. Each entry is a 110-byte ASCII
header, the magic `070701` then 13 fields of 8 hex digits: ino, mode (type and
permission bits), uid, gid, nlink, mtime, filesize, devmajor, devminor (the device
holding the file), rdevmajor, rdevminor (a device node's target), namesize (with the
final NUL), check (0). Then the NUL-terminated name, padded with NULs to a multiple of 4
bytes from the header's start, then the data, padded the same way. A symlink's data is
its target; a directory, device node or fifo is a header alone, so writing a device node
needs no privilege. `TRAILER!!!` ends an archive. Names are relative (`etc/passwd`).

Hardlinks share an inode number, and nlink counts the names. Every name but the last
has filesize 0 and the data travels with the last one: GNU cpio writes that and, on
reading, defers the empty names until the data arrives. The kernel links each later
name to the first one it saw and writes the data through whichever name carries it.
Both forget inode numbers at each trailer, so numbers need only be unique per archive.

The kernel accepts several archives one after another, each compressed or not (NUL bytes
between them are skipped; an uncompressed one must start at an offset that is a multiple
of 4). They unpack in order into one tree, later entries replacing earlier ones, so an
initrd can be the concatenation of one segment per root filesystem fragment, each built
and cached on its own. GNU `cpio -i` stops at the first trailer and never sees the rest.

The kernel creates no missing parent directory: an entry whose parent does not exist is
skipped without a word, so the tar conversion here adds parents that a tar left implicit.
Extended attributes (file capabilities, SELinux labels) have no place in newc: lost.

Output is reproducible: inode numbers count up from 1 in write order, one mtime, the
ownership the caller states (never the host's), gzip without name or time, zstd from the
`zstandard` module on one thread with a checksum. Compressed bytes are stable for one
compressor version only, so the actions that compress carry `compressor_id` in their key.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator

from forge.formats.common.compression import open_decompressed, zstd_compressor
from forge.formats.image.layer_read import naming_layer
from forge.formats.linux.errors import CpioError

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
# What LinuxKit strips from every image filesystem (container runtime leftovers).
LINUXKIT_DROP = (".dockerenv", "Dockerfile", "dev/console", "dev/pts", "dev/shm",
                 "etc/hostname")
# LinuxKit's replacements; pass as `replace=` to get its behaviour exactly.
LINUXKIT_REPLACE = {
    "etc/hosts": b"127.0.0.1       localhost\n::1     localhost ip6-localhost ip6-loopback\n"
                 b"fe00::0 ip6-localnet\nff00::0 ip6-mcastprefix\nff02::1 ip6-allnodes\n"
                 b"ff02::2 ip6-allrouters\n",
    "etc/resolv.conf": b"\n# no resolv.conf configured\n",
}
# Image layers lack these mount points, and init cannot mount on what does not exist.
MOUNT_POINTS = ("proc", "sys", "dev", "tmp", "run")
_DIR_MODES = {"tmp": 0o1777}
_CHUNK = 1 << 20
_MAX32 = 0xFFFFFFFF
_PATH_MAX = 4096  # the kernel rejects longer names, NUL included

Opener = Callable[[], BinaryIO]


@dataclass
class _Group:  # a regular file with several names: its data waits for the last one
    ino: int
    nlink: int
    mode: int
    uid: int
    gid: int
    size: int
    opener: Opener
    names: int = 1


def _clean(path: str | os.PathLike, root_ok: bool = True) -> str:
    parts = [p for p in os.fspath(path).split("/") if p not in ("", ".")]
    if ".." in parts or not (parts or root_ok):
        raise CpioError(f"{path!r}: not a path below the root")
    return "/".join(parts)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Writes newc entries to `fileobj` in call order; `close()` adds the trailer.

    A file with hardlinks is declared with `add_file(..., nlink=N)` and followed, in any
    later order, by N-1 `add_hardlink` calls: newc needs the name count in the first
    header and the data after the last name, and a stream cannot be patched afterwards.
    `close()` leaves `fileobj` open.
    """

    def __init__(self, fileobj: BinaryIO, *, mtime: int):
        _check32("mtime", mtime)
        self._f, self._mtime, self._ino, self._closed = fileobj, mtime, 0, False
        self._groups: dict[str, _Group] = {}

    def __enter__(self) -> CpioWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()

    def add_dir(self, path, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        name = _clean(path)
        if name:  # the root exists before any archive is unpacked
            self._entry(name, stat.S_IFDIR | (mode & 0o7777), uid, gid, nlink=2)

    def add_file(self, path, data: bytes | str | os.PathLike, mode: int = 0o644,
                 uid: int = 0, gid: int = 0, *, nlink: int = 1) -> None:
        """`data` is the content, or the path of a host file to copy (read when written)."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            blob = bytes(data)
            size, opener = len(blob), lambda: io.BytesIO(blob)
        else:
            src = os.fspath(data)
            size, opener = os.stat(src).st_size, lambda: open(src, "rb")
        self.add_stream(path, size, opener, mode, uid, gid, nlink=nlink)

    def add_stream(self, path, size: int, opener: Opener, mode: int = 0o644, uid: int = 0,
                   gid: int = 0, *, nlink: int = 1) -> None:
        """A regular file whose `size` bytes `opener()` returns when they are needed."""
        name, mode = _clean(path, False), stat.S_IFREG | (mode & 0o7777)
        if nlink <= 1:
            self._entry(name, mode, uid, gid, size=size, body=opener)
            return
        group = _Group(self._next_ino(), nlink, mode, uid, gid, size, opener)
        self._groups[name] = group
        self._entry(name, mode, uid, gid, nlink=nlink, ino=group.ino)

    def add_hardlink(self, path, target) -> None:
        name, group = _clean(path, False), self._groups.get(_clean(target))
        if group is None:
            raise CpioError(f"hardlink {name!r}: {target!r} was not added with "
                             f"add_file(..., nlink=N) (newc needs the count up front)")
        if group.names >= group.nlink:
            raise CpioError(f"hardlink {name!r}: {target!r} already has the "
                             f"{group.nlink} names declared")
        group.names += 1
        self._groups[name] = group
        last = group.names == group.nlink
        self._entry(name, group.mode, group.uid, group.gid, nlink=group.nlink,
                    ino=group.ino, size=group.size if last else 0,
                    body=group.opener if last else None)

    def add_symlink(self, path, target: str, uid: int = 0, gid: int = 0) -> None:
        data = os.fsencode(target)
        if not data:
            raise CpioError(f"symlink {path!r}: empty target")
        self._entry(_clean(path, False), stat.S_IFLNK | 0o777, uid, gid, size=len(data),
                    body=data)

    def add_device(self, path, kind: str, major: int, minor: int, mode: int = 0o600,
                   uid: int = 0, gid: int = 0) -> None:
        kinds = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}
        if kind not in kinds:
            raise CpioError(f"device {path!r}: kind must be 'c' or 'b', not {kind!r}")
        self._entry(_clean(path, False), kinds[kind] | (mode & 0o7777), uid, gid,
                    rdev=(major, minor))

    def add_fifo(self, path, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        self._entry(_clean(path, False), stat.S_IFIFO | (mode & 0o7777), uid, gid)

    def close(self) -> None:
        if self._closed:
            return
        for name, g in self._groups.items():
            if g.names < g.nlink:
                raise CpioError(f"{name!r} was declared with nlink={g.nlink} but got "
                                 f"{g.names} names: its data was never written")
        self._entry(TRAILER, 0, 0, 0, ino=0, mtime=0)
        self._closed = True

    def _next_ino(self) -> int:
        self._ino += 1
        return self._ino

    def _entry(self, name: str, mode: int, uid: int, gid: int, *, nlink: int = 1,
               ino: int | None = None, size: int = 0, body: bytes | Opener | None = None,
               rdev: tuple[int, int] = (0, 0), mtime: int | None = None) -> None:
        if self._closed:
            raise CpioError("the archive is already closed")
        for what, value in (("uid", uid), ("gid", gid), ("size", size), ("device", rdev[0]),
                            ("device", rdev[1])):
            _check32(what, value)
        encoded = name.encode("utf-8", "surrogateescape") + b"\0"
        if len(encoded) > _PATH_MAX:
            raise CpioError(f"{name[:60]!r}...: longer than the kernel's PATH_MAX")
        fields = (self._next_ino() if ino is None else ino, mode, uid, gid, nlink,
                  self._mtime if mtime is None else mtime, size, 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        head = b"070701" + ("%08X" * 13 % fields).encode("ascii") + encoded
        self._f.write(head + _pad(len(head)))
        if isinstance(body, bytes):
            self._f.write(body)
        elif body is not None and size:
            with body() as src:
                left = size
                while left:
                    chunk = src.read(min(left, _CHUNK))
                    if not chunk:
                        raise CpioError(f"{name!r}: {left} bytes short of the size "
                                         f"recorded (did it change while being read?)")
                    self._f.write(chunk)
                    left -= len(chunk)
        self._f.write(_pad(size))


def _check32(what: str, value: int) -> None:
    if not 0 <= value <= _MAX32:
        raise CpioError(f"{what} {value} does not fit the 32-bit field of a newc header")


# ---- an image filesystem tar as one initramfs segment -------------------------------

def _dropped(name: str, drop: set[str]) -> bool:
    return any(name == d or name.startswith(d + "/") for d in drop)


def write_tree_from_tar(tar_fileobj: BinaryIO, out_fileobj: BinaryIO,
                        *, mtime: int, drop: Iterable[str] = LINUXKIT_DROP,
                        replace: dict[str, bytes] | None = None,
                        extra_dirs: Iterable[str] = MOUNT_POINTS,
                        console: bool = True) -> None:
    """Write a tar's members (plain, gzip or zstd) as one uncompressed newc archive.

    Members keep their order, mode and numeric ownership. `drop` removes paths with
    everything under them; `replace` gives new content to paths the tar has (a symlink
    there becomes a regular file, as in LinuxKit); `extra_dirs` missing from the tar are
    created first (mount points the kernel and init expect); `console` writes
    `dev/console` as character device 5,1 right after `dev`, since the kernel opens it
    before running `/init`. Hardlinks become newc hardlinks; one whose target is dropped,
    replaced or not a regular file is stored as a copy of the target.
    """
    gone = {_clean(d) for d in drop}
    new = {_clean(k): v for k, v in (replace or {}).items()}
    with tempfile.TemporaryFile() as spool, naming_layer(tar_fileobj):
        stream = open_decompressed(tar_fileobj)
        if stream is not tar_fileobj or not stream.seekable():  # data is read out of order
            shutil.copyfileobj(stream, spool, _CHUNK)
            spool.seek(0)
            stream = spool
        with tarfile.open(fileobj=stream, mode="r:") as tf:
            _convert(tf, CpioWriter(out_fileobj, mtime=mtime), gone, new,
                     [_clean(d) for d in extra_dirs], console)


def _convert(tf: tarfile.TarFile, w: CpioWriter, gone: set[str], new: dict[str, bytes],
             extra_dirs: list[str], console: bool) -> None:
    everything = {_clean(m.name): m for m in tf.getmembers()}
    members = [(n, m) for n, m in ((_clean(m.name), m) for m in tf.getmembers())
               if n and not _dropped(n, gone)]
    position = {n: i for i, (n, _) in enumerate(members)}
    leader: dict[str, str] = {}  # link name -> the name whose inode it shares
    nlink: dict[str, int] = {}
    for i, (name, m) in enumerate(members):
        if m.islnk() and name not in new:
            t = _clean(m.linkname)
            t = leader.get(t, t)
            if (t in position and position[t] < i and members[position[t]][1].isreg()
                    and t not in new):
                leader[name] = t
                nlink[t] = nlink.get(t, 1) + 1

    made: set[str] = set()

    def add_dir(name: str, mode: int, uid: int = 0, gid: int = 0) -> None:
        w.add_dir(name, mode, uid, gid)
        made.add(name)
        if console and name == "dev" and "dev/console" not in made:
            w.add_device("dev/console", "c", 5, 1, 0o600)
            made.add("dev/console")

    def parents(name: str) -> None:
        parts = name.split("/")
        for k in range(1, len(parts)):
            p = "/".join(parts[:k])
            if p not in made:
                add_dir(p, 0o755)

    present = {n.rsplit("/", k)[0] for n in position for k in range(n.count("/") + 1)}
    for d in extra_dirs:
        if d and d not in present and d not in made:
            parents(d)
            add_dir(d, _DIR_MODES.get(d, 0o755))

    for name, m in members:
        parents(name)
        made.add(name)
        target = _clean(m.linkname) if m.islnk() else ""
        if name in new or target in new:
            w.add_file(name, new.get(name, new.get(target)), m.mode if m.isreg() else 0o644,
                       m.uid, m.gid)
            continue
        if name in leader:
            w.add_hardlink(name, leader[name])
            continue
        for _ in range(40):  # a link newc cannot express is a copy of what it points at
            if not m.islnk():
                break
            m = everything.get(_clean(m.linkname))
            if m is None:
                raise CpioError(f"hardlink {name!r}: its target is not in the tar")
        perm = m.mode & 0o7777
        if m.isdir():
            add_dir(name, perm, m.uid, m.gid)
        elif m.isreg():
            w.add_stream(name, m.size, lambda m=m: tf.extractfile(m), perm, m.uid, m.gid,
                         nlink=nlink.get(name, 1))
        elif m.issym():
            w.add_symlink(name, m.linkname, m.uid, m.gid)
        elif m.ischr() or m.isblk():
            w.add_device(name, "c" if m.ischr() else "b", m.devmajor, m.devminor, perm,
                         m.uid, m.gid)
        elif m.isfifo():
            w.add_fifo(name, perm, m.uid, m.gid)
        else:
            raise CpioError(f"{m.name!r}: tar member type {m.type!r} has no initramfs form")
    if console and "dev/console" not in made:
        parents("dev/console")
        w.add_device("dev/console", "c", 5, 1, 0o600)
    w.close()


# ---- compression and concatenation --------------------------------------------------

@contextlib.contextmanager
def open_compressed(out_fileobj: BinaryIO, method: str = "gzip",
                    level: int = 6) -> Iterator[BinaryIO]:
    """A writable stream compressing into `out_fileobj`, which stays open afterwards."""
    if method == "none":
        yield out_fileobj
        out_fileobj.flush()
    elif method == "gzip":
        with gzip.GzipFile(fileobj=out_fileobj, mode="wb", compresslevel=level, mtime=0,
                           filename="") as z:
            yield z
    elif method == "zstd":
        with zstd_compressor(level).stream_writer(out_fileobj, closefd=False) as z:
            yield z
    else:
        raise CpioError(f"unknown compression {method!r} (gzip, zstd or none)")


def compress(in_fileobj: BinaryIO, out_fileobj: BinaryIO, method: str = "gzip",
             level: int = 6) -> None:
    with open_compressed(out_fileobj, method, level) as w:
        shutil.copyfileobj(in_fileobj, w, _CHUNK)


def concatenate(segment_paths: Iterable[str | os.PathLike], out_fileobj: BinaryIO) -> None:
    """Join complete segments into one initrd, in the order the kernel will apply them."""
    offset = 0
    for path in segment_paths:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
            if head == MAGIC and offset % 4:  # the kernel reads plain cpio only 4-aligned
                out_fileobj.write(_pad(offset))
                offset += -offset % 4
            out_fileobj.write(head)
            offset += len(head)
            while chunk := f.read(_CHUNK):
                out_fileobj.write(chunk)
                offset += len(chunk)
